"""Queue behaviour of the real server: hand-off during teardown, long-poll latency, concurrency,
stalled clients, expiry, work-dir hygiene over many cycles."""
import json
import os
import socket
import statistics
import threading
import time

import pytest

from server_support import (api, shared_server, srv,  # noqa: F401 (fixtures)
                            MAPPING, SIMPLE, SINGLE, calls_of, lab_dirs,
                            start_server, up_dirs, wait_until)  # noqa: F401 (fixture)


shared = shared_server("queue", "--socket-timeout", "1.5")


class Poller(threading.Thread):
    """GET /session/{sid}?wait=S in the background; records the answer and when it came."""

    def __init__(self, api, sid, wait=30):
        super().__init__(daemon=True)
        self.api, self.sid, self.wait = api, sid, wait
        self.result = self.when = None
        self.start()

    def run(self):
        self.result = self.api.session(self.sid, wait=self.wait, timeout=self.wait + 10)
        self.when = time.monotonic()


# ------------------------------------------------------------------------------------------
# hand-off while the old lab is torn down
# ------------------------------------------------------------------------------------------


def test_always_an_active_head_during_teardown(api, srv):
    a = api.new_session()
    b = api.new_session()
    n = len(srv.calls())
    assert api.post_lab(a)[0] == 200
    old_dir = up_dirs(srv, n)[0]
    srv.switch("down_delay", value="1.5")
    poll = Poller(api, b)
    time.sleep(0.3)
    t0 = time.monotonic()
    status, _, _ = api.req("DELETE", "/session/%s" % a)
    assert status == 204
    assert time.monotonic() - t0 < 1.0  # the teardown does not hold the request
    poll.join(5)
    assert poll.result == (200, {"session_id": b, "status": "active", "position": 0})
    assert poll.when - t0 < 1.0
    # the teardown is still running, and b is the active head
    assert api.req("GET", "/active-session")[1]["session_id"] == b
    lab = api.lab(b)[1]
    assert lab["running"] is False and lab["netlab_status"] == "stopping"
    downs = wait_until(lambda: calls_of(srv, "down", n), 3, what="teardown started")
    assert len(downs) == 1 and downs[0]["cwd"] == old_dir
    assert time.time() - downs[0]["time"] < 1.5  # still inside the delayed down
    # b's `up` waits for the teardown, then succeeds in a fresh dir
    status, body = api.post_lab(b, MAPPING, "mapping.yml")
    assert (status, body["reused"]) == (200, False), body
    ups = calls_of(srv, "up", n)
    assert len(ups) == 2 and ups[1]["cwd"] != old_dir
    assert ups[1]["time"] >= downs[0]["time"] + 1.4
    assert not os.path.exists(old_dir)


def test_failed_teardown_does_not_stall_the_queue(start_server):
    # own server: a failed `down` leaves netlab's `default` instance registered (as real netlab
    # would), which would make every later `up` of a shared server fail
    srv, api = start_server()
    a = api.new_session()
    b = api.new_session()
    c = api.new_session()
    n = len(srv.calls())
    assert api.post_lab(a)[0] == 200
    old_dir = up_dirs(srv, n)[0]
    srv.switch("down_fail")
    srv.switch("down_delay", value="0.5")
    t0 = time.monotonic()
    assert api.delete_session(a) == 204
    assert time.monotonic() - t0 < 1.0
    assert api.session(b)[1] == {"session_id": b, "status": "active", "position": 0}
    t0 = time.monotonic()
    assert api.lab(b)[0] == 200
    assert time.monotonic() - t0 < 1.0  # answered while the failing teardown runs
    # the failing `down` (and its --force retry) ends; the lab is not stuck in "stopping"
    api.wait_lab_state("stopped", timeout=10)
    downs = calls_of(srv, "down", n)
    assert downs and all(d["cwd"] == old_dir for d in downs)
    assert ["--force" in d["argv"] for d in downs][-1] is True
    assert "fake failure of 'netlab down'" in srv.log()
    # netlab still knows that lab (its snapshot is there): the dir is kept, not deleted, since
    # netlab can only clean a lab from its own dir; the error says so
    assert lab_dirs(srv) == [os.path.basename(old_dir)]
    assert "netlab still knows the lab in %s" % old_dir in srv.log()
    # the queue goes on
    assert api.delete_session(b) == 204
    assert api.session(c)[1]["status"] == "active"
    assert api.req("DELETE", "/lab?force=true", c)[0] == 204  # no lab running
    assert api.lab(c)[1]["running"] is False
    # once netlab works again, the next acquire first cleans the kept dir, then starts
    srv.switch("down_fail", on=False)
    srv.switch("down_delay", on=False)
    m = len(srv.calls())
    assert api.post_lab(c)[0] == 200
    verbs = [(call["argv"][0], call["cwd"]) for call in srv.calls()[m:]]
    assert verbs[0] == ("down", old_dir) and verbs[1][0] == "up"
    assert not os.path.exists(old_dir)
    assert len(lab_dirs(srv)) == 1


