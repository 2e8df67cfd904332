"""SessionQueue: the pure queue state machine, driven by a fake clock (no server, no I/O)."""
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from remote_lab import QueueFull, SessionQueue, UnknownSession  # noqa: E402


class FakeClock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def q(clock):
    return SessionQueue(waiting_timeout=600, active_timeout=300, max_length=5, clock=clock)


def test_first_session_is_active_at_once_others_wait_in_fifo_order(q):
    a, pa = q.create()
    b, pb = q.create()
    c, pc = q.create()
    assert (pa, pb, pc) == (0, 1, 2)
    assert len({a, b, c}) == 3
    assert q.state(a) == ("active", 0)
    assert q.state(b) == ("waiting", 1)
    assert q.state(c) == ("waiting", 2)
    assert q.active_id() == a and q.is_active(a) and not q.is_active(b)
    assert len(q) == 3
    assert [s["session_id"] for s in q.snapshot()] == [a, b, c]
    assert [s["status"] for s in q.snapshot()] == ["active", "waiting", "waiting"]


def test_removing_the_head_promotes_the_next_and_shifts_positions(q):
    a, _ = q.create()
    b, _ = q.create()
    c, _ = q.create()
    assert q.remove(a) == (True, b)
    assert q.state(b) == ("active", 0)
    assert q.state(c) == ("waiting", 1)
    with pytest.raises(UnknownSession):
        q.state(a)


def test_removing_a_waiting_session_promotes_nobody(q):
    a, _ = q.create()
    b, _ = q.create()
    c, _ = q.create()
    assert q.remove(b) == (False, None)
    assert q.state(a) == ("active", 0)
    assert q.state(c) == ("waiting", 1)


def test_remove_unknown_raises_and_empty_queue_has_no_active(q):
    with pytest.raises(UnknownSession):
        q.remove("nope")
    assert q.active_id() is None
    a, _ = q.create()
    q.remove(a)
    assert q.active_id() is None and len(q) == 0
    # a new session in the emptied queue is active at once
    b, pos = q.create()
    assert pos == 0 and q.state(b) == ("active", 0)


def test_queue_full(q):
    for _ in range(5):
        q.create()
    with pytest.raises(QueueFull):
        q.create()
    assert len(q) == 5
    q.remove(q.active_id())
    q.create()  # room again
    assert len(q) == 5


def test_active_session_expires_after_active_timeout_and_next_is_promoted(clock):
    q = SessionQueue(waiting_timeout=600, active_timeout=300, max_length=10, clock=clock)
    a, _ = q.create()
    b, _ = q.create()
    clock.advance(200)
    q.touch(b)  # b stays alive, a is silent
    clock.advance(100)
    assert q.expire() == []  # exactly at the limit: not yet
    clock.advance(0.5)
    assert q.expire() == [(a, True)]
    assert q.state(b) == ("active", 0)


def test_waiting_session_expires_after_waiting_timeout(clock):
    q = SessionQueue(waiting_timeout=600, active_timeout=300, max_length=10, clock=clock)
    a, _ = q.create()
    b, _ = q.create()
    c, _ = q.create()
    for _ in range(7):  # a (active) and c heartbeat every 100 s, b is silent
        clock.advance(100)
        q.touch(a)
        q.touch(c)
        assert q.expire() == ([] if clock.now - 1000 <= 600 else [(b, False)])
    assert q.state(a) == ("active", 0)
    assert q.state(c) == ("waiting", 1)
    with pytest.raises(UnknownSession):
        q.state(b)


def test_waiting_timeout_longer_than_active_timeout_applies_to_waiters_only(clock):
    q = SessionQueue(waiting_timeout=600, active_timeout=300, max_length=10, clock=clock)
    dropped = []
    q.on_drop = lambda s: dropped.append(s.id)
    a, _ = q.create()
    b, _ = q.create()
    c, _ = q.create()
    clock.advance(400)  # all silent: only the active one is past its (shorter) limit
    q.touch(c)
    assert q.expire() == [(a, True)]
    # b waited 400 s silent: under the waiting limit, but past the active one when its turn came
    assert dropped == [b]
    assert q.state(c, touch=False) == ("active", 0)


