"""The lab and the queue in-process, on one fake clock with a recording netlab runner:
acquisition, keep-warm, expiry, promotion and the kept-dir retries in milliseconds (the same
Lab and SessionQueue App wires together; the HTTP wiring is tested in test_server_lab.py)."""
import os

import pytest

from clock_support import FakeClock, LabWorld, remote_lab
from remote_lab import RUNNING, STOPPED, LabBusy, SessionQueue, UnknownSession


@pytest.fixture
def world(tmp_path):
    return LabWorld(tmp_path)


@pytest.fixture
def warm(tmp_path):
    return LabWorld(tmp_path, keep_warm=1.0)


# -- acquisition, applied --


def test_start_reuse_busy_and_replace_run_netlab_only_when_the_table_says(world):
    a, _ = world.queue.create()
    first = world.upload("A")
    assert world.lab.acquire(a, first, True) == (False, [{"name": "r1", "raw": {}},
                                                         {"name": "r2", "raw": {}}])
    assert world.runner.verbs() == ["up", "inspect"]
    again = world.upload("A")
    assert world.lab.acquire(a, again, True)[0] is True  # reused: no netlab call
    assert not os.path.exists(again.workdir)  # the reused upload is dropped
    assert world.lab.snapshot()["ref_count"] == 2
    other = world.upload("B")
    with pytest.raises(LabBusy, match="Lab currently busy: lab.yml is in use .ref count 2."):
        world.lab.acquire(a, other, True)
    assert not os.path.exists(other.workdir)
    world.lab.release(a)
    world.lab.release(a)
    replacement = world.upload("B")
    assert world.lab.acquire(a, replacement, True)[0] is False
    assert world.runner.calls[2:] == [("down", first.workdir, False), ("up", replacement.workdir,
                                                                       False),
                                      ("inspect", replacement.workdir, False)]
    assert not os.path.exists(first.workdir)
    assert world.lab.snapshot()["fingerprint"] == "B"


def test_an_acquire_by_a_session_no_longer_active_gets_423_and_no_netlab(world):
    a, _ = world.queue.create()
    b, _ = world.queue.create()  # waiting: not the active session
    upload = world.upload("A")
    with pytest.raises(LabBusy, match="session s2 is no longer active"):
        world.lab.acquire(b, upload, True)
    assert world.runner.calls == [] and not os.path.exists(upload.workdir)


def test_a_failed_up_leaves_the_lab_stopped_with_the_error_and_its_dir_cleaned(world):
    a, _ = world.queue.create()
    world.runner.fail = {"up"}
    upload = world.upload("A")
    with pytest.raises(remote_lab.NetlabError):
        world.lab.acquire(a, upload, True)
    assert world.runner.calls == [("up", upload.workdir, False), ("down", upload.workdir, True)]
    snap = world.lab.snapshot()
    assert (snap["state"], snap["ref_count"]) == (STOPPED, 0)
    assert "fake failure of netlab up" in snap["last_error"]
    assert not os.path.exists(upload.workdir)


# -- keep-warm: kept after a reuse=true session, until its deadline unless in use --


def test_keep_warm_one_up_for_three_sessions(tmp_path):
    world = LabWorld(tmp_path, keep_warm=30.0)
    for i in range(3):
        sid, _ = world.queue.create()
        reused, _ = world.lab.acquire(sid, world.upload("A"), True)
        assert reused is (i > 0)
        world.clock.advance(10)
        world.end(sid)
        assert world.state() == RUNNING  # kept warm
    assert world.runner.verbs() == ["up", "inspect"]


def test_keep_warm_expires_at_its_deadline_and_the_next_session_gets_a_fresh_lab(warm):
    a, _ = warm.queue.create()
    upload = warm.upload("A")
    warm.lab.acquire(a, upload, True)
    warm.end(a)
    warm.clock.advance(0.999)
    warm.housekeeping()
    assert warm.state() == RUNNING and "down" not in warm.runner.verbs()
    warm.clock.advance(0.001)
    warm.housekeeping()
    assert warm.state() == STOPPED
    assert warm.runner.calls[-1] == ("down", upload.workdir, False)
    assert not os.path.exists(upload.workdir)
    b, _ = warm.queue.create()
    assert warm.lab.acquire(b, warm.upload("A"), True)[0] is False


def test_keep_warm_lab_not_expired_while_the_next_session_uses_it(warm):
    a, _ = warm.queue.create()
    warm.lab.acquire(a, warm.upload("A"), True)
    warm.end(a)
    b, _ = warm.queue.create()
    assert warm.lab.acquire(b, warm.upload("A"), True)[0] is True  # ref 1 again
    warm.clock.advance(1.8)  # past the keep-warm deadline: in use, so it stays
    warm.housekeeping()
    assert "down" not in warm.runner.verbs()
    snap = warm.lab.snapshot()
    assert (snap["running"], snap["ref_count"]) == (True, 1)
    warm.lab.release(b)  # released by its active holder: still not expired
    warm.clock.advance(10)
    warm.housekeeping()
    assert warm.state() == RUNNING


