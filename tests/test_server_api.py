"""The REST contract (shared/notes/api-contract.md), row by row, against a real server process.

One server (fake netlab) is shared by this module; after every test the `clean` fixture ends all
sessions, waits for the lab to be torn down and checks that no lab work dir leaked.
"""
import http.client
import io
import json
import os
import threading
import time

import pytest

from server_support import (api, shared_server, srv,  # noqa: F401 (fixtures)
                            MAPPING, SIMPLE, SINGLE, assert_detail, build_multipart, calls_of,
                            lab_dirs, up_dirs, wait_until)


shared = shared_server("api")


def mark(srv):
    return len(srv.calls())


# ------------------------------------------------------------------------------------------
# sessions and the queue
# ------------------------------------------------------------------------------------------


def test_post_session_201_head_of_empty_queue_is_active(api):
    status, body, headers = api.req("POST", "/session")
    assert status == 201
    assert headers["Content-Type"] == "application/json"
    assert isinstance(body["session_id"], str) and body["session_id"]
    assert body["position"] == 0
    assert api.session(body["session_id"]) == (200, {"session_id": body["session_id"],
                                                     "status": "active", "position": 0})


def test_post_session_next_ones_wait_in_order(api):
    first = api.new_session()
    positions = []
    sids = []
    for _ in range(3):
        status, body, _ = api.req("POST", "/session")
        assert status == 201
        positions.append(body["position"])
        sids.append(body["session_id"])
    assert positions == [1, 2, 3]
    assert len(set(sids + [first])) == 4
    for i, sid in enumerate(sids, start=1):
        status, body = api.session(sid)
        assert status == 200
        assert (body["status"], body["position"]) == ("waiting", i)


def test_get_unknown_session_404(api):
    for path in ("/session/does-not-exist", "/session/does-not-exist?wait=1"):
        status, body, headers = api.req("GET", path)
        assert status == 404
        assert headers["Content-Type"] == "application/json"
        assert_detail(body)


def test_long_poll_returns_after_wait_seconds_when_nothing_changes(api):
    api.new_session()
    waiting = api.new_session()
    t0 = time.monotonic()
    status, body = api.session(waiting, wait=0.5)
    elapsed = time.monotonic() - t0
    assert status == 200 and (body["status"], body["position"]) == ("waiting", 1)
    assert 0.45 <= elapsed < 3, elapsed


def test_long_poll_returns_as_soon_as_the_position_changes(api):
    head = api.new_session()
    api.new_session()
    third = api.new_session()
    out = {}
    t = threading.Thread(target=lambda: out.update(r=api.session(third, wait=20),
                                                   t=time.monotonic()))
    t.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    assert api.delete_session(head) == 204
    t.join(5)
    assert out["r"] == (200, {"session_id": third, "status": "waiting", "position": 1})
    assert out["t"] - t0 < 1.0


@pytest.mark.parametrize("wait", ["abc", "-1", "61", "1e9", "nan", ""])
def test_long_poll_bad_wait_400(api, wait):
    sid = api.new_session()
    t0 = time.monotonic()
    status, body, _ = api.req("GET", "/session/%s?wait=%s" % (sid, wait))
    assert status == 400, (wait, body)
    assert_detail(body)
    assert time.monotonic() - t0 < 2  # rejected at once, not held


def test_long_poll_wait_60_is_accepted(api):
    sid = api.new_session()  # active, alone: nothing changes, but wait=60 is valid
    other = api.new_session()
    out = {}
    t = threading.Thread(target=lambda: out.update(r=api.session(other, wait=60, timeout=30)))
    t.start()
    time.sleep(0.3)
    api.delete_session(sid)
    t.join(5)
    assert out["r"][0] == 200 and out["r"][1]["status"] == "active"


