"""Lab and session semantics: the topology name never reaches netlab as an option, a
dead waiter is not promoted, netlab processes of a crashed server are killed at the next start,
and /debug/health answers the seed's ``sessions`` count."""
import os
import signal
import threading

import pytest

from helpers import ServerProcess
from server_support import (MAPPING, SIMPLE, Api, calls_of, lab_dirs, pid_alive,  # noqa: F401
                            proc_records, seed_proc_record, start_server, wait_until)


# ------------------------------------------------------------------------------------------
# the topology is passed as ./NAME; names netlab misreads anyway are refused
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("simulate", [False, True], ids=["fake-netlab", "simulated"])
def test_a_topology_named_like_an_option_is_built_not_read_as_an_option(start_server, simulate):
    srv, api = start_server(simulate=simulate)
    sid = api.new_session()
    # netlab read `--set=x.yml` as an option and built topology.yml (the mapping lab) instead
    status, body = api.post_lab(sid, SIMPLE, "--set=x.yml", extras=[("topology.yml", MAPPING)])
    assert status == 200, body
    assert [d["name"] for d in body["devices"]] == ["r1", "r2"]
    assert "netlab up ./--set=x.yml" in srv.log()
    if not simulate:
        assert [c["argv"] for c in calls_of(srv, "up")] == [["up", "./--set=x.yml"]]
    assert api.lab(sid)[1]["topology"] == "--set=x.yml"


def test_a_plain_topology_name_goes_to_netlab_as_a_relative_path(start_server):
    srv, api = start_server()
    sid = api.new_session()
    assert api.post_lab(sid, SIMPLE, "lab.yaml")[0] == 200
    up = calls_of(srv, "up")[-1]
    assert up["argv"] == ["up", "./lab.yaml"]
    assert os.path.isfile(os.path.join(up["cwd"], "lab.yaml"))


@pytest.mark.parametrize("name", ["package:x.yml", "x*.yml", "lab?.yml", "lab[1].yml"])
def test_topology_names_netlab_misreads_even_as_a_path_are_refused(start_server, name):
    # netlab reads any name containing `package:` from its own package (a different file), and
    # globs the name's stem to find versioned topologies (x.1.2.yml)
    srv, api = start_server()
    sid = api.new_session()
    status, body = api.post_lab(sid, SIMPLE, name, extras=[("x.yml", MAPPING)])
    assert status == 400, body
    assert name in body["detail"] and "netlab" in body["detail"], body
    assert calls_of(srv, "up") == []
    wait_until(lambda: lab_dirs(srv) == [], 5, what="the refused upload removed")
    assert api.session(sid)[1]["status"] == "active"  # the session may try again
    assert api.post_lab(sid, SIMPLE, "x-1.yml")[0] == 200


# ------------------------------------------------------------------------------------------
# a waiter silent past the active timeout is dropped at promotion
# ------------------------------------------------------------------------------------------

# short enough for a test, long enough that the holder, alive between its requests, never
# expires on a loaded machine
ACTIVE_TIMEOUT = 2.5
NOT_SIGNS_OF_LIFE = ["/healthz", "/", "/status", "/metrics", "/docs", "/openapi.json",
                     "/debug/health", "/active-session"]


def _hold_the_lab_while(api, srv, sid, seconds):
    """POST /lab from ``sid`` with a slow fake `up`: the session is pinned (alive) meanwhile."""
    srv.switch("up_delay", value=str(seconds))
    result = {}
    t = threading.Thread(target=lambda: result.update(r=api.post_lab(sid, timeout=60)))
    t.start()
    wait_until(lambda: calls_of(srv, "up"), 10, what="netlab up started")
    return t, result


def _events(api, kind):
    return [e["text"] for e in api.req("GET", "/status")[1]["events"] if e["kind"] == kind]


def test_a_dead_waiter_is_dropped_at_promotion_and_the_next_one_promoted(start_server):
    srv, api = start_server("--active-timeout", ACTIVE_TIMEOUT)
    active, dead, alive = api.new_session(), api.new_session(), api.new_session()
    # `alive` long-polls (a pinned request is a sign of life); `dead` says nothing itself, and
    # requests to the server's other endpoints that carry its id do not count for it
    poll = {}
    poller = threading.Thread(target=lambda: poll.update(r=api.session(alive, wait=60, timeout=70)))
    poller.start()
    holder, held = _hold_the_lab_while(api, srv, active, 2 * ACTIVE_TIMEOUT)
    while holder.is_alive():
        for path in NOT_SIGNS_OF_LIFE:
            assert api.req("GET", path, dead)[0] in (200, 204), path
        holder.join(0.2)
    assert held["r"][0] == 200, held
    # still queued (waiters expire after --waiting-timeout), silent all along
    queued = {s["session_id"]: s for s in api.health()["session_list"]}
    assert dead in queued and queued[dead]["idle"] > ACTIVE_TIMEOUT, queued
    assert api.delete_session(active) == 204
    poller.join(30)
    assert poll["r"] == (200, {"session_id": alive, "status": "active", "position": 0})
    assert api.session(dead)[0] == 404
    health = api.health()
    assert health["counters"].get("sessions_expired") == 1
    assert [s["session_id"] for s in health["session_list"]] == [alive]
    dropped = [t for t in _events(api, "expired") if dead[:8] in t]
    assert len(dropped) == 1 and "waiting" in dropped[0], _events(api, "expired")
    assert any(dead[:8] in line and "WARNING" in line and "expired" in line
               for line in srv.log().splitlines()), srv.log()