def test_keep_warm_reuse_false_restarts_and_is_not_kept_warm(tmp_path):
    world = LabWorld(tmp_path, keep_warm=30.0)
    a, _ = world.queue.create()
    world.lab.acquire(a, world.upload("A"), True)
    world.end(a)
    b, _ = world.queue.create()
    assert world.lab.acquire(b, world.upload("A"), False)[0] is False  # restarted
    world.end(b)
    assert world.state() == STOPPED
    assert world.runner.verbs() == ["up", "inspect", "down", "up", "inspect", "down"]
    assert os.listdir(world.settings.labs_dir) == []


# -- expiry and promotion --


def test_a_silent_active_session_expires_its_lab_goes_and_the_next_is_promoted(world):
    a, _ = world.queue.create()
    b, _ = world.queue.create()
    world.lab.acquire(a, world.upload("A"), True)
    world.clock.advance(200)
    world.queue.touch(b)
    world.clock.advance(100)
    world.housekeeping()
    assert world.state() == RUNNING  # exactly at the limit: not yet
    world.clock.advance(0.5)
    world.housekeeping()
    assert world.state() == STOPPED and world.queue.active_id() == b
    assert world.lab.acquire(b, world.upload("B"), True)[0] is False


def test_a_dead_waiter_is_skipped_at_promotion(world):
    dropped = []
    world.queue.on_drop = lambda s: dropped.append(s.id)
    a, _ = world.queue.create()
    dead, _ = world.queue.create()
    live, _ = world.queue.create()
    world.clock.advance(301)
    world.queue.touch(a)
    world.queue.touch(live)
    world.end(a)
    assert dropped == [dead] and world.queue.active_id() == live


# -- long-polls on the fake clock: no real waiting --


def test_wait_change_returns_when_the_turn_comes_not_at_its_deadline():
    clock = FakeClock()
    q = SessionQueue(600, 300, 10, clock)
    a, _ = q.create()
    b, _ = q.create()
    clock.at(7.5, lambda: q.remove(a))
    assert q.wait_change(b, 30) == ("active", 0)
    assert clock.now() == 1007.5 and q.long_polls() == 0


def test_wait_change_times_out_on_the_fake_clock_with_the_state_unchanged():
    clock = FakeClock()
    q = SessionQueue(600, 300, 10, clock)
    q.create()
    b, _ = q.create()
    clock.at(3, lambda: q.create())  # behind b: not a change for b
    assert q.wait_change(b, 30) == ("waiting", 1)
    assert clock.now() == 1030.0


def test_wait_change_raises_when_the_session_goes_while_waiting():
    clock = FakeClock()
    q = SessionQueue(600, 300, 10, clock)
    q.create()
    b, _ = q.create()
    clock.at(1, lambda: q.remove(b))
    with pytest.raises(UnknownSession):
        q.wait_change(b, 30)


def test_the_id_factory_names_sessions():
    names = iter(["first", "second"])
    q = SessionQueue(600, 300, 10, FakeClock(), new_id=lambda: next(names))
    assert [q.create()[0], q.create()[0]] == ["first", "second"]


# -- kept dirs: the retry backoff runs on the lab's clock --


def test_a_dir_netlab_still_knows_is_retried_with_backoff_on_the_clock(world):
    a, _ = world.queue.create()
    upload = world.upload("A")
    world.lab.acquire(a, upload, True)
    open(os.path.join(upload.workdir, remote_lab.NETLAB_SNAPSHOT), "w").close()
    world.runner.fail = {"down"}
    world.end(a)
    assert world.lab.unclean == {upload.workdir: (1, 1000.0 + 15.0)}  # the first retry: 15 s
    world.clock.advance(14)
    world.housekeeping()
    assert world.runner.verbs().count("down") == 2  # down, down --force: not retried yet
    world.clock.advance(1)
    world.housekeeping()
    assert world.runner.verbs().count("down") == 3
    assert world.lab.unclean[upload.workdir] == (2, 1015.0 + 30.0)  # doubled
    world.runner.fail = set()
    world.clock.advance(29)
    world.housekeeping()
    assert world.runner.verbs().count("down") == 3
    world.clock.advance(1)
    world.housekeeping()
    assert world.lab.unclean == {} and not os.path.exists(upload.workdir)
    assert world.state() == STOPPED


def test_a_session_created_into_an_empty_queue_is_active_the_moment_it_is_created():
    # making the id may take a while (the first uuid4 imports uuid): the clock is read after it,
    # so creation and promotion are one instant and nobody is counted as having waited
    clock = FakeClock()

    def slow_id():
        clock.advance(0.005)
        return "s1"

    q = SessionQueue(600, 300, 10, clock, new_id=slow_id)
    promoted = []
    q.on_activate = promoted.append
    q.create()
    assert [(s.id, s.activated - s.created) for s in promoted] == [("s1", 0.0)]
