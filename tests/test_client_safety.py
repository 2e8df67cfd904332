"""Safety of remote_lab_client against hostile input, lost sessions and servers that stall,
trickle, lie or restart.

Real server processes where our server is involved; a raw-socket peer (RawServer) for answers
our server never gives (slow, huge, malformed), and a TCP gate (Gate) on a fixed port that can
refuse connections for a while, like a server being restarted by systemd.
"""
import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from client_support import (SIMPLE, accept_each, active_session, cli, client, client_env,
                            free_port, health, http, lab_idle, loopback_listener,
                            one_error_line, pump, sessions, wait_until)
from client_support import clean_env, servers, srv  # noqa: F401  (fixtures; clean_env autouse)
from helpers import CLIENT, in_thread, kill_if_running, made_by, parse_head, pid_alive

import remote_lab_client as rlc  # noqa: E402  (after client_support: repo root on sys.path)

pytest_plugins = ["pytester"]


# ------------------------------------------------------------------------------------------
# peers that are not our server
# ------------------------------------------------------------------------------------------


class RawServer:
    """An HTTP/1.1 peer on 127.0.0.1 that answers with whatever ``answer(method, path, conn)``
    returns (bytes, sent as they are), or sends itself through ``conn`` (then returns None)."""

    def __init__(self, answer):
        self.answer = answer
        self.requests = []
        self.closed = False
        self.conns = []
        self.listener = loopback_listener(backlog=16)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=accept_each, args=(self.listener, self._serve,
                                                   lambda: self.closed), daemon=True).start()

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def _serve(self, conn):
        self.conns.append(conn)
        data = b""
        try:
            while not self.closed:
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    data += chunk
                head, data = data.split(b"\r\n\r\n", 1)
                request_line, headers = parse_head(head)
                method, path, _ = request_line.split(" ", 2)
                length = int(headers.get("content-length", "0"))
                while len(data) < length:
                    data += conn.recv(65536)
                data = data[length:]
                self.requests.append((method, path))
                out = self.answer(method, path, conn)
                if out is not None:
                    conn.sendall(out)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self):
        self.closed = True
        self.listener.close()
        for c in self.conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()


def json_answer(obj, status="200 OK"):
    body = json.dumps(obj).encode() if not isinstance(obj, bytes) else obj
    return (b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (status.encode(), len(body), body))


NO_CONTENT = b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n"


@pytest.fixture
def raw():
    """Factory: raw(answer) -> a RawServer; all closed at the end."""
    yield from made_by(RawServer, RawServer.close)