def test_kept_lab_dir_is_cleaned_by_housekeeping_once_netlab_works(start_server):
    # a teardown that failed while netlab still knows the lab is retried in the background,
    # with no request needed; short timeouts make the first retry come within a second
    srv, api = start_server("--active-timeout", "2")
    a = api.new_session()
    assert api.post_lab(a, SINGLE, "single.yml")[0] == 200
    workdir = up_dirs(srv)[0]
    srv.switch("down_fail")
    assert api.delete_session(a) == 204
    wait_until(lambda: "netlab still knows the lab" in srv.log(), 10, what="the kept dir")
    assert lab_dirs(srv) == [os.path.basename(workdir)]
    tries = len(calls_of(srv, "down"))
    wait_until(lambda: len(calls_of(srv, "down")) > tries, 10, what="a retry")
    assert lab_dirs(srv) == [os.path.basename(workdir)]  # still failing: still kept
    srv.switch("down_fail", on=False)
    wait_until(lambda: lab_dirs(srv) == [], 15, what="the kept dir cleaned")
    last = calls_of(srv, "down")[-1]
    assert last["cwd"] == workdir and "--force" in last["argv"]
    assert json.loads((srv.fake_dir / "status.json").read_text()) == {}
    assert "finally cleaned" in srv.log()


def test_session_deleted_while_its_up_runs(api, srv):
    """The head leaves mid-`up`: the next one is active at once; the late lab is torn down."""
    a = api.new_session()
    b = api.new_session()
    n = len(srv.calls())
    srv.switch("up_delay", value="1")
    result = {}
    t = threading.Thread(target=lambda: result.update(r=api.post_lab(a)), daemon=True)
    t.start()
    wait_until(lambda: calls_of(srv, "up", n), 5, what="up started")
    t0 = time.monotonic()
    assert api.delete_session(a) == 204
    assert time.monotonic() - t0 < 1.0
    assert api.session(b)[1]["status"] == "active"
    t.join(20)
    assert not t.is_alive()
    # a's lab came up after a had gone: it must not stay up for nobody
    api.wait_lab_state("stopped", timeout=15)
    assert [d["cwd"] for d in calls_of(srv, "down", n)] == up_dirs(srv, n)
    assert lab_dirs(srv) == []
    srv.switch("up_delay", on=False)
    status, body = api.post_lab(b)
    assert (status, body["reused"]) == (200, False)


def test_next_session_waiting_for_a_late_up_does_not_see_it_busy(api, srv):
    """The head leaves mid-`up` while the next one's acquires wait for that `up`: the late lab
    is nobody's, so they replace it (no 423 "busy"). A race: three rounds, six waiters each."""
    for _ in range(3):
        a = api.new_session()
        b = api.new_session()
        n = len(srv.calls())
        srv.switch("up_delay", value="0.6")
        late = threading.Thread(target=api.post_lab, args=(a,), daemon=True)
        late.start()
        wait_until(lambda: calls_of(srv, "up", n), 5, what="up started")
        assert api.delete_session(a) == 204
        srv.switch("up_delay", on=False)
        results = []
        waiters = [threading.Thread(target=lambda: results.append(
            api.post_lab(b, MAPPING, "mapping.yml")), daemon=True) for _ in range(6)]
        for t in waiters:
            t.start()
        for t in waiters + [late]:
            t.join(20)
        assert sorted((status, body.get("reused")) for status, body in results) == \
            [(200, False)] + [(200, True)] * 5, results
        assert api.delete_session(b) == 204
        api.wait_lab_state("stopped")


