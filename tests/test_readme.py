"""The README's commands work as written: the Quick start, the curl session
(under /bin/sh, dash on Debian: no bashisms), the systemd install steps with
`systemd-analyze verify`, and the socket-activation example.

The commands are taken from README.md itself; only the port (a free one instead of 8000) and,
where said, a state dir are substituted, so a README edit that breaks them fails here.
"""
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

from client_support import client_env, free_port, sessions
from helpers import ROOT, SERVER, ServerProcess, http, wait_until
from server_support import TOKENS, Api, write_auth_file

pytestmark = pytest.mark.timeout(120)

README = (ROOT / "README.md").read_text()


def section(title):
    """The README text under the heading ``title``, up to the next heading of its level or above
    (lines inside ``` fences are never headings: shell comments start with '#' too)."""
    found, level, out, fenced = False, 0, [], False
    for line in README.splitlines(keepends=True):
        if line.startswith("```"):
            fenced = not fenced
        heading = None if fenced else re.match(r"(#+) (.*)$", line.rstrip("\n"))
        if found and heading and len(heading.group(1)) <= level:
            break
        if found:
            out.append(line)
        elif heading and heading.group(2) == title:
            found, level = True, len(heading.group(1))
    assert found, "no README section %r" % title
    return "".join(out)


def sh_blocks(text):
    return re.findall(r"^```sh\n(.*?)^```$", text, re.M | re.S)


def commands(block):
    return [line for line in block.splitlines() if line.strip() and not line.startswith("#")]


def has(tool):
    if not shutil.which(tool):
        pytest.skip("%s is not installed" % tool)


@pytest.fixture
def env(tmp_path):
    """No REMOTE_LAB_* and a private HOME: a server started with the defaults locks it."""
    home = tmp_path / "home"
    home.mkdir()
    e = client_env(HOME=str(home))
    del e["PYTHONPATH"]  # the commands run from the repository's directory, like a user's
    return e


@pytest.fixture
def quick_server(tmp_path, env):
    """The Quick start's server command, as written but on a free port."""
    block = sh_blocks(section("Quick start"))[0]
    (line,) = commands(block)
    words = shlex.split(line)
    assert words[:2] == ["python3", "remote_lab.py"] and "--simulate" in words, line
    words[words.index("--port") + 1] = "0"
    srv = ServerProcess(tmp_path / "quick")
    srv.cmd = [sys.executable] + [str(ROOT / w) if w == "remote_lab.py" else w
                                  for w in words[1:]]
    srv.env.update(env)
    srv.start()
    yield srv
    srv.stop()


