"""Requests a web page could make a browser send, as raw HTTP requests.

1. a state-changing request (POST, DELETE) with a foreign ``Origin`` -- another site, or ``null``
   (sandboxed iframes, file://) -- is refused with 403 and changes nothing; the server's own
   origin, no Origin at all (curl, the client library) and ``--allow-origin`` pass;
2. bound to loopback, a request whose ``Host`` is not a loopback name (DNS rebinding) is refused
   with 403, GETs of the status page included; loopback names and ``--allow-host`` pass;
3. bound to a non-loopback address, any Host reads (as before), but a same-origin POST through a
   name the server does not know (a rebound name) is still refused.

The same attacks from a real browser: tests/test_origin_chromium.py.
"""
import subprocess
import sys

import pytest

from helpers import SERVER, http
from server_support import start_server  # noqa: F401

EVIL = "http://evil.example"


def refused(status, body, word):
    assert status == 403, (status, body)
    assert word in body["detail"], body


def test_foreign_origin_cannot_change_anything(start_server):
    srv, api = start_server()
    for origin in (EVIL, EVIL + ":%d" % srv.port, "null", "http://127.0.0.1:1",
                   "https://127.0.0.1:%d.evil.example" % srv.port, "file://"):
        status, body, _ = api.req("POST", "/session", headers={"Origin": origin})
        refused(status, body, "Origin")
    assert api.queue_length() == 0, "a refused POST /session created a session"

    sid = api.new_session()  # no Origin: curl, the client library
    status, body, _ = api.req("DELETE", "/session/%s" % sid, headers={"Origin": EVIL})
    refused(status, body, "Origin")
    status, body, _ = api.req("POST", "/lab", sid, b"x" * 5000,
                              {"Origin": "null", "Content-Type": "multipart/form-data; boundary=b"})
    refused(status, body, "Origin")
    assert api.session(sid)[0] == 200 and api.queue_length() == 1
    assert srv.netlab_verbs() == []
    # reading is not state-changing: a GET with a foreign Origin is answered
    status, body, _ = api.req("GET", "/session/%s" % sid, headers={"Origin": EVIL})
    assert status == 200 and body["status"] == "active", (status, body)


def test_own_origin_and_no_origin_are_accepted(start_server):
    srv, api = start_server()
    for host, origin in (("127.0.0.1:%d" % srv.port, "http://127.0.0.1:%d" % srv.port),
                         ("localhost:%d" % srv.port, "http://localhost:%d" % srv.port),
                         ("LOCALHOST:%d" % srv.port, "http://localhost:%d" % srv.port),
                         ("[::1]:%d" % srv.port, "http://[::1]:%d" % srv.port),
                         ("localhost", "http://localhost:80"),
                         ("127.0.0.1:%d" % srv.port, None)):
        headers = {"Host": host}
        if origin:
            headers["Origin"] = origin
        status, body, _ = api.req("POST", "/session", headers=headers)
        assert status == 201, (host, origin, status, body)
        status, _, _ = api.req("DELETE", "/session/%s" % body["session_id"], headers=headers)
        assert status == 204, (host, origin, status)
    # the Origin must be the one the Host names: another loopback port is another site
    status, body, _ = api.req("POST", "/session", headers={
        "Host": "127.0.0.1:%d" % srv.port, "Origin": "http://127.0.0.1:%d" % (srv.port + 1)})
    refused(status, body, "Origin")
    assert api.queue_length() == 0


def test_allow_origin_flag(start_server):
    srv, api = start_server("--allow-origin", "http://UI.example:3000",
                            "--allow-origin", "https://ops.example/")
    for origin in ("http://ui.example:3000", "https://ops.example", "https://ops.example:443"):
        status, body, _ = api.req("POST", "/session", headers={"Origin": origin})
        assert status == 201, (origin, status, body)
    for origin in ("http://ui.example:3001", "http://ops.example", "null"):
        status, body, _ = api.req("POST", "/session", headers={"Origin": origin})
        refused(status, body, "Origin")
    assert api.queue_length() == 3


