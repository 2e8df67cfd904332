"""Launcher: the status-file protocol (server side) and launch/reconnect/stop locally and over SSH.

Everything is real: server processes, the bootstrap program piped to python3, and a private sshd
on loopback for the SSH part (tests/sshd_support.py).
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

import client_support
from helpers import (CLIENT, ROOT, SERVER, TOPOLOGIES, http, kill_if_running, pid_alive, read_json,
                     stop_launched, wait_until)
from server_support import Api, start_server  # noqa: F401  (fixture)
from sshd_support import sshd  # noqa: F401  (fixture)

sys.path.insert(0, str(ROOT))
import remote_lab_client as rlc  # noqa: E402


# --------------------------------------------------------------------------------------------
# The status-file protocol, server side
# --------------------------------------------------------------------------------------------


def start_with_status_file(tmp_path, *args):
    status = tmp_path / "status.json"
    log = open(tmp_path / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, str(SERVER), "--simulate", "--state-dir",
                             str(tmp_path / "state"), "--status-file", str(status)] + list(args),
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            start_new_session=True)
    return proc, status


def launcher_record(pid):
    # what remote-http-launcher writes after starting the service
    return {"workdir": "/somewhere", "log": "/somewhere/x.log", "command": "remote_lab.py ...",
            "uid": os.getuid(), "pid": pid, "status": "starting", "parameters": {"a": 1},
            "meta": {"who": "test"}}


def test_status_file_written_after_launcher_keeps_fields(tmp_path):
    proc, status = start_with_status_file(tmp_path, "--port-range", "0", "0")
    try:
        time.sleep(0.5)  # the server binds first and waits for the launcher's file
        assert not status.exists()
        record = launcher_record(proc.pid)
        tmp = tmp_path / "status.json.tmp"
        tmp.write_text(json.dumps(record))
        os.replace(tmp, status)
        data = wait_until(lambda: (read_json(status) or {}).get("status") == "running" and read_json(status),
                        what="status running")
        for key, value in record.items():
            if key != "status":
                assert data[key] == value, key  # every field kept
        port = data["port"]
        assert isinstance(port, int) and port > 0
        status_code, body, _ = http("GET", "http://127.0.0.1:%d/" % port)
        assert 200 <= status_code < 300  # the launcher's handshake
        assert not list(tmp_path.glob(".status.json.*.tmp"))  # temp files renamed away
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert read_json(status)["status"] == "stopped"
    finally:
        kill_if_running(proc)


def test_status_file_not_marked_stopped_when_it_names_another_pid(tmp_path):
    proc, status = start_with_status_file(tmp_path, "--port", "0")
    try:
        status.write_text(json.dumps(launcher_record(proc.pid)))
        wait_until(lambda: (read_json(status) or {}).get("status") == "running", what="running")
        other = dict(read_json(status), pid=proc.pid + 100000, status="running")
        status.write_text(json.dumps(other))  # a successor took the file over
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
        assert read_json(status) == other
    finally:
        kill_if_running(proc)


def test_status_file_failed_when_port_range_exhausted(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        status = tmp_path / "status.json"
        status.write_text(json.dumps(launcher_record(0)))
        proc, _ = start_with_status_file(tmp_path, "--host", "127.0.0.1", "--port-range",
                                         str(port), str(port))
        assert proc.wait(30) == 1
    data = read_json(status)
    assert data["status"] == "failed"
    assert str(port) in data["error"]
    assert data["uid"] == os.getuid()  # fields kept on failure too


def test_status_file_failed_when_netlab_missing(tmp_path):
    status = tmp_path / "status.json"
    status.write_text(json.dumps(launcher_record(0)))
    proc = subprocess.run([sys.executable, str(SERVER), "--netlab", "/nonexistent/netlab",
                           "--state-dir", str(tmp_path / "state"), "--status-file", str(status)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    data = read_json(status)
    assert data["status"] == "failed"
    assert "netlab not found" in data["error"]


# --------------------------------------------------------------------------------------------
# The lab-host program: ordinary functions of the client file, shipped as one section
# --------------------------------------------------------------------------------------------


def host_program(**params):
    return rlc._host_program(dict({"action": "status", "key": "remote-lab-test", "workdir": "~/w",
                                   "timeout": 10}, **params))


def test_the_lab_host_program_uses_only_what_it_defines_imports_or_builtins():
    import builtins
    import symtable

    program = host_program()
    top = symtable.symtable(program, "<lab host>", "exec")
    known = {s.get_name() for s in top.get_symbols() if s.is_assigned() or s.is_imported()}
    known |= set(dir(builtins))
    undefined = set()
    tables = list(top.get_children())
    while tables:
        table = tables.pop()
        tables += table.get_children()
        undefined |= {s.get_name() for s in table.get_symbols()
                      if s.is_referenced() and s.is_global() and s.get_name() not in known}
    assert undefined == set()  # a NameError on the lab host otherwise


def test_the_client_runs_the_same_functions_it_ships():
    import ast
    import inspect

    shipped = {node.name for node in ast.parse(host_program()).body
               if isinstance(node, ast.FunctionDef)}
    # the jobs both sides do are written once, in the shipped section
    assert {"_healthz", "_root_json", "_terminate", "_read_json_file", "_write_json_file",
            "_same_process", "_proc_start_time", "_launcher_dir"} <= shipped
    program = host_program()
    for name in shipped:  # the very functions the client module calls, not copies
        assert inspect.getsource(getattr(rlc, name)) in program, name
    for twin in ("_BOOTSTRAP", "_bootstrap_helpers", "_write_private_json"):
        assert not hasattr(rlc, twin), twin


def run_host_program(python, home, **params):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["HOME"] = str(home)
    out = subprocess.run([python, "-S", "-"], input=host_program(**params), env=env,
                         cwd=str(home), capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_the_lab_host_program_runs_alone_under_python_3_8(tmp_path):
    from client_support import find_python38

    pythons = [sys.executable] + ([find_python38()] if find_python38() else [])
    for python in pythons:  # (3.8 where the machine has one)
        answer = run_host_program(python, tmp_path, action="status")
        assert answer["ok"] is True and answer["running"] is False, python
        assert answer["status_file"] == str(
            tmp_path / ".remote-http-launcher" / "server" / "remote-lab-test.json")
        answer = run_host_program(python, tmp_path, action="stop")
        assert answer["ok"] is True and answer["stopped"] is False, python


def test_terminate_stops_the_whole_process_group(tmp_path):
    # a server (or an ssh tunnel with a ProxyCommand) may have children: none stays behind
    child_pid = tmp_path / "child.pid"
    proc = subprocess.Popen(["sh", "-c", "sleep 60 & echo $! > %s; wait" % child_pid],
                            start_new_session=True)
    try:
        wait_until(lambda: child_pid.exists() and child_pid.read_text().strip(), what="child")
        child = int(child_pid.read_text())
        assert rlc._terminate(proc.pid, rlc._proc_start_time(proc.pid), grace=10) is True
        proc.wait(10)
        wait_until(lambda: not pid_alive(child), what="the child to be stopped too")
        assert rlc._terminate(proc.pid, None) is False  # not running any more
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)


def test_write_json_file_is_atomic_and_private_when_asked(tmp_path):
    path = tmp_path / "record.json"
    rlc._write_json_file(str(path), {"a": 1}, mode=0o600)
    assert read_json(path) == {"a": 1} and oct(path.stat().st_mode & 0o777) == "0o600"
    rlc._write_json_file(str(path), {"b": 2})
    assert read_json(path) == {"b": 2} and rlc._read_json_file(str(path)) == {"b": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]  # no temp file left


# --------------------------------------------------------------------------------------------
# Local launch
# --------------------------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private HOME: the launcher's state files and the servers' workdirs land in tmp."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("HOME", str(h))
    monkeypatch.delenv("REMOTE_LAB_URL", raising=False)
    monkeypatch.setenv("REMOTE_LAB_SERVER_ARGS", "--simulate")
    yield h
    stop_launched(h)  # never leave a server or a tunnel behind


def cli(*args, env=None, timeout=90):
    """The CLI in this process's environment (the private HOME and the fixtures' settings)."""
    return client_support.cli(*args, env=env or os.environ.copy(), timeout=timeout)


def test_ps_prints_column_headers(home):
    folder = home / ".remote-http-launcher" / "server"
    folder.mkdir(parents=True)
    # no pid: the home fixture's teardown kills the process group of any live pid it finds
    (folder / "remote-lab-old.json").write_text(json.dumps({"status": "stopped", "port": 8701}))
    out = cli("ps")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split() == ["SIDE", "STATE", "WHERE", "URL", "KEY"]
    assert lines[1].split() == ["server", "down", "local", "http://127.0.0.1:8701",
                                "remote-lab-old"]
    # the headers stand over their columns
    assert [lines[0].index(h) for h in ("WHERE", "URL", "KEY")] == \
        [lines[1].index(v) for v in ("local", "http://", "remote-lab-old")]


def test_local_launch_reconnect_stop(home):
    out = cli("logs")  # nothing launched yet: a one-line error, not a JSON line on stdout
    assert out.returncode == 1 and out.stdout == ""
    assert "no server log" in out.stderr and len(out.stderr.splitlines()) == 1
    first = rlc.launch()
    assert first.reused is False
    assert http("GET", first.url + "/healthz")[0] == 204
    server_files = list((home / ".remote-http-launcher" / "server").glob("remote-lab-*.json"))
    assert len(server_files) == 1
    state = read_json(server_files[0])
    assert state["status"] == "running" and state["pid"] == first.server_pid
    client_file = home / ".remote-http-launcher" / "client" / (first.key + ".json")
    assert oct(client_file.stat().st_mode & 0o777) == "0o600"
    assert all(c.isalnum() or c in "._-" for c in first.key)

    again = rlc.launch()
    assert again.reused is True and again.url == first.url and again.server_pid == first.server_pid

    # a second process reconnects too (the CLI), and `ps` shows the server
    out = cli("launch")
    assert out.returncode == 0, out.stderr
    assert first.url in out.stdout
    ps = cli("ps")
    assert ps.returncode == 0 and first.key in ps.stdout
    logs = cli("logs")
    assert logs.returncode == 0, logs.stderr
    assert "Listening on %s" % first.url in logs.stdout

    assert rlc.Launcher().stop() is True
    wait_until(lambda: not pid_alive(first.server_pid), what="server exit")
    assert read_json(server_files[0])["status"] == "stopped"
    assert not client_file.exists()


def test_stop_is_for_good_it_tears_down_the_lab_the_server_left(home):
    """A stopped server leaves its lab running for its next start; `stop` runs the server's
    --cleanup on its state dir after it, so nothing is left on the lab host."""
    launched = rlc.launch()
    api = Api(types.SimpleNamespace(url=launched.url))
    assert api.post_lab(api.new_session())[0] == 200
    labs = [p for p in home.rglob("labs") if p.is_dir()]
    assert len(labs) == 1 and list(labs[0].iterdir()), "the lab's dir"
    out = cli("stop")
    assert out.returncode == 0, out.stderr
    assert "stopped the server" in out.stdout
    assert "1 lab dir(s) torn down" in out.stdout, out.stdout
    assert list(labs[0].iterdir()) == []
    registry = [json.loads(p.read_text()) for p in home.rglob("simulated-netlab/status.json")]
    assert registry == [{}]


def test_two_concurrent_launches_make_one_server(home):
    procs = [subprocess.Popen([sys.executable, str(CLIENT), "launch", "--json"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(3)]
    answers = []
    for p in procs:
        out, err = p.communicate(timeout=90)
        assert p.returncode == 0, err
        answers.append(json.loads(out.strip().splitlines()[-1]))
    assert len({a["url"] for a in answers}) == 1
    assert len({a["server_pid"] for a in answers}) == 1
    assert sorted(a["reused"] for a in answers) == [False, True, True]
    rlc.Launcher().stop()


def test_stale_state_relaunches(home):
    first = rlc.launch()
    rlc.Launcher().stop()
    wait_until(lambda: not pid_alive(first.server_pid), what="server exit")
    server_file = next((home / ".remote-http-launcher" / "server").glob("remote-lab-*.json"))

    # dead pid marked running
    dead = subprocess.Popen(["true"])
    dead.wait()
    data = dict(read_json(server_file), status="running", pid=dead.pid)
    server_file.write_text(json.dumps(data))
    second = rlc.launch()
    assert second.reused is False and second.server_pid != dead.pid
    rlc.Launcher().stop()
    wait_until(lambda: not pid_alive(second.server_pid), what="server exit")

    # a live pid that is some other process (pid reused: start time differs)
    data = dict(read_json(server_file), status="running", pid=os.getpid(), start_time="1")
    server_file.write_text(json.dumps(data))
    third = rlc.launch()
    assert third.reused is False and third.server_pid != os.getpid()
    assert pid_alive(os.getpid())  # we were not signalled
    rlc.Launcher().stop()


def test_stale_client_file_is_not_trusted_on_healthz_alone(home):
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    class Healthz(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    first = rlc.launch()
    os.killpg(first.server_pid, signal.SIGKILL)  # died without a word
    wait_until(lambda: not pid_alive(first.server_pid), what="server death")
    # something else now answers /healthz on the recorded port
    def bind():
        try:
            return HTTPServer(("127.0.0.1", first.server_port), Healthz)
        except OSError:  # the killed server's threads may still hold it for a moment
            return None

    other = wait_until(bind, what="the port to be free")
    threading.Thread(target=other.serve_forever, daemon=True).start()
    try:
        assert [r["alive"] for r in rlc.running_servers() if r["side"] == "client"] == [False]
        second = rlc.launch()
        assert second.reused is False and second.server_pid != first.server_pid
        assert second.url != first.url
        assert http("GET", second.url + "/debug/health")[0] == 200  # a real remote-lab server
    finally:
        other.shutdown()
        other.server_close()
    rlc.Launcher().stop()


def test_local_mode_client_when_url_unset(home):
    with rlc.RemoteLabClient() as client:
        devices = client.acquire(str(TOPOLOGIES / "simple.yml"))
        assert sorted(d.name for d in devices) == ["r1", "r2"]
        client.release()
    rlc.Launcher().stop()


def test_launcher_commands_read_the_dotenv_file(home, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    (tmp_path / ".env").write_text("REMOTE_LAB_URL=ssh://root@127.0.0.1:%d\n" % closed_port)
    for command in ("stop", "launch"):  # they act on the ssh host named there, not locally
        out = subprocess.run([sys.executable, str(CLIENT), command], capture_output=True,
                             text=True, timeout=60, cwd=str(tmp_path))
        assert out.returncode == 1, out
        assert "ssh to root@127.0.0.1:%d failed" % closed_port in out.stderr


def test_shell_noise_on_stderr_does_not_hide_the_launch_answer(home, tmp_path):
    # like a lab host whose shell start-up files complain on every ssh command
    python = tmp_path / "noisy-python"
    python.write_text("#!/bin/sh\necho 'bash: pyenv: command not found' >&2\n"
                      "echo 'bash: /etc/x: No such file or directory' >&2\nexec %s \"$@\"\n"
                      % sys.executable)
    python.chmod(0o755)
    started = rlc.launch(python=str(python))
    assert started.reused is False and http("GET", started.url + "/healthz")[0] == 204
    assert rlc.Launcher().stop() is True


def test_a_live_client_does_not_bring_a_stopped_server_back(home):
    def live_servers():
        return [r["pid"] for r in rlc.running_servers() if r["side"] == "server" and r["alive"]]

    client = rlc.RemoteLabClient(progress=False, heartbeat_interval=0.2, retries=1)
    assert len(live_servers()) == 1
    assert rlc.Launcher().stop() is True
    time.sleep(1.0)  # heartbeats fail meanwhile
    assert live_servers() == []
    with pytest.raises(rlc.ConnectionFailed):
        client.devices()
    client.close()
    assert live_servers() == []


def test_launch_failure_reports_server_error(home, monkeypatch):
    monkeypatch.setenv("REMOTE_LAB_SERVER_ARGS", "--netlab /nonexistent/netlab")
    with pytest.raises(rlc.LaunchError) as err:
        rlc.launch(timeout=30)
    assert "netlab not found" in str(err.value)
    out = cli("launch", "--server-args=--netlab /nonexistent/netlab")
    assert out.returncode != 0
    assert "netlab not found" in out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    # a crash at start-up: the exit code and the last lines of the server log
    with pytest.raises(rlc.LaunchError) as err:
        rlc.launch(server_args=["--no-such-flag"], timeout=30)
    assert "exited with code 2 during start-up" in str(err.value)
    assert "server log: " in str(err.value) and "unrecognized arguments: --no-such-flag" in str(err.value)


def test_launch_deadline_stops_a_server_that_never_comes_up(home, tmp_path):
    python = tmp_path / "slow-python"  # the bootstrap runs; the "server" just hangs
    python.write_text('#!/bin/sh\n[ "$1" = - ] || exec sleep 60\nexec %s "$@"\n' % sys.executable)
    python.chmod(0o755)
    t0 = time.monotonic()
    with pytest.raises(rlc.LaunchError, match="did not start within 1 s"):
        rlc.launch(python=str(python), timeout=1)
    assert time.monotonic() - t0 < 10
    state = read_json(next((home / ".remote-http-launcher" / "server").glob("remote-lab-*.json")))
    wait_until(lambda: not pid_alive(state["pid"]), what="the hung server to be stopped")


def test_ssh_target_cannot_smuggle_ssh_options(home, tmp_path):
    # a host or user starting with '-' would be an ssh option (-oProxyCommand=... runs a command)
    for bad in ("-oProxyCommand=touch${IFS}pwned", "-oProxyCommand=touch${IFS}pwned@host"):
        with pytest.raises(rlc.LaunchError, match="must not start with '-'"):
            rlc.SSHTarget.parse(bad)
    env = dict(os.environ, REMOTE_LAB_URL="ssh://-oProxyCommand=touch${IFS}pwned")
    for args in (["health"], ["launch", "--ssh=-oProxyCommand=touch${IFS}pwned@labhost"]):
        out = subprocess.run([sys.executable, str(CLIENT)] + args, capture_output=True,
                             text=True, timeout=60, env=env, cwd=str(tmp_path))
        assert out.returncode == 1
        assert "must not start with '-'" in out.stderr and len(out.stderr.splitlines()) == 1
    assert not (tmp_path / "pwned").exists()


# --------------------------------------------------------------------------------------------
# Over SSH, through a private sshd
# --------------------------------------------------------------------------------------------


@pytest.fixture
def ssh_env(home, sshd, monkeypatch):  # noqa: F811
    monkeypatch.setenv("REMOTE_LAB_SSH_ARGS", sshd.ssh_args)
    yield sshd
    stop_launched(sshd.remote_home)  # anything left on the "remote" side


@pytest.mark.timeout(180)
def test_ssh_launch_tunnel_reconnect_and_stop(ssh_env, home, tmp_path):
    sshd = ssh_env
    installed = sshd.remote_home / ".remote-lab" / "remote_lab.py"
    installed.parent.mkdir(exist_ok=True)
    installed.write_text("# an older remote_lab.py\n")  # replaced: it differs from ours
    first = rlc.launch(sshd.target)
    assert first.reused is False and first.tunnel_pid
    assert first.url.startswith("http://127.0.0.1:")
    assert http("GET", first.url + "/healthz")[0] == 204
    remote_files = list((sshd.remote_home / ".remote-http-launcher" / "server").glob("remote-lab-*.json"))
    assert len(remote_files) == 1
    remote_state = read_json(remote_files[0])
    assert remote_state["status"] == "running" and remote_state["host"] == "127.0.0.1"
    assert installed.read_bytes() == SERVER.read_bytes()  # shipped and verified
    tunnel_log = home / ".remote-http-launcher" / "client" / (first.key + ".tunnel.log")
    assert oct(tunnel_log.stat().st_mode & 0o777) == "0o600"

    # pytest in another process uses it through REMOTE_LAB_URL=ssh://... (reconnect, no new server)
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_lab.py").write_text(
        "from remote_lab_client import remote_lab_fixture\n"
        "lab = remote_lab_fixture(%r)\n"
        "def test_devices(lab):\n"
        "    assert sorted(d.name for d in lab) == ['r1', 'r2']\n" % str(TOPOLOGIES / "simple.yml"))
    env = dict(os.environ, REMOTE_LAB_URL="ssh://%s" % sshd.target,
               PYTHONPATH=str(ROOT), HOME=str(home))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "remote_lab_client", str(suite)],
                         capture_output=True, text=True, timeout=120, env=env, cwd=str(suite))
    assert run.returncode == 0, run.stdout + run.stderr
    assert "1 passed" in run.stdout
    assert len(list((sshd.remote_home / ".remote-http-launcher" / "server").glob("remote-lab-*.json"))) == 1
    assert read_json(remote_files[0])["pid"] == remote_state["pid"]

    # a second launch reconnects without starting anything
    again = rlc.launch(sshd.target)
    assert again.reused is True and again.server_pid == remote_state["pid"]
    assert again.url == first.url

    # a killed tunnel is re-created, the server stays
    os.kill(first.tunnel_pid, signal.SIGKILL)
    wait_until(lambda: not pid_alive(first.tunnel_pid), what="tunnel death")
    third = rlc.launch(sshd.target)
    assert third.tunnel_pid != first.tunnel_pid
    assert third.server_pid == remote_state["pid"]
    assert http("GET", third.url + "/healthz")[0] == 204

    # stop leaves nothing behind
    out = cli("stop", "--ssh", sshd.target)
    assert out.returncode == 0, out.stderr
    wait_until(lambda: not pid_alive(remote_state["pid"]), what="remote server exit")
    wait_until(lambda: not pid_alive(third.tunnel_pid), what="tunnel exit")
    assert read_json(remote_files[0])["status"] == "stopped"


def ssh_tunnels(needle):
    """Pids of live ssh tunnel processes (-N -L) whose command line contains ``needle``."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = Path("/proc", pid, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"-N" in argv and b"-L" in argv and needle in b" ".join(argv) and pid_alive(int(pid)):
            found.append(int(pid))
    return found