def test_active_timeout_counts_from_promotion_not_from_creation(clock):
    q = SessionQueue(waiting_timeout=600, active_timeout=300, max_length=10, clock=clock)
    a, _ = q.create()
    b, _ = q.create()
    clock.advance(299)
    q.touch(a)
    q.touch(b)
    clock.advance(290)  # b: 290 s since its last sign of life, alive when its turn comes
    q.remove(a)
    clock.advance(250)  # b promoted 250 s ago (540 s after its last sign of life): inside
    assert q.expire() == []
    assert q.state(b, touch=False) == ("active", 0)
    clock.advance(51)
    assert q.expire() == [(b, True)]


def test_state_counts_as_sign_of_life_unless_touch_false(clock):
    q = SessionQueue(waiting_timeout=600, active_timeout=300, max_length=10, clock=clock)
    a, _ = q.create()
    clock.advance(250)
    q.state(a)
    clock.advance(250)
    assert q.expire() == []
    q.state(a, touch=False)
    clock.advance(60)
    assert q.expire() == [(a, True)]


def test_pins_prevent_expiry_and_unpin_restarts_the_clock(clock):
    q = SessionQueue(waiting_timeout=600, active_timeout=300, max_length=10, clock=clock)
    a, _ = q.create()
    b, _ = q.create()
    q.pin(a)
    q.pin(b)
    clock.advance(10000)
    assert q.expire() == []
    q.unpin(a)  # unpinning is a sign of life
    clock.advance(299)
    assert q.expire() == []
    clock.advance(2)
    assert q.expire() == [(a, True)]
    # b is pinned: still there (and now active) although silent for ages
    assert q.state(b, touch=False) == ("active", 0)
    q.unpin(b)
    q.unpin("gone")  # unpinning an unknown session is harmless


def test_nested_pins(clock):
    q = SessionQueue(waiting_timeout=600, active_timeout=300, max_length=10, clock=clock)
    a, _ = q.create()
    q.pin(a)
    q.pin(a)
    q.unpin(a)
    clock.advance(1000)
    assert q.expire() == []  # one pin still held
    q.unpin(a)
    clock.advance(301)
    assert q.expire() == [(a, True)]


# -- promotion skips dead waiters --


def _dropped(q):
    dropped = []
    q.on_drop = lambda s: dropped.append(s.id)
    return dropped


def test_a_waiter_silent_past_the_active_timeout_is_dropped_at_promotion(clock):
    q = SessionQueue(waiting_timeout=600, active_timeout=300, max_length=10, clock=clock)
    dropped = _dropped(q)
    a, _ = q.create()
    b, _ = q.create()
    c, _ = q.create()
    clock.advance(301)  # b is silent, c heartbeats, a (the holder) is busy
    q.touch(a)
    q.touch(c)
    assert q.expire() == []  # b is under the waiting limit: still queued
    assert q.state(b, touch=False) == ("waiting", 1)
    version = q.version
    assert q.remove(a) == (True, c)
    assert dropped == [b]
    with pytest.raises(UnknownSession):
        q.state(b)
    assert q.state(c) == ("active", 0)
    assert [s["session_id"] for s in q.snapshot()] == [c]
    assert q.version > version


def test_a_waiter_exactly_at_the_active_timeout_is_still_promoted(clock):
    q = SessionQueue(waiting_timeout=600, active_timeout=300, max_length=10, clock=clock)
    dropped = _dropped(q)
    a, _ = q.create()
    b, _ = q.create()
    clock.advance(300)
    q.touch(a)
    assert q.remove(a) == (True, b)
    assert dropped == []
    assert q.state(b) == ("active", 0)


def test_several_dead_waiters_are_dropped_until_a_live_one_is_promoted(clock):
    q = SessionQueue(waiting_timeout=600, active_timeout=300, max_length=10, clock=clock)
    dropped = _dropped(q)
    a, _ = q.create()
    dead1, _ = q.create()
    dead2, _ = q.create()
    live, _ = q.create()
    last, _ = q.create()
    clock.advance(400)
    q.touch(live)
    q.touch(last)
    assert q.expire() == [(a, True)]  # the silent holder expires: dead1, dead2 are skipped
    assert dropped == [dead1, dead2]
    assert q.state(live) == ("active", 0) and q.state(last) == ("waiting", 1)


