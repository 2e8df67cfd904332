"""Identity and access control (issue 12): --auth-file tokens, sessions owned by their user,
others' ids hidden, admins' kick and destroy. Real server processes; nothing mocked."""
import base64
import json
import signal
import subprocess
import sys
import time

import pytest

from helpers import SERVER
from server_support import (SIMPLE, TOKENS, Api, start_server, wait_until,  # noqa: F401
                            write_auth_file)

pytestmark = pytest.mark.timeout(60)


def basic(name, token):
    return {"Authorization": "Basic " + base64.b64encode(
        ("%s:%s" % (name, token)).encode()).decode()}


def bearer(name):
    return {"Authorization": "Bearer " + TOKENS[name]}


@pytest.fixture
def auth_server(start_server, tmp_path):
    """A server with alice, bob and root (admin): (srv, {name: Api})."""
    srv, api = start_server("--auth-file", str(write_auth_file(tmp_path / "users")))
    return srv, {name: api.as_user(token) for name, token in TOKENS.items()}


def test_every_endpoint_but_healthz_needs_a_valid_token(auth_server):
    srv, users = auth_server
    anon = Api(srv)
    for path in ("/", "/status", "/debug/health", "/metrics", "/docs", "/openapi.json",
                 "/active-session"):
        status, body, headers = anon.req("GET", path)
        assert status == 401, (path, status, body)
        assert body["detail"].startswith("authentication required"), body
    status, body, headers = anon.req("POST", "/session")
    assert status == 401 and "Bearer" in body["detail"]
    assert anon.req("GET", "/healthz")[0] == 204  # the liveness probe stays open
    for wrong in ({"Authorization": "Bearer " + "x" * 22},
                  {"Authorization": "Bearer " + TOKENS["alice"][:-1]},
                  basic("alice", "not-the-token-of-alice"),
                  basic("bob", TOKENS["alice"]),  # a real token, under another name
                  {"Authorization": "Basic !!!"}, {"Authorization": "Digest x"}):
        status, body, headers = anon.req("GET", "/status", headers=wrong)
        assert status == 401, (wrong, status, body)
        assert isinstance(body["detail"], str) and body["detail"]
        assert any("Basic" in h for h in headers.get_all("WWW-Authenticate")), headers
        assert any("Bearer" in h for h in headers.get_all("WWW-Authenticate")), headers
    assert anon.req("GET", "/status", headers=bearer("alice"))[0] == 200
    assert anon.req("GET", "/status", headers=basic("bob", TOKENS["bob"]))[0] == 200
    assert "Traceback" not in srv.log()


def test_a_session_belongs_to_its_creator(auth_server):
    srv, users = auth_server
    alice, bob = users["alice"], users["bob"]
    a = alice.new_session()
    b = bob.new_session()
    status, lab, _ = alice.req("POST", "/lab", a, *multipart())
    assert status == 200, lab
    assert bob.req("POST", "/session/heartbeat", b)[0] == 204  # his own
    for method, path, sid in (("POST", "/session/heartbeat", a), ("GET", "/lab", a),
                              ("GET", "/lab/devices", a), ("POST", "/lab/release", a),
                              ("DELETE", "/lab", a), ("DELETE", "/session/" + a, None)):
        status, body, _ = bob.req(method, path, sid)
        assert status == 403, (method, path, status, body)
        assert body["detail"] == ("session %s belongs to alice: only its owner%s may use it"
                                  % (a[:8], " or an admin" if method == "DELETE" else "")), body
        assert a not in json.dumps(body)
    status, body, _ = bob.req("POST", "/lab", a, *multipart())
    assert status == 403 and body["detail"].startswith("session %s belongs to alice" % a[:8])
    # nothing changed: alice still holds the lab, bob still waits
    assert alice.session(a)[1]["status"] == "active"
    assert bob.session(b)[1] == {"session_id": b, "status": "waiting", "position": 1}
    assert alice.req("GET", "/lab", a)[1]["ref_count"] == 1
    assert alice.req("POST", "/lab/release", a)[0] == 204
    assert alice.req("DELETE", "/session/" + a)[0] == 204
    assert bob.session(b)[1]["status"] == "active"