class Gate:
    """A TCP forwarder on a fixed port: ``down()`` resets every connection and refuses new ones
    (nothing listens), ``up()`` listens on the same port again."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.port = free_port()
        self.socks = []
        self.lock = threading.Lock()
        self.listener = None
        self.up()

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def up(self):
        self.listener = loopback_listener(self.port)
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def down(self):
        try:  # (shutdown: a close() alone leaves the socket listening while accept() blocks)
            self.listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.listener.close()
        with self.lock:
            socks, self.socks = self.socks, []
        for s in socks:
            try:  # like a server process that died (shutdown wakes the pump's recv)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self):
        try:
            self.down()
        except OSError:
            pass

    def _accept(self, listener):
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                conn.close()
                continue
            with self.lock:
                self.socks += [conn, upstream]
            for src, dst in ((conn, upstream), (upstream, conn)):
                threading.Thread(target=pump, args=(src, dst), daemon=True).start()


@pytest.fixture
def gates():
    """Factory: gates(target_port) -> a Gate; all down at the end."""
    yield from made_by(Gate, Gate.close)


# ------------------------------------------------------------------------------------------
# ssh option injection
# ------------------------------------------------------------------------------------------


def test_a_bracketed_ssh_host_cannot_smuggle_an_ssh_option(tmp_path):
    marker = tmp_path / "pwned"
    proc = cli("launch", "--ssh", "[-oProxyCommand=touch %s]" % marker, "--timeout", "5",
               timeout=30)
    assert not marker.exists(), "ssh ran the ProxyCommand"
    assert proc.returncode == 1, proc.stderr
    assert "must not start with '-'" in one_error_line(proc, besides_waiting=True)
    with pytest.raises(rlc.LaunchError, match="must not start with '-'"):
        rlc.SSHTarget.parse("[-oProxyCommand=touch %s]" % marker)
    with pytest.raises(rlc.LaunchError, match="must not start with '-'"):
        rlc.SSHTarget.parse("[-x]@host")


@pytest.mark.skipif(not shutil.which("ssh"), reason="needs the ssh client")
def test_every_ssh_command_line_ends_the_options_before_the_destination(tmp_path):
    # a target that got past parse() still cannot be an option: "--" comes before it
    marker = tmp_path / "pwned"
    target = rlc.SSHTarget("-oProxyCommand=touch %s" % marker, extra_args=("-p", "9"))
    argv = target.ssh_argv(5)
    assert argv[-2:] == ["--", target.host]
    subprocess.run(argv + ["true"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=30)
    assert not marker.exists(), "ssh ran the ProxyCommand"


@pytest.mark.timeout(120)
def test_the_tunnel_command_line_ends_the_options_before_the_destination(tmp_path, monkeypatch):
    from sshd_support import PrivateSSHD, sshd_available
    if not sshd_available():
        pytest.skip("no sshd/ssh/ssh-keygen available, or not root")
    sshd = PrivateSSHD(tmp_path / "sshd").start()
    try:
        monkeypatch.setenv("REMOTE_LAB_SSH_ARGS", sshd.ssh_args)
        launched = rlc.launch(sshd.target, server_args=["--simulate"], timeout=60)
        try:
            with open("/proc/%d/cmdline" % launched.tunnel_pid, "rb") as f:
                argv = [a.decode() for a in f.read().split(b"\0") if a]
            assert argv[-2:] == ["--", "%s@127.0.0.1" % sshd.user], argv
            assert "-L" in argv[:-2]
        finally:
            rlc.Launcher(sshd.target).stop()
    finally:
        sshd.stop()


def test_an_ssh_url_that_cannot_be_parsed_is_a_config_error(tmp_path):
    marker = tmp_path / "pwned"
    for url in ("ssh://[::1", "ssh://me@host:99999999/work", "[::1"):
        with pytest.raises(rlc.ConfigError, match="URL"):
            rlc.RemoteLabClient(url, progress=False)
    # (Python < 3.11 parses the brackets: then SSHTarget refuses the '-')
    with pytest.raises((rlc.ConfigError, rlc.LaunchError)):
        rlc.RemoteLabClient("ssh://[-oProxyCommand=touch %s]" % marker, progress=False)
    proc = cli("health", env=client_env(REMOTE_LAB_URL="ssh://[-oProxyCommand=touch %s]"
                                        % marker))
    assert proc.returncode == 1
    assert "bad ssh URL" in one_error_line(proc, besides_waiting=True)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------
# .env: our variables only
# ------------------------------------------------------------------------------------------


def test_dotenv_sets_only_remote_lab_variables(tmp_path, monkeypatch, srv):
    for key in ("LD_PRELOAD_TEST_ONLY", "NOT_OURS"):
        monkeypatch.delenv(key, raising=False)
    (tmp_path / ".env").write_text("NOT_OURS=1\nLD_PRELOAD_TEST_ONLY=/tmp/evil.so\n"
                                   "REMOTE_LAB_URL=%s\nREMOTE_LAB_MARK=yes\n" % srv.url)
    try:
        applied = rlc.load_dotenv()
        assert applied == {"REMOTE_LAB_URL": srv.url, "REMOTE_LAB_MARK": "yes"}
        assert "NOT_OURS" not in os.environ and "LD_PRELOAD_TEST_ONLY" not in os.environ
    finally:
        for key in ("REMOTE_LAB_URL", "REMOTE_LAB_MARK", "NOT_OURS", "LD_PRELOAD_TEST_ONLY"):
            os.environ.pop(key, None)
    # the command run by `run` does not get them either
    out = tmp_path / "seen.json"
    proc = cli("run", SIMPLE, "--", sys.executable, "-c",
               "import json, os, sys; json.dump([os.environ.get('NOT_OURS'), "
               "os.environ.get('REMOTE_LAB_MARK')], open(sys.argv[1], 'w'))", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(out.read_text()) == [None, "yes"]


# ------------------------------------------------------------------------------------------
# a lost session stops run, acquire and the running pytest test
# ------------------------------------------------------------------------------------------

RUN_CHILD = r'''
import json, os, signal, subprocess, sys, time
out = sys.argv[1]
grandchild = subprocess.Popen([sys.executable, "-c",
    "import signal, sys, time\n"
    "def term(*a):\n"
    "    open(sys.argv[1], 'w').write('SIGTERM')\n"
    "    sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, term)\n"
    "open(sys.argv[1] + '.ready', 'w').close()\n"
    "time.sleep(120)\n", out + ".grandchild"])
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # the command itself needs the SIGKILL
while not os.path.exists(out + ".grandchild.ready"):  # its handler is in place
    time.sleep(0.01)
with open(out + ".tmp", "w") as f:
    json.dump({"child": os.getpid(), "grandchild": grandchild.pid,
               "session": os.environ["REMOTE_LAB_SESSION"]}, f)
os.rename(out + ".tmp", out)
time.sleep(120)
'''


@pytest.mark.timeout(90)
def test_run_stops_the_command_when_the_session_ends_under_it(srv, tmp_path):
    marker = tmp_path / "pids.json"
    env = client_env(REMOTE_LAB_HEARTBEAT_INTERVAL="0.3")
    p = subprocess.Popen([sys.executable, str(CLIENT), "-q", "--url", srv.url, "run", SIMPLE,
                          "--", sys.executable, "-c", RUN_CHILD, marker],
                         stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_until(marker.exists, timeout=20, what="the command to start")
        pids = json.loads(marker.read_text())
        # someone ends our session (an admin, or the server expired it)
        assert http("DELETE", srv.url + "/session/" + pids["session"])[0] == 204
        out, err = p.communicate(timeout=40)
    finally:
        kill_if_running(p)
    assert p.returncode == rlc.EXIT_LAB_LOST == 75, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert "session" in lines[0] and "stopped" in lines[0], lines[0]
    wait_until(lambda: not pid_alive(pids["child"]) and not pid_alive(pids["grandchild"]),
               timeout=10, what="the command and its child to be gone")
    assert (tmp_path / "pids.json.grandchild").read_text() == "SIGTERM"  # TERM came first


@pytest.mark.timeout(60)
def test_acquire_exits_when_the_session_ends_under_it(srv):
    env = client_env(REMOTE_LAB_HEARTBEAT_INTERVAL="0.3")
    p = subprocess.Popen([sys.executable, str(CLIENT), "-q", "--url", srv.url, "acquire",
                          SIMPLE], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_until(lambda: health(srv)["lab"]["ref_count"] == 1, timeout=20,
                   what="the lab to be acquired")
        sid = active_session(srv)
        assert http("DELETE", srv.url + "/session/" + sid)[0] == 204
        out, err = p.communicate(timeout=30)
    finally:
        kill_if_running(p)
    assert p.returncode == 75, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "no longer knows session %s" % sid in lines[0], err


PLUGIN_CONFTEST = '''
pytest_plugins = ["remote_lab_client"]
from remote_lab_client import remote_lab_fixture
lab = remote_lab_fixture("simple.yml")
'''

PLUGIN_TESTS = '''
import os, time, urllib.request

def test_a_lab_vanishes(lab, remote_lab_client):
    url = os.environ["REMOTE_LAB_URL"] + "/session/" + remote_lab_client.session_id
    urllib.request.urlopen(urllib.request.Request(url, method="DELETE"), timeout=10)
    time.sleep(60)  # the plugin must not let this go on without the lab

def test_b_later(lab):
    pass

def test_c_no_lab():
    pass
'''


@pytest.mark.timeout(120)
def test_the_running_pytest_test_fails_and_later_lab_tests_error_at_once(pytester, srv,
                                                                        monkeypatch):
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("REMOTE_LAB_URL", srv.url)
    monkeypatch.setenv("REMOTE_LAB_HEARTBEAT_INTERVAL", "0.3")
    shutil.copy(str(CLIENT), str(pytester.path / "remote_lab_client.py"))
    shutil.copy(str(SIMPLE), str(pytester.path / "simple.yml"))
    pytester.makeconftest(PLUGIN_CONFTEST)
    pytester.makepyfile(test_vanish=PLUGIN_TESTS)
    started = time.monotonic()
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=110)
    took = time.monotonic() - started
    result.assert_outcomes(passed=1, failed=1, errors=1)
    text = result.stdout.str()
    assert "FAILED test_vanish.py::test_a_lab_vanishes - remote_lab_client.SessionLost" in text
    assert "ERROR test_vanish.py::test_b_later" in text
    assert text.count("no longer knows session") >= 2
    assert took < 50, "the test slept on without the lab"


# ------------------------------------------------------------------------------------------
# whole-call deadlines
# ------------------------------------------------------------------------------------------


def trickle(body=b"", status=b"204 No Content", every=2.0):
    """An answer sent one byte every ``every`` seconds (each read of the client gets a byte)."""
    data = b"HTTP/1.1 %s\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body)

    def answer(method, path, conn):
        for i in range(len(data)):
            conn.sendall(data[i:i + 1])
            time.sleep(every)
    return answer


@pytest.mark.timeout(90)
def test_the_request_timeout_bounds_a_whole_trickling_answer(raw):
    slow = raw(trickle())
    started = time.monotonic()
    proc = cli("--url", slow.url, "health", env=client_env(REMOTE_LAB_REQUEST_TIMEOUT="3"),
               timeout=60)
    assert time.monotonic() - started < 20
    assert proc.returncode == 1
    assert "no answer within 3 s" in one_error_line(proc, besides_waiting=True)
    t, result = in_thread(lambda: client(slow.url, request_timeout=3))
    t.join(25)
    assert not t.is_alive(), "RemoteLabClient() kept reading a trickling answer"
    assert isinstance(result.get("error"), rlc.RequestTimeout), result


# ------------------------------------------------------------------------------------------
# response size cap
# ------------------------------------------------------------------------------------------


def test_an_answer_over_the_size_cap_is_refused_before_its_body_is_read(raw):
    def huge(method, path, conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 8000000000\r\n\r\n")
        conn.sendall(b"[" * 65536)
        time.sleep(30)
    peer = raw(huge)
    c = client(peer.url, start_session=False, request_timeout=20)
    started = time.monotonic()
    with pytest.raises(rlc.ProtocolError, match="too large") as info:
        c.health()
    assert time.monotonic() - started < 10
    assert isinstance(info.value, rlc.RemoteLabError) and "ProtocolError" in rlc.__all__
    assert rlc.MAX_RESPONSE_BYTES == 64 * 1024 * 1024


def test_a_chunked_answer_over_the_size_cap_is_refused(raw, monkeypatch):
    monkeypatch.setattr(rlc, "MAX_RESPONSE_BYTES", 1024 * 1024)

    def chunked(method, path, conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(40):
            conn.sendall(b"10000\r\n" + b"x" * 0x10000 + b"\r\n")
        conn.sendall(b"0\r\n\r\n")
    peer = raw(chunked)
    with pytest.raises(rlc.ProtocolError, match="too large"):
        client(peer.url, start_session=False).health()


def test_an_answer_that_closes_the_connection_is_read_to_its_end(raw):
    # http.client closes the connection as soon as it sees "Connection: close", and reads the
    # body afterwards: the socket must stay open until then
    body = json.dumps({"service": "remote-lab", "version": "x"}).encode()

    def close_after_a_late_body(method, path, conn):
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
        time.sleep(0.2)
        conn.sendall(body)
        conn.close()
    peer = raw(close_after_a_late_body)
    assert client(peer.url, start_session=False, retries=0).server_info()["version"] == "x"


# ------------------------------------------------------------------------------------------
# bad answers are RemoteLabErrors; the last long-poll ends with session_timeout
# ------------------------------------------------------------------------------------------


def fake_session_server(session_answer, poll_answer=None, lab_answer=None):
    def answer(method, path, conn):
        if method == "POST" and path == "/session":
            return json_answer(session_answer, "201 Created")
        if method == "GET" and path.startswith("/session/"):
            return json_answer(poll_answer)
        if method == "POST" and path == "/lab":
            return json_answer(lab_answer)
        return NO_CONTENT
    return answer


@pytest.mark.parametrize("position", ["x", b"1e400", None, [1], True])
def test_a_bad_position_is_a_protocol_error(raw, position):
    body = (b'{"session_id": "s1", "position": %s}' % position if isinstance(position, bytes)
            else {"session_id": "s1", "position": position})
    peer = raw(fake_session_server(body))
    with pytest.raises(rlc.ProtocolError, match="position"):
        client(peer.url, heartbeat_interval=0)
    assert ("DELETE", "/session/s1") in peer.requests  # the session is not left behind


def test_bad_poll_and_lab_answers_are_protocol_errors(raw):
    peer = raw(fake_session_server({"session_id": "s1", "position": 1},
                                   poll_answer=b'{"status": "waiting", "position": 1e400}'))
    with pytest.raises(rlc.ProtocolError, match="position"):
        client(peer.url, heartbeat_interval=0)
    peer = raw(fake_session_server({"session_id": "s2", "position": 0},
                                   lab_answer={"reused": False, "devices": 5}))
    with client(peer.url, heartbeat_interval=0) as c:
        with pytest.raises(rlc.ProtocolError, match="devices"):
            c.acquire(SIMPLE)
    peer = raw(fake_session_server({"session_id": "s3", "position": 0},
                                   lab_answer=b"[" * 100000 + b"]" * 100000))
    with client(peer.url, heartbeat_interval=0) as c:
        with pytest.raises(rlc.ProtocolError):
            c.acquire(SIMPLE)


@pytest.mark.timeout(60)
def test_the_last_long_poll_ends_with_the_session_timeout(raw):
    def answer(method, path, conn):
        if method == "POST":
            return json_answer({"session_id": "s1", "position": 1}, "201 Created")
        if method == "GET":  # a server that holds the poll well past the wait asked for
            time.sleep(15)
            return json_answer({"status": "waiting", "position": 1})
        return NO_CONTENT
    peer = raw(answer)
    started = time.monotonic()
    with pytest.raises(rlc.QueueTimeout):
        client(peer.url, session_timeout=4, request_timeout=5, heartbeat_interval=0)
    took = time.monotonic() - started
    assert took < 7.5, "waited %.1f s for a session_timeout of 4 s" % took


# ------------------------------------------------------------------------------------------
# riding through a server restart
# ------------------------------------------------------------------------------------------


def test_the_reconnect_timeout_comes_from_the_environment(monkeypatch, srv):
    with client(srv.url, heartbeat_interval=0) as c:
        assert c.reconnect_timeout == 60
    monkeypatch.setenv("REMOTE_LAB_RECONNECT_TIMEOUT", "7.5")
    with client(srv.url, heartbeat_interval=0) as c:
        assert c.reconnect_timeout == 7.5
    monkeypatch.setenv("REMOTE_LAB_RECONNECT_TIMEOUT", "soon")
    with pytest.raises(rlc.ConfigError, match="REMOTE_LAB_RECONNECT_TIMEOUT"):
        client(srv.url)


@pytest.mark.timeout(90)
def test_refused_connections_are_ridden_through_waiting_and_holding_the_lab(srv, gates):
    gate = gates(srv.port)
    holder = client(gate.url, heartbeat_interval=0.3)
    holder.acquire(SIMPLE)
    t_wait, waiter = in_thread(lambda: client(gate.url, heartbeat_interval=0.3))
    wait_until(lambda: len(sessions(srv)) == 2, timeout=20, what="the second session")
    gate.down()  # refused and reset, for longer than the old ~4 s of retries
    t_call, call = in_thread(holder.devices)
    time.sleep(7)
    assert t_call.is_alive() and t_wait.is_alive(), (call, waiter)
    gate.up()
    t_call.join(30)
    assert [d.name for d in call.get("value", [])] == ["r1", "r2"], call
    assert holder.lost is None and active_session(srv) == holder.session_id
    holder.close()
    t_wait.join(30)
    assert "value" in waiter, waiter
    assert active_session(srv) == waiter["value"].session_id
    waiter["value"].close()


def client_lines(caplog, level=logging.INFO):
    """The client's log lines at ``level`` and above: [(level name, message)]."""
    return [(r.levelname, r.getMessage()) for r in caplog.records
            if r.name == "remote_lab_client" and r.levelno >= level]


