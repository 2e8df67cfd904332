"""The operations parts with --slots N (issue 13, item 1), in-process, from constructed
snapshots (as tests/test_ops_parts.py): the status view and page show every slot's lab and
holder, the queue only the waiting sessions; the metrics label the lab gauges with their slot;
systemd's STATUS= counts the busy slots. With one slot everything stays as it was."""
import sys

import pytest

from helpers import ROOT

sys.path.insert(0, str(ROOT))
import remote_lab  # noqa: E402

pytestmark = pytest.mark.timeout(60)

A = "aaaaaaaa-1111-4111-8111-111111111111"
B = "bbbbbbbb-2222-4222-8222-222222222222"
C = "cccccccc-3333-4333-8333-333333333333"
D = "dddddddd-4444-4444-8444-444444444444"
R1 = {"name": "r1", "raw": {"device": "frr", "mgmt": {"ipv4": "192.168.1.101"}}}
SPINE = {"name": "spine", "raw": {"device": "eos", "mgmt": {"ipv4": "192.168.2.101"}}}


def lab(slot, topology, holder, devices=(), ref_count=1, warm_until=None, state="running"):
    return {"state": state, "running": state == "running", "topology": topology,
            "ref_count": ref_count, "holder": holder, "last_error": None,
            "devices": list(devices), "fingerprint": None, "slot": slot,
            "warm_until": warm_until}


def three_slots():
    """A in slot 2 (the oldest active), B in slot 1, slot 3 free with D's lab kept warm
    until 60 s from now; C waits."""
    labs = [lab(1, "mapping.yml", B, [SPINE]), lab(2, "simple.yml", A, [R1]),
            lab(3, "single.yml", D, ref_count=0, warm_until=160.0)]
    return remote_lab.OpsSnapshot(
        token="t1", now=1000.0, mono=100.0,
        sessions=[(A, 10.0, 95.0, 12.0, {"owner": "alice", "note": "CI #7"}),
                  (B, 20.0, 98.0, 30.0, {"owner": "bob"}),
                  (C, 40.0, 99.0, None, {"owner": "carol", "note": "later"})],
        lab=labs[0], events=[], events_total=0, started=900.0, uptime=100.0,
        timeouts={"waiting": 600.0, "active": 300.0}, waits=[0.0, 0.0, 35.0, 80.0],
        max_hold=120.0, slots=3, labs=labs, holders={2: A, 1: B})


def one_slot():
    only = lab(1, "simple.yml", A, [R1])
    return remote_lab.OpsSnapshot(
        token="t1", now=1000.0, mono=100.0,
        sessions=[(A, 10.0, 95.0, 12.0, {"owner": "alice"}), (B, 20.0, 99.0, None, {})],
        lab=only, events=[], events_total=0, started=900.0, uptime=100.0,
        timeouts={"waiting": 600.0, "active": 300.0}, labs=[only], holders={1: A})


def test_the_view_has_every_slot_and_the_queue_only_the_waiting():
    view = remote_lab.status_view(three_slots(), viewer=B)
    assert view["slots"] == 3 and [e["slot"] for e in view["labs"]] == [1, 2, 3]
    one, two, three = view["labs"]
    assert one["holder"] == {"session": B, "you": True, "since": 930.0, "last_seen": 998.0,
                             "topology": "mapping.yml", "held_s": 70.0, "owner": "bob",
                             "note": None, "link": None, "hold_left_s": 50.0}
    assert (two["holder"]["session"], two["holder"]["topology"]) == (A[:8], "simple.yml")
    assert two["holder"]["hold_left_s"] == 32.0
    assert three["holder"] is None
    assert three["lab"]["warm_until"] == 1060.0 and one["lab"]["warm_until"] is None
    assert three["lab"]["holder"] == D[:8] and three["lab"]["ref_count"] == 0
    assert one["lab"]["devices"] == [{"name": "spine", "device": "eos",
                                      "mgmt": "192.168.2.101"}]
    assert view["queue"] == [{"position": 1, "session": C[:8], "you": False, "joined": 940.0,
                              "last_seen": 999.0, "owner": "carol", "note": "later",
                              "link": None, "eta_s": 35.0}]
    assert view["join_eta_s"] == 80.0
    # the one-lab fields: the oldest active session (with its own slot's topology), slot 1's lab
    assert view["holder"] == two["holder"]
    assert view["lab"]["topology"] == "mapping.yml" and "warm_until" not in view["lab"]


def test_one_slot_keeps_its_view_and_lists_the_one_slot_too():
    view = remote_lab.status_view(one_slot(), viewer=B)
    assert view["queue"][0]["position"] == 1 and len(view["queue"]) == 1
    assert view["holder"]["topology"] == "simple.yml"
    assert view["slots"] == 1
    assert view["labs"] == [{"slot": 1, "lab": dict(view["lab"], warm_until=None),
                             "holder": view["holder"]}]
    html = remote_lab.render_status_sections(view)
    assert "holds the lab" in html["holder"] and "slots busy" not in html["holder"]
    assert 'data-slot="' not in html["lab"]
    page = remote_lab.render_status_page(view).decode()
    assert "<h2>Lab holder</h2>" in page and "<h2>Lab</h2>" in page


