"""Resource limits of the real server: whole-request deadlines
(--header-timeout and a minimum body rate), the header size cap, the connection cap
(--max-connections), the open-files limit and EMFILE on accept."""
import resource
import select
import socket
import time

import pytest

from helpers import ServerProcess, http, parse_head
from server_support import (Api, SIMPLE, build_multipart, lab_dirs, parse_raw_response,
                            start_server, wait_until)  # noqa: F401 (fixture)


def connect(srv, timeout=10):
    return socket.create_connection(("127.0.0.1", srv.port), timeout=timeout)


def read_until_closed(s, within):
    """What the server sends until it closes the connection; fail if it is still open after
    ``within`` seconds."""
    deadline = time.monotonic() + within
    data = b""
    while True:
        s.settimeout(max(0.05, deadline - time.monotonic()))
        try:
            chunk = s.recv(65536)
        except ConnectionResetError:
            return data
        except socket.timeout:
            pytest.fail("connection still open after %.1f s (got %r)" % (within, data[:200]))
        if not chunk:
            return data
        data += chunk


def read_response(s, timeout=5):
    """One HTTP response (headers + Content-Length body) from a kept-alive connection."""
    s.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, "connection closed, got %r" % data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(parse_head(head)[1].get("content-length", "0"))
    while len(rest) < length:
        rest += s.recv(65536)
    return parse_raw_response(head + b"\r\n\r\n" + rest)


def drip(sockets, data, interval, limit):
    """Send ``data`` one byte every ``interval`` s on each socket until the server closes them.

    Returns {socket: (seconds until closed, bytes the server sent)}; fails if any is still open
    after ``limit`` seconds.
    """
    t0 = time.monotonic()
    open_, closed, received = list(sockets), {}, {s: b"" for s in sockets}
    i = 0
    while open_:
        if time.monotonic() - t0 > limit:
            pytest.fail("%d of %d connections still open after %.0f s"
                        % (len(open_), len(sockets), limit))
        for s in list(open_):
            try:
                s.sendall(data[i % len(data):i % len(data) + 1])
            except OSError:
                open_.remove(s)
                closed[s] = time.monotonic() - t0
        i += 1
        end = time.monotonic() + interval
        while open_ and time.monotonic() < end:
            ready, _, _ = select.select(open_, [], [], max(0, end - time.monotonic()))
            for s in ready:
                try:
                    chunk = s.recv(65536)
                except ConnectionResetError:
                    chunk = b""
                if chunk:
                    received[s] += chunk
                else:
                    open_.remove(s)
                    closed[s] = time.monotonic() - t0
    return {s: (closed[s], received[s]) for s in sockets}