@pytest.mark.parametrize("teardown", ["destroy", "replace"])
def test_acquire_waiting_for_a_teardown_is_dropped_when_its_session_ends(api, srv, teardown):
    """An acquire waits for a teardown (a background one, or its own of the idle lab it
    replaces); meanwhile its session ends: no `up` for nobody (the next session would wait for
    it), 423 instead."""
    a = api.new_session()
    b = api.new_session()
    assert api.post_lab(a)[0] == 200
    n = len(srv.calls())
    srv.switch("down_delay", value="1")
    if teardown == "destroy":
        assert api.req("DELETE", "/lab?force=true", a)[0] == 202
    else:
        assert api.req("POST", "/lab/release", a)[0] == 204
    result = {}
    t = threading.Thread(target=lambda: result.update(r=api.post_lab(a, MAPPING, "mapping.yml")),
                         daemon=True)
    t.start()
    time.sleep(0.4)  # the upload is in, the acquire waits for the teardown
    assert api.delete_session(a) == 204
    t.join(10)
    status, body = result["r"]
    assert status == 423 and "no longer active" in body["detail"], body
    assert calls_of(srv, "up", n) == []
    srv.switch("down_delay", on=False)
    api.wait_lab_state("stopped")
    assert lab_dirs(srv) == []
    assert api.post_lab(b)[0] == 200


# ------------------------------------------------------------------------------------------
# long-poll latency
# ------------------------------------------------------------------------------------------


def test_long_poll_wakes_within_100ms_of_the_head_leaving(api, srv):
    head = api.new_session()
    latencies = []
    for _ in range(7):
        nxt = api.new_session()
        poll = Poller(api, nxt)
        time.sleep(0.25)  # let the poll reach the server and block
        assert poll.is_alive()
        t0 = time.monotonic()
        assert api.delete_session(head) == 204
        poll.join(5)
        assert poll.result == (200, {"session_id": nxt, "status": "active", "position": 0})
        latencies.append(poll.when - t0)
        head = nxt
    print("hand-off latencies (ms):", [round(x * 1000, 1) for x in latencies])
    assert statistics.median(latencies) < 0.1, latencies
    assert max(latencies) < 1.0, latencies  # sanity bound on a loaded machine


def test_long_poll_of_a_deleted_session_answers_404(api, srv):
    api.new_session()
    b = api.new_session()
    poll = Poller(api, b)
    time.sleep(0.25)
    t0 = time.monotonic()
    assert api.delete_session(b) == 204
    poll.join(5)
    assert poll.result[0] == 404
    assert poll.when - t0 < 1.0


# ------------------------------------------------------------------------------------------
# concurrency
# ------------------------------------------------------------------------------------------


