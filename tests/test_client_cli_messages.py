"""What the CLI and the plugin say when something is wrong, and what they check before queueing.

Real servers (tests/helpers.py), `python3 -m http.server` as a server that is not remote-lab, a
listening socket that never answers, pytester for the plugin.
"""
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest

from client_support import SIMPLE, cli, client_env, free_port, one_error_line, sessions
from client_support import clean_env, servers, srv  # noqa: F401  (fixtures; clean_env autouse)
from helpers import CLIENT, TOPOLOGIES, wait_until

import remote_lab_client as rlc  # noqa: E402  (after client_support: repo root on sys.path)

pytest_plugins = ["pytester"]


@pytest.fixture
def holder(srv):
    """Another session holds the server: anything that joins the queue would wait."""
    client = rlc.RemoteLabClient(srv.url, progress=False)
    yield client
    client.close()


# --------------------------------------------------------------------------------------------
# messages
# --------------------------------------------------------------------------------------------


def test_a_server_that_is_not_remote_lab_is_named_as_such(tmp_path):
    port = free_port()
    web = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind",
                            "127.0.0.1", "--directory", str(tmp_path)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = "http://127.0.0.1:%d" % port
    try:
        def answers():
            try:
                socket.create_connection(("127.0.0.1", port), 0.5).close()
                return True
            except OSError:
                return False
        wait_until(answers, timeout=15, what="http.server")
        for args, request in ((["health"], "GET /healthz answered 404 text/html"),
                              (["status"], "GET /debug/health answered 404 text/html"),
                              (["run", SIMPLE, "--", "true"], "POST /session answered 501 text/html")):
            proc = cli("--url", url, *args)
            assert proc.returncode == 1
            line = one_error_line(proc)
            assert "%s is not a remote-lab server (%s)" % (url, request) in line, line
            assert "<" not in line  # no HTML
    finally:
        web.kill()
        web.wait()


def test_health_against_a_server_that_never_answers_says_what_it_waits_for(tmp_path):
    with socket.socket() as silent:  # accepts connections (backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        url = "http://127.0.0.1:%d" % silent.getsockname()[1]
        t0 = time.monotonic()
        proc = cli("--url", url, "health", env=client_env(REMOTE_LAB_REQUEST_TIMEOUT=3))
        took = time.monotonic() - t0
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 2, proc.stderr
    assert "waiting for %s to answer GET /healthz (giving up after 3 s)" % url in lines[0]
    assert "no answer within 3 s" in lines[1]
    assert took < 20  # a generous bound: it gave up, it did not hang


def test_looked_in_names_each_directory_once(srv, tmp_path):
    topo = tmp_path / "simple.yml"
    topo.write_bytes(SIMPLE.read_bytes())
    proc = cli("--url", srv.url, "run", "simple.yml", "--extra", "gone.yml", "--", "true",
               cwd=str(tmp_path))  # the working directory is the topology's directory
    assert proc.returncode == 1
    line = one_error_line(proc)
    assert "(looked in %s)" % tmp_path in line, line


