"""The client rides through a server restart (issue 11, item 5).

A server that restarts refuses or resets connections for a while, answers work a stop cut short
with ``503`` + ``Retry-After``, and closes idle keep-alive connections; the client retries all of
these within its reconnect window and goes on with the same session. Real server processes
throughout; the only thing in between is StaleProxy, a TCP forwarder that closes a reused
keep-alive connection just as the next request arrives on it (the race a server closing idle
connections loses now and then, made certain).
"""
import logging
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from client_support import (SIMPLE, accept_each, active_session, client, client_env,
                            close_quietly, free_port, http, lab_idle, loopback_listener, pump,
                            sessions, wait_until)
from client_support import clean_env, servers  # noqa: F401  (fixtures; clean_env autouse)
from helpers import CLIENT, ServerProcess, in_thread, kill_if_running

import remote_lab_client as rlc  # noqa: E402  (after client_support: repo root on sys.path)


def requests_logged(srv, request_line, status=None):
    """How many answers to ``request_line`` (e.g. "POST /session") the server logged (it runs
    with --log-level DEBUG), only those with ``status`` if given."""
    mark = 'http: "%s HTTP/1.1" %s' % (request_line, "" if status is None else "%d " % status)
    return srv.log().count(mark)


class HeldConnections:
    """``n`` connections that take the server's connection slots: each sent the first byte of
    a request line and nothing more, so the server neither closes them as idle (make_room())
    nor lets them go before --header-timeout."""

    def __init__(self, port, n):
        self.port = port
        self.socks = []
        for _ in range(50):  # until a probe over the cap closes none of them
            self.socks += [self._one() for _ in range(n - len(self.socks))]
            self._probe()
            alive = [s for s in self.socks if not _closed_by_peer(s)]
            close_quietly(*(s for s in self.socks if s not in alive))
            if len(alive) == n:
                return
            self.socks = alive
        raise AssertionError("the server keeps closing the held connections")

    def _one(self):
        s = socket.create_connection(("127.0.0.1", self.port))
        s.sendall(b"G")
        return s

    def _probe(self):
        """GET /healthz over the cap: the server first closes a connection that has sent
        nothing yet (idle to it: its handler did not see the byte yet), if there is one."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=10) as s:
            s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            while s.recv(65536):
                pass

    def release(self):
        close_quietly(*self.socks)


def _closed_by_peer(sock):
    if not select.select([sock], [], [], 0.1)[0]:
        return False
    try:
        return sock.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


class StaleProxy:
    """A TCP forwarder to ``target_port``. Armed (``arm(how)``), it closes the next connection
    that already carried a request as the next request arrives on it, passing nothing on: how
    = "eof" closes it plainly, "reset" with an RST (``fresh_drops``: the first request of new
    connections too, closed plainly). ``dropped`` counts those."""

    def __init__(self, target_port):
        self.target_port = target_port
        self.armed = None
        self.fresh_drops = 0  # also drop the first request of this many new connections
        self.dropped = 0
        self.lock = threading.Lock()
        self.closed = False
        self.sockets = []
        self.listener = loopback_listener()
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=accept_each, args=(self.listener, self._serve,
                                                   lambda: self.closed), daemon=True).start()

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def arm(self, how):
        with self.lock:
            self.armed = how

    def _serve(self, conn):
        upstream = socket.create_connection(("127.0.0.1", self.target_port))
        self.sockets += [conn, upstream]
        threading.Thread(target=pump, args=(upstream, conn), daemon=True).start()
        carried = False
        try:
            while True:
                data = conn.recv(65536)
                if not data:
                    break
                with self.lock:
                    how, self.armed = (self.armed, None) if carried else (None, self.armed)
                    if not carried and not how and self.fresh_drops:
                        self.fresh_drops -= 1
                        how = "eof"
                if how:
                    self.dropped += 1
                    if how == "reset":
                        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                    break
                carried = True
                upstream.sendall(data)
        except OSError:
            pass
        finally:
            close_quietly(conn, upstream)

    def close(self):
        self.closed = True
        self.listener.close()
        close_quietly(*self.sockets)


@pytest.fixture
def proxy():
    made = []
    yield lambda port: made.append(StaleProxy(port)) or made[-1]
    for p in made:
        p.close()


def restarted(servers, old, *args, sig=signal.SIGTERM, meanwhile=None):
    """Stop ``old`` with ``sig`` (then call ``meanwhile``) and start a server again on its port
    and state dir, with the same fake netlab (its registry), and the flags ``args``: a
    restart, as systemd does it."""
    old.stop(sig)
    if meanwhile is not None:
        meanwhile()
    srv = ServerProcess(old.tmp.parent / ("%s-%d" % (old.tmp.name, len(servers.started))),
                        "--port", old.port, "--state-dir", old.state_dir, *args,
                        env={"FAKE_NETLAB_DIR": str(old.fake_dir)})
    srv.fake_dir = old.fake_dir
    servers.started.append(srv)
    return srv.start()


# ------------------------------------------------------------------------------------------
# 503 with Retry-After: not processed, try later (any method)
# ------------------------------------------------------------------------------------------


def test_a_session_is_created_after_503s_of_the_connection_cap(servers):
    srv = servers.start("--max-connections", 2, "--log-level", "DEBUG")
    held = HeldConnections(srv.port, 2)
    t, result = in_thread(lambda: client(srv.url, heartbeat_interval=0))
    try:
        wait_until(lambda: requests_logged(srv, "POST /session", 503), timeout=10,
                   what="a 503 for POST /session")
    finally:
        held.release()
    t.join(20)
    assert "value" in result, result
    c = result["value"]
    assert [s["session_id"] for s in sessions(srv)] == [c.session_id]
    assert requests_logged(srv, "POST /session", 201) == 1
    c.close()


def test_without_a_session_a_503_with_retry_after_is_retried_the_usual_number_of_times(servers):
    srv = servers.start("--max-connections", 2, "--log-level", "DEBUG")
    held = HeldConnections(srv.port, 2)
    try:
        with pytest.raises(rlc.QueueFull) as info:
            client(srv.url, heartbeat_interval=0, retries=3)
    finally:
        held.release()
    assert info.value.status == 503 and "too many connections" in info.value.detail
    assert requests_logged(srv, "POST /session", 503) == 4  # the first try and 3 retries
    assert requests_logged(srv, "POST /session") == 4


@pytest.mark.timeout(60)
def test_with_a_session_a_503_with_retry_after_is_retried_within_the_reconnect_window(servers):
    srv = servers.start("--max-connections", 2, "--log-level", "DEBUG",
                        "--header-timeout", 40)
    c = client(srv.url, heartbeat_interval=0, retries=2, reconnect_timeout=30)
    c._http.close()  # (its keep-alive connection would take a slot)
    held = HeldConnections(srv.port, 2)
    t, result = in_thread(lambda: c.acquire(SIMPLE))
    try:  # more 503s than retries: the reconnect window counts, not the retries
        wait_until(lambda: requests_logged(srv, "POST /lab", 503) >= 4, timeout=30,
                   what="four 503s for POST /lab")
        assert t.is_alive(), result
    finally:
        held.release()
    t.join(30)
    assert [d.name for d in result.get("value", [])] == ["r1", "r2"], result
    assert requests_logged(srv, "POST /lab", 200) == 1
    assert c.lost is None and active_session(srv) == c.session_id
    c.close()


@pytest.mark.timeout(60)
def test_an_acquire_a_stop_cut_short_is_retried_on_the_next_server(servers):
    """The stop kills `netlab up` and answers 503 + Retry-After: the client sends the acquire
    again once a server answers. This one is new (another state dir), so the session is lost:
    SessionLost, not the 503 as a ServerError."""
    port = free_port()
    first = servers.start("--port", port, name="first")
    c = client(first.url, heartbeat_interval=0)
    first.switch("up_hang")
    t, result = in_thread(lambda: c.acquire(SIMPLE))
    wait_until(lambda: first.netlab_verbs().count("up") == 1, timeout=10, what="netlab up")
    assert first.stop() == 0
    time.sleep(1.0)
    assert t.is_alive(), result  # waiting for a server, not failed with the 503
    second = servers.start("--port", port, "--log-level", "DEBUG", name="second")
    t.join(30)
    assert isinstance(result.get("error"), rlc.SessionLost), result
    assert requests_logged(second, "POST /lab", 404) == 1
    c.close()


# ------------------------------------------------------------------------------------------
# a stale keep-alive connection: sent again at once on a new one (any method)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["eof", "reset"])
def test_a_post_on_a_keep_alive_connection_the_server_closed_is_sent_again(servers, proxy, how):
    srv = servers.start("--log-level", "DEBUG")
    p = proxy(srv.port)
    c = client(p.url, heartbeat_interval=0, start_session=False, retries=0)
    assert c.server_info()["service"] == "remote-lab"  # the keep-alive connection is open
    p.arm(how)
    c.start_session()  # POST /session on that connection: dropped, sent again on a new one
    assert p.dropped == 1
    assert [s["session_id"] for s in sessions(srv)] == [c.session_id]
    assert requests_logged(srv, "POST /session") == 1
    p.arm(how)
    assert [d.name for d in c.acquire(SIMPLE)] == ["r1", "r2"]  # an upload, the same
    assert p.dropped == 2 and requests_logged(srv, "POST /lab") == 1
    c.close()
    assert sessions(srv) == []


def test_a_post_failing_again_on_the_new_connection_is_not_sent_a_third_time(servers, proxy):
    """Only a reused connection is taken for closed while idle: a new connection failing the
    same way keeps the usual rule (a POST that may have been processed is not sent again)."""
    srv = servers.start("--log-level", "DEBUG")
    p = proxy(srv.port)
    c = client(p.url, heartbeat_interval=0)
    p.arm("eof")
    p.fresh_drops = 1
    with pytest.raises(rlc.ConnectionFailed):
        c.acquire(SIMPLE)
    assert p.dropped == 2 and requests_logged(srv, "POST /lab") == 0
    c.close()  # (a DELETE, on a new connection)
    assert sessions(srv) == []


def test_after_the_server_dropped_an_idle_connection_a_post_succeeds(servers):
    """A real server closing idle keep-alive connections (--socket-timeout 1)."""
    srv = servers.start("--socket-timeout", 1, "--log-level", "DEBUG")
    c = client(srv.url, heartbeat_interval=0)
    time.sleep(1.5)
    assert [d.name for d in c.acquire(SIMPLE)] == ["r1", "r2"]
    assert requests_logged(srv, "POST /lab") == 1
    c.close()


# ------------------------------------------------------------------------------------------
# across a real restart: the same session, the same lab (the durable server)
# ------------------------------------------------------------------------------------------


def client_lines(caplog, level=logging.INFO):
    """The client's log lines at ``level`` and above: [(level name, message)]."""
    return [(r.levelname, r.getMessage()) for r in caplog.records
            if r.name == "remote_lab_client" and r.levelno >= level]