@pytest.mark.timeout(90)
def test_200_concurrent_session_creations(api, srv):
    n = 200
    barrier = threading.Barrier(n)
    results = [None] * n

    def create(i):
        barrier.wait(10)
        results[i] = api.req("POST", "/session", timeout=30)[:2]

    threads = [threading.Thread(target=create, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(r is not None for r in results)
    assert [r[0] for r in results] == [201] * n
    positions = sorted(r[1]["position"] for r in results)
    assert positions == list(range(n))
    sids = [r[1]["session_id"] for r in results]
    assert len(set(sids)) == n
    health = api.health()
    assert health["queue_length"] == n
    statuses = [s["status"] for s in health["session_list"]]
    assert statuses.count("active") == 1 and statuses[0] == "active"
    head = [r[1]["session_id"] for r in results if r[1]["position"] == 0][0]
    assert api.req("GET", "/active-session")[1]["session_id"] == head
    # every answer's position is where the session really is
    by_pos = {s["session_id"]: s["position"] for s in health["session_list"]}
    assert all(by_pos[r[1]["session_id"]] == r[1]["position"] for r in results)


def test_stalled_raw_sockets_do_not_block_other_clients(api, srv):
    a = api.new_session()
    stalled = []

    def hold(data):
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        if data:
            s.sendall(data)
        stalled.append(s)
        return s

    hold(b"")  # connected, silent
    hold(b"GET /healthz HTTP/1.1\r\nHo")  # half the headers
    hold(b"GET /sess")  # half a request line
    hold(b"POST /session/heartbeat HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Session-ID: %s\r\n"
         b"Content-Length: 100\r\n\r\n{\"x\"" % a.encode())  # half a body
    # an upload from the active session, stalled half-way
    body = (b"--B\r\nContent-Disposition: form-data; name=\"topology\"; filename=\"t.yml\"\r\n"
            b"\r\n" + SIMPLE)
    hold(b"POST /lab HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Session-ID: %s\r\nContent-Type: multipart/form-data;"
         b" boundary=B\r\nContent-Length: %d\r\n\r\n" % (a.encode(), len(body) + 1000) + body)
    time.sleep(0.2)
    t0 = time.monotonic()
    for _ in range(10):
        assert api.req("GET", "/healthz", timeout=2)[0] == 204
        b = api.new_session()
        assert api.session(b)[0] == 200
        assert api.req("POST", "/session/heartbeat", a, timeout=2)[0] == 204
        assert api.delete_session(b) == 204
    assert time.monotonic() - t0 < 5
    assert api.session(a)[1]["status"] == "active"
    # the server drops the stalled connections after --socket-timeout (1.5 s)
    t0 = time.monotonic()
    answers = []
    for s in stalled:
        s.settimeout(max(0.1, 6 - (time.monotonic() - t0)))
        data = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except socket.timeout:
            pytest.fail("stalled connection still open after %.1f s" % (time.monotonic() - t0))
        except ConnectionResetError:
            pass
        answers.append(data)
        s.close()
    # the stalled upload was refused and its partial work dir removed
    assert answers[-1].startswith(b"HTTP/1.1 400"), answers[-1][:200]
    wait_until(lambda: lab_dirs(srv) == [], 3, what="partial upload removed")
    assert api.session(a)[1]["status"] == "active"


# ------------------------------------------------------------------------------------------
# work dirs never leak
# ------------------------------------------------------------------------------------------


@pytest.mark.timeout(120)
def test_no_work_dir_left_after_10_cycles(api, srv):
    n = len(srv.calls())
    max_dirs = 0

    def cycle(body):
        nonlocal max_dirs
        sid = api.new_session()
        body(sid)
        max_dirs = max(max_dirs, len(lab_dirs(srv)))
        assert api.delete_session(sid) == 204

    def plain(sid):
        assert api.post_lab(sid, SINGLE, "single.yml")[0] == 200

    def release_first(sid):
        assert api.post_lab(sid, SINGLE, "single.yml")[0] == 200
        assert api.req("POST", "/lab/release", sid)[0] == 204

    def destroy_first(sid):
        assert api.post_lab(sid, SINGLE, "single.yml")[0] == 200
        assert api.req("DELETE", "/lab?force=true", sid)[0] == 202

    def failing(switch):
        def run(sid):
            srv.switch(switch)
            try:
                assert api.post_lab(sid, SINGLE, "single.yml")[0] == 502
            finally:
                srv.switch(switch, on=False)
        return run

    def reuse_twice(sid):
        assert api.post_lab(sid, SINGLE, "single.yml")[0] == 200
        assert api.post_lab(sid, SINGLE, "single.yml")[1]["reused"] is True

    def refused(sid):
        assert api.post_lab(sid, SINGLE, "../x.yml")[0] == 400

    def restart(sid):
        assert api.post_lab(sid, SINGLE, "single.yml")[0] == 200
        assert api.req("POST", "/lab/release", sid)[0] == 204
        assert api.post_lab(sid, SINGLE, "single.yml", reuse=False)[0] == 200

    def other_topology(sid):
        assert api.post_lab(sid, SINGLE, "other.yml")[0] == 200

    for body in (plain, release_first, destroy_first, failing("up_fail"), reuse_twice,
                 failing("inspect_fail"), other_topology, refused, restart, plain):
        cycle(body)
    api.wait_lab_state("stopped")
    assert lab_dirs(srv) == []
    assert max_dirs <= 2
    ups = up_dirs(srv, n)
    downs = [c["cwd"] for c in calls_of(srv, "down", n)]
    assert len(ups) == 10
    assert set(ups) == set(downs)  # every lab dir got its `down`
    assert all(not os.path.exists(d) for d in ups)
    registry = json.loads((srv.fake_dir / "status.json").read_text())
    assert registry == {}  # no stale netlab instance either


# ------------------------------------------------------------------------------------------
# expiry
# ------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_active_session_expires_next_promoted_and_lab_torn_down(start_server):
    srv, api = start_server("--active-timeout", "1", "--waiting-timeout", "2")
    a = api.new_session()
    # a request in flight pins its session: an `up` longer than the active timeout is fine
    srv.switch("up_delay", value="1.5")
    t0 = time.monotonic()
    assert api.post_lab(a, SINGLE, "single.yml")[0] == 200
    assert time.monotonic() - t0 > 1.5
    srv.switch("up_delay", on=False)
    assert api.req("GET", "/active-session")[1]["session_id"] == a
    b = api.new_session()
    workdir = up_dirs(srv)[0]
    t0 = time.monotonic()
    # b keeps itself alive with long-polls only (each is a sign of life), a goes silent
    state = None
    while time.monotonic() - t0 < 8:
        state = api.session(b, wait=0.5)[1]
        if state["status"] == "active":
            break
    promoted_after = time.monotonic() - t0
    assert state == {"session_id": b, "status": "active", "position": 0}
    assert 0.9 <= promoted_after < 4, promoted_after
    assert api.session(a)[0] == 404
    api.wait_lab_state("stopped", timeout=10)
    assert [d["cwd"] for d in calls_of(srv, "down")] == [workdir]
    assert lab_dirs(srv) == []
    assert "expired" in srv.log()
    # a long-poll longer than the waiting timeout keeps its (otherwise silent) session alive
    c = api.new_session()
    poll = Poller(api, c, wait=3)
    t0 = time.monotonic()
    while poll.is_alive() and time.monotonic() - t0 < 6:
        assert api.req("POST", "/session/heartbeat", b)[0] == 204  # b (active) stays alive
        time.sleep(0.25)
    poll.join(1)
    assert poll.result == (200, {"session_id": c, "status": "waiting", "position": 1})
    assert api.session(c)[0] == 200


@pytest.mark.timeout(60)
def test_waiting_session_expires_signs_of_life_keep_others(start_server):
    srv, api = start_server("--active-timeout", "1", "--waiting-timeout", "2")
    a = api.new_session()  # active: alive through GET /lab (any request naming it)
    b = api.new_session()  # waiting, silent: expires
    c = api.new_session()  # waiting: alive through heartbeats
    t0 = time.monotonic()
    gone = None
    while time.monotonic() - t0 < 6:
        assert api.lab(a)[0] == 200
        assert api.req("POST", "/session/heartbeat", c)[0] == 204
        if gone is None and api.req("GET", "/debug/health")[1]["queue_length"] == 2:
            gone = time.monotonic() - t0
        if gone is not None and time.monotonic() - t0 > 3.2:
            break
        time.sleep(0.25)
    assert gone is not None and 1.9 <= gone < 4, gone
    assert api.session(b)[0] == 404
    assert api.session(a)[1]["status"] == "active"  # 3 s > active timeout, but alive
    assert api.session(c)[1] == {"session_id": c, "status": "waiting", "position": 1}
    # now a goes silent too: it expires and c (heartbeating) is promoted
    t0 = time.monotonic()
    while time.monotonic() - t0 < 5 and api.session(c)[1]["status"] != "active":
        time.sleep(0.2)
    assert api.session(c)[1]["status"] == "active"
    assert api.session(a)[0] == 404


def test_queue_full_answers_429(start_server):
    srv, api = start_server("--max-queue", "3")
    sids = [api.new_session() for _ in range(3)]
    status, body, _ = api.req("POST", "/session")
    assert status in (429, 503)
    assert body["detail"]
    assert api.health()["queue_length"] == 3
    assert api.delete_session(sids[1]) == 204
    status, body, _ = api.req("POST", "/session")
    assert (status, body["position"]) == (201, 2)