def test_the_page_sections_show_each_slot():
    snap = three_slots()
    html = remote_lab.render_status_sections(remote_lab.status_view(snap, viewer=B))
    holders = html["holder"]
    assert "2 of 3 slots busy" in holders
    assert holders.count('<tr class="slot-busy">') == 2
    assert '<tr class="slot-free"><td>3</td>' in holders
    assert '<b class="owner">bob</b> <code class="you">%s</code>' % B in holders
    assert '<div class="why muted"><span class="note">CI #7</span></div>' in holders
    assert "<code>simple.yml</code>" in holders and "ends in 32 s (--max-hold)" in holders
    labs = html["lab"]
    assert [labs.index('data-slot="%d"' % k) for k in (1, 2, 3)] == \
        sorted(labs.index('data-slot="%d"' % k) for k in (1, 2, 3))
    assert "<td>spine</td><td>eos</td><td><code>192.168.2.101</code></td>" in labs
    assert "<dt>kept warm</dt><dd>until" in labs and "(1 min left)" in labs
    assert labs.count("kept warm") == 1
    assert '<td>1</td><td><b class="owner">carol</b> <code>%s</code>' % C[:8] in html["queue"]
    page = remote_lab.render_status_page(remote_lab.status_view(snap, viewer=B)).decode()
    assert "<h2>Lab holders</h2>" in page and "<h2>Labs</h2>" in page
    assert 'data-waiting="1"' in page and 'data-holder="%s"' % A[:8] in page


def test_metrics_label_the_lab_gauges_with_the_slot():
    metrics = remote_lab.Metrics()
    metrics.count("sessions_overtaking", 3)
    lines = remote_lab.render_metrics(metrics, three_slots()).splitlines()
    for line in ("remote_lab_slots 3", 'remote_lab_sessions{status="active"} 2',
                 'remote_lab_sessions{status="waiting"} 1', "remote_lab_queue_length 3",
                 'remote_lab_lab_running{slot="1"} 1', 'remote_lab_lab_running{slot="3"} 1',
                 'remote_lab_lab_state{slot="2",state="running"} 1',
                 'remote_lab_lab_state{slot="2",state="stopped"} 0',
                 'remote_lab_lab_ref_count{slot="3"} 0', 'remote_lab_lab_devices{slot="1"} 1',
                 "remote_lab_sessions_overtaking_total 3"):
        assert line in lines, line
    assert not [line for line in lines if line.startswith("remote_lab_lab_running ")]
    # one slot: the series as they were, no slot label (the new counter is additive)
    one = remote_lab.render_metrics(remote_lab.Metrics(), one_slot()).splitlines()
    for line in ("remote_lab_lab_running 1", 'remote_lab_lab_state{state="running"} 1',
                 "remote_lab_lab_ref_count 1", "remote_lab_lab_devices 1",
                 'remote_lab_sessions{status="active"} 1',
                 'remote_lab_sessions{status="waiting"} 1',
                 "remote_lab_sessions_overtaking_total 0"):
        assert line in one, line
    assert not [line for line in one if "slot" in line]


def test_systemd_status_line_counts_the_busy_slots():
    assert remote_lab.systemd_status_line(three_slots()) == \
        "2/3 slots busy, 3 labs up (mapping.yml,simple.yml,single.yml), 1 waiting"
    idle = three_slots()
    idle.sessions, idle.holders = [], {}
    idle.labs = [lab(k, None, None, ref_count=0, state="stopped") for k in (1, 2, 3)]
    assert remote_lab.systemd_status_line(idle) == "0/3 slots busy"
    assert remote_lab.systemd_status_line(one_slot()) == \
        "lab r1 (simple.yml) held by sid=%s, 1 waiting" % A[:8]


@pytest.mark.parametrize("slots", [1, 2])
def test_root_and_debug_health_add_the_slots_only_with_more_than_one(tmp_path, slots):
    app = remote_lab.App(remote_lab.Settings(simulate=True, state_dir=str(tmp_path),
                                             slots=slots))
    request = remote_lab.Request("GET", "/", {}, {})
    root = app.get_root(request).body
    health = app.get_debug_health(request).body
    seed_root = ["active_session", "docs", "lab", "netlab", "pid", "queue_length", "service",
                 "simulated", "uptime", "version"]
    seed_health = ["counters", "lab", "netlab_calls", "netlab_failures", "queue_length",
                   "session_list", "sessions", "status", "timestamp", "uptime", "version"]
    if slots == 1:
        assert sorted(root) == seed_root and sorted(health) == seed_health
        return
    assert sorted(root) == sorted(seed_root + ["labs", "slots"])
    assert sorted(health) == sorted(seed_health + ["labs", "slots"])
    assert root["labs"] == [{"slot": k, "session": None, "state": "stopped", "topology": None,
                             "ref_count": 0, "devices": []} for k in (1, 2)]
    assert [(h["slot"], h["state"]) for h in health["labs"]] == [(1, "stopped"), (2, "stopped")]