@pytest.mark.timeout(90)
def test_an_outage_is_one_line_when_it_starts_and_one_when_it_ends(srv, gates, caplog):
    caplog.set_level(logging.INFO, logger="remote_lab_client")
    gate = gates(srv.port)
    holder = client(gate.url, heartbeat_interval=0.3)
    holder.acquire(SIMPLE)
    caplog.clear()
    gate.down()
    t, call = in_thread(holder.status)
    time.sleep(3)  # the call and the heartbeats retry meanwhile
    gate.up()
    t.join(30)
    assert call.get("value", {}).get("ref_count") == 1, call
    wait_until(lambda: len(client_lines(caplog)) >= 2, timeout=10, what="the outage's end")
    time.sleep(1)  # heartbeats after it add nothing
    lines = client_lines(caplog)
    assert [level for level, _ in lines] == ["INFO", "INFO"], lines
    assert "retrying for up to 1 min" in lines[0][1] and "answers again" in lines[1][1], lines
    assert holder.lost is None
    holder.close()


@pytest.mark.timeout(90)
def test_close_during_an_outage_waits_for_the_server_and_ends_the_session(srv, gates, caplog):
    caplog.set_level(logging.INFO, logger="remote_lab_client")
    gate = gates(srv.port)
    holder = client(gate.url, heartbeat_interval=0.3)
    holder.acquire(SIMPLE)
    gate.down()
    t, result = in_thread(holder.close)
    time.sleep(3)
    assert t.is_alive(), result  # waiting for the server, not given up with a warning
    gate.up()
    t.join(30)
    assert "error" not in result, result
    assert sessions(srv) == []
    wait_until(lambda: lab_idle(srv), timeout=10, what="the lab released")
    assert [level for level, _ in client_lines(caplog)] == ["INFO", "INFO"], caplog.text