def test_long_poll_answers_at_once_for_an_active_session_or_a_stale_position(api):
    a = api.new_session()
    b = api.new_session()
    # active: nothing left to wait for
    t0 = time.monotonic()
    assert api.session(a, wait=20) == (200, {"session_id": a, "status": "active", "position": 0})
    assert time.monotonic() - t0 < 2
    # the caller last saw position 2, it is 1 now: the change already happened, answer at once
    t0 = time.monotonic()
    status, body, _ = api.req("GET", "/session/%s?wait=20&position=2" % b)
    assert (status, body["position"]) == (200, 1)
    assert time.monotonic() - t0 < 2
    # the position it knows is the current one: held until wait runs out
    t0 = time.monotonic()
    status, body, _ = api.req("GET", "/session/%s?wait=0.6&position=1" % b)
    assert (status, body["position"]) == (200, 1)
    assert time.monotonic() - t0 >= 0.5
    status, body, _ = api.req("GET", "/session/%s?wait=1&position=first" % b)
    assert status == 400 and "position" in body["detail"]


def test_delete_session_204_then_404_and_next_promoted(api):
    a = api.new_session()
    b = api.new_session()
    c = api.new_session()
    status, body, _ = api.req("DELETE", "/session/%s" % a)
    assert (status, body) == (204, None)
    assert api.session(b)[1]["status"] == "active" and api.session(b)[1]["position"] == 0
    assert api.session(c)[1]["position"] == 1
    assert api.req("GET", "/active-session")[1]["session_id"] == b
    status, body, _ = api.req("DELETE", "/session/%s" % a)
    assert status == 404
    assert_detail(body)
    assert api.session(a)[0] == 404


def test_delete_waiting_session_keeps_the_head(api):
    a = api.new_session()
    b = api.new_session()
    c = api.new_session()
    assert api.delete_session(b) == 204
    assert api.session(a)[1]["status"] == "active"
    assert api.session(c)[1] == {"session_id": c, "status": "waiting", "position": 1}


def test_heartbeat_204_400_404(api):
    active = api.new_session()
    waiting = api.new_session()
    for sid in (active, waiting):  # waiting sessions may heartbeat too
        status, body, _ = api.req("POST", "/session/heartbeat", sid)
        assert (status, body) == (204, None)
    status, body, _ = api.req("POST", "/session/heartbeat")
    assert status == 400
    assert "X-Session-ID" in body["detail"]
    status, body, _ = api.req("POST", "/session/heartbeat", headers={"X-Session-ID": "  "})
    assert status == 400
    status, body, _ = api.req("POST", "/session/heartbeat", "no-such-session")
    assert status == 404
    assert_detail(body)


def test_active_session_200_and_404(api):
    status, body, _ = api.req("GET", "/active-session")
    assert status == 404
    assert_detail(body)
    a = api.new_session()
    api.new_session()
    status, body, _ = api.req("GET", "/active-session")
    assert status == 200
    assert body == {"session_id": a, "status": "active", "position": 0}


# ------------------------------------------------------------------------------------------
# service endpoints, routing
# ------------------------------------------------------------------------------------------


def test_healthz_204_with_empty_body(srv):
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    try:
        conn.request("GET", "/healthz")
        resp = conn.getresponse()
        assert resp.status == 204
        assert resp.read() == b""
        # keep-alive: the same connection serves a second request
        conn.request("GET", "/healthz")
        resp = conn.getresponse()
        assert resp.status == 204 and resp.read() == b""
    finally:
        conn.close()


def test_debug_health_fields(api):
    a = api.new_session()
    api.new_session()
    before = time.time()
    body = api.health()
    assert body["status"] == "ok"
    assert isinstance(body["timestamp"], (int, float)) and abs(body["timestamp"] - before) < 5
    assert isinstance(body["uptime"], (int, float)) and body["uptime"] > 0
    assert body["queue_length"] == 2
    assert body["sessions"] == 2  # a count, as in the seed
    assert isinstance(body["session_list"], list) and len(body["session_list"]) == 2
    assert body["session_list"][0]["session_id"] == a


def test_root_200(api):
    status, body, _ = api.req("GET", "/")
    assert status == 200
    assert body  # a short JSON or text summary
    if isinstance(body, dict):
        assert body.get("service") == "remote-lab"


@pytest.mark.parametrize("method,path", [("GET", "/nope"), ("POST", "/nope"),
                                         ("GET", "/session/a/b"), ("GET", "/lab/unknown"),
                                         ("DELETE", "/lab/devices/x")])