@pytest.mark.timeout(120)
def test_fixture_looked_in_names_each_directory_once(pytester, monkeypatch):
    monkeypatch.chdir(pytester.path)
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    shutil.copy(str(CLIENT), str(pytester.path / "remote_lab_client.py"))
    pytester.makeconftest('pytest_plugins = ["remote_lab_client"]\n'
                          'from remote_lab_client import remote_lab_fixture\n'
                          'lab = remote_lab_fixture("nope.yml")\n')
    pytester.makepyfile(test_x="def test_x(lab):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=60)
    out = result.stdout.str()
    assert "topology file not found (looked in %s)" % pytester.path in out, out


def test_run_takes_extra_before_the_topology(srv, tmp_path):
    topo = tmp_path / "simple.yml"
    topo.write_bytes(SIMPLE.read_bytes())
    (tmp_path / "vars.yml").write_text("x: 1\n")
    marker = tmp_path / "ran"
    proc = cli("--url", srv.url, "run", "--extra", tmp_path / "vars.yml", topo, "--",
               sys.executable, "-c", "open(%r, 'w').write('ok')" % str(marker))
    assert proc.returncode == 0, proc.stderr
    assert marker.read_text() == "ok"
    up = [c for c in srv.calls() if c["argv"][:1] == ["up"]][-1]
    assert os.path.exists(os.path.join(up["cwd"], "vars.yml"))


def test_quiet_and_verbose_work_after_the_subcommand(srv):
    for flag in ("-q", "--quiet", "-v", "--verbose"):
        proc = cli("--url", srv.url, "health", flag)
        assert proc.returncode == 0, (flag, proc.stderr)
        assert proc.stdout.startswith(srv.url + ": ok")
    proc = cli("--url", srv.url, "status", "-v")
    assert proc.returncode == 0, proc.stderr
    # -q after the subcommand silences the info lines as before it
    proc = cli("--url", srv.url, "run", SIMPLE, "-q", "--", "true")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


@pytest.mark.timeout(120)
def test_a_lab_fixture_error_is_reported_once_per_test(pytester, monkeypatch):
    monkeypatch.chdir(pytester.path)
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setenv("REMOTE_LAB_URL", "http://127.0.0.1:%d" % closed)
    shutil.copy(str(CLIENT), str(pytester.path / "remote_lab_client.py"))
    shutil.copy(str(SIMPLE), str(pytester.path / "simple.yml"))
    pytester.makeconftest('pytest_plugins = ["remote_lab_client"]\n'
                          'from remote_lab_client import remote_lab_fixture\n'
                          'lab = remote_lab_fixture("simple.yml")\n')
    pytester.makepyfile(test_x="def test_one(lab):\n    pass\n\n\ndef test_two(lab):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rN", timeout=60)
    result.assert_outcomes(errors=2)
    out = result.stdout.str()
    assert "During handling of the above exception" not in out, out
    message = "cannot connect to the remote lab at http://127.0.0.1:%d" % closed
    assert out.count(message) == 2, out  # one per test


# --------------------------------------------------------------------------------------------
# fail before queueing
# --------------------------------------------------------------------------------------------


def test_run_with_a_missing_command_fails_before_queueing(srv, holder, tmp_path):
    env = client_env(REMOTE_LAB_SESSION_TIMEOUT=8)  # the old code waits this long, then fails
    script = tmp_path / "not-executable.sh"
    script.write_text("#!/bin/sh\nexit 0\n")
    for command, code, reason in ((["./nonexistent-cmd"], 127, "command not found"),
                                  (["nonexistent-cmd-on-path", "x"], 127, "command not found"),
                                  ([str(script)], 126, "not executable")):
        proc = cli("--url", srv.url, "run", SIMPLE, "--", *command, env=env, cwd=str(tmp_path))
        assert proc.returncode == code, (command, proc.stderr)
        line = one_error_line(proc)
        assert "cannot run %s: %s" % (command[0], reason) in line, line
    assert [s["session_id"] for s in sessions(srv)] == [holder.session_id]


def test_run_refuses_a_directory_or_a_non_yaml_topology_at_once(srv, holder, tmp_path):
    env = client_env(REMOTE_LAB_SESSION_TIMEOUT=8)
    text = tmp_path / "topo.txt"
    text.write_bytes(SIMPLE.read_bytes())
    for args, reason in (([TOPOLOGIES], "%s is a directory" % TOPOLOGIES),
                         ([text], "%s is not a .yml/.yaml file" % text)):
        for command in (["run"] + args + ["--", "true"], ["acquire"] + args):
            proc = cli("--url", srv.url, *command, env=env)
            assert proc.returncode == 1, (command, proc.stderr)
            assert reason in one_error_line(proc)
    assert [s["session_id"] for s in sessions(srv)] == [holder.session_id]