@pytest.mark.timeout(90)
def test_a_stalled_server_is_waited_for_and_the_session_goes_on(srv):
    c = client(srv.url, heartbeat_interval=0.3, request_timeout=2)
    c.acquire(SIMPLE)
    os.kill(srv.proc.pid, signal.SIGSTOP)
    try:
        # stopped for sure before the request (a thread in the middle of a disk sync stops
        # only once it is done, and on a busy machine that can take a while)
        stat = "/proc/%d/stat" % srv.proc.pid
        wait_until(lambda: open(stat).read().rsplit(")", 1)[1].split()[0] == "T", 10,
                   what="the server stopped")
        t, call = in_thread(c.status)
        time.sleep(5)  # longer than the request timeout
        assert t.is_alive(), call
    finally:
        os.kill(srv.proc.pid, signal.SIGCONT)
    t.join(30)
    assert call.get("value", {}).get("ref_count") == 1, call
    assert c.lost is None, c.lost
    assert active_session(srv) == c.session_id
    c.close()
    assert sessions(srv) == [], srv.log()[-3000:]


@pytest.mark.timeout(90)
def test_a_restarted_server_that_forgot_the_session_is_session_lost_after_reconnecting(servers):
    port = free_port()
    first = servers.start("--port", port, name="first")
    c = client(first.url, heartbeat_interval=0)
    c.acquire(SIMPLE)
    first.stop()
    t, call = in_thread(c.devices)
    time.sleep(6)  # down for longer than the old ~4 s of retries
    assert t.is_alive(), call
    servers.start("--port", port, name="second")
    t.join(30)
    assert isinstance(call.get("error"), rlc.SessionLost), call
    c.close()