def test_unknown_route_404_json(api, method, path):
    status, body, headers = api.req(method, path)
    assert status == 404
    assert headers["Content-Type"] == "application/json"
    assert_detail(body)


@pytest.mark.parametrize("method,path", [("PUT", "/session"), ("DELETE", "/healthz"),
                                         ("POST", "/active-session"), ("GET", "/lab/release"),
                                         ("PATCH", "/lab"), ("POST", "/session/x")])
def test_wrong_method_405_json(api, method, path):
    status, body, headers = api.req(method, path)
    assert status == 405
    assert headers["Content-Type"] == "application/json"
    assert_detail(body)
    allowed = {m.strip() for m in headers["Allow"].split(",")}  # RFC 9110: 405 names them
    assert allowed and method not in allowed and allowed <= {"GET", "POST", "DELETE"}


@pytest.mark.parametrize("case", ["waiting-423", "unknown-404", "no-header-400", "route-404",
                                  "method-405"])
def test_error_before_reading_the_body_keeps_the_connection_sane(api, srv, case):
    """A request refused before its body is read must not leave that body to be parsed as the
    next request on a keep-alive connection."""
    api.new_session()
    waiting = api.new_session()
    body, ctype = build_multipart({}, [("topology", "simple.yml", SIMPLE)])
    method, path, sid, expected = {
        "waiting-423": ("POST", "/lab", waiting, 423),
        "unknown-404": ("POST", "/lab", "unknown", 404),
        "no-header-400": ("POST", "/lab", None, 400),
        "route-404": ("POST", "/nope", waiting, 404),
        "method-405": ("PUT", "/lab", waiting, 405),
    }[case]
    headers = {"Content-Type": ctype}
    if sid:
        headers["X-Session-ID"] = sid
    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=5)
    try:
        conn.request(method, path, body, headers)
        resp = conn.getresponse()
        assert resp.status == expected
        assert json.loads(resp.read())["detail"]
        # the next request on this connection (http.client reopens it if the server closed it)
        conn.request("GET", "/session/%s" % waiting)
        resp = conn.getresponse()
        assert resp.status == 200
        assert json.loads(resp.read())["position"] == 1
    finally:
        conn.close()
    assert lab_dirs(srv) == []


# ------------------------------------------------------------------------------------------
# /lab*: only the active session
# ------------------------------------------------------------------------------------------

LAB_REQUESTS = [("GET", "/lab"), ("GET", "/lab/devices"), ("POST", "/lab/release"),
                ("DELETE", "/lab?force=true"), ("DELETE", "/lab?force=false")]


def test_lab_endpoints_unknown_session_404(api, srv):
    for method, path in LAB_REQUESTS:
        status, body, _ = api.req(method, path, "unknown-session")
        assert status == 404, (method, path)
        assert_detail(body)
    status, body = api.post_lab("unknown-session")
    assert status == 404
    assert lab_dirs(srv) == []


def test_post_lab_for_a_session_ending_right_after_its_check_404(tmp_path):
    """The session ends (DELETE from another thread, expiry) between POST /lab's active check and
    the pin that keeps it alive during the upload: 404, not a 500 from the KeyError."""
    import sys
    from helpers import ROOT
    sys.path.insert(0, str(ROOT))
    import remote_lab

    app = remote_lab.App(remote_lab.Settings(simulate=True, state_dir=str(tmp_path)))
    sid, _ = app.queue.create()
    checked = app.resolve_session

    def check_then_end(endpoint, request):
        checked(endpoint, request)
        app.end_session(sid, "deleted by client")
        return sid

    app.resolve_session = check_then_end
    headers = http.client.parse_headers(io.BytesIO(b"X-Session-ID: %s\r\n\r\n" % sid.encode()))
    endpoint, params = app.endpoints.match("POST", "/lab")
    request = remote_lab.Request("POST", "/lab", {}, headers, params, body=io.BytesIO(b""))
    response = app.respond(endpoint, request)
    assert response.status == 404
    assert response.body == {"detail": "unknown session %s" % sid}