def test_reads_of_another_users_session_never_reveal_its_id_nor_keep_it_alive(start_server,
                                                                             tmp_path):
    srv, api = start_server("--auth-file", str(write_auth_file(tmp_path / "users")),
                            "--waiting-timeout", "3", "--active-timeout", "3")
    alice, bob = api.as_user(TOKENS["alice"]), api.as_user(TOKENS["bob"])
    a = alice.new_session()
    status, body = bob.session_full(a)
    assert status == 200 and body["session_id"] == a[:8] and body["owner"] == "alice", body
    assert alice.session_full(a)[1]["session_id"] == a
    # bob's reads (plain and long-poll) are no sign of life of alice's session
    deadline = time.monotonic() + 8
    while bob.session_full(a, wait=0.5)[0] == 200:
        assert time.monotonic() < deadline, "bob's polls kept alice's session alive"
    assert alice.session_full(a)[0] == 404


def test_others_session_ids_are_hidden_on_every_endpoint_that_lists_sessions(auth_server):
    srv, users = auth_server
    alice, bob, root = users["alice"], users["bob"], users["root"]
    a = alice.new_session()
    b = bob.new_session()
    assert alice.req("POST", "/lab", a, *multipart())[0] == 200
    views = (("GET", "/", {}), ("GET", "/", {"Accept": "text/html"}),
             ("GET", "/active-session", {}), ("GET", "/status", {}),
             ("GET", "/debug/health", {}), ("GET", "/metrics", {}),
             ("GET", "/session/" + a, {}), ("GET", "/session/" + b, {}))
    for method, path, headers in views:
        status, body, raw = bob.req(method, path, headers=headers)
        text = json.dumps(body) if not isinstance(body, (bytes, str)) else str(body)
        assert status == 200, (path, status)
        assert a not in text, (path, text[:300])  # alice's, to bob: short id only
        if path in ("/status", "/debug/health", "/active-session", "/"):
            assert a[:8] in text, (path, text[:300])
    # bob sees his own in full; alice hers; an admin everybody's
    assert b in json.dumps(bob.req("GET", "/status")[1])
    assert a in json.dumps(alice.req("GET", "/status")[1])
    assert alice.req("GET", "/active-session")[1]["session_id"] == a
    assert bob.req("GET", "/active-session")[1]["session_id"] == a[:8]
    admin_view = json.dumps(root.req("GET", "/debug/health")[1])
    assert a in admin_view and b in admin_view
    status = bob.req("GET", "/status")[1]
    assert status["holder"]["owner"] == "alice" and status["queue"][0]["owner"] == "bob"


def test_with_tokens_the_owner_is_the_authenticated_name(auth_server):
    srv, users = auth_server
    status, body, _ = users["bob"].req(
        "POST", "/session", body=json.dumps({"owner": "alice", "note": "nightly",
                                             "link": "https://ci.example/1"}).encode(),
        headers={"Content-Type": "application/json"})
    assert status == 201
    session = users["bob"].session_full(body["session_id"])[1]
    assert (session["owner"], session["note"], session["link"]) == \
        ("bob", "nightly", "https://ci.example/1")


def test_an_admin_kicks_a_session_and_the_next_one_is_promoted(auth_server):
    srv, users = auth_server
    alice, bob, root = users["alice"], users["bob"], users["root"]
    a = alice.new_session()
    assert alice.req("POST", "/lab", a, *multipart())[0] == 200
    b = bob.new_session()
    assert root.req("DELETE", "/session/" + a)[0] == 204
    assert bob.session(b)[1]["status"] == "active"
    assert alice.session(a)[0] == 404
    events = [e["text"] for e in root.req("GET", "/status")[1]["events"]]
    assert any("kicked by admin root" in t and a[:8] in t for t in events), events
    assert "kicked by admin root" in srv.log()
    # the lab was handled as on any session end: released (ref count 0), then torn down
    wait_until(lambda: root.lab_state() == "stopped", timeout=20, what="the kicked lab's teardown")


def test_an_admin_may_force_destroy_the_lab_others_may_not(auth_server):
    srv, users = auth_server
    alice, bob, root = users["alice"], users["bob"], users["root"]
    a = alice.new_session()
    assert alice.req("POST", "/lab", a, *multipart())[0] == 200
    assert bob.req("DELETE", "/lab?force=true", a)[0] == 403
    assert root.req("DELETE", "/lab?force=false", a)[0] == 409  # in use: the usual rule
    assert root.req("DELETE", "/lab?force=true", a)[0] == 202
    wait_until(lambda: root.lab_state() == "stopped", timeout=20, what="the teardown")
    assert "destroy requested by admin root" in srv.log()
    assert root.req("POST", "/session/heartbeat", a)[0] == 403  # admins kick; they do not use
    assert alice.session(a)[1]["status"] == "active"  # the session itself goes on


