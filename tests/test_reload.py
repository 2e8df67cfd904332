"""Reload (SIGHUP): the server re-executes itself in place -- same pid, same listening socket
(never closed), the single-instance lock handed over -- after answering what is in flight.
Clients hammering it meanwhile see no refused connection and no error; a new file that does not
even start (preflight) is refused and the running server keeps serving.
"""
import http.client
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from helpers import FAKE_NETLAB, ROOT, SERVER, TOPOLOGIES, ServerProcess, http as http_request
from server_support import (Api, acquire_while_up_hangs, calls_of, pid_alive,  # noqa: F401
                            seed_fields, start_server, wait_until)
from systemd_support import notify_socket, start_socket_activated, unit  # noqa: F401

sys.path.insert(0, str(ROOT))
import remote_lab  # noqa: E402
import remote_lab_client  # noqa: E402

pytestmark = pytest.mark.timeout(90)

LISTENING = "Listening on http://"
HANDED_OVER = "reload: serving the listening socket handed over"


class KeepAliveClient:
    """One persistent HTTP/1.1 connection, as any HTTP client keeps one: a request on a REUSED
    connection that the server closed before sending any byte of an answer (it was idle when
    the server closed it) is retried once on a fresh connection. Everything else counts."""

    def __init__(self, port, timeout=30):
        self.port, self.timeout = port, timeout
        self.conn = None
        self.retries = 0
        self.closes = 0  # answers that carried Connection: close

    def request(self, method, path, headers=None, body=None):
        for attempt in (0, 1):
            reused = self.conn is not None
            if not reused:
                self.conn = http.client.HTTPConnection("127.0.0.1", self.port,
                                                       timeout=self.timeout)
            try:
                self.conn.request(method, path, body=body, headers=headers or {})
                resp = self.conn.getresponse()
                data = resp.read()
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self.close()
                if reused and attempt == 0:
                    self.retries += 1
                    continue
                raise
            except Exception:
                self.close()
                raise
            if resp.will_close:
                self.closes += 1
                self.close()
            return resp.status, data

    def close(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None


class Hammer:
    """Threads that each send ``requests`` (a list of (method, path, headers, expected statuses))
    in a loop on their own keep-alive connection; every exception or unexpected status is a
    failure."""

    def __init__(self, port, plans):
        self.port = port
        self.stop = threading.Event()
        self.lock = threading.Lock()
        self.failures = []
        self.counts = [0] * len(plans)
        self.clients = [KeepAliveClient(port) for _ in plans]
        self.threads = [threading.Thread(target=self._run, args=(i, plan), daemon=True)
                        for i, plan in enumerate(plans)]
        for t in self.threads:
            t.start()

    def _run(self, i, plan):
        client = self.clients[i]
        while not self.stop.is_set():
            for method, path, headers, expected in plan:
                try:
                    status, data = client.request(method, path, headers)
                    ok = status in expected
                except Exception as e:  # noqa: B902 - every error is a failed request
                    ok, status, data = False, repr(e), b""
                with self.lock:
                    self.counts[i] += 1
                    if not ok:
                        self.failures.append((method, path, status, data[:200]))
        client.close()

    def wait_for(self, n, timeout=20):
        """Until every thread has sent at least ``n`` more requests."""
        base = list(self.counts)
        wait_until(lambda: all(c - b >= n for c, b in zip(self.counts, base)), timeout,
                   what="every client to send %d more requests" % n)

    def finish(self):
        self.stop.set()
        for t in self.threads:
            t.join(30)
        return self.failures


def listening_inode(port):
    """The inode of the socket listening on 127.0.0.1:``port`` (/proc/net/tcp), or None."""
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].split(":")[1], 16) == port:
                return fields[9]
    return None


