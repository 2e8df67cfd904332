"""The lab's planner: the README's acquisition table ("How it works"), the end of a session and
the keep-warm deadline, as pure functions of the lab's state and the request (no netlab, no
threads, no clock)."""
import pytest

from clock_support import remote_lab
from remote_lab import (BUSY, GONE, KEEP_WARM, REPLACE, REUSE, RUNNING, START, STARTING,
                        STOPPED, STOPPING, TEAR_DOWN, WAIT, LabInfo, plan_acquire,
                        plan_session_end, warm_lab_expired)


def running(fingerprint="A", ref_count=0, **kw):
    return LabInfo(state=RUNNING, workdir="/labs/lab-a", topology="a.yml",
                   fingerprint=fingerprint, ref_count=ref_count, holder="s0", **kw)


def plan(lab, fingerprint, reuse, active=True):
    return plan_acquire(lab, "s1", fingerprint, reuse, active)


# -- the acquisition table, row by row --


@pytest.mark.parametrize("reuse", [True, False])
@pytest.mark.parametrize("lab", [LabInfo(), LabInfo(last_error="netlab up failed")])
def test_no_lab_any_request_starts_one(lab, reuse):
    assert plan(lab, "A", reuse) == remote_lab.AcquirePlan(START)


@pytest.mark.parametrize("ref_count", [0, 1, 3])
def test_same_fingerprint_with_reuse_is_reused_whatever_the_ref_count(ref_count):
    assert plan(running("A", ref_count), "A", True).action == REUSE


def test_same_fingerprint_ref_count_0_reuse_false_is_torn_down_and_started_again():
    p = plan(running("A", 0), "A", False)
    assert p == remote_lab.AcquirePlan(REPLACE, "restart requested (reuse=false)")


@pytest.mark.parametrize("reuse", [True, False])
def test_other_fingerprint_ref_count_0_is_torn_down_and_the_new_one_started(reuse):
    p = plan(running("A", 0), "B", reuse)
    assert p == remote_lab.AcquirePlan(REPLACE, "another topology requested")


@pytest.mark.parametrize("fingerprint, reuse", [("A", False), ("B", True), ("B", False)])
@pytest.mark.parametrize("ref_count", [1, 2])
def test_in_use_otherwise_is_busy_with_the_423_detail(fingerprint, reuse, ref_count):
    p = plan(running("A", ref_count), fingerprint, reuse)
    assert p == remote_lab.AcquirePlan(
        BUSY, "Lab currently busy: a.yml is in use (ref count %d)" % ref_count)


# -- around the table: transitions under way, a session that ended meanwhile --


@pytest.mark.parametrize("state", [STARTING, STOPPING])
@pytest.mark.parametrize("active", [True, False])
def test_an_up_or_teardown_under_way_is_waited_for_first(state, active):
    assert plan(LabInfo(state=state), "A", True, active).action == WAIT


@pytest.mark.parametrize("lab", [LabInfo(), running("A", 0), running("A", 2)])
def test_a_session_no_longer_active_gets_no_lab(lab):
    assert plan(lab, "A", True, active=False) == remote_lab.AcquirePlan(
        GONE, "session s1 is no longer active")


def test_the_plan_is_a_value_and_the_lab_is_not_changed():
    lab = running("A", 1)
    before = LabInfo(**vars(lab))
    assert plan(lab, "A", True) == plan(lab, "A", True)
    assert lab == before  # the executor applies the plan, not the planner


# -- the end of the holder's session --


def test_the_holders_session_end_tears_down_without_keep_warm():
    assert plan_session_end(running(reusable=True), "s0", keep_warm=0) == TEAR_DOWN


def test_keep_warm_keeps_a_lab_whose_last_acquire_used_reuse():
    assert plan_session_end(running(reusable=True), "s0", keep_warm=30) == KEEP_WARM