@pytest.mark.timeout(120)
def test_interrupted_or_late_tunnel_start_leaves_no_ssh_behind(ssh_env, monkeypatch):
    sshd = ssh_env
    tried = []

    def interrupted(url, timeout=2.0):  # Ctrl-C while waiting for the tunnel to answer
        tried.append(url)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(rlc, "_healthz", interrupted)
        with pytest.raises(KeyboardInterrupt):
            rlc.launch(sshd.target)
    assert len(tried) == 1
    assert ssh_tunnels(b"127.0.0.1:%d:" % int(tried[0].rsplit(":", 1)[1])) == []

    # one deadline for the whole launch: a slow bootstrap leaves the tunnel no time
    real = rlc._run_bootstrap

    def slow(*args, **kw):
        answer = real(*args, **kw)  # reconnects to the server started above
        time.sleep(2)
        return answer

    with monkeypatch.context() as patch:
        patch.setattr(rlc, "_run_bootstrap", slow)
        with pytest.raises(rlc.LaunchError, match="did not come up within 2 s"):
            rlc.launch(sshd.target, timeout=2)
    assert ssh_tunnels(b"-p %d " % sshd.port) == []
    assert rlc.Launcher(sshd.target).stop() is True  # the server itself was started


@pytest.mark.timeout(120)
def test_ssh_client_survives_killed_tunnel(ssh_env, home, monkeypatch):
    sshd = ssh_env
    monkeypatch.setenv("REMOTE_LAB_URL", "ssh://%s" % sshd.target)
    with rlc.RemoteLabClient() as client:
        devices = client.acquire(str(TOPOLOGIES / "simple.yml"))
        assert len(devices) == 2
        conn = read_json(next((home / ".remote-http-launcher" / "client").glob("remote-lab-*.json")))
        os.kill(conn["tunnel_pid"], signal.SIGKILL)
        wait_until(lambda: not pid_alive(conn["tunnel_pid"]), what="tunnel death")
        # the same session goes on through a re-created tunnel
        assert [d.name for d in client.devices()] == [d.name for d in devices]
        client.release()
    rlc.Launcher(sshd.target).stop()