@pytest.mark.parametrize("flag, value", [("--allow-origin", "ui.example"),
                                         ("--allow-origin", "null"),
                                         ("--allow-origin", "http://ui.example/path"),
                                         ("--allow-host", "http://ui.example"),
                                         ("--allow-host", "ui.example:port")])
def test_bad_allow_values_are_refused_at_start_up(tmp_path, flag, value):
    proc = subprocess.run([sys.executable, str(SERVER), "--simulate", "--port", "0",
                           "--state-dir", str(tmp_path), flag, value],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc
    assert flag in proc.stderr and repr(value) in proc.stderr, proc.stderr
    assert "unrecognized" not in proc.stderr, proc.stderr


def test_only_loopback_hosts_are_answered_on_loopback(start_server):
    srv, api = start_server()
    for host in ("evil.example", "evil.example:%d" % srv.port, "127.0.0.1.evil.example",
                 "localhost.evil.example:%d" % srv.port, "127.0.0.256", "[::2]", "0.0.0.0",
                 "127.0.0.1:x"):
        for method, path, headers in (("GET", "/", {"Accept": "text/html"}),
                                      ("GET", "/status", {}), ("GET", "/healthz", {}),
                                      ("GET", "/debug/health", {}), ("POST", "/session", {})):
            status, body, hdrs = http(method, srv.url + path, headers=dict(headers, Host=host))
            assert status == 403, (host, method, path, status, body)
            assert hdrs["Content-Type"] == "application/json"
            assert "Host" in body["detail"] and "--allow-host" in body["detail"], body
    assert api.queue_length() == 0
    for host in ("127.0.0.1:%d" % srv.port, "127.0.0.1", "127.1.2.3:99", "localhost",
                 "localhost:%d" % srv.port, "LocalHost", "[::1]", "[::1]:%d" % srv.port):
        status, body, _ = http("GET", srv.url + "/status", headers={"Host": host})
        assert status == 200, (host, status, body)
        status, body, _ = http("GET", srv.url + "/healthz", headers={"Host": host})
        assert status == 204, (host, status, body)


def test_allow_host_flag(start_server):
    srv, api = start_server("--allow-host", "Lab.example", "--allow-host", "proxy.example:8443")
    for host in ("lab.example", "lab.example:%d" % srv.port, "proxy.example:8443", "localhost"):
        status, body, _ = http("GET", srv.url + "/status", headers={"Host": host})
        assert status == 200, (host, status, body)
    for host in ("proxy.example", "proxy.example:8444", "sub.lab.example", "evil.example"):
        status, body, _ = http("GET", srv.url + "/status", headers={"Host": host})
        refused(status, body, "Host")
    # the docs page reached as http://lab.example:PORT posts with that origin: its own
    own = "lab.example:%d" % srv.port
    status, body, _ = api.req("POST", "/session", headers={"Host": own, "Origin": "http://" + own})
    assert status == 201, (status, body)


def test_any_host_reads_on_a_non_loopback_address_but_rebound_names_cannot_post(start_server):
    srv, api = start_server("--host", "0.0.0.0", "--allow-host", "lab.example")
    status, body, _ = http("GET", srv.url + "/status", headers={"Host": "any.example"})
    assert status == 200, (status, body)  # as before: whatever name the LAN uses
    rebound = "evil.example:%d" % srv.port  # the page's own origin, by a name we do not know
    status, body, _ = api.req("POST", "/session", headers={"Host": rebound,
                                                          "Origin": "http://" + rebound})
    refused(status, body, "Origin")
    for host in ("127.0.0.1:%d" % srv.port, "lab.example:%d" % srv.port, "10.1.2.3:8000"):
        status, body, _ = api.req("POST", "/session", headers={"Host": host,
                                                              "Origin": "http://" + host})
        assert status == 201, (host, status, body)
    status, body, _ = api.req("POST", "/session", headers={"Host": "any.example"})
    assert status == 201, (status, body)  # no Origin: not a browser
    assert api.queue_length() == 4