def test_a_waiter_that_asks_about_its_session_or_the_lab_is_promoted(start_server):
    srv, api = start_server("--active-timeout", ACTIVE_TIMEOUT)
    active, waiter = api.new_session(), api.new_session()
    holder, held = _hold_the_lab_while(api, srv, active, 2 * ACTIVE_TIMEOUT)
    while holder.is_alive():
        # a waiting session's lab request is refused (423), but it is a sign of life
        assert api.req("GET", "/lab", waiter)[0] == 423
        holder.join(0.2)
    assert held["r"][0] == 200, held
    assert api.delete_session(active) == 204
    assert api.session(waiter)[1]["status"] == "active"
    assert api.health()["counters"].get("sessions_expired") is None


# ------------------------------------------------------------------------------------------
# netlab left running by a crashed (SIGKILLed) server
# ------------------------------------------------------------------------------------------


def _post_lab_until_the_server_dies(api, sid):
    try:
        api.post_lab(sid, timeout=60)
    except OSError:  # the connection dies with the server
        pass


def test_a_restarted_server_kills_the_netlab_up_of_its_crashed_predecessor(tmp_path):
    first = ServerProcess(tmp_path / "first").start()
    api = Api(first)
    try:
        first.switch("up_hang")
        sid = api.new_session()
        threading.Thread(target=_post_lab_until_the_server_dies, args=(api, sid),
                         daemon=True).start()
        up = wait_until(lambda: calls_of(first, "up"), 10, what="netlab up started")[0]
        wait_until(lambda: proc_records(first.state_dir), 5, what="the running up recorded")
        record = proc_records(first.state_dir)[0]
        assert (record["pid"], record["pgid"]) == (up["pid"], up["pgid"])
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(10)
    finally:
        first.stop()
    assert pid_alive(up["pid"]), "the hanging up should have outlived the killed server"
    labdir = up["cwd"]
    assert os.path.isdir(labdir)

    second = ServerProcess(tmp_path / "second", "--state-dir", first.state_dir,
                           env={"FAKE_NETLAB_DIR": str(first.fake_dir)})
    try:
        second.start()
        wait_until(lambda: not pid_alive(up["pid"]), 15, what="the orphaned up killed")
        wait_until(lambda: not os.path.exists(labdir), 15, what="the old lab dir cleaned")
        wait_until(lambda: not proc_records(first.state_dir), 5,
                   what="the process record removed")
        log = second.log()
        killed = log.index("killing netlab up left running by a previous server (pid %d"
                           % up["pid"])
        assert killed < log.index("cleaning up lab dir left from a previous run: %s" % labdir)
        # the restarted server works: the session is still the active one and acquires again
        first.switch("up_hang", on=False)
        api2 = Api(second)
        assert api2.session(sid)[1]["status"] == "active"
        status, body = api2.post_lab(sid)
        assert (status, body["reused"]) == (200, False), body
    finally:
        second.stop()
        try:
            os.killpg(up["pgid"], signal.SIGKILL)
        except OSError:
            pass


def test_a_recorded_pid_now_used_by_another_process_is_left_alone(tmp_path):
    # a record whose pid is alive but started at another time is not ours: never killed
    import subprocess
    import sys
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"],
                             start_new_session=True)
    try:
        srv = ServerProcess(tmp_path)
        seed_proc_record(srv.state_dir, {"pid": other.pid, "pgid": other.pid, "start_time": 1,
                                         "verb": "up", "cwd": str(tmp_path)})
        with srv:
            wait_until(lambda: not proc_records(srv.state_dir), 5,
                       what="the stale record removed")
            assert pid_alive(other.pid)
            assert "killing netlab" not in srv.log()
    finally:
        other.kill()
        other.wait(5)


def test_the_children_of_a_dead_recorded_leader_are_killed_too(tmp_path):
    # netlab (the group leader) gone, a child it started still running in its group
    import subprocess
    leader = subprocess.Popen(["sh", "-c", "sleep 60 & echo $!"], stdout=subprocess.PIPE,
                              start_new_session=True)
    started = open("/proc/%d/stat" % leader.pid).read().rsplit(")", 1)[1].split()[19]
    child = int(leader.stdout.readline())
    leader.wait(5)
    leader.stdout.close()
    try:
        assert pid_alive(child) and os.getpgid(child) == leader.pid
        srv = ServerProcess(tmp_path)
        seed_proc_record(srv.state_dir, {"pid": leader.pid, "pgid": leader.pid,
                                         "start_time": int(started), "verb": "up",
                                         "cwd": str(tmp_path)})
        with srv:
            wait_until(lambda: not pid_alive(child), 10, what="the orphaned child killed")
            wait_until(lambda: not proc_records(srv.state_dir), 5, what="the record removed")
            assert "killing netlab up left running by a previous server (pid %d" % leader.pid \
                in srv.log()
    finally:
        try:
            os.kill(child, signal.SIGKILL)
        except OSError:
            pass


# ------------------------------------------------------------------------------------------
# /debug/health "sessions" is the count, as in the seed
# ------------------------------------------------------------------------------------------


def test_debug_health_sessions_is_the_count_as_in_the_seed(start_server):
    srv, api = start_server()
    body = api.health()
    assert body["sessions"] == 0 and type(body["sessions"]) is int
    assert body["session_list"] == []
    a, b = api.new_session(), api.new_session()
    body = api.health()
    assert body["sessions"] == 2 and type(body["sessions"]) is int
    assert body["queue_length"] == 2
    assert [(s["session_id"], s["status"]) for s in body["session_list"]] == \
        [(a, "active"), (b, "waiting")]
    schema = api.req("GET", "/openapi.json")[1]["components"]["schemas"]["DebugHealth"]
    assert schema["properties"]["sessions"]["type"] == "integer"
    assert schema["properties"]["session_list"]["type"] == "array"
