"""HTTP edge cases: request smuggling, HTTP/0.9, Expect: 100-continue, IPv6.

Raw sockets for everything a well-behaved client library would never send; real server processes.
"""
import json
import shutil
import socket
import struct
import subprocess

import pytest

from helpers import ServerProcess, http, wait_until
from server_support import (api, shared_server, srv, start_server,  # noqa: F401 (fixtures)
                            SIMPLE, assert_detail, build_multipart, lab_dirs)

MAX_MB = 0.3
shared = shared_server("http-edge", "--max-upload-mb", MAX_MB, "--socket-timeout", 40)


def connect(port, host="127.0.0.1", timeout=10.0):
    s = socket.create_connection((host, port), timeout=timeout)
    return s, s.makefile("rb")


def read_response(f):
    """(status, {lower-case header: value}, parsed JSON body or None) of one response."""
    status_line = f.readline()
    assert status_line.startswith(b"HTTP/1."), status_line
    status = int(status_line.split()[1])
    headers = {}
    while True:
        line = f.readline()
        assert line, "connection closed inside the response head"
        if line in (b"\r\n", b"\n"):
            break
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = f.read(int(headers.get("content-length", "0")))
    return status, headers, (json.loads(body) if body else None)


def closed_by_server(f):
    """True when the server closes the connection (EOF or reset) before the read times out."""
    try:
        return f.read(1) == b""
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


# ------------------------------------------------------------------------------------------
# request smuggling
# ------------------------------------------------------------------------------------------

SMUGGLING_HEADERS = {
    "content-length-and-chunked": ["Content-Length: 5", "Transfer-Encoding: chunked"],
    "chunked-and-content-length": ["Transfer-Encoding: chunked", "Content-Length: 5"],
    "plus-sign": ["Content-Length: +5"],
    # a line that is no header hides the rest of the head from a lenient parser (RFC 9112 5.1)
    "space-before-colon": ["X-A: b", "Content-Length : 5"],
    "tab-before-colon": ["Content-Length\t: 5"],
    "line-without-colon": ["X-A: b", "Garbage", "Content-Length: 5"],
    "underscore": ["Content-Length: 0_5"],
    "empty": ["Content-Length: "],
    "two-equal": ["Content-Length: 5", "Content-Length: 5"],
    "two-different": ["Content-Length: 5", "Content-Length: 40"],
    "comma-list": ["Content-Length: 5, 5"],
    "transfer-encoding-not-chunked": ["Transfer-Encoding: gzip"],
    "chunked-not-last": ["Transfer-Encoding: chunked, gzip"],
}


@pytest.mark.parametrize("lines", list(SMUGGLING_HEADERS.values()), ids=list(SMUGGLING_HEADERS))
def test_ambiguous_body_framing_400_and_close(api, srv, lines):
    """A body whose length the server and a proxy in front of it could read differently: 400
    before the handler runs (no session created), then the connection is closed, so nothing
    after the head is ever taken for the next request."""
    s, f = connect(srv.port)
    with s, f:
        head = "POST /session HTTP/1.1\r\nHost: 127.0.0.1\r\n%s\r\n\r\n" % "\r\n".join(lines)
        smuggled = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        s.sendall(head.encode() + b"0\r\n\r\n" + smuggled)
        status, headers, body = read_response(f)
        assert status == 400, body
        assert_detail(body)
        assert headers.get("connection") == "close"
        assert closed_by_server(f)
    assert api.health()["queue_length"] == 0  # POST /session never ran


def test_plain_content_length_keeps_the_connection(api, srv):
    """Guard: a well-formed Content-Length body still keeps the connection alive."""
    s, f = connect(srv.port)
    with s, f:
        for _ in range(2):
            s.sendall(b"POST /session HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n"
                      b"Content-Type: application/json\r\n\r\n{}")
            status, headers, body = read_response(f)
            assert status == 201, body
            assert "connection" not in headers


# ------------------------------------------------------------------------------------------
# HTTP/0.9 and Expect: 100-continue
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("line", [b"GET /healthz\r\n", b"GET /status\n", b"POST /session\r\n"])
def test_http09_request_line_400_at_once(srv, line):
    """No version: answered at once (not after waiting for headers that never come, until
    --socket-timeout, 40 s here), with a status line, JSON, and the connection closed."""
    s, f = connect(srv.port, timeout=15)
    with s, f:
        s.sendall(line)
        status, headers, body = read_response(f)
        assert status == 400
        assert "HTTP/0.9" in body["detail"]
        assert headers.get("connection") == "close"
        assert closed_by_server(f)