def test_lab_endpoints_waiting_session_423(api, srv):
    api.new_session()
    waiting = api.new_session()
    for method, path in LAB_REQUESTS:
        status, body, _ = api.req(method, path, waiting)
        assert status == 423, (method, path)
        assert_detail(body)
    status, body = api.post_lab(waiting)
    assert status == 423
    assert_detail(body)
    assert lab_dirs(srv) == []


def test_lab_endpoints_without_session_header_400(api):
    for method, path in LAB_REQUESTS:
        status, body, _ = api.req(method, path)
        assert status == 400, (method, path)
        assert "X-Session-ID" in body["detail"]


def test_no_lab_answers(api):
    sid = api.new_session()
    status, body = api.lab(sid)
    assert status == 200
    assert body["running"] is False and body["ref_count"] == 0 and body["devices"] == []
    assert {"running", "topology", "ref_count", "devices", "netlab_status"} <= set(body)
    status, body, _ = api.req("GET", "/lab/devices", sid)
    assert status == 404
    assert_detail(body)
    status, body, _ = api.req("POST", "/lab/release", sid)
    assert status == 404
    assert_detail(body)
    status, body, _ = api.req("DELETE", "/lab?force=true", sid)
    assert (status, body) == (204, None)
    status, body, _ = api.req("DELETE", "/lab?force=false", sid)
    assert (status, body) == (204, None)


def test_delete_lab_bad_force_value_400(api):
    sid = api.new_session()
    status, body, _ = api.req("DELETE", "/lab?force=maybe", sid)
    assert status == 400
    assert "force" in body["detail"]


# ------------------------------------------------------------------------------------------
# the lab: acquire, reuse, release, destroy
# ------------------------------------------------------------------------------------------


def test_lab_full_cycle_acquire_reuse_release_destroy(api, srv):
    m = mark(srv)
    sid = api.new_session()
    status, body = api.post_lab(sid)
    assert status == 200, body
    assert body["reused"] is False
    assert [d["name"] for d in body["devices"]] == ["r1", "r2"]
    for d in body["devices"]:
        assert isinstance(d["raw"], dict)
        assert d["raw"]["name"] == d["name"] and "ansible_host" in d["raw"]
    devices = body["devices"]

    status, lab = api.lab(sid)
    assert status == 200
    assert lab["running"] is True and lab["topology"] == "simple.yml" and lab["ref_count"] == 1
    assert lab["devices"] == devices and isinstance(lab["netlab_status"], str)
    status, got, _ = api.req("GET", "/lab/devices", sid)
    assert (status, got) == (200, devices)

    # same fingerprint, reuse=true (default): ref + 1, no second `up`
    status, body = api.post_lab(sid)
    assert (status, body["reused"], body["devices"]) == (200, True, devices)
    assert api.lab(sid)[1]["ref_count"] == 2
    assert len(calls_of(srv, "up", m)) == 1

    # release: ref - 1; force=false refused while in use
    assert api.req("POST", "/lab/release", sid)[:2] == (204, None)
    assert api.lab(sid)[1]["ref_count"] == 1
    status, body, _ = api.req("DELETE", "/lab?force=false", sid)
    assert status == 409
    assert_detail(body)
    assert api.lab(sid)[1]["running"] is True
    assert api.req("POST", "/lab/release", sid)[0] == 204
    lab = api.lab(sid)[1]
    assert (lab["running"], lab["ref_count"]) == (True, 0)  # stays up idle at 0
    assert calls_of(srv, "down", m) == []

    # force=false at ref 0: destroyed (202), torn down in its dir
    status, body, _ = api.req("DELETE", "/lab?force=false", sid)
    assert status == 202
    workdir = up_dirs(srv, m)[0]
    wait_until(lambda: api.lab(sid)[1]["running"] is False, 10, what="lab torn down")
    api.wait_lab_state("stopped")
    downs = calls_of(srv, "down", m)
    assert [d["cwd"] for d in downs] == [workdir]
    assert downs[0]["argv"][:2] == ["down", "--cleanup"]
    assert not os.path.exists(workdir)
    assert api.req("DELETE", "/lab?force=true", sid)[:2] == (204, None)
    assert api.req("GET", "/lab/devices", sid)[0] == 404