def open_files(pid):
    """{fd: what it is} of the process ``pid`` (sockets as "socket", pipes as "pipe": a new
    program makes its own, e.g. the server's wake-up pipe)."""
    fds = {}
    for fd in os.listdir("/proc/%d/fd" % pid):
        try:
            target = os.readlink("/proc/%d/fd/%s" % (pid, fd))
        except OSError:
            continue
        fds[int(fd)] = ("socket" if target.startswith("socket:") else
                        "pipe" if target.startswith("pipe:") else target)
    return fds


def lock_fds(pid):
    return [fd for fd, target in open_files(pid).items() if target.endswith("server.lock")]


def server_pid(srv):
    status, body, _ = http_request("GET", srv.url + "/")
    assert status == 200, body
    return body["pid"]


def wait_reloaded(srv, starts=2, timeout=30):
    wait_until(lambda: srv.log().count(LISTENING) >= starts or srv.proc.poll() is not None,
               timeout, what="the server to start again")
    assert srv.proc.poll() is None, srv.log()
    assert srv.log().count(LISTENING) == starts, srv.log()


def notified(notify_socket):
    """The sd_notify messages so far, each a dict of its fields."""
    return [fields for _, fields in notify_socket.all()]


# ---------------------------------------------------------------------------------------------


def test_sighup_reexecs_in_place_while_clients_hammer_it(tmp_path, notify_socket):
    """SIGHUP with 4 clients in a loop: none sees an error or a refused connection; same pid,
    same listening socket (same inode: never closed), a second start in the log, RELOADING=1
    then READY=1; long-polls (session and status page) are answered at once, not dropped; the
    single-instance lock is still held (a second server is refused)."""
    srv = ServerProcess(tmp_path, env={"NOTIFY_SOCKET": notify_socket.address,
                                       "WATCHDOG_USEC": "2000000"}).start()
    try:
        api = Api(srv)
        wait_until(lambda: notify_socket.values("READY"), what="READY=1")
        pid, inode = srv.proc.pid, listening_inode(srv.port)
        assert server_pid(srv) == pid and inode
        api.new_session()
        waiter = api.new_session()
        status, view, _ = http_request("GET", srv.url + "/status")
        polls = {}
        poller, idle = KeepAliveClient(srv.port), KeepAliveClient(srv.port)
        assert idle.request("GET", "/healthz")[0] == 204  # then idle on its kept-alive connection
        session_poll = threading.Thread(target=lambda: polls.update(
            session=poller.request("GET", "/session/%s?wait=30" % waiter)), daemon=True)
        status_poll = threading.Thread(target=lambda: polls.update(status=http_request(
            "GET", srv.url + "/status?wait=30&since=" + view["token"], timeout=40)[:2]),
            daemon=True)
        session_poll.start()
        status_poll.start()
        plans = [[("GET", "/healthz", {}, (204,)), ("GET", "/debug/health", {}, (200,))],
                 [("GET", "/", {}, (200,))],
                 [("GET", "/status", {}, (200,)), ("GET", "/metrics", {}, (200,))],
                 [("GET", "/openapi.json", {}, (200,)), ("GET", "/healthz", {}, (204,))]]
        hammer = Hammer(srv.port, plans)
        hammer.wait_for(20)
        wait_until(lambda: "remote_lab_status_page_watchers 1" in api.req("GET", "/metrics")[1],
                   what="the status long-poll to be held")
        t0 = time.monotonic()
        srv.proc.send_signal(signal.SIGHUP)
        session_poll.join(15)
        status_poll.join(15)
        wait_reloaded(srv)
        hammer.wait_for(20)
        failures = hammer.finish()
        assert failures == [], (failures, srv.log())
        # the long-polls got their current state at once, closing their connection; the idle
        # connection was closed at once (the reload waits for no connection to its limit)
        assert seed_fields((polls["session"][0], json.loads(polls["session"][1]))) == (200, {
            "session_id": waiter, "status": "waiting", "position": 1}), polls
        assert poller.closes == 1
        assert polls["status"][0] == 200, polls
        assert time.monotonic() - t0 < 20 and "still open" not in srv.log()
        assert idle.request("GET", "/healthz")[0] == 204 and idle.retries == 1
        # same process, same socket, started again from the file
        assert server_pid(srv) == pid and srv.proc.poll() is None
        assert listening_inode(srv.port) == inode
        assert HANDED_OVER in srv.log()
        assert "received SIGHUP" in srv.log() and "shutting down" not in srv.log()
        # RELOADING=1 (with the monotonic time systemd >= 253 wants), then READY=1 again
        messages = notified(notify_socket)
        reloading = [i for i, m in enumerate(messages) if m.get("RELOADING") == "1"]
        ready = [i for i, m in enumerate(messages) if m.get("READY") == "1"]
        assert len(reloading) == 1 and len(ready) == 2 and ready[0] < reloading[0] < ready[1]
        usec = int(messages[reloading[0]]["MONOTONIC_USEC"])
        assert abs(usec / 1e6 - time.clock_gettime(time.CLOCK_MONOTONIC)) < 60
        # the new process pings the watchdog too (WATCHDOG_USEC passed back)
        after = len(messages)
        wait_until(lambda: any("WATCHDOG" in m for m in notified(notify_socket)[after:]),
                   timeout=5, what="a watchdog ping from the new process")
        # the lock went along: no second server on this state dir
        second = subprocess.run([sys.executable, str(SERVER), "--port", "0", "--state-dir",
                                 str(srv.state_dir), "--netlab", str(FAKE_NETLAB)],
                                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=20)
        assert second.returncode == 1 and "already running" in second.stderr, second
        assert "pid %d" % pid in second.stderr
    finally:
        rc = srv.stop()
    assert rc == 0, srv.log()
    assert notify_socket.values("STOPPING") == ["1"]


