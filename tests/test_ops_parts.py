"""The operations parts in-process (the event log, the metrics, the status view-model, systemd's
STATUS= line), and the status page rendered once, on the server: GET /status carries the page's
HTML sections, and the page's script only swaps them in and ticks the clocks."""
import re
import sys

import pytest

from helpers import ROOT
from server_support import start_server  # noqa: F401

sys.path.insert(0, str(ROOT))
import remote_lab  # noqa: E402

pytestmark = pytest.mark.timeout(60)

HTML = {"Accept": "text/html"}
A = "aaaaaaaa-1111-4111-8111-111111111111"
B = "bbbbbbbb-2222-4222-8222-222222222222"
LAB = {"state": "running", "running": True, "topology": "simple.yml", "ref_count": 1,
       "holder": A, "last_error": None,
       "devices": [{"name": "r1", "raw": {"device": "frr", "mgmt": {"ipv4": "10.0.0.1"}}},
                   {"name": "r2", "raw": {"device": "eos", "ansible_host": "10.0.0.2"}}]}


def snapshot(sessions=((A, 10.0, 95.0, 12.0, {"owner": "alice@laptop", "note": "CI #7",
                                              "link": "https://ci.example/7"}),
                       (B, 20.0, 99.0, None, {})), lab=LAB, events=()):
    return remote_lab.OpsSnapshot(
        token="t1", now=1000.0, mono=100.0, sessions=list(sessions), lab=lab,
        events=list(events), events_total=len(events), started=900.0, uptime=100.0,
        timeouts={"waiting": 600.0, "active": 300.0})


def test_status_view_is_a_function_of_the_snapshot():
    events = [{"time": 950.0, "kind": "active", "text": "one", "detail": None, "seq": 1},
              {"time": 960.0, "kind": "failure", "text": "two", "detail": "out", "seq": 2}]
    view = remote_lab.status_view(snapshot(events=events), viewer=B)
    assert view["holder"] == {"session": A[:8], "you": False, "since": 912.0, "last_seen": 995.0,
                              "topology": "simple.yml", "held_s": 88.0, "owner": "alice@laptop",
                              "note": "CI #7", "link": "https://ci.example/7",
                              "hold_left_s": None}
    assert view["queue"] == [{"position": 1, "session": B, "you": True, "joined": 920.0,
                              "last_seen": 999.0, "owner": None, "note": None, "link": None,
                              "eta_s": None}]
    assert view["max_hold"] == 0.0 and view["join_eta_s"] is None
    assert view["lab"]["holder"] == A[:8]
    assert view["lab"]["devices"] == [{"name": "r1", "device": "frr", "mgmt": "10.0.0.1"},
                                      {"name": "r2", "device": "eos", "mgmt": "10.0.0.2"}]
    assert [e["text"] for e in view["events"]] == ["two", "one"]  # newest first
    assert "seq" not in view["events"][0]
    assert (view["token"], view["server_time"], view["started"], view["uptime"]) == \
        ("t1", 1000.0, 900.0, 100.0)
    assert view["timeouts"] == {"waiting": 600.0, "active": 300.0}
    empty = remote_lab.status_view(snapshot(sessions=(), lab=dict(LAB, holder=None)))
    assert empty["holder"] is None and empty["queue"] == []


def test_status_view_shows_the_estimated_waits_and_the_hold_left():
    """The waits (SessionQueue.waits(joining=1)) go to the queue entries and join_eta_s; with
    --max-hold the holder's hold_left_s counts down from it (it has held the lab 88 s)."""
    snap = snapshot()
    snap.waits, snap.max_hold = [0.0, 42.0, 102.0], 120.0
    view = remote_lab.status_view(snap, viewer=B)
    assert view["queue"][0]["eta_s"] == 42.0
    assert view["join_eta_s"] == 102.0
    assert view["holder"]["hold_left_s"] == 32.0 and view["max_hold"] == 120.0
    snap.max_hold = 60.0  # held longer already: 0, not negative
    assert remote_lab.status_view(snap)["holder"]["hold_left_s"] == 0.0


def test_the_status_page_shows_the_estimated_waits_and_the_hold_left():
    snap = snapshot()
    snap.waits, snap.max_hold = [0.0, 170.0, 230.0], 120.0
    html = remote_lab.render_status_sections(remote_lab.status_view(snap, viewer=B))
    assert "<th>estimated wait</th>" in html["queue"]
    assert '<td class="eta">about 3 min</td>' in html["queue"]
    assert "ends in 32 s (--max-hold 2 min)" in html["holder"]
    snap.waits, snap.max_hold = [0.0, None, None], 0.0  # no history yet, no --max-hold
    html = remote_lab.render_status_sections(remote_lab.status_view(snap, viewer=B))
    assert ">unknown</span></td>" in html["queue"] and "max hold" not in html["holder"]


def test_systemd_status_line_from_the_snapshot():
    assert remote_lab.systemd_status_line(snapshot()) == \
        "lab r1,r2 (simple.yml) held by sid=%s, 1 waiting" % A[:8]
    stopped = dict(LAB, state="stopped", running=False, devices=[], holder=None)
    assert remote_lab.systemd_status_line(snapshot(sessions=(), lab=stopped)) == "idle"
    assert remote_lab.systemd_status_line(snapshot(sessions=[(A, 1.0, 1.0, 1.0, {})], lab=stopped)) \
        == "sid=%s active, no lab" % A[:8]