def upload_body():
    return build_multipart({}, [("topology", "simple.yml", SIMPLE)])


def expect_request(path, sid=None, length=None, extra=()):
    body, ctype = upload_body()
    lines = ["POST %s HTTP/1.1" % path, "Host: 127.0.0.1", "Expect: 100-continue",
             "Content-Type: %s" % ctype, "Content-Length: %d" % (len(body) if length is None
                                                                 else length)]
    if sid:
        lines.append("X-Session-ID: %s" % sid)
    return ("\r\n".join(lines + list(extra)) + "\r\n\r\n").encode(), body


def refused_unknown_session(api):
    return expect_request("/lab", sid="no-such-session"), 404


def refused_not_active(api):
    api.new_session()  # active
    return expect_request("/lab", sid=api.new_session()), 423  # the second one waits


def refused_too_large(api):
    return expect_request("/lab", sid=api.new_session(), length=int(MAX_MB * 2 ** 20) + 1), 413


def refused_unknown_endpoint(api):
    return expect_request("/no-such-endpoint", sid=api.new_session()), 404


def refused_smuggling(api):
    return expect_request("/lab", sid=api.new_session(),
                          extra=["Transfer-Encoding: chunked"]), 400


def refused_json_body_too_large(api):
    return expect_request("/session/heartbeat", sid=api.new_session(), length=2 ** 21), 413


REFUSALS = [refused_unknown_session, refused_not_active, refused_too_large,
            refused_unknown_endpoint, refused_smuggling, refused_json_body_too_large]


@pytest.mark.parametrize("refusal", REFUSALS, ids=[r.__name__ for r in REFUSALS])
def test_expect_100_refused_request_gets_final_status_only(api, srv, refusal):
    """A client waiting for 100 Continue before sending a body it must not send gets the final
    status as the first and only answer, then the connection is closed."""
    (head, _body), expected = refusal(api)
    s, f = connect(srv.port)
    with s, f:
        s.sendall(head)  # and no body: the client waits for 100 Continue
        status, headers, body = read_response(f)
        assert status == expected, body
        assert_detail(body)
        assert closed_by_server(f)
    assert lab_dirs(srv) == []


def test_expect_100_accepted_upload_gets_continue_before_the_body(api, srv):
    """Guard (curl relies on it): POST /lab by the active session, acceptable size: 100 Continue
    while the client still holds the body back, then the final answer."""
    (head, body), _ = expect_request("/lab", sid=api.new_session()), 200
    s, f = connect(srv.port, timeout=30)
    with s, f:
        s.sendall(head)
        assert f.readline() == b"HTTP/1.1 100 Continue\r\n"
        assert f.readline() == b"\r\n"
        s.sendall(body)
        status, headers, answer = read_response(f)
        assert status == 200, answer
        assert sorted(d["name"] for d in answer["devices"]) == ["r1", "r2"]
        # and the connection goes on serving
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert read_response(f)[0] == 204


def test_expect_100_small_json_body_continues(api, srv):
    """Guard: an accepted request with a small body to discard also gets its 100 Continue."""
    sid = api.new_session()
    s, f = connect(srv.port)
    with s, f:
        s.sendall(("POST /session/heartbeat HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Session-ID: %s\r\n"
                   "Expect: 100-continue\r\nContent-Length: 2\r\n\r\n" % sid).encode())
        assert f.readline() == b"HTTP/1.1 100 Continue\r\n"
        assert f.readline() == b"\r\n"
        s.sendall(b"{}")
        assert read_response(f)[0] == 204


# ------------------------------------------------------------------------------------------
# IPv6
# ------------------------------------------------------------------------------------------


def _ipv6_loopback_works():
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def _dual_stack_works():
    """Whether an IPv6 socket on :: with IPV6_V6ONLY=0 takes IPv4 connections here."""
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            s.bind(("::", 0))
            s.listen(1)
            with socket.create_connection(("127.0.0.1", s.getsockname()[1]), timeout=5):
                pass
        return True
    except OSError:
        return False


needs_ipv6 = pytest.mark.skipif(not _ipv6_loopback_works(), reason="no IPv6 loopback (::1) here")


def healthz(host, port):
    shown = "[%s]" % host if ":" in host else host
    return http("GET", "http://%s:%d/healthz" % (shown, port))[0]