def test_sighup_keeps_sessions_and_the_running_lab(start_server):
    """4 clients poll their sessions and heartbeat in a loop across a SIGHUP: no failed request,
    the same sessions in the same order, the lab still running (no new `up`, no `down`); the
    RemoteLabClient holding the lab (heartbeating meanwhile) rides through and reuses it."""
    srv, api = start_server()
    client = remote_lab_client.RemoteLabClient(srv.url, heartbeat_interval=0.2, progress=False)
    client.acquire(TOPOLOGIES / "simple.yml")
    sids = [client.session_id, api.new_session(), api.new_session()]
    before = api.health()
    ups = len(calls_of(srv, "up"))
    plans = [[("GET", "/session/%s" % sids[1], {}, (200,))],
             [("GET", "/session/%s" % sids[2], {}, (200,))],
             [("POST", "/session/heartbeat", {"X-Session-ID": sids[0]}, (204,))],
             [("POST", "/session/heartbeat", {"X-Session-ID": sids[1]}, (204,)),
              ("GET", "/lab", {"X-Session-ID": sids[0]}, (200,))]]
    hammer = Hammer(srv.port, plans)
    hammer.wait_for(20)
    srv.proc.send_signal(signal.SIGHUP)
    wait_reloaded(srv)
    hammer.wait_for(20)
    assert hammer.finish() == [], srv.log()
    after = api.health()
    assert [s["session_id"] for s in after["session_list"]] == sids
    assert after["lab"]["state"] == "running"
    assert after["lab"]["devices"] == before["lab"]["devices"]
    assert len(calls_of(srv, "up")) == ups and calls_of(srv, "down") == []
    assert "restored the state of a reload: 3 session(s), lab adopted" in srv.log()
    assert client.lost is None
    client.acquire(TOPOLOGIES / "simple.yml")
    assert client.reused is True and len(calls_of(srv, "up")) == ups
    client.close()