@pytest.mark.timeout(90)
def test_an_acquire_a_stop_cut_short_succeeds_on_the_restarted_server(servers, caplog):
    caplog.set_level(logging.INFO, logger="remote_lab_client")
    srv = servers.start("--port", free_port(), name="first")
    c = client(srv.url, heartbeat_interval=0.3)
    srv.switch("up_hang")
    t, result = in_thread(lambda: c.acquire(SIMPLE))
    wait_until(lambda: srv.netlab_verbs().count("up") == 1, timeout=10, what="netlab up")
    srv.switch("up_hang", on=False)
    again = restarted(servers, srv)
    t.join(30)
    assert [d.name for d in result.get("value", [])] == ["r1", "r2"], result
    assert c.lost is None and active_session(again) == c.session_id
    assert again.netlab_verbs().count("up") == 2  # the killed one, and the one sent again
    c.close()
    assert sessions(again) == []
    assert not [line for line in client_lines(caplog) if line[0] != "INFO"], caplog.text


HOLDING_TEST = '''
import os
import time


def test_holding_the_lab_across_a_restart(lab, remote_lab_client):
    open(os.environ["STARTED"], "w").close()
    while not os.path.exists(os.environ["GO"]):
        time.sleep(0.1)
    assert [d.name for d in lab] == ["r1", "r2"]
    if open(os.environ["GO"]).read() == "check":  # (else: end without a request)
        assert remote_lab_client.status()["ref_count"] == 1  # the same lab, still ours
'''