def test_keep_warm_does_not_keep_a_lab_last_acquired_with_reuse_false():
    assert plan_session_end(running(reusable=False), "s0", keep_warm=30) == TEAR_DOWN


@pytest.mark.parametrize("lab", [running(), LabInfo(), LabInfo(state=STOPPING)])
def test_another_sessions_end_or_no_running_lab_changes_nothing(lab):
    assert plan_session_end(lab, "s9", keep_warm=30) is None


# -- the keep-warm deadline --


def test_a_warm_lab_expires_at_its_deadline_not_before():
    lab = running(warm_until=130.0)
    assert not warm_lab_expired(lab, 129.999, holder_active=False)
    assert warm_lab_expired(lab, 130.0, holder_active=False)


@pytest.mark.parametrize("lab, holder_active", [
    (running(ref_count=1, warm_until=100.0), False),  # the next session acquired it again
    (running(warm_until=100.0), True),  # its holder is the active session (released, ref 0)
    (running(warm_until=None), False),  # not kept warm at all
    (LabInfo(state=STOPPED, warm_until=100.0), False),
])
def test_a_warm_lab_in_use_or_not_warm_does_not_expire(lab, holder_active):
    assert not warm_lab_expired(lab, 1000.0, holder_active)


# -- start-up: what to do with the lab a previous server saved (plan_restore) --

LABS = "/labs"


def saved(state=RUNNING, workdir="/labs/lab-a", fingerprint="A"):
    return LabInfo(state=state, workdir=workdir, topology="a.yml", fingerprint=fingerprint,
                   ref_count=2, holder="s0")


def started(*dirs, status="started"):
    return {("default" if i == 0 else "i%d" % i): {"dir": d, "status": status}
            for i, d in enumerate(dirs)}


def test_a_saved_lab_netlab_still_runs_with_the_same_files_is_adopted_as_it_was():
    lab = saved()
    p = remote_lab.plan_restore(lab, started("/labs/lab-a"), ["/labs/lab-a"], LABS, "A")
    assert p.adopt is lab and p.lost is None
    assert (p.stale_instances, p.dirs) == ([], [])


@pytest.mark.parametrize("registry, fingerprint_now, why", [
    ({}, "A", "netlab no longer runs it"),
    (started("/labs/lab-a", status="failed"), "A", "netlab no longer runs it"),
    (started("/labs/lab-b"), "A", "netlab no longer runs it"),
    (None, "A", "netlab could not tell whether it still runs"),
    (started("/labs/lab-a"), None, "its dir or netlab's snapshot in it is gone"),
    (started("/labs/lab-a"), "B", "its files changed"),
])
def test_a_saved_lab_is_lost_unless_netlab_runs_it_in_its_dir_unchanged(registry,
                                                                        fingerprint_now, why):
    p = remote_lab.plan_restore(saved(), registry, ["/labs/lab-a"], LABS, fingerprint_now)
    assert (p.adopt, p.lost, p.dirs) == (None, why, ["/labs/lab-a"])


@pytest.mark.parametrize("state", [STARTING, STOPPING, STOPPED])
def test_a_lab_saved_between_states_is_never_adopted_and_its_dir_is_cleaned(state):
    p = remote_lab.plan_restore(saved(state), started("/labs/lab-a"), ["/labs/lab-a"], LABS, "A")
    assert (p.adopt, p.lost, p.dirs) == (None, None, ["/labs/lab-a"])


def test_every_other_dir_is_cleaned_and_only_instances_whose_dir_is_gone_are_stale():
    registry = started("/labs/lab-a", "/labs/lab-gone", "/elsewhere/lab", "/labs/lab-c")
    p = remote_lab.plan_restore(saved(), registry, ["/labs/lab-a", "/labs/lab-c"], LABS, "A")
    assert p.adopt is not None
    assert p.dirs == ["/labs/lab-c"]  # its instance goes with its teardown
    assert p.stale_instances == ["i1"]  # /labs/lab-gone; never an instance outside our dir
