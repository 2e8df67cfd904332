"""How long (issue 12, items 4 and 5) on a real server: the estimated waits (`eta_s`) from the
recent hold times, and `--max-hold` ending a session that holds the lab too long."""
import time

import pytest

from helpers import ServerProcess
from server_support import Api, SIMPLE, calls_of, start_server, wait_until  # noqa: F401

pytestmark = pytest.mark.timeout(90)


def queue_etas(api):
    return [q["eta_s"] for q in api.req("GET", "/status")[1]["queue"]]


def test_eta_is_unknown_until_a_session_held_the_lab_then_estimated(start_server):
    srv, api = start_server()
    a, b = api.new_session(), api.new_session()
    assert api.session_full(a)[1]["eta_s"] == 0  # active
    assert api.session_full(b)[1]["eta_s"] is None  # no history: unknown
    status = api.req("GET", "/status")[1]
    assert queue_etas(api) == [None] and status["join_eta_s"] is None
    assert status["max_hold"] == 0 and status["holder"]["hold_left_s"] is None
    time.sleep(0.6)
    assert api.delete_session(a) == 204  # a held the lab ~0.6 s: the history has one hold
    c, d = api.new_session(), api.new_session()
    eta_c, eta_d = api.session_full(c)[1]["eta_s"], api.session_full(d)[1]["eta_s"]
    assert 0 <= eta_c <= eta_d  # b's expected rest, then that plus one typical hold
    status = api.req("GET", "/status")[1]
    etas = [q["eta_s"] for q in status["queue"]]
    assert 0.5 <= etas[1] - etas[0] <= 30  # the typical hold: a's (0.6 s and a bit)
    assert status["join_eta_s"] - etas[1] == pytest.approx(etas[1] - etas[0], abs=0.11)
    assert api.session_full(b)[1]["hold_left_s"] is None  # no --max-hold


def test_the_hold_times_survive_a_restart(tmp_path):
    first = ServerProcess(tmp_path / "run1").start()
    try:
        api = Api(first)
        a = api.new_session()
        time.sleep(0.3)
        assert api.delete_session(a) == 204
    finally:
        assert first.stop() == 0
    second = ServerProcess(tmp_path / "run2", "--state-dir", first.state_dir).start()
    try:
        api = Api(second)
        api.new_session()
        b = api.new_session()
        assert api.session_full(b)[1]["eta_s"] is not None
    finally:
        second.stop()


def test_max_hold_ends_the_holder_and_promotes_the_next(start_server):
    srv, api = start_server("--max-hold", "3")
    a, b = api.new_session(), api.new_session()
    left = api.session_full(a)[1]["hold_left_s"]
    assert 0 < left <= 3
    status = api.req("GET", "/status")[1]
    assert status["max_hold"] == 3 and 0 < status["holder"]["hold_left_s"] <= 3
    time.sleep(0.3)
    assert api.session_full(a)[1]["hold_left_s"] < left  # it counts down
    assert api.session_full(b)[1]["hold_left_s"] is None  # waiting
    n = len(srv.calls())
    assert api.post_lab(a)[0] == 200  # (if this takes the whole hold, a ends right after it)
    assert api.session(b, wait=10, timeout=20) == \
        (200, {"session_id": b, "status": "active", "position": 0})
    status, body = api.session_full(a)
    assert status == 404
    assert "held the lab longer than 3 s (--max-hold)" in body["detail"]
    texts = [e["text"] for e in api.req("GET", "/status")[1]["events"]]
    assert any("%s ended: held longer than 3 s (--max-hold)" % a[:8] in t for t in texts), texts
    assert api.health()["counters"].get("sessions_expired") == 1
    wait_until(lambda: calls_of(srv, "down", n), 5, what="a's lab torn down")
    assert "WARNING" in srv.log() and "held the lab longer than 3 s" in srv.log()
    assert 0 < api.session_full(b)[1]["hold_left_s"] <= 3  # b's own hold counts from now