def test_a_pinned_waiter_is_alive_however_long_it_was_silent(clock):
    q = SessionQueue(waiting_timeout=600, active_timeout=300, max_length=10, clock=clock)
    dropped = _dropped(q)
    a, _ = q.create()
    b, _ = q.create()
    q.pin(b)  # a long-poll in flight
    clock.advance(500)
    q.touch(a)
    assert q.remove(a) == (True, b)
    assert dropped == []


def test_when_every_waiter_is_dead_the_queue_empties(clock):
    q = SessionQueue(waiting_timeout=600, active_timeout=300, max_length=10, clock=clock)
    dropped = _dropped(q)
    a, _ = q.create()
    b, _ = q.create()
    c, _ = q.create()
    clock.advance(350)
    q.touch(a)
    assert q.remove(a) == (True, None)
    assert dropped == [b, c] and len(q) == 0 and q.active_id() is None
    d, pos = q.create()  # a newcomer into the emptied queue is active at once
    assert pos == 0 and dropped == [b, c]


def test_dropping_without_a_hook_still_drops(clock):
    q = SessionQueue(waiting_timeout=600, active_timeout=300, max_length=10, clock=clock)
    a, _ = q.create()
    b, _ = q.create()
    clock.advance(301)
    q.touch(a)
    assert q.remove(a) == (True, None)
    assert len(q) == 0


def test_version_bumps_on_every_change(q):
    v0 = q.version
    a, _ = q.create()
    b, _ = q.create()
    assert q.version == v0 + 2
    q.remove(a)
    assert q.version == v0 + 3


# -- long-poll: wait_change, woken from another thread (real time, bounded small) --


def test_wait_change_times_out_with_unchanged_state():
    q = SessionQueue(600, 300, 10)  # real clock
    a, _ = q.create()
    b, _ = q.create()
    t0 = time.monotonic()
    assert q.wait_change(b, 0.2) == ("waiting", 1)
    elapsed = time.monotonic() - t0
    assert 0.18 <= elapsed < 1.0


def test_wait_change_zero_timeout_returns_at_once():
    q = SessionQueue(600, 300, 10)
    a, _ = q.create()
    t0 = time.monotonic()
    assert q.wait_change(a, 0) == ("active", 0)
    assert time.monotonic() - t0 < 0.1


def _wait_in_thread(q, sid, timeout):
    result = {}

    def run():
        t0 = time.monotonic()
        try:
            result["state"] = q.wait_change(sid, timeout)
        except UnknownSession as e:
            result["error"] = e
        result["woke"] = time.monotonic()
        result["waited"] = result["woke"] - t0

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, result


