"""The command line of remote_lab_client (python3 remote_lab_client.py ...), real server."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from client_support import (MAPPING, SIMPLE, active_session, cli, client_env, health,
                            one_error_line, sessions, wait_until)
from client_support import clean_env, servers, srv  # noqa: F401  (fixtures; clean_env autouse)
from helpers import CLIENT, kill_if_running

import remote_lab_client as rlc  # noqa: E402  (after client_support: repo root on sys.path)

CHILD = r'''
import json, os, signal, sys, time
marker = sys.argv[1]
devices = json.load(open(os.environ["REMOTE_LAB_DEVICES"]))

def on_int(signum, frame):
    open(marker + ".sigint", "w").write("got SIGINT")
    sys.exit(5)

signal.signal(signal.SIGINT, on_int)
with open(marker + ".tmp", "w") as f:
    json.dump({"devices": devices, "session": os.environ["REMOTE_LAB_SESSION"],
               "devices_file": os.environ["REMOTE_LAB_DEVICES"]}, f)
os.rename(marker + ".tmp", marker)
time.sleep(float(sys.argv[2]))
sys.exit(int(sys.argv[3]))
'''


def spawn(*args, env=None):
    return subprocess.Popen([sys.executable, str(CLIENT)] + [str(a) for a in args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env or client_env())


# ------------------------------------------------------------------------------------------
# health, status, errors
# ------------------------------------------------------------------------------------------


def test_health_ok_and_url_from_the_environment(srv):
    proc = cli("--url", srv.url, "health")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(srv.url + ": ok (remote-lab ")
    proc = cli("health", env=client_env(REMOTE_LAB_URL=srv.url))
    assert proc.returncode == 0 and "ok" in proc.stdout


def test_url_from_a_dotenv_file_in_the_working_directory(srv, tmp_path):
    (tmp_path / ".env").write_text("REMOTE_LAB_URL=%s\n" % srv.url)
    proc = cli("health", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr


def test_commands_read_the_dotenv_file_without_changing_the_environment(srv, tmp_path, capsys):
    (tmp_path / ".env").write_text("REMOTE_LAB_URL=%s\n" % srv.url)
    before = dict(os.environ)
    assert rlc.main(["health"]) == 0  # in this process
    assert capsys.readouterr().out.startswith(srv.url + ": ok")
    assert dict(os.environ) == before


def test_errors_are_one_line_without_traceback(tmp_path):
    proc = cli("--url", "http://127.0.0.1:9", "health")
    assert proc.returncode == 1
    assert "cannot connect to the remote lab at http://127.0.0.1:9" in one_error_line(proc)

    # no URL: local mode tries to start a server; one that cannot start (no netlab here, made
    # sure of whatever this machine has) is one line naming what to set
    proc = cli("status", cwd=str(tmp_path),
               env=client_env(REMOTE_LAB_SERVER_ARGS="--netlab /nonexistent/netlab"))
    assert proc.returncode == 1
    line = one_error_line(proc)
    assert "set REMOTE_LAB_URL" in line and "netlab not found" in line

    proc = cli("frobnicate")
    assert proc.returncode == 2
    assert "invalid choice" in one_error_line(proc)

    proc = cli("--url", "http://127.0.0.1:9", "run", SIMPLE)
    assert proc.returncode == 2
    assert "run needs a command after --" in one_error_line(proc)


def test_status_table_and_json(srv):
    with rlc.RemoteLabClient(srv.url, progress=False) as c:
        c.acquire(SIMPLE)
        proc = cli("--url", srv.url, "status")
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
        assert "queue    1 session" in out and c.session_id in out and "active" in out
        assert "running  simple.yml  ref count 1" in out
        assert "\n  r1 " in out and "\n  r2 " in out and "192.168.121.10" in out

        proc = cli("status", "--json", "--url", srv.url)
        assert proc.returncode == 0, proc.stderr
        data = json.loads(proc.stdout)
        assert data["url"] == srv.url and data["active_session"] == c.session_id
        assert data["lab"]["topology"] == "simple.yml" and data["lab"]["ref_count"] == 1
        assert [d["name"] for d in data["lab"]["devices"]] == ["r1", "r2"]
        assert [s["session_id"] for s in data["sessions"]] == [c.session_id]


def test_netlab_failure_is_reported_in_one_line(srv):
    srv.switch("up_fail")
    proc = cli("--url", srv.url, "run", SIMPLE, "--", sys.executable, "-c", "pass")
    assert proc.returncode == 1
    line = one_error_line(proc)
    assert "netlab failed to start simple.yml" in line and "HTTP 502" in line
    assert sessions(srv) == []


# ------------------------------------------------------------------------------------------
# run
# ------------------------------------------------------------------------------------------


def test_run_exits_with_the_commands_code_and_cleans_up(srv, tmp_path):
    marker = tmp_path / "child.json"
    (tmp_path / "nodes").mkdir()
    topo = tmp_path / "simple.yml"
    topo.write_bytes(SIMPLE.read_bytes())
    (tmp_path / "nodes" / "r1.yml").write_text("x: 1\n")
    proc = cli("--url", srv.url, "run", topo, "--extra", tmp_path / "nodes" / "r1.yml",
               "--", sys.executable, "-c", CHILD, marker, "0", "7")
    assert proc.returncode == 7, proc.stderr
    seen = json.loads(marker.read_text())
    assert [d["name"] for d in seen["devices"]] == ["r1", "r2"]
    assert seen["devices"][0]["raw"]["ansible_host"]
    assert not os.path.exists(seen["devices_file"])  # the temp file is removed
    assert seen["session"] and sessions(srv) == []  # the session was ended
    assert "lab released" in srv.log()
    up = [c for c in srv.calls() if c["argv"][:1] == ["up"]][-1]
    assert open(os.path.join(up["cwd"], "nodes", "r1.yml")).read() == "x: 1\n"


def test_run_reports_a_command_killed_by_a_signal_and_a_missing_command(srv):
    proc = cli("--url", srv.url, "run", SIMPLE, "--", "sh", "-c", "kill -TERM $$")
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr
    proc = cli("--url", srv.url, "run", SIMPLE, "--", "/nonexistent/command")
    assert proc.returncode == 127
    assert "cannot run /nonexistent/command" in one_error_line(proc)
    assert sessions(srv) == []


@pytest.mark.timeout(60)
def test_run_forwards_sigint_then_releases_and_ends_the_session(srv, tmp_path):
    marker = tmp_path / "child.json"
    p = spawn("--url", srv.url, "run", SIMPLE, "--", sys.executable, "-c", CHILD, marker,
              "50", "0")
    try:
        wait_until(marker.exists, timeout=20, what="the command to start")
        session = json.loads(marker.read_text())["session"]
        assert active_session(srv) == session and health(srv)["lab"]["ref_count"] == 1
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=20)
    finally:
        kill_if_running(p)
    assert p.returncode == 5, err  # the command's own exit code after its SIGINT handler
    assert (tmp_path / "child.json.sigint").read_text() == "got SIGINT"
    assert "Traceback" not in err
    assert sessions(srv) == []
    assert "lab released" in srv.log()


@pytest.mark.timeout(60)
def test_sigint_while_waiting_in_the_queue_ends_the_session(srv, tmp_path):
    holder = rlc.RemoteLabClient(srv.url, progress=False)
    p = spawn("--url", srv.url, "run", MAPPING, "--", sys.executable, "-c", "pass")
    try:
        wait_until(lambda: len(sessions(srv)) == 2, timeout=20, what="the CLI to queue")
        time.sleep(0.3)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=20)
    finally:
        kill_if_running(p)
        holder.close()
    assert p.returncode == 130, err
    assert err.strip().splitlines()[-1] == "remote-lab-client: interrupted"
    assert "Traceback" not in err
    assert sessions(srv) == []


def test_a_missing_file_fails_at_once_without_waiting_in_the_queue(srv, tmp_path):
    holder = rlc.RemoteLabClient(srv.url, progress=False)  # the CLI would have to wait
    try:
        env = client_env(REMOTE_LAB_SESSION_TIMEOUT=5)
        t0 = time.monotonic()
        for args, error in ((["run", tmp_path / "nope.yml", "--", "true"], "topology file not found"),
                            (["acquire", SIMPLE, "--extra", tmp_path / "gone.yml"],
                             "extra file not found")):
            proc = cli("--url", srv.url, *args, env=env)
            assert proc.returncode == 1
            assert error in one_error_line(proc)
        assert time.monotonic() - t0 < 4
        assert [s["session_id"] for s in sessions(srv)] == [holder.session_id]
    finally:
        holder.close()


# ------------------------------------------------------------------------------------------
# acquire
# ------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_acquire_prints_devices_and_holds_the_lab_until_ctrl_c(srv):
    p = spawn("--url", srv.url, "acquire", MAPPING, "--no-reuse")
    try:
        lines = []
        while not lines or lines[-1] != "]":
            line = p.stdout.readline()
            assert line, "acquire ended early: %s" % p.stderr.read()
            lines.append(line.rstrip("\n"))
        devices = json.loads("\n".join(lines))
        assert [d["name"] for d in devices] == ["spine", "leaf1", "leaf2"]
        time.sleep(1)
        assert len(sessions(srv)) == 1 and health(srv)["lab"]["ref_count"] == 1
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=20)
    finally:
        kill_if_running(p)
    assert p.returncode == 0, err
    assert "releasing the lab" in err and "Traceback" not in err
    assert sessions(srv) == []
    assert "lab released" in srv.log()


@pytest.mark.timeout(60)
def test_acquire_ends_cleanly_on_sigterm(srv):
    p = spawn("--url", srv.url, "acquire", SIMPLE)
    try:
        assert p.stdout.readline().strip() == "["
        wait_until(lambda: health(srv)["lab"]["ref_count"] == 1, what="the lab")
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=20)
    finally:
        kill_if_running(p)
    assert p.returncode == 0, err
    assert sessions(srv) == []


@pytest.mark.timeout(60)
def test_on_a_tty_waiting_shows_one_updating_status_line(srv):
    import pty
    import select

    holder = rlc.RemoteLabClient(srv.url, progress=False)
    master, slave = pty.openpty()
    p = subprocess.Popen([sys.executable, str(CLIENT), "--url", srv.url, "run", SIMPLE, "--",
                          sys.executable, "-c", "pass"], stdin=subprocess.DEVNULL,
                         stdout=subprocess.PIPE, stderr=slave, env=client_env())
    os.close(slave)
    seen = b""
    try:
        deadline = time.monotonic() + 20
        while seen.count(b"position 1") < 3 and time.monotonic() < deadline:
            if select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 65536)
        holder.close()
        assert p.wait(20) == 0
        while select.select([master], [], [], 0.2)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        kill_if_running(p)
        holder.close()
        os.close(master)
    text = seen.decode()
    # the same line is rewritten (carriage return + erase line), once a second
    assert text.count("\r\x1b[Kremote lab: waiting in the queue at position 1, ") >= 3
    assert "(0 s)" in text and "(2 s)" in text
    assert re.search(r"position 1, (wait unknown|any moment now|about \d+ \w+) \(0 s\)",
                     text), text  # the estimated wait (eta_text)
    waiting, _, after = text.rpartition("\r\x1b[K")  # the status line is erased at the end
    assert "\n" not in waiting  # no new lines while waiting
    assert after.startswith("remote-lab-client: remote lab session ") and "is active after" in after


@pytest.mark.timeout(60)
def test_a_second_ctrl_c_stops_the_wait_for_a_server_that_went_away(tmp_path):
    """Ending a session waits for a restarting server (within REMOTE_LAB_RECONNECT_TIMEOUT, 60 s
    by default); a second Ctrl-C meanwhile ends that wait, not the cleanup of a server that
    answers."""
    from helpers import ServerProcess
    server = ServerProcess(tmp_path).start()
    p = spawn("--url", server.url, "acquire", SIMPLE)
    try:
        assert p.stdout.readline().strip() == "["
        wait_until(lambda: health(server)["lab"]["ref_count"] == 1, what="the lab")
        server.stop(signal.SIGKILL)  # gone, and nobody restarts it
        p.send_signal(signal.SIGINT)  # release: the client waits for the server to come back
        time.sleep(1.5)
        assert p.poll() is None, "it did not wait for the server"
        t0 = time.monotonic()
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=20)
    finally:
        kill_if_running(p)
    assert time.monotonic() - t0 < 10, "the second Ctrl-C did not end the wait"
    assert "Traceback" not in err, err