def test_a_new_file_that_does_not_start_is_refused_and_the_server_keeps_serving(
        tmp_path, notify_socket):
    """Preflight: the new file is run with --version first; a syntax error is logged as an
    ERROR and nothing else happens (same process, no RELOADING=1, no exec). Fixed, the next
    SIGHUP runs the new version."""
    script = tmp_path / "remote_lab.py"
    shutil.copy(SERVER, script)
    srv = ServerProcess(tmp_path, env={"NOTIFY_SOCKET": notify_socket.address})
    srv.cmd[1] = str(script)
    srv.start()
    try:
        wait_until(lambda: notify_socket.values("READY"), what="READY=1")
        pid = srv.proc.pid
        good = script.read_text()
        script.write_text(good + "\ndef broken(:\n")
        srv.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "| ERROR |" in srv.log(), timeout=40, what="the preflight ERROR")
        line = [x for x in srv.log().splitlines() if "| ERROR |" in x][0]
        assert "reload" in line and "SyntaxError" in line and str(script) in line, line
        assert http_request("GET", srv.url + "/healthz")[0] == 204
        assert server_pid(srv) == pid
        time.sleep(0.5)
        assert srv.log().count(LISTENING) == 1
        assert notify_socket.values("RELOADING") == [] and len(notify_socket.values("READY")) == 1
        # the upgrade, fixed: the next SIGHUP runs it
        script.write_text(good.replace('__version__ = "%s"' % remote_lab.__version__,
                                       '__version__ = "99.0.0"', 1))
        srv.proc.send_signal(signal.SIGHUP)
        wait_reloaded(srv)
        status, body, _ = http_request("GET", srv.url + "/")
        assert body["version"] == "99.0.0" and body["pid"] == pid
    finally:
        rc = srv.stop()
    assert rc == 0, srv.log()


def test_sighup_with_socket_activation_hands_over_the_inherited_socket(tmp_path):
    """Socket-activated (fd 3, LISTEN_FDS/LISTEN_PID): the socket systemd passed is what the new
    process serves; clients keep working throughout."""
    srv = ServerProcess(tmp_path, "--port", "1")
    port = start_socket_activated(srv)
    try:
        assert srv.port == port
        socket_fd3 = os.readlink("/proc/%d/fd/3" % srv.proc.pid)
        assert socket_fd3.startswith("socket:")
        hammer = Hammer(port, [[("GET", "/healthz", {}, (204,))],
                               [("GET", "/debug/health", {}, (200,))]])
        hammer.wait_for(20)
        srv.proc.send_signal(signal.SIGHUP)
        wait_reloaded(srv)
        hammer.wait_for(20)
        files = {fd: t for fd, t in open_files(srv.proc.pid).items() if t != "socket"}
        srv.proc.send_signal(signal.SIGHUP)  # again: what the first reload handed over works too
        wait_reloaded(srv, starts=3)
        hammer.wait_for(20)
        assert hammer.finish() == [], srv.log()
        assert os.readlink("/proc/%d/fd/3" % srv.proc.pid) == socket_fd3
        assert srv.log().count(HANDED_OVER) == 2
        assert srv.log().count("socket activation: serving the listening socket") == 1
        assert server_pid(srv) == srv.proc.pid
        # nothing leaks from one program to the next: the same files, one lock fd
        assert {fd: t for fd, t in open_files(srv.proc.pid).items() if t != "socket"} == files
        assert len(lock_fds(srv.proc.pid)) == 1
    finally:
        rc = srv.stop()
    assert rc == 0, srv.log()


def test_sighup_during_a_netlab_up_answers_503_and_the_server_comes_back(start_server):
    """The `netlab up` under way is killed (whole group); its acquire answers 503 with
    Retry-After, and the re-executed server answers again on the same port."""
    srv, api = start_server()
    sid = api.new_session()
    t, result = acquire_while_up_hangs(srv, api, sid, timeout=40)
    up = calls_of(srv, "up")[0]
    pid = srv.proc.pid
    srv.proc.send_signal(signal.SIGHUP)
    t.join(30)
    status, data, headers = result["r"]
    assert status == 503, (status, data)
    assert "retry" in data["detail"] and int(headers["Retry-After"]) >= 1
    assert not pid_alive(up["pid"])
    wait_reloaded(srv)
    assert server_pid(srv) == pid
    assert api.req("GET", "/healthz")[0] == 204
    srv.switch("up_hang", on=False)
    assert api.post_lab(sid)[0] == 200  # the same session, kept across the reload