def _wait_blocked(q, count, timeout=2.0):
    """Wait until ``count`` threads are blocked in wait_change."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if q.long_polls() >= count:
            return
        time.sleep(0.005)
    raise AssertionError("waiter threads never blocked")


def test_wait_change_wakes_on_promotion_from_another_thread():
    q = SessionQueue(600, 300, 10)
    a, _ = q.create()
    b, _ = q.create()
    t, result = _wait_in_thread(q, b, 10)
    _wait_blocked(q, 1)
    t0 = time.monotonic()
    q.remove(a)
    t.join(2)
    assert not t.is_alive()
    assert result["state"] == ("active", 0)
    assert result["woke"] - t0 < 0.1, "woke %.3f s after the change" % (result["woke"] - t0)


def test_wait_change_wakes_on_position_change_only_for_affected_sessions():
    q = SessionQueue(600, 300, 10)
    a, _ = q.create()
    b, _ = q.create()
    c, _ = q.create()
    d, _ = q.create()
    tb, rb = _wait_in_thread(q, b, 0.6)
    td, rd = _wait_in_thread(q, d, 10)
    _wait_blocked(q, 2)
    t0 = time.monotonic()
    q.remove(c)  # d moves up (3 -> 2); b stays at 1 and keeps waiting
    td.join(2)
    assert rd["state"] == ("waiting", 2)
    assert rd["woke"] - t0 < 0.1
    assert tb.is_alive(), "b's position did not change: it must keep waiting"
    tb.join(2)
    assert rb["state"] == ("waiting", 1)
    assert rb["waited"] >= 0.55


def test_wait_change_ignores_unrelated_changes_at_the_tail():
    q = SessionQueue(600, 300, 10)
    a, _ = q.create()
    b, _ = q.create()
    t, result = _wait_in_thread(q, b, 0.5)
    _wait_blocked(q, 1)
    c, _ = q.create()  # appended behind b: b's state is unchanged
    q.remove(c)
    t.join(2)
    assert result["state"] == ("waiting", 1)
    assert result["waited"] >= 0.45


def test_wait_change_raises_unknown_when_the_session_is_removed_while_waiting():
    q = SessionQueue(600, 300, 10)
    a, _ = q.create()
    b, _ = q.create()
    t, result = _wait_in_thread(q, b, 10)
    _wait_blocked(q, 1)
    t0 = time.monotonic()
    q.remove(b)
    t.join(2)
    assert isinstance(result.get("error"), UnknownSession)
    assert result["woke"] - t0 < 0.1


def test_wait_change_wakes_on_expiry_promotion():
    clock = FakeClock()
    q = SessionQueue(600, 300, 10, clock=clock)
    a, _ = q.create()
    b, _ = q.create()
    q.pin(b)  # as the server does while long-polling
    # the fake clock does not move by itself: wait_change's own deadline is far away
    t, result = _wait_in_thread(q, b, 5)
    _wait_blocked(q, 1)
    clock.advance(301)
    t0 = time.monotonic()
    assert q.expire() == [(a, True)]
    t.join(2)
    assert result["state"] == ("active", 0)
    assert result["woke"] - t0 < 0.1


def test_wait_change_unknown_session():
    q = SessionQueue(600, 300, 10)
    with pytest.raises(UnknownSession):
        q.wait_change("nope", 0.1)


def test_many_waiters_all_wake_on_one_promotion():
    q = SessionQueue(600, 300, 100)
    head, _ = q.create()
    sids = [q.create()[0] for _ in range(20)]
    waiters = [_wait_in_thread(q, s, 10) for s in sids]
    _wait_blocked(q, 20)
    t0 = time.monotonic()
    q.remove(head)
    for t, _ in waiters:
        t.join(2)
    states = [r["state"] for _, r in waiters]
    assert states[0] == ("active", 0)
    assert states[1:] == [("waiting", i) for i in range(1, 20)]
    assert max(r["woke"] for _, r in waiters) - t0 < 0.5


def test_concurrent_creates_give_distinct_positions():
    q = SessionQueue(600, 300, 1000)
    results = []
    lock = threading.Lock()

    def make():
        r = q.create()
        with lock:
            results.append(r)

    threads = [threading.Thread(target=make) for _ in range(100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(5)
    assert sorted(p for _, p in results) == list(range(100))
    assert len({s for s, _ in results}) == 100
    assert [s["status"] for s in q.snapshot()].count("active") == 1



@pytest.mark.parametrize("flags, cadences", [
    ([], (30, 15, 5, 5)),  # idle, one active session, sessions waiting
    (["--active-timeout", "20"], (5, 5, 5, 5)),  # a quarter of the shortest timeout
    (["--waiting-timeout", "2", "--active-timeout", "1"], (0.25, 0.25, 0.25, 0.25)),
    (["--keep-warm", "8"], (2, 2, 2, 2)),  # a warm lab's expiry is a deadline too
])
def test_housekeeping_cadence_adapts_to_the_queue_and_the_timeouts(tmp_path, flags, cadences):
    from remote_lab import App, settings_from_args
    app = App(settings_from_args(flags + ["--state-dir", str(tmp_path)]))
    seen = []
    for _ in range(4):
        seen.append(app.cadence())
        app.queue.create()
    assert tuple(seen) == cadences


def test_close_ends_every_long_poll_with_the_current_state():
    """A server stopping answers its long-polls at once (their current state), not after their
    wait; later long-polls do not wait either."""
    q = SessionQueue(600, 300, 10)
    q.create()
    b, _ = q.create()
    t, result = _wait_in_thread(q, b, 30)
    _wait_blocked(q, 1)
    q.close()
    t.join(2)
    assert not t.is_alive() and result["state"] == ("waiting", 1)
    assert q.wait_change(b, 30) == ("waiting", 1)


# -- the journal (what goes to disk) and the start-up restore --


class RecordingJournal:
    def __init__(self, fail_add=False):
        self.writes = []
        self.fail_add = fail_add

    def added(self, session, slot):
        if self.fail_add:
            raise OSError("disk full")
        self.writes.append(("added", session.id, slot))

    def changed(self, removed, activated):
        self.writes.append(("changed", list(removed), [s.id for s in activated]))


def test_each_queue_call_is_one_journal_write_before_it_returns(clock):
    journal = RecordingJournal()
    ids = iter("abc")
    q = SessionQueue(600, 300, 10, clock, new_id=lambda: next(ids), journal=journal)
    q.create()
    q.create()
    assert journal.writes == [("added", "a", 1), ("added", "b", None)]  # a: active in slot 1
    journal.writes.clear()
    q.remove("a")  # the end and the promotion it causes: one write
    assert journal.writes == [("changed", ["a"], ["b"])]
    journal.writes.clear()
    q.state("b")
    q.touch("b")
    q.pin("b")
    q.unpin("b")
    assert journal.writes == []  # signs of life are never written
    clock.advance(301)
    assert q.expire() == [("b", True)]
    assert journal.writes == [("changed", ["b"], [])]


def test_a_session_that_cannot_be_written_is_not_queued(clock):
    q = SessionQueue(600, 300, 10, clock, journal=RecordingJournal(fail_add=True))
    with pytest.raises(OSError):
        q.create()
    assert len(q) == 0 and q.version == 0


def test_restored_sessions_keep_order_and_get_full_timeouts_from_now(clock):
    journal = RecordingJournal()
    q = SessionQueue(600, 300, 10, clock, journal=journal)
    # saved long ago: created 5000 s and activated 4000 s before this start
    q.restore([("a", 5000.0, 4000.0), ("b", 4500.0, None), ("c", 10.0, None)])
    assert [s["session_id"] for s in q.snapshot()] == ["a", "b", "c"]
    assert q.state("a", touch=False) == ("active", 0)
    assert [s["age"] for s in q.snapshot()] == [5000.0, 4500.0, 10.0]
    assert journal.writes == []  # nothing changed: nothing written
    clock.advance(299)
    assert q.expire() == []  # a full active timeout from the start-up
    q.touch("b")  # b's client is back and polls; c's is not (yet)
    clock.advance(2)
    assert q.expire() == [("a", True)]
    assert q.state("b", touch=False) == ("active", 0)
    assert journal.writes == [("changed", ["a"], ["b"])]


def test_a_restored_head_that_was_not_active_yet_is_promoted_at_once(clock):
    journal = RecordingJournal()
    q = SessionQueue(600, 300, 10, clock, journal=journal)
    q.restore([("b", 100.0, None), ("c", 50.0, 20.0)])  # c's "activated" cannot be: ignored
    assert q.state("b", touch=False) == ("active", 0)
    assert q.state("c", touch=False) == ("waiting", 1)
    assert journal.writes == [("changed", [], ["b"])]


# -- hold times, estimated waits and --max-hold --


def test_hold_times_give_no_estimate_until_there_is_history():
    from remote_lab import HoldTimes
    holds = HoldTimes()
    assert holds.waits(0.0, 2) == [None, None]
    holds.add(100.0)
    assert holds.waits(0.0, 2) == [100.0, 200.0]


def test_the_estimate_is_the_holders_expected_rest_plus_a_median_hold_per_session_ahead():
    from remote_lab import HoldTimes
    holds = HoldTimes(keep=3)
    for t in (500.0, 60.0, 120.0, 180.0):  # only the last 3 are kept: median 120
        holds.add(t)
    assert list(holds.times) == [60.0, 120.0, 180.0]
    # held 30 s: the holds longer than that went on for 30, 90 and 150 s more (median 90)
    assert holds.waits(30.0, 3) == [90.0, 210.0, 330.0]
    # held 150 s: only the 180 s hold lasted longer: 30 s more
    assert holds.waits(150.0, 1) == [30.0]
    # held longer than any recent hold: its turn may come any moment
    assert holds.waits(1000.0, 2) == [0.0, 120.0]


def test_max_hold_caps_every_hold_in_the_estimate():
    from remote_lab import HoldTimes
    holds = HoldTimes()
    for t in (600.0, 900.0, 1200.0):
        holds.add(t)
    assert holds.waits(0.0, 2, cap=300.0) == [300.0, 600.0]
    assert holds.waits(250.0, 1, cap=300.0) == [50.0]  # ended at 300 s at the latest
    holds.restore([10, "x", -1, True, 20.5])  # a saved list: numbers only
    assert list(holds.times)[-2:] == [10.0, 20.5]


def test_queue_waits_are_unknown_until_an_active_session_ended(clock):
    q = SessionQueue(600, 300, 10, clock)
    assert q.waits() == [] and q.waits(joining=1) == [0.0]  # a newcomer is active at once
    a, _ = q.create()
    b, _ = q.create()
    assert q.waits() == [0.0, None]
    clock.advance(100)
    q.remove(a)  # held 100 s
    c, _ = q.create()
    d, _ = q.create()
    assert q.waits() == [0.0, 100.0, 200.0]
    clock.advance(40)
    assert q.waits(joining=1) == [0.0, 60.0, 160.0, 260.0]
    q.remove(c)  # a waiting session leaving is no hold time
    assert list(q.holds.times) == [100.0]


def test_expired_holders_count_as_hold_times_too(clock):
    q = SessionQueue(600, 300, 10, clock)
    a, _ = q.create()
    q.create()
    clock.advance(301)
    assert q.expire()[0] == (a, True)
    assert list(q.holds.times) == [301.0]


def test_an_active_session_holding_longer_than_max_hold_is_ended_and_the_next_promoted(clock):
    q = SessionQueue(600, 300, 10, clock, max_hold=120)
    a, _ = q.create()
    b, _ = q.create()
    assert q.hold_left(a) == 120.0 and q.hold_left(b) is None
    clock.advance(100)
    q.touch(a)
    q.touch(b)
    assert q.end_overheld() is None and q.hold_left(a) == 20.0
    clock.advance(21)
    assert q.end_overheld() == a
    assert q.state(b) == ("active", 0) and q.hold_left(b) == 120.0
    assert list(q.holds.times) == [121.0]
    with pytest.raises(UnknownSession) as lost:
        q.state(a)
    assert "held the lab longer than 2 min (--max-hold)" in lost.value.args[1]


def test_max_hold_waits_for_the_request_in_flight_then_ends_the_session(clock):
    """A pinned session (a long netlab up) is not ended under its request; at the first call
    after the request it is. Counted from the activation either way."""
    q = SessionQueue(600, 300, 10, clock, max_hold=60)
    a, _ = q.create()
    q.pin(a)
    clock.advance(100)
    assert q.end_overheld() is None and q.hold_left(a) == 0.0
    q.unpin(a)
    assert q.end_overheld() == a and len(q) == 0


def test_without_max_hold_nobody_is_ended_for_holding(clock):
    q = SessionQueue(600, 300, 10, clock)
    a, _ = q.create()
    clock.advance(10 ** 6)
    q.touch(a)
    assert q.end_overheld() is None and q.hold_left(a) is None
    q.remove(a)
    with pytest.raises(UnknownSession) as gone:
        q.state(a)
    assert gone.value.args == (a,)  # an ordinary end: the seed's 404


def test_housekeeping_wakes_often_enough_for_a_short_max_hold(tmp_path):
    from remote_lab import App, settings_from_args
    app = App(settings_from_args(["--max-hold", "2", "--state-dir", str(tmp_path)]))
    app.queue.create()
    assert app.cadence() == 0.5


def test_the_estimate_of_one_position_is_that_of_the_whole_list(clock):
    q = SessionQueue(600, 300, clock=clock)
    ids = [q.create()[0] for _ in range(4)]
    assert [q.eta(i) for i in range(4)] == [0.0, None, None, None]  # no history yet
    for held in (30, 50, 40):
        clock.advance(held)
        q.remove(q.active_id())
        ids.append(q.create()[0])
    clock.advance(10)
    assert [q.eta(i) for i in range(len(q))] == q.waits()