def holding_client(how, url, tmp_path):
    """A client process that holds the lab until the file ``go`` exists: the CLI's ``run`` or
    a pytest run with the plugin (whose test then checks the lab if ``go`` says "check").
    Returns (Popen, started file, go file)."""
    started, go = tmp_path / "started", tmp_path / "go"
    env = client_env(REMOTE_LAB_URL=url, REMOTE_LAB_HEARTBEAT_INTERVAL="0.3",
                     STARTED=started, GO=go)
    if how == "run":
        script = ("import os, time\nopen(os.environ['STARTED'], 'w').close()\n"
                  "while not os.path.exists(os.environ['GO']): time.sleep(0.1)")
        argv = [CLIENT, "run", SIMPLE, "--", sys.executable, "-c", script]
    else:
        suite = tmp_path / "suite"
        suite.mkdir()
        (suite / "conftest.py").write_text(
            "from remote_lab_client import remote_lab_fixture\n"
            "pytest_plugins = ['remote_lab_client']\n"
            "lab = remote_lab_fixture(%r)\n" % str(SIMPLE))
        (suite / "test_hold.py").write_text(HOLDING_TEST)
        argv = ["-m", "pytest", "-q", "-p", "no:cacheprovider", str(suite)]
    proc = subprocess.Popen([sys.executable] + [str(a) for a in argv], cwd=str(tmp_path),
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    return proc, started, go


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["run", "pytest"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_client_holding_the_lab_finishes_normally_across_a_restart(servers, tmp_path, how,
                                                                     sig):
    srv = servers.start("--port", free_port(), name="first")
    proc, started, go = holding_client(how, srv.url, tmp_path)
    try:
        wait_until(started.exists, timeout=30, what="the lab held")
        sid = active_session(srv)
        ups = srv.netlab_verbs().count("up")
        again = restarted(servers, srv, sig=sig)
        time.sleep(1.0)  # heartbeats reach the new server meanwhile
        assert proc.poll() is None, proc.communicate()
        assert active_session(again) == sid
        go.write_text("check")
        out, err = proc.communicate(timeout=60)
    finally:
        kill_if_running(proc)
    assert proc.returncode == 0, (out, err)
    assert "lost" not in err and "Traceback" not in err, err
    if how == "pytest":
        assert "1 passed" in out, out
    assert again.netlab_verbs().count("up") == ups  # adopted: not brought up again
    wait_until(lambda: sessions(again) == [], timeout=10, what="the session ended")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("how", ["run", "pytest"])
def test_a_client_ending_while_the_server_restarts_ends_its_session_once_it_is_back(
        servers, tmp_path, how):
    """The command (or the test) ends while the server is down: the release and the session's
    end wait for the server, rather than leave the lab held until the session times out."""
    srv = servers.start("--port", free_port(), name="first")
    proc, started, go = holding_client(how, srv.url, tmp_path)
    try:
        wait_until(started.exists, timeout=30, what="the lab held")

        def the_command_ends():
            go.write_text("")
            time.sleep(2.0)  # the client ends meanwhile: it waits for the server
            assert proc.poll() is None, proc.communicate()

        again = restarted(servers, srv, meanwhile=the_command_ends)
        out, err = proc.communicate(timeout=60)
    finally:
        kill_if_running(proc)
    assert proc.returncode == 0, (out, err)
    assert "releasing the lab" not in err and "ending session" not in err, err
    wait_until(lambda: sessions(again) == [], timeout=10, what="the session ended")
    wait_until(lambda: lab_idle(again), timeout=10, what="the lab released")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_waiting_clients_get_their_turns_in_order_across_a_restart(servers, caplog, sig):
    caplog.set_level(logging.INFO, logger="remote_lab_client")
    srv = servers.start("--port", free_port(), name="first")
    holder = client(srv.url, heartbeat_interval=0.3)
    holder.acquire(SIMPLE)
    waiters = []
    for n in (2, 3):
        waiters.append(in_thread(lambda: client(srv.url, heartbeat_interval=0.3)))
        wait_until(lambda: len(sessions(srv)) == n, timeout=10, what="%d sessions" % n)
    order = [s["session_id"] for s in sessions(srv)]
    again = restarted(servers, srv, sig=sig)
    assert [s["session_id"] for s in sessions(again)] == order
    time.sleep(1.0)  # the waiters' polls reach the new server
    assert all(t.is_alive() for t, _ in waiters), waiters
    holder.close()
    for n, (t, result) in enumerate(waiters, 1):
        t.join(30)
        assert "value" in result, result
        assert result["value"].session_id == order[n] == active_session(again)
        if n == 1:
            assert waiters[1][0].is_alive(), waiters[1][1]  # still waiting its turn
        result["value"].close()
    assert sessions(again) == []
    assert not [line for line in client_lines(caplog) if line[0] != "INFO"], caplog.text


@pytest.mark.timeout(90)
def test_clients_hammering_posts_across_reloads_see_no_error(servers):
    """A reload (SIGHUP) closes idle keep-alive connections: a POST that meets one just closed
    is sent again on a new connection (4 clients, each a GET and a POST in turn, 3 reloads)."""
    srv = servers.start()
    sids = [http("POST", srv.url + "/session")[1]["session_id"] for _ in range(4)]
    errors, rounds = [], [0]
    stop = threading.Event()

    def hammer(sid):
        c = client(srv.url, heartbeat_interval=0, start_session=False)
        c._http.reconnect_timeout = 30  # (set once a session is created; this one has none)
        while not stop.is_set():
            try:
                c.server_info()
                resp = c._http.request("POST", "/session/heartbeat", idempotent=False,
                                       headers={"X-Session-ID": sid})
                assert resp.status == 204, (resp.status, resp.detail)
                rounds[0] += 1
            except (rlc.RemoteLabError, AssertionError) as e:
                errors.append(e)
        c.close()

    threads = [threading.Thread(target=hammer, args=(sid,), daemon=True) for sid in sids]
    for t in threads:
        t.start()
    for n in range(3):
        wait_until(lambda: rounds[0] >= 200 * (n + 1), timeout=20, what="rounds")
        srv.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: srv.log().count("Listening on") >= n + 2, timeout=20,
                   what="reload %d" % (n + 1))
    wait_until(lambda: rounds[0] >= 800, timeout=20, what="rounds after the reloads")
    stop.set()
    for t in threads:
        t.join(30)
    assert errors == [], errors
