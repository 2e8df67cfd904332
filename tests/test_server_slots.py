"""--slots N: several labs at once, each its own netlab multilab instance; the affinity promotion
of a warm lab (fake netlab, real server processes)."""
import json
import os
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from client_support import cli  # noqa: E402
from remote_lab_client import lab_fingerprint  # noqa: E402
from helpers import ServerProcess  # noqa: E402
from server_support import (MAPPING, SIMPLE, Api, calls_of, seed_fields,  # noqa: E402
                            start_server, wait_until)  # noqa: F401


def join(api, fingerprint=None):
    body = json.dumps({"fingerprint": fingerprint}).encode() if fingerprint else None
    headers = {"Content-Type": "application/json"} if body else None
    status, data, _ = api.req("POST", "/session", body=body, headers=headers)
    assert status == 201, (status, data)
    return data["session_id"]


def fingerprint(tmp_path, name, content):
    path = tmp_path / "fp" / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(content)
    return lab_fingerprint(str(path))


def acquire_both(api, a, b):
    """POST /lab of a (simple.yml) and b (mapping.yml) at the same time."""
    answers = {}
    threads = [threading.Thread(target=lambda: answers.__setitem__(a, api.post_lab(a))),
               threading.Thread(target=lambda: answers.__setitem__(
                   b, api.post_lab(b, MAPPING, "mapping.yml")))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return answers[a], answers[b]


def test_two_labs_run_at_once_in_two_slots_each_session_sees_its_own(start_server):
    srv, api = start_server("--slots", "2")
    srv.switch("up_delay", value="1.5")
    a, b, c = join(api), join(api), join(api)
    assert [api.session_full(s)[1]["slot"] for s in (a, b, c)] == [1, 2, None]
    assert seed_fields(api.session_full(c)) == (200, {"session_id": c, "status": "waiting",
                                                      "position": 1})
    (sa, la), (sb, lb) = acquire_both(api, a, b)
    assert sa == 200 and sb == 200, (la, lb)
    assert [d["name"] for d in la["devices"]] == ["r1", "r2"]
    assert [d["name"] for d in lb["devices"]] == ["spine", "leaf1", "leaf2"]
    assert la["devices"][0]["raw"]["mgmt"]["ipv4"].startswith("192.168.1.")  # instance 1
    assert lb["devices"][0]["raw"]["mgmt"]["ipv4"].startswith("192.168.2.")  # instance 2
    ups = calls_of(srv, "up")
    lock = "defaults.multilab.lock=%s" % (srv.state_dir / "netlab.lock")
    assert sorted(u["argv"] for u in ups) == [
        ["up", "--plugin", "multilab", "-s", "defaults.multilab.id=%d" % k, "-s", lock,
         "./" + name] for k, name in ((1, "simple.yml"), (2, "mapping.yml"))]
    assert sorted(os.path.basename(os.path.dirname(u["cwd"])) for u in ups) == ["slot-1",
                                                                               "slot-2"]
    assert abs(ups[0]["time"] - ups[1]["time"]) < 1.5  # the second began before the first ended
    for sid, names in ((a, ["r1", "r2"]), (b, ["spine", "leaf1", "leaf2"])):
        status, devices, _ = api.req("GET", "/lab/devices", sid)
        assert status == 200 and [d["name"] for d in devices] == names
    assert api.lab(a)[1]["topology"] == "simple.yml" and api.lab(b)[1]["topology"] == "mapping.yml"
    assert api.req("GET", "/active-session")[1] == {"session_id": a, "status": "active",
                                                   "position": 0}
    listed = api.req("GET", "/sessions")[1]
    assert listed["slots"] == 2
    assert [(s["session_id"], s["status"], s["position"], s["slot"]) for s in
            listed["sessions"]] == [(a, "active", 0, 1), (b, "active", 0, 2), (c, "waiting", 1,
                                                                                None)]
    shown = cli("status", "--url", srv.url)
    assert shown.returncode == 0, shown.stderr
    assert "slot 1   running  simple.yml  ref count 1  held by unknown (session %s)" % a \
        in shown.stdout, shown.stdout
    assert "slot 2   running  mapping.yml  ref count 1  held by unknown (session %s)" % b \
        in shown.stdout
    shown = cli("status", "--json", "--url", srv.url)
    listed = json.loads(shown.stdout)
    assert listed["slots"] == 2 and [(x["slot"], x["topology"]) for x in listed["labs"]] == [
        (1, "simple.yml"), (2, "mapping.yml")]
    assert api.req("POST", "/lab/release", a)[0] == 204
    assert api.delete_session(a) == 204  # slot 1 frees: c gets it, a's lab goes
    assert api.session_full(c)[1]["slot"] == 1
    wait_until(lambda: len(calls_of(srv, "down")) == 1, 10, what="a's lab torn down")
    assert api.lab(c)[1]["running"] is False and api.lab(b)[1]["running"] is True
    assert api.req("POST", "/lab/release", b)[0] == 204


def test_one_slot_runs_netlab_without_the_multilab_plugin(start_server):
    srv, api = start_server()
    a = join(api)
    assert api.post_lab(a)[0] == 200
    assert [u["argv"] for u in calls_of(srv, "up")] == [["up", "./simple.yml"]]
    assert api.session_full(a)[1]["slot"] == 1
    assert api.req("GET", "/sessions")[1] == {"slots": 1, "sessions": [
        {"session_id": a, "status": "active", "position": 0, "slot": 1, "owner": None}]}


def test_a_restart_restores_every_slot_and_adopts_its_lab(start_server):
    srv, api = start_server("--slots", "2")
    a, b, c = join(api), join(api), join(api)
    acquire_both(api, a, b)
    srv.stop()
    srv.log_path.write_text("")  # (start() reads the new port from the log)
    srv.start()
    assert [api.session_full(s)[1]["slot"] for s in (a, b, c)] == [1, 2, None]
    assert api.lab(a)[1]["topology"] == "simple.yml" and api.lab(a)[1]["running"]
    assert api.lab(b)[1]["topology"] == "mapping.yml" and api.lab(b)[1]["running"]
    assert len(calls_of(srv, "up")) == 2 and calls_of(srv, "down") == []  # both adopted
    assert "restarted after a stop; 3 sessions restored, slot 1's lab simple.yml adopted, slot " \
        "2's lab mapping.yml adopted" in [e["text"] for e in api.req("GET", "/status")[1]["events"]]
    assert api.delete_session(b) == 204
    assert api.session_full(c)[1]["slot"] == 2


@pytest.mark.parametrize("max_overtake", [None, "0"])
def test_the_warm_lab_goes_to_a_later_session_that_declared_it(start_server, tmp_path,
                                                               max_overtake):
    args = ["--keep-warm", "60"] + (["--max-overtake", max_overtake] if max_overtake else [])
    srv, api = start_server(*args)
    fp_simple = fingerprint(tmp_path, "simple.yml", SIMPLE)
    fp_mapping = fingerprint(tmp_path, "mapping.yml", MAPPING)
    holder = join(api, fp_simple)
    assert api.post_lab(holder)[0] == 200
    other = join(api, fp_mapping)
    same = join(api, fp_simple)
    assert api.delete_session(holder) == 204
    events = [e["text"] for e in api.req("GET", "/status")[1]["events"]]
    if max_overtake == "0":  # strict FIFO
        assert api.session_full(other)[1]["status"] == "active"
        assert not any("promoted ahead" in t for t in events)
        return
    assert api.session_full(same)[1]["status"] == "active"
    assert api.session_full(other)[1]["position"] == 1
    assert "session %s promoted ahead of 1 session for the warm lab simple.yml" % same[:8] \
        in events
    status, lab = api.post_lab(same)
    assert status == 200 and lab["reused"] is True and len(calls_of(srv, "up")) == 1


def test_a_session_takes_over_the_warm_lab_of_a_free_slot(start_server):
    srv, api = start_server("--slots", "2", "--keep-warm", "60")
    a, b = join(api), join(api)
    acquire_both(api, a, b)
    assert api.delete_session(b) == 204  # slot 2 keeps mapping.yml warm
    assert api.delete_session(a) == 204  # slot 1 keeps simple.yml warm
    c = join(api)  # declared nothing: the first free slot
    assert api.session_full(c)[1]["slot"] == 1
    status, lab = api.post_lab(c, MAPPING, "mapping.yml")
    assert status == 200 and lab["reused"] is True  # slot 2's warm lab, no `up`
    assert api.session_full(c)[1]["slot"] == 2
    assert "session %s moved to slot 2, whose warm lab mapping.yml it asked for" % c[:8] in [
        e["text"] for e in api.req("GET", "/status")[1]["events"]]
    d = join(api)
    assert api.session_full(d)[1]["slot"] == 1
    status, lab = api.post_lab(d)
    assert status == 200 and lab["reused"] is True
    assert len(calls_of(srv, "up")) == 2 and calls_of(srv, "down") == []
    assert [d["name"] for d in api.req("GET", "/lab/devices", c)[1]] == ["spine", "leaf1",
                                                                         "leaf2"]
    assert not [p for p in (srv.state_dir / "labs" / "slot-1").iterdir()
                if p.name.startswith("lab-")][1:]  # the upload moved with c: one dir each


def test_the_slots_multilab_ids_skip_121_or_come_from_multilab_ids():
    import remote_lab
    s = remote_lab.settings_from_args(["--slots", "122"])
    assert [s.multilab_id(k) for k in (1, 2, 120, 121, 122)] == [1, 2, 120, 122, 123]
    assert remote_lab.settings_from_args([]).multilab_id(1) is None  # one slot: no plugin
    s = remote_lab.settings_from_args(["--slots", "2", "--multilab-ids", "7,9"])
    assert [s.multilab_id(k) for k in (1, 2)] == [7, 9]
    assert s.overtake_limit == 4
    assert remote_lab.settings_from_args(["--max-overtake", "0"]).overtake_limit == 0
    for bad in (["--slots", "0"], ["--slots", "2", "--multilab-ids", "7"], ["--multilab-ids", "7"],
                ["--slots", "2", "--multilab-ids", "7,7"], ["--multilab-ids", "x"],
                ["--slots", "2", "--multilab-ids", "1,201"], ["--max-overtake", "-1"]):
        with pytest.raises(SystemExit):
            remote_lab.settings_from_args(bad)


def restarted(srv, *args):
    """A new server on ``srv``'s state dir and fake netlab, started with ``args``."""
    again = ServerProcess(srv.tmp / "again", "--state-dir", srv.state_dir, *args,
                          env={"FAKE_NETLAB_DIR": str(srv.fake_dir)})
    again.fake_dir, again.state_dir = srv.fake_dir, srv.state_dir
    return again.start(), Api(again)


def test_a_restart_with_fewer_slots_ends_the_session_whose_slot_is_gone(start_server):
    srv, api = start_server("--slots", "3")
    a, b, c = join(api), join(api), join(api)
    for sid in (a, b, c):
        assert api.post_lab(sid)[0] == 200
    srv.stop()
    srv2, api2 = restarted(srv, "--slots", "2")
    try:
        assert [api2.session_full(s)[1]["slot"] for s in (a, b)] == [1, 2]
        status, body = api2.session_full(c)
        assert status == 404 and "restarted with --slots 2: slot 3, which it held, and its lab " \
            "are gone" in body["detail"], body
        wait_until(lambda: not list((srv.state_dir / "labs" / "slot-3").glob("lab-*")), 10,
                   what="slot 3's lab cleaned")
        assert any("restarted with --slots 2" in e["text"]
                   for e in api2.req("GET", "/status")[1]["events"])
    finally:
        srv2.stop()


def test_a_restart_with_other_multilab_ids_does_not_adopt_labs_under_their_old_ids(start_server):
    """Slot 2's lab ran as instance 2; after --multilab-ids 2,1 slot 1 is instance 2: slot 2's
    lab is not adopted but cleaned, and slot 1's first `up` waits for that clean-up."""
    srv, api = start_server("--slots", "2")
    a, b = join(api), join(api)
    assert api.post_lab(b, MAPPING, "mapping.yml")[0] == 200
    srv.stop()
    srv.switch("down_delay", value="2")  # the clean-up of instance 2 takes a while
    srv2, api2 = restarted(srv, "--slots", "2", "--multilab-ids", "2,1")
    try:
        status, answer = api2.post_lab(a)  # slot 1, instance 2 now: at once
        assert status == 200, answer
        assert answer["devices"][0]["raw"]["mgmt"]["ipv4"].startswith("192.168.2.")
        lab = api2.lab(b)[1]
        assert lab["running"] is False and "runs as netlab instance 2, and its slot's is 1 " \
            "now" in lab["last_error"], lab
    finally:
        srv2.stop()