def test_quick_start_fits_one_screen_and_its_client_command_works_as_pasted(quick_server, env):
    text = section("Quick start")
    assert len(text.strip().splitlines()) <= 30
    first, second = sh_blocks(text)[:2]
    lines = commands(second)
    run_line = lines[0]
    assert "run tests/topologies/" in run_line and (ROOT / "tests" / "topologies").is_dir()
    out = subprocess.run(["/bin/sh", "-c", run_line.replace(":8000", ":%d" % quick_server.port)],
                         cwd=str(ROOT), env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert '"name": "r1"' in out.stdout and '"name": "r2"' in out.stdout, out.stdout
    assert sessions(quick_server) == []
    # the test command: pytest and pytest-timeout (pyproject sets a timeout) in a venv, then
    # that venv's python (installing needs PyPI, so it is checked, not run)
    venv, test = lines[1], lines[2]
    assert re.match(r"python3 -m venv (\S+) && \1/bin/pip install pytest pytest-timeout$", venv)
    assert test.split()[0] == venv.split()[3] + "/bin/python" and "-m pytest" in test
    syntax = subprocess.run(["/bin/sh", "-n", "-c", second], capture_output=True, text=True)
    assert syntax.returncode == 0, syntax.stderr


def test_from_python_example_runs_with_the_files_it_says_how_to_make(quick_server, env,
                                                                     tmp_path):
    text = section("From Python")
    prepare, = sh_blocks(text)
    example = re.search(r"^```python\n(.*?)^```$", text, re.M | re.S).group(1)
    work = tmp_path / "work"  # a copy of what the commands read from the repository
    shutil.copytree(str(ROOT / "tests" / "topologies"), str(work / "tests" / "topologies"))
    out = subprocess.run(["/bin/sh", "-e", "-c", prepare], cwd=str(work), env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    env = dict(env, REMOTE_LAB_URL=quick_server.url, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", example], cwd=str(work), env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["r1", "192.168.121.101", "192.168.121.101",
                                  "r2", "192.168.121.102", "192.168.121.102"], out.stdout
    assert sessions(quick_server) == []


def curl_script(url):
    (block,) = sh_blocks(section("A session with curl"))
    assert "[[" not in block
    lines = block.splitlines()
    assert lines[0].startswith("URL=")
    return "\n".join(["URL=" + url] + lines[1:]) + "\n"


def start_script(text, env):
    return subprocess.Popen(["/bin/sh", "-c", text], cwd=str(ROOT), env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def finish(proc, timeout=60):
    try:
        return proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the heartbeat loop's last `sleep`
        except OSError:
            pass


def heartbeats(srv):
    return Api(srv).metric("remote_lab_http_requests_total", route="post_heartbeat", status=204)


def start_curl_script_behind_a_holder(srv, env):
    """A session holds the lab; the README's curl script starts and queues behind it:
    (the holder's POST /session answer, the script's process)."""
    status, holder, _ = http("POST", srv.url + "/session")
    assert status == 201
    proc = start_script(curl_script(srv.url), env)
    try:
        wait_until(lambda: len(sessions(srv)) == 2, timeout=20, what="the script's session")
    except BaseException:
        finish(proc, 5)
        raise
    return holder, proc


@pytest.fixture
def curl_server(tmp_path):
    has("curl")
    has("jq")
    srv = ServerProcess(tmp_path / "curl", simulate=True)
    srv.start()
    yield srv
    srv.stop()


def test_curl_session_heartbeats_while_waiting_then_gets_the_lab(curl_server, env):
    srv = curl_server
    holder, proc = start_curl_script_behind_a_holder(srv, env)
    try:
        wait_until(lambda: heartbeats(srv) >= 1, timeout=20, what="a heartbeat while waiting")
        assert [s["status"] for s in sessions(srv)] == ["active", "waiting"]
        assert http("DELETE", srv.url + "/session/" + holder["session_id"])[0] == 204
        out, err = finish(proc)
    finally:
        finish(proc, 5) if proc.poll() is None else None
    assert proc.returncode == 0, err
    assert '"name": "r1"' in out and '"reused": false' in out, out
    assert sessions(srv) == []  # ended by the script
    assert "lab released" in srv.log()


def test_curl_session_stops_when_its_session_is_gone(curl_server, env):
    srv = curl_server
    holder, proc = start_curl_script_behind_a_holder(srv, env)
    try:
        (sid,) = [s["session_id"] for s in sessions(srv) if s["status"] == "waiting"]
        assert http("DELETE", srv.url + "/session/" + sid)[0] == 204  # ended by someone else
        t0 = time.monotonic()
        out, err = finish(proc)
    finally:
        finish(proc, 5) if proc.poll() is None else None
    assert proc.returncode == 1, (out, err)
    assert "HTTP 404" in err, err
    assert time.monotonic() - t0 < 45
    assert [s["status"] for s in sessions(srv)] == ["active"]  # the holder only, untouched


def test_curl_session_with_a_token_added_works_against_auth_file(tmp_path, env):
    """README "Security": the curl session with `-H "Authorization: Bearer ..."` added to each
    curl works with --auth-file; unchanged, it stops at the first call (401)."""
    has("curl")
    has("jq")
    srv = ServerProcess(tmp_path / "auth", "--auth-file",
                        write_auth_file(tmp_path / "users"), simulate=True)
    srv.start()
    try:
        assert "Authorization: Bearer $REMOTE_LAB_TOKEN" in section("Security")
        plain = start_script(curl_script(srv.url), env)
        out, err = finish(plain)
        assert plain.returncode == 1, (out, err)
        script = curl_script(srv.url).replace(
            "curl ", 'curl -H "Authorization: Bearer $REMOTE_LAB_TOKEN" ')
        proc = start_script(script, dict(env, REMOTE_LAB_TOKEN=TOKENS["alice"]))
        out, err = finish(proc)
        assert proc.returncode == 0, err
        assert '"name": "r1"' in out and '"reused": false' in out, out
        assert "lab released" in srv.log()
        admin = Api(srv, TOKENS["root"])
        assert admin.health()["session_list"] == []
    finally:
        srv.stop()


def systemd_steps():
    block = sh_blocks(section("Running it as a service (systemd)"))[0]
    steps = [line for line in commands(block) if line.split()[0] in ("install", "systemd-analyze")]
    assert steps[-1].startswith("systemd-analyze verify /etc/systemd/system/remote-lab.service")
    return steps


def test_systemd_steps_followed_literally_make_verify_pass(tmp_path):
    has("systemd-analyze")
    has("unshare")
    steps = systemd_steps()
    # in a private mount namespace: tmpfs over the directories the steps write, nothing of the
    # real system is touched; the system's own units (sysinit.target, ...) stay visible
    script = "\n".join(["set -e", "mount --make-rprivate /"]
                       + ["mount -t tmpfs none %s" % d for d in
                          ("/usr/local/bin", "/etc/systemd/system", "/etc/default")]
                       + steps)
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip("no private mount namespace here: %s" % probe.stderr.strip())
    proc = subprocess.run(["unshare", "-m", "/bin/sh", "-c", script], cwd=str(ROOT),
                          capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "remote-lab" not in proc.stdout + proc.stderr  # no warning about our units


def test_socket_activation_example_has_its_own_port_and_state_dir(tmp_path, env):
    has("systemd-socket-activate")
    (line,) = [line for line in commands(section("Running it as a service (systemd)"))
               if line.startswith("systemd-socket-activate")]
    words = shlex.split(line)
    state_dir = words[words.index("--state-dir") + 1]
    assert state_dir not in ("/var/lib/remote-lab", "~/.remote-lab")
    address = words[words.index("-l") + 1]
    assert address != "127.0.0.1:8000"  # the service's port
    # a server started by hand with the defaults (state dir ~/.remote-lab) runs already
    default = ServerProcess(tmp_path / "default")
    default.cmd = [sys.executable, str(SERVER), "--simulate", "--port", "0"]
    default.env.update(env)
    default.start()
    port = free_port()
    words[words.index("-l") + 1] = "127.0.0.1:%d" % port
    words[words.index("--state-dir") + 1] = str(tmp_path / "try")  # this test's own copy
    words[words.index("/usr/local/bin/remote-lab")] = str(SERVER)
    log = open(tmp_path / "socket.log", "wb")
    proc = subprocess.Popen(words, env=env, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: http_ok("http://127.0.0.1:%d/healthz" % port), timeout=30,
                   what="the socket-activated server")
        assert http("GET", default.url + "/healthz")[0] == 204
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(20)
        log.close()
        default.stop()


def http_ok(url):
    try:
        return http("GET", url, timeout=5)[0] == 204
    except OSError:
        return False