def start_a_slow_teardown(srv, api):
    """A session with its lab up, then a 3 s `netlab down` of it under way (a reload waits for
    that teardown); returns the session id."""
    sid = api.new_session()
    assert api.post_lab(sid)[0] == 200
    srv.switch("down_delay", value="3")
    assert api.req("DELETE", "/lab", sid)[0] == 202
    wait_until(lambda: calls_of(srv, "down"), 5, what="down started")
    return sid


def test_a_failed_exec_goes_back_to_serving_on_the_same_socket(tmp_path, notify_socket):
    """The interpreter vanishes between the preflight and the exec (the exec fails): an ERROR,
    READY=1 again, and the same process serves on, the lock and the socket still its own."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    python = bindir / "python3"
    python.symlink_to(sys.executable)
    srv = ServerProcess(tmp_path, env={"NOTIFY_SOCKET": notify_socket.address,
                                       "WATCHDOG_USEC": "1000000"})
    srv.cmd[0] = str(python)
    srv.start()
    try:
        api = Api(srv)
        wait_until(lambda: notify_socket.values("READY"), what="READY=1")
        inode = listening_inode(srv.port)
        files = {fd: t for fd, t in open_files(srv.proc.pid).items() if t != "socket"}
        sid = start_a_slow_teardown(srv, api)
        srv.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: notify_socket.values("RELOADING"), 20, what="RELOADING=1")
        python.unlink()
        wait_until(lambda: "| ERROR |" in srv.log(), 20, what="the exec ERROR")
        line = [x for x in srv.log().splitlines() if "| ERROR |" in x][0]
        assert "reload" in line and "exec" in line, line
        wait_until(lambda: len(notify_socket.values("READY")) == 2, 10, what="READY=1 again")
        seen = len(notify_socket.all())  # housekeeping runs again: the watchdog pings go on
        wait_until(lambda: any("WATCHDOG" in m for m in notified(notify_socket)[seen:]),
                   timeout=5, what="a watchdog ping after the failed exec")
        assert listening_inode(srv.port) == inode
        assert srv.log().count(LISTENING) == 1
        # the fds moved for the exec are back where they were (the lock too, still held)
        assert {fd: t for fd, t in open_files(srv.proc.pid).items() if t != "socket"} == files
        assert len(lock_fds(srv.proc.pid)) == 1
        second = subprocess.run([sys.executable, str(SERVER), "--port", "0", "--state-dir",
                                 str(srv.state_dir), "--netlab", str(FAKE_NETLAB)],
                                stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                timeout=20)
        assert second.returncode == 1 and "already running" in second.stderr, second
        # serving as before: the queue and the runner work again
        assert api.queue_length() == 1
        api.wait_lab_state("stopped")
        srv.switch("down_delay", on=False)
        assert api.post_lab(sid)[0] == 200
        wait = api.session(sid, wait=1)
        assert wait[0] == 200
    finally:
        rc = srv.stop()
    assert rc == 0, srv.log()


def test_service_unit_reloads_with_sighup():
    svc = unit("remote-lab.service")["Service"]
    assert svc["Type"] == "notify"  # RELOADING=1 ... READY=1 works with plain notify too
    assert svc["ExecReload"] == "/bin/kill -HUP $MAINPID"


def test_sigterm_during_a_reload_stops_the_server_instead(start_server):
    """A stop signal while the reload waits for a teardown: no exec, the ordinary stop (exit 0,
    STOPPING), nothing started again."""
    srv, api = start_server()
    start_a_slow_teardown(srv, api)
    srv.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload: answering what is in flight" in srv.log(), 20,
               what="the reload to drain")
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(30) == 0, srv.log()
    assert srv.log().count(LISTENING) == 1 and "re-executing" not in srv.log()
    assert "received SIGTERM: shutting down" in srv.log()