@pytest.mark.timeout(120)
def test_ssh_errors_are_one_clear_line(ssh_env, home):
    sshd = ssh_env
    # unreachable: nothing listens on that port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    out = cli("launch", "--ssh", "root@127.0.0.1:%d" % closed_port)
    assert out.returncode != 0
    assert "ssh to root@127.0.0.1:%d failed" % closed_port in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    out = cli("logs", "--ssh", "root@127.0.0.1:%d" % closed_port)
    assert out.returncode == 1 and "ssh to root@127.0.0.1:%d failed" % closed_port in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
    # no such python on the host
    out = cli("launch", "--ssh", sshd.target, "--python", "python3-nonexistent")
    assert out.returncode != 0 and "python3-nonexistent" in out.stderr and "not found" in out.stderr
    # netlab missing on the host: the server's own message comes back
    out = cli("launch", "--ssh", sshd.target, "--server-args=")
    assert out.returncode != 0 and "netlab not found" in out.stderr, out.stderr
    # the same through --ssh-arg alone (repeatable, shell words): without them ssh cannot log in
    env = {k: v for k, v in os.environ.items() if k != "REMOTE_LAB_SSH_ARGS"}
    key, options = sshd.ssh_args.split(" ", 2)[1], sshd.ssh_args.split(" ", 2)[2]
    out = cli("launch", "--ssh", sshd.target, "--server-args=", env=env)
    assert out.returncode == 1 and "ssh to %s failed" % sshd.target in out.stderr, out.stderr
    out = cli("launch", "--ssh", sshd.target, "--server-args=", "--ssh-arg=-i %s" % key,
              "--ssh-arg", options, env=env)
    assert out.returncode == 1 and "netlab not found" in out.stderr, out.stderr


@pytest.mark.timeout(120)
def test_a_pool_mixes_ssh_and_http_hosts(ssh_env, home, start_server):  # noqa: F811
    """REMOTE_LAB_URL=http://held,ssh://free: the ssh:// host is launched like a single one
    (real sshd), the session gets it, and the held host's queue keeps only its holder."""
    sshd = ssh_env
    _, held = start_server()
    holder = held.new_session()
    pool = "%s,ssh://%s" % (held.url, sshd.target)
    with rlc.RemoteLabClient(pool, heartbeat_interval=0, session_timeout=60) as c:
        assert c.host == "ssh://%s" % sshd.target and c.base_url.startswith("http://127.0.0.1:")
        assert sorted(d.name for d in c.acquire(str(TOPOLOGIES / "simple.yml"))) == ["r1", "r2"]
        assert [s["session_id"] for s in held.req("GET", "/sessions")[1]["sessions"]] == [holder]
    assert held.delete_session(holder) == 204