def test_delete_lab_force_true_while_in_use_202(api, srv):
    m = mark(srv)
    sid = api.new_session()
    assert api.post_lab(sid)[0] == 200
    assert api.post_lab(sid)[1]["reused"] is True  # ref 2
    status, body, _ = api.req("DELETE", "/lab?force=true", sid)
    assert status == 202
    api.wait_lab_state("stopped")
    assert len(calls_of(srv, "down", m)) == 1
    assert lab_dirs(srv) == []
    lab = api.lab(sid)[1]
    assert (lab["running"], lab["ref_count"]) == (False, 0)
    # the session can start a lab again
    status, body = api.post_lab(sid)
    assert (status, body["reused"]) == (200, False)


def test_lab_busy_423_other_topology_while_in_use(api, srv):
    m = mark(srv)
    sid = api.new_session()
    assert api.post_lab(sid)[0] == 200
    status, body = api.post_lab(sid, MAPPING, "mapping.yml")
    assert status == 423
    assert "busy" in body["detail"].lower()
    lab = api.lab(sid)[1]
    assert (lab["topology"], lab["ref_count"], lab["running"]) == ("simple.yml", 1, True)
    assert len(calls_of(srv, "up", m)) == 1 and calls_of(srv, "down", m) == []
    assert len(lab_dirs(srv)) == 1  # the refused upload was not kept


def test_lab_busy_423_reuse_false_while_in_use(api, srv):
    m = mark(srv)
    sid = api.new_session()
    assert api.post_lab(sid)[0] == 200
    status, body = api.post_lab(sid, reuse=False)
    assert status == 423
    assert "busy" in body["detail"].lower()
    assert api.lab(sid)[1]["ref_count"] == 1
    assert len(calls_of(srv, "up", m)) == 1
    assert len(lab_dirs(srv)) == 1


def test_reuse_false_at_ref_zero_restarts(api, srv):
    m = mark(srv)
    sid = api.new_session()
    assert api.post_lab(sid)[0] == 200
    first_dir = up_dirs(srv, m)[0]
    assert api.req("POST", "/lab/release", sid)[0] == 204
    status, body = api.post_lab(sid, reuse=False)
    assert (status, body["reused"]) == (200, False)
    assert [d["name"] for d in body["devices"]] == ["r1", "r2"]
    ups = up_dirs(srv, m)
    assert len(ups) == 2 and ups[1] != first_dir
    downs = calls_of(srv, "down", m)
    assert [d["cwd"] for d in downs] == [first_dir]
    # the old lab went down before the new one came up
    assert downs[0]["time"] < calls_of(srv, "up", m)[1]["time"]
    assert not os.path.exists(first_dir)
    assert lab_dirs(srv) == [os.path.basename(ups[1])]
    assert api.lab(sid)[1]["ref_count"] == 1


def test_different_fingerprint_at_ref_zero_tears_down_then_starts(api, srv):
    m = mark(srv)
    sid = api.new_session()
    assert api.post_lab(sid)[0] == 200
    assert api.req("POST", "/lab/release", sid)[0] == 204
    status, body = api.post_lab(sid, MAPPING, "mapping.yml")
    assert (status, body["reused"]) == (200, False)
    assert sorted(d["name"] for d in body["devices"]) == ["leaf1", "leaf2", "spine"]
    ups = up_dirs(srv, m)
    downs = calls_of(srv, "down", m)
    assert len(ups) == 2 and [d["cwd"] for d in downs] == [ups[0]]
    assert downs[0]["time"] < calls_of(srv, "up", m)[1]["time"]
    lab = api.lab(sid)[1]
    assert (lab["topology"], lab["ref_count"]) == ("mapping.yml", 1)
    assert lab_dirs(srv) == [os.path.basename(ups[1])]


def test_same_topology_and_same_extra_files_is_reused(api, srv):
    m = mark(srv)
    sid = api.new_session()
    extras = [("nodes/r1.yml", b"device: frr\n"), ("banner.j2", b"hello\n")]
    assert api.post_lab(sid, extras=extras)[0] == 200
    # same names and bytes, sent in another order: the same lab
    status, body = api.post_lab(sid, extras=list(reversed(extras)))
    assert (status, body["reused"]) == (200, True)
    assert len(calls_of(srv, "up", m)) == 1