def cpu_seconds(pid):
    """User + system CPU time of a process (all its threads), from /proc."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / float(__import__("os").sysconf("SC_CLK_TCK"))


def open_files_limits(pid):
    with open("/proc/%d/limits" % pid) as f:
        for line in f:
            if line.startswith("Max open files"):
                soft, hard = line.split()[3:5]
                return int(soft), int(hard)
    raise AssertionError("no 'Max open files' in /proc/%d/limits" % pid)


def with_open_files_limit(srv, soft, hard):
    """Start ``srv`` under RLIMIT_NOFILE soft/hard (set in a shell, then exec)."""
    srv.cmd = ["sh", "-c", 'ulimit -Sn %d && ulimit -Hn %d && exec "$@"' % (soft, hard),
               "sh"] + srv.cmd
    return srv.start()


def warnings_in(srv, text):
    return [line for line in srv.log().splitlines() if "| WARNING |" in line and text in line]


# ------------------------------------------------------------------------------------------
# whole-request deadlines
# ------------------------------------------------------------------------------------------


def test_slowloris_headers_are_dropped_after_the_header_timeout(start_server):
    srv, api = start_server("--header-timeout", "3", "--socket-timeout", "30",
                            "--log-level", "DEBUG")
    request_line = connect(srv)  # the request line itself, a byte a second
    headers = connect(srv)  # a full request line, then header bytes, a byte a second
    headers.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    many = [connect(srv) for _ in range(20)]
    for s in many:
        s.sendall(b"POST /session HTTP/1.1\r\n")
    t0 = time.monotonic()
    result = drip([request_line, headers] + many, b"GET /healthz HTTP/1.1\r\nX-Slow: " +
                  b"a" * 100, 1.0, limit=15)
    # other clients are served meanwhile, and the slow ones were dropped without an answer
    assert api.req("GET", "/healthz", timeout=5)[0] == 204
    for s, (seconds, answer) in result.items():
        assert answer == b"", answer[:200]
        assert seconds < 12  # ~3 s (--header-timeout), far less than --socket-timeout 30
        s.close()
    assert time.monotonic() - t0 > 2  # sanity: they did get their header time
    assert api.health()["queue_length"] == 0  # no half-sent POST /session was served
    drops = [line for line in srv.log().splitlines() if "dropping the connection" in line]
    assert len(drops) == 22, drops  # once per connection, at DEBUG
    assert all("| DEBUG |" in line for line in drops)


def test_default_header_timeout_drops_a_byte_every_two_seconds(start_server):
    srv, api = start_server("--socket-timeout", "30")
    s = connect(srv)
    s.sendall(b"GET /healthz HTTP/1.1\r\n")
    (seconds, answer), = drip([s], b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", 2.0, limit=25).values()
    assert answer == b"" and seconds < 20  # the default --header-timeout is 10 s
    s.close()


def test_keep_alive_and_long_polls_are_not_cut_by_the_header_timeout(start_server):
    srv, api = start_server("--header-timeout", "1", "--socket-timeout", "30")
    s = connect(srv)
    request = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
    s.sendall(request)
    assert read_response(s)[0] == 204
    time.sleep(2)  # idle between two requests: only --socket-timeout applies
    s.sendall(request)
    assert read_response(s)[0] == 204
    s.close()
    # a long-poll the server holds past the header timeout
    a, b = api.new_session(), api.new_session()
    t0 = time.monotonic()
    assert api.session(b, wait=2.5) == (200, {"session_id": b, "status": "waiting",
                                                "position": 1})
    assert time.monotonic() - t0 > 2  # it did wait (and was not dropped)
    api.delete_session(b)
    # an upload whose `netlab up` takes longer than the header timeout
    srv.switch("up_delay", value="2")
    status, body = api.post_lab(a)
    assert status == 200, body
    api.delete_session(a)


def test_a_body_slower_than_the_minimum_rate_is_refused(start_server):
    srv, api = start_server("--header-timeout", "1", "--socket-timeout", "30")
    sid = api.new_session()
    # a JSON body: 100 bytes announced, sent a byte every half second
    s = connect(srv)
    s.sendall(b"POST /session/heartbeat HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Session-ID: %s\r\n"
              b"Content-Length: 100\r\n\r\n{" % sid.encode())
    (seconds, answer), = drip([s], b'"x": "aaaaaaaaaaaaaaaaaaaaaaaaaaaa', 0.5, limit=10).values()
    status, body = parse_raw_response(answer)
    assert status == 400 and "too slow" in body["detail"], body
    s.close()
    # an upload: the multipart body trickles in
    body, ctype = build_multipart({}, [("topology", "simple.yml", SIMPLE)])
    s = connect(srv)
    s.sendall(b"POST /lab HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Session-ID: %s\r\nContent-Type: %s\r\n"
              b"Content-Length: %d\r\n\r\n" % (sid.encode(), ctype.encode(), len(body))
              + body[:40])
    (seconds, answer), = drip([s], body[40:-10], 0.5, limit=10).values()
    status, detail = parse_raw_response(answer)
    assert status == 400 and "too slow" in detail["detail"], detail
    s.close()
    wait_until(lambda: lab_dirs(srv) == [], 3, what="partial upload removed")
    assert "Traceback" not in srv.log()
    # the session is untouched and a normal upload works
    assert api.session(sid)[1]["status"] == "active"
    assert api.post_lab(sid)[0] == 200


# ------------------------------------------------------------------------------------------
# header size cap
# ------------------------------------------------------------------------------------------


def test_header_bytes_are_capped_while_reading(start_server):
    srv, api = start_server("--socket-timeout", "30")
    line = b"X-Big: " + b"a" * 16000 + b"\r\n"
    s = connect(srv)
    # 80 KB of header lines (each far below the 64 KiB line limit), and no end of the headers:
    # the server answers as soon as the total passes 64 KiB, without waiting for the rest
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + line * 5)
    status, body = parse_raw_response(read_until_closed(s, 5))
    s.close()
    assert status == 431 and "65536" in body["detail"], body
    # just under the cap is fine
    s = connect(srv)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + line * 4 + b"\r\n")
    assert read_response(s)[0] == 204
    s.close()
    assert api.req("GET", "/healthz")[0] == 204


# ------------------------------------------------------------------------------------------
# connection cap, open-files limit, EMFILE
# ------------------------------------------------------------------------------------------


def test_beyond_max_connections_a_503_but_healthz_still_answers(start_server):
    srv, api = start_server("--max-connections", "4", "--header-timeout", "30")
    busy = [connect(srv) for _ in range(4)]
    for s in busy:  # each in the middle of a request: busy, not idle
        s.sendall(b"GET /status HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    time.sleep(0.5)
    status, body, _ = http("POST", srv.url + "/session", timeout=5)
    assert status == 503 and "--max-connections" in body["detail"], body
    assert http("GET", srv.url + "/healthz", timeout=5)[0] == 204
    assert warnings_in(srv, "connection limit")
    for s in busy:
        s.close()
    wait_until(lambda: http("POST", srv.url + "/session", timeout=5)[0] == 201, 5,
               what="a session once the busy connections closed")


def test_the_oldest_idle_connection_makes_room(start_server):
    srv, api = start_server("--max-connections", "3", "--header-timeout", "30")
    oldest = connect(srv)
    oldest.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")  # kept alive after its request
    assert read_response(oldest)[0] == 204
    time.sleep(0.2)
    others = [connect(srv), connect(srv)]  # connected, silent
    time.sleep(0.3)
    assert http("GET", srv.url + "/healthz", timeout=5)[0] == 204
    assert read_until_closed(oldest, 5) == b""
    for s in others:  # the younger idle connections are still open
        assert select.select([s], [], [], 0.3)[0] == []
        s.close()
    oldest.close()


def test_soft_open_files_limit_is_raised_to_the_hard_limit(tmp_path):
    srv = with_open_files_limit(ServerProcess(tmp_path), 256, 4096)
    try:
        assert open_files_limits(srv.proc.pid) == (4096, 4096)
    finally:
        srv.stop()


def test_400_idle_connections_under_ulimit_256(tmp_path):
    srv = with_open_files_limit(ServerProcess(tmp_path), 256, 256)
    socks = []
    try:
        assert open_files_limits(srv.proc.pid) == (256, 256)  # raising is impossible
        for _ in range(400):
            socks.append(connect(srv))
        time.sleep(1)  # let the server take them in
        cpu = cpu_seconds(srv.proc.pid)
        time.sleep(2)
        assert cpu_seconds(srv.proc.pid) - cpu < 1.0  # no accept loop spinning on a core
        status, _, _ = http("GET", srv.url + "/healthz", timeout=5)
        assert status == 204
        assert Api(srv).health()["status"] == "ok"
        assert warnings_in(srv, "connection limit")
    finally:
        for s in socks:
            s.close()
        srv.stop()


def test_emfile_on_accept_backs_off_and_warns_once(tmp_path):
    srv = ServerProcess(tmp_path).start()
    socks = []
    try:
        # the cap was sized for the limit at start-up; lower it under the running server
        resource.prlimit(srv.proc.pid, resource.RLIMIT_NOFILE, (64, 64))
        for _ in range(150):
            socks.append(connect(srv))
        time.sleep(1)
        cpu = cpu_seconds(srv.proc.pid)
        time.sleep(2)
        assert cpu_seconds(srv.proc.pid) - cpu < 1.0  # backs off, no spin
        assert http("GET", srv.url + "/healthz", timeout=5)[0] == 204
        assert 1 <= len(warnings_in(srv, "cannot accept")) <= 2, srv.log()[-3000:]
    finally:
        for s in socks:
            s.close()
        srv.stop()