@pytest.mark.timeout(60)
def test_heartbeats_give_up_after_the_reconnect_timeout_and_run_stops(srv, gates, tmp_path):
    gate = gates(srv.port)
    marker = tmp_path / "started"
    env = client_env(REMOTE_LAB_HEARTBEAT_INTERVAL="0.3", REMOTE_LAB_RECONNECT_TIMEOUT="2")
    p = subprocess.Popen([sys.executable, str(CLIENT), "-q", "--url", gate.url, "run", SIMPLE,
                          "--", sys.executable, "-c",
                          "import sys, time; open(sys.argv[1], 'w').close(); time.sleep(120)",
                          marker], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
    try:
        wait_until(marker.exists, timeout=20, what="the command to start")
        gate.down()
        out, err = p.communicate(timeout=30)
    finally:
        kill_if_running(p)
    assert p.returncode == 75, err
    assert "could not be reached" in err.strip().splitlines()[-1], err


@pytest.mark.timeout(60)
def test_on_a_terminal_the_command_gets_the_foreground_in_a_process_group_of_its_own(srv,
                                                                                   tmp_path):
    import pty
    import select
    out = tmp_path / "groups.json"
    script = ("import json, os, sys; json.dump([os.getpgrp() == os.getpid(), "
              "os.tcgetpgrp(0) == os.getpgrp()], open(sys.argv[1], 'w'))")
    argv = [sys.executable, str(CLIENT), "-q", "--url", srv.url, "run", str(SIMPLE), "--",
            sys.executable, "-c", script, str(out)]
    pid, master = pty.fork()  # the client leads a session whose terminal is the pty
    if pid == 0:
        os.execve(argv[0], argv, client_env())
    try:
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    if not os.read(master, 65536):
                        break
                except OSError:
                    break
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
        else:
            pytest.fail("the client did not finish")
        if not done:
            _, status = os.waitpid(pid, 0)
    finally:
        os.close(master)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    # the command leads its own process group, and that group had the terminal
    assert json.loads(out.read_text()) == [True, True]