def test_same_topology_with_different_extra_files_is_not_reused(api, srv):
    """Each step differs from the previous one only in its extra files: never the same lab."""
    m = mark(srv)
    sid = api.new_session()
    steps = [
        [("nodes/r1.yml", b"device: frr\n")],
        [("nodes/r1.yml", b"device: eos\n")],  # other bytes
        [("nodes/r9.yml", b"device: eos\n")],  # same bytes, other name
        [],  # no extra file at all
        [("nodes/r9.yml", b"device: eos\n"), ("r9.yml", b"device: eos\n")],  # more files
    ]
    assert api.post_lab(sid, SINGLE, "single.yml", steps[0])[1]["reused"] is False
    for i, extras in enumerate(steps[1:], start=2):
        # while in use: another lab, so busy
        status, body = api.post_lab(sid, SINGLE, "single.yml", extras)
        assert status == 423, (i, body)
        # at ref 0: torn down and started again, not reused
        assert api.req("POST", "/lab/release", sid)[0] == 204
        status, body = api.post_lab(sid, SINGLE, "single.yml", extras)
        assert (status, body["reused"]) == (200, False), i
        assert len(calls_of(srv, "up", m)) == i
        assert len(calls_of(srv, "down", m)) == i - 1
    assert len(lab_dirs(srv)) == 1


def test_lab_torn_down_when_session_ends_without_keep_warm(api, srv):
    m = mark(srv)
    sid = api.new_session()
    nxt = api.new_session()
    assert api.post_lab(sid, SINGLE, "single.yaml")[0] == 200
    workdir = up_dirs(srv, m)[0]
    assert api.delete_session(sid) == 204
    api.wait_lab_state("stopped")
    assert [d["cwd"] for d in calls_of(srv, "down", m)] == [workdir]
    assert lab_dirs(srv) == []
    # the next session gets a fresh `up`, even for the same topology with reuse=true
    status, body = api.post_lab(nxt, SINGLE, "single.yaml", reuse=True)
    assert (status, body["reused"]) == (200, False)
    assert [d["name"] for d in body["devices"]] == ["solo"]
    assert len(calls_of(srv, "up", m)) == 2


def test_concurrent_acquires_of_the_same_lab_share_one_up(api, srv):
    m = mark(srv)
    sid = api.new_session()
    results = []
    threads = [threading.Thread(target=lambda: results.append(api.post_lab(sid, SINGLE,
                                                                            "single.yml")))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert [r[0] for r in results] == [200, 200, 200]
    assert sorted(r[1]["reused"] for r in results) == [False, True, True]
    assert len(calls_of(srv, "up", m)) == 1
    assert api.lab(sid)[1]["ref_count"] == 3
    assert len(lab_dirs(srv)) == 1  # the two reused uploads were discarded


def test_command_line_defaults_are_the_settings_defaults():
    """No option given: every setting is the Settings field's default (the state dir made
    absolute); options land in the field of the same name."""
    import sys
    from helpers import ROOT
    sys.path.insert(0, str(ROOT))
    import remote_lab

    defaults = remote_lab.Settings()
    parsed = remote_lab.settings_from_args([])
    assert parsed.state_dir == os.path.abspath(os.path.expanduser(defaults.state_dir))
    assert dataclasses_dict(parsed, "state_dir") == dataclasses_dict(defaults, "state_dir")
    parsed = remote_lab.settings_from_args(["--allow-host", "a.example", "--port-range", "1", "2",
                                            "--waiting-timeout", "7", "--debug"])
    assert parsed.allow_hosts == ("a.example",) and parsed.port_range == (1, 2)
    assert parsed.waiting_timeout == 7.0 and parsed.debug and parsed.log_level == "DEBUG"


def dataclasses_dict(settings, *leave_out):
    import dataclasses
    return {k: v for k, v in dataclasses.asdict(settings).items() if k not in leave_out}