def test_event_log_lists_deferred_events_after_their_cause():
    log = remote_lab.EventLog(limit=3)
    log.session_active(A, 0.0)  # at once: recorded now
    log.session_active(B, 75.0)  # a promotion: waits for the end that caused it
    assert log.version() == "1.1"
    log.session_gone(A, True, "deleted by client", expired=False)
    events, total = log.recent(10)
    assert total == 3 and [e["seq"] for e in events] == [1, 2, 3]
    assert [e["text"] for e in events] == [
        "session %s is active at once (nobody was before it)" % A[:8],
        "active session %s ended (deleted by client)" % A[:8],
        "session %s got the lab after waiting 1 min 15 s" % B[:8]]
    log.netlab_done("up", 2.5, "boom\nmore", "sid=%s" % B[:8])
    events, total = log.recent(10)
    assert total == 4 and len(events) == 3  # bounded
    assert events[-1]["text"] == "netlab up failed after 2 s: boom [sid=%s]" % B[:8]
    assert events[-1]["detail"] == "boom\nmore"


def test_metrics_render_from_the_metrics_object_and_a_snapshot():
    metrics = remote_lab.Metrics()
    metrics.count("sessions_created", 2)
    metrics.count("upload_bytes", 1234)
    metrics.netlab_started("up")
    metrics.netlab_done("up", 3.0, None)
    metrics.netlab_started("up")
    metrics.netlab_done("up", 700.0, "exit 1")
    metrics.queue_wait(0.05)
    metrics.http_request("post_session", 201)
    metrics.watchers(+1)
    lines = remote_lab.render_metrics(metrics, snapshot()).splitlines()
    for line in ("remote_lab_queue_length 2", 'remote_lab_sessions{status="waiting"} 1',
                 "remote_lab_lab_devices 2", "remote_lab_status_page_watchers 1",
                 "remote_lab_sessions_created_total 2", "remote_lab_upload_bytes_total 1234",
                 'remote_lab_netlab_commands_total{command="up"} 2',
                 'remote_lab_netlab_failures_total{command="up"} 1',
                 'remote_lab_netlab_commands_total{command="inspect"} 0',
                 'remote_lab_netlab_duration_seconds_bucket{command="up",le="5.0"} 1',
                 'remote_lab_netlab_duration_seconds_count{command="up"} 2',
                 'remote_lab_queue_wait_seconds_bucket{le="0.1"} 1',
                 "remote_lab_start_time_seconds 900.0", "remote_lab_uptime_seconds 100.0",
                 'remote_lab_http_requests_total{route="post_session",status="201"} 1'):
        assert line in lines, line


def test_netlab_runner_reports_to_the_hooks_it_was_built_with(tmp_path):
    seen = []
    runner = remote_lab.NetlabRunner(
        [sys.executable, "-c", "import sys; sys.exit(sys.argv[1] == 'down')"], 10, 10, False,
        on_start=lambda verb: seen.append(("start", verb)),
        on_done=lambda verb, seconds, error, ctx: seen.append(("done", verb, error, ctx)))
    assert runner.run(["up", "x.yml"], str(tmp_path), 10, ctx="c1")[0] == 0
    with pytest.raises(remote_lab.NetlabError):
        runner.run(["down"], str(tmp_path), 10)
    assert seen[:3] == [("start", "up"), ("done", "up", None, "c1"), ("start", "down")]
    assert seen[3][:2] == ("done", "down") and "failed (exit 1)" in seen[3][2]


# ---------------------------------------------------------------------------------------------
# the status page, rendered once

_CLOCKS = re.compile(r'<(span class="ago"|time) data-t="[^"]*">[^<]*</(span|time)>')


def _without_clocks(markup):
    """Clock texts and their timestamps move between two answers; the rest must not."""
    return _CLOCKS.sub("CLOCK", markup)


def test_status_json_carries_the_sections_the_page_shows(start_server):
    srv, api = start_server()
    a = api.new_session()
    assert api.post_lab(a)[0] == 200
    b = api.new_session()
    status, st, _ = api.req("GET", "/status?sid=%s" % b)
    assert status == 200
    html = st["html"]
    assert sorted(html) == ["events", "holder", "lab", "queue", "uptime"]
    assert "<code>%s</code> holds the lab" % a[:8] in html["holder"]
    assert '<code class="you">%s</code>' % b in html["queue"]
    assert "<td>r1</td><td>frr</td><td><code>192.168.121.101</code></td>" in html["lab"]
    assert "session %s is active at once" % a[:8] in html["events"]
    assert 'class="ago" data-t="%.3f"' % st["started"] in html["uptime"]
    page = api.req("GET", "/?sid=%s" % b, headers=HTML)[1]
    for name in ("holder", "queue", "lab", "events"):
        shown = re.search(r'<div id="%s-body">(.*?)</div></section>' % name, page, re.S).group(1)
        assert _without_clocks(shown) == _without_clocks(html[name]), name
    uptime = re.search(r'<span id="uptime">(<span [^>]*>[^<]*</span>)</span>', page).group(1)
    assert _without_clocks(uptime) == _without_clocks(html["uptime"])
    assert a not in str(st) and b in str(st)  # others' ids shortened in the HTML too


def test_status_script_builds_no_html_and_has_one_duration_formatter():
    js = remote_lab.STATUS_JS
    literals = re.findall(r'"(?:[^"\\\n]|\\.)*"|\'(?:[^\'\\\n]|\\.)*\'', js)
    assert not [s for s in literals if "<" in s], "the script builds markup"
    functions = re.findall(r"function (\w+)", js)
    assert functions.count("dur") == 1  # the one duration formatter, for the ticking clocks
    assert not set(functions) & {"esc", "who", "ago", "clock", "holder", "queue", "lab", "events"}
    assert "innerHTML = d.html[" in js  # what it does instead: swap in the server's sections