def multipart():
    from server_support import build_multipart
    body, ctype = build_multipart({}, [("topology", "simple.yml", SIMPLE)])
    return body, {"Content-Type": ctype}


def start(tmp_path, *args):
    return subprocess.run([sys.executable, str(SERVER), "--simulate", "--port", "0",
                           "--state-dir", str(tmp_path / "state")] + list(args),
                          capture_output=True, text=True, timeout=30)


@pytest.mark.parametrize("text, mode, expected", [
    (None, 0o644, "is readable by group or others (mode 644)"),
    (None, 0o640, "is readable by group or others (mode 640)"),
    ("alice:short-token\n", 0o600, "the token of alice is shorter than 16 characters"),
    ("alice\n", 0o600, "line 1: expected NAME:TOKEN or NAME:TOKEN:admin"),
    ("alice:%s:root\n" % TOKENS["alice"], 0o600, "expected NAME:TOKEN or NAME:TOKEN:admin"),
    ("al ice:%s\n" % TOKENS["alice"], 0o600, "the name 'al ice' is not"),
    ("# nobody\n\n", 0o600, "names no user"),
    ("a:%s\nb:%s\n" % (TOKENS["alice"], TOKENS["alice"]), 0o600, "gives a token twice"),
])
def test_an_unusable_auth_file_keeps_the_server_from_starting(tmp_path, text, mode, expected):
    path = write_auth_file(tmp_path / "users", text, mode)
    out = start(tmp_path, "--auth-file", str(path))
    assert out.returncode != 0
    assert expected in out.stderr, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "Traceback" not in out.stderr
    missing = start(tmp_path, "--auth-file", str(tmp_path / "nope"))
    assert missing.returncode != 0 and "cannot read the auth file" in missing.stderr


def test_an_open_server_on_a_non_loopback_address_warns(start_server, tmp_path):
    srv, api = start_server("--host", "0.0.0.0", sub="open")
    assert "WARNING" in srv.log() and "without --auth-file" in srv.log()
    srv2, api2 = start_server("--host", "0.0.0.0", "--auth-file",
                              str(write_auth_file(tmp_path / "users")), sub="closed")
    assert "without --auth-file" not in srv2.log()
    srv3, api3 = start_server(sub="loopback")
    assert "without --auth-file" not in srv3.log()


def test_a_reload_reads_the_auth_file_again_and_refuses_one_it_could_not_use(start_server,
                                                                             tmp_path):
    users = write_auth_file(tmp_path / "users")
    srv, api = start_server("--auth-file", str(users))
    alice = api.as_user(TOKENS["alice"])
    a = alice.new_session()
    carol = "carol-token-0123456789"
    # a new user, the file left readable by others: the reload is refused, nothing changes
    write_auth_file(users, users.read_text() + "carol:%s\n" % carol, mode=0o644)
    srv.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload refused" in srv.log(), timeout=30, what="the refusal")
    assert "readable by group or others" in srv.log()
    assert api.as_user(carol).req("GET", "/status")[0] == 401
    assert alice.session(a)[1]["status"] == "active"
    # fixed: the next reload serves the new user, the sessions and their owners are kept
    users.chmod(0o600)
    srv.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: srv.log().count("Listening on http") == 2, timeout=30,
               what="the reloaded server")
    wait_until(lambda: api.as_user(carol).req("GET", "/status")[0] == 200, timeout=15,
               what="carol's token")
    assert alice.session(a)[1]["status"] == "active"
    assert api.as_user(carol).req("POST", "/session/heartbeat", a)[0] == 403


def test_the_status_marks_the_users_own_sessions_as_theirs(auth_server):
    srv, users = auth_server
    a = users["alice"].new_session()
    b = users["bob"].new_session()
    view = users["bob"].req("GET", "/status")[1]
    assert (view["holder"]["you"], view["holder"]["session"]) == (False, a[:8])
    assert (view["queue"][0]["you"], view["queue"][0]["session"]) == (True, b)
    admin = users["root"].req("GET", "/status")[1]  # an admin sees all, owns none
    assert (admin["holder"]["you"], admin["holder"]["session"]) == (False, a)