@needs_ipv6
def test_ipv6_loopback(tmp_path):
    status_file = tmp_path / "status.json"
    status_file.write_text(json.dumps({"status": "starting"}))
    srv = ServerProcess(tmp_path, "--host", "::1", "--status-file", status_file).start()
    try:
        assert "Listening on http://[::1]:%d " % srv.port in srv.log()
        assert healthz("::1", srv.port) == 204
        sid = http("POST", "http://[::1]:%d/session" % srv.port)[1]["session_id"]
        assert http("GET", "http://[::1]:%d/session/%s" % (srv.port, sid))[0] == 200
        data = json.loads(status_file.read_text())
        assert (data["status"], data["host"], data["port"]) == ("running", "::1", srv.port)
    finally:
        assert srv.stop() == 0, srv.log()


@needs_ipv6
def test_ipv6_any_address_is_dual_stack(tmp_path):
    srv = ServerProcess(tmp_path, "--host", "::").start()
    try:
        assert "Listening on http://[::]:%d " % srv.port in srv.log()
        assert healthz("::1", srv.port) == 204
        if not _dual_stack_works():
            pytest.skip("this OS refuses IPv4 on an IPv6 socket (IPV6_V6ONLY)")
        assert healthz("127.0.0.1", srv.port) == 204
    finally:
        assert srv.stop() == 0, srv.log()


@needs_ipv6
def test_ipv6_port_range_skips_a_busy_port(tmp_path):
    busy = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    with busy:
        busy.bind(("::1", 0))
        busy.listen(1)
        first = busy.getsockname()[1]
        srv = ServerProcess(tmp_path, "--host", "::1", "--port-range", first, first + 20).start()
        try:
            assert first < srv.port <= first + 20
            assert healthz("::1", srv.port) == 204
        finally:
            assert srv.stop() == 0, srv.log()


@needs_ipv6
def test_ipv6_socket_activation(tmp_path):
    """Guard: a socket-activated IPv6 socket is served, and the log line brackets it."""
    tool = shutil.which("systemd-socket-activate")
    if not tool:
        pytest.skip("systemd-socket-activate is not installed")
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
        s.bind(("::1", 0))
        port = s.getsockname()[1]
    srv = ServerProcess(tmp_path)
    passed = ["FAKE_NETLAB_DIR", "PYTHONUNBUFFERED"]
    srv.cmd = [tool, "-l", "[::1]:%d" % port] + \
        ["-E%s=%s" % (k, srv.env[k]) for k in passed] + srv.cmd
    srv._log = open(srv.log_path, "ab")  # ServerProcess.start() without waiting for the line
    srv.proc = subprocess.Popen(srv.cmd, stdin=subprocess.DEVNULL, stdout=srv._log,
                                stderr=subprocess.STDOUT, env=srv.env, start_new_session=True)
    try:
        wait_until(lambda: "Listening on" in srv.log(), timeout=10,
                   what="systemd-socket-activate to listen")
        assert healthz("::1", port) == 204
        wait_until(lambda: "Listening on http://[::1]:%d " % port in srv.log(), timeout=10,
                   what="the server's listening line")
    finally:
        rc = srv.stop()
    assert rc == 0, srv.log()


# ------------------------------------------------------------------------------------------
# clients that reset their connection
# ------------------------------------------------------------------------------------------


def reset(s, f):
    """Close with a TCP reset (SO_LINGER 0) instead of a FIN."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    f.close()  # (the file holds the socket open too)
    s.close()


def test_a_reset_connection_is_no_traceback_and_no_500(start_server):
    """A client resetting its connection mid-head or mid-upload is a dropped connection (DEBUG
    at most), never a traceback on stderr or an 'unhandled error' 500 logged as a bug."""
    srv, api = start_server()
    sid = api.new_session()
    s, f = connect(srv.port)
    s.sendall(b"GET / HTTP/1.1\r\nHost: local")
    reset(s, f)
    body, ctype = build_multipart({}, [("topology", "simple.yml", SIMPLE + b"#" * 200000)])
    s, f = connect(srv.port)
    s.sendall(("POST /lab HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Session-ID: %s\r\nContent-Type: %s\r\n"
               "Content-Length: %d\r\n\r\n" % (sid, ctype, len(body))).encode() + body[:1000])
    wait_until(lambda: lab_dirs(srv), 5, what="upload started")
    reset(s, f)
    wait_until(lambda: not lab_dirs(srv), 5, what="partial upload removed")
    assert api.health()["queue_length"] == 1  # the server serves on
    log = srv.log()
    assert "Traceback" not in log and "unhandled error" not in log, log
