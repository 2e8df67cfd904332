"""The operations surface with --slots 2 (issue 13, item 1): /status, the status page, GET /,
/debug/health, /metrics and systemd's STATUS= show every slot's lab and holder, and the queue.
One real server (fake netlab, --auth-file) for the module: alice and bob each hold a slot with
a topology of their own (two labs up at once), bob's second session waits; alice looks, so
bob's ids are short."""
import re
import time

import pytest

from chromium_support import chromium  # noqa: F401  (fixture)
from helpers import ServerProcess
from server_support import (MAPPING, TOKENS, Api, metric_sample, wait_until,
                            write_auth_file)
from systemd_support import NotifySocket
from test_ops import parse_exposition

pytestmark = pytest.mark.timeout(60)

HTML = {"Accept": "text/html"}


@pytest.fixture(scope="module")
def lab2(tmp_path_factory):
    """(srv, {user: Api}, {name: session id}): alice in one slot (simple.yml, reuse), bob in
    the other (mapping.yml), bob's second session waiting."""
    tmp = tmp_path_factory.mktemp("slots-ops")
    notify = NotifySocket()  # systemd's, for the STATUS= lines
    srv = ServerProcess(tmp, "--slots", "2", "--keep-warm", "60",
                        "--auth-file", str(write_auth_file(tmp / "users")),
                        env={"NOTIFY_SOCKET": notify.address}).start()
    srv.notify = notify
    apis = {name: Api(srv, TOKENS[name]) for name in ("alice", "bob", "root")}
    sids = {}
    for name, user, body in (("a", "alice", {"note": "CI #7", "link": "https://ci.example/7"}),
                             ("b", "bob", {}), ("b2", "bob", {"note": "later"})):
        status, data, _ = apis[user].req("POST", "/session", body=body)
        assert status == 201, data
        sids[name] = data["session_id"]
    assert apis["alice"].post_lab(sids["a"], reuse=True)[0] == 200
    assert apis["bob"].post_lab(sids["b"], MAPPING, "mapping.yml")[0] == 200
    yield srv, apis, sids
    assert srv.stop() == 0
    notify.close()


def slot_of(view, slot):
    return next(entry for entry in view["labs"] if entry["slot"] == slot)


def test_status_shows_each_slot_with_its_lab_and_holder_and_the_queue(lab2):
    srv, apis, sids = lab2
    status, view, _ = apis["alice"].req("GET", "/status")
    assert status == 200, view
    assert view["slots"] == 2 and [e["slot"] for e in view["labs"]] == [1, 2]
    one, two = slot_of(view, 1), slot_of(view, 2)
    assert one["holder"]["session"] == sids["a"] and one["holder"]["you"] is True
    assert (one["holder"]["owner"], one["holder"]["note"]) == ("alice", "CI #7")
    assert one["holder"]["topology"] == "simple.yml"
    assert two["holder"]["session"] == sids["b"][:8] and two["holder"]["you"] is False
    assert two["holder"]["topology"] == "mapping.yml" and two["holder"]["owner"] == "bob"
    assert (one["lab"]["state"], one["lab"]["topology"], one["lab"]["ref_count"]) == \
        ("running", "simple.yml", 1)
    assert (two["lab"]["state"], two["lab"]["topology"]) == ("running", "mapping.yml")
    # each its own multilab instance: its own management subnet
    assert {d["mgmt"].rsplit(".", 1)[0] for d in one["lab"]["devices"]} == {"192.168.1"}
    assert {d["mgmt"].rsplit(".", 1)[0] for d in two["lab"]["devices"]} == {"192.168.2"}
    assert one["lab"]["warm_until"] is None  # held, not kept warm
    # the queue: only the waiting session, at position 1
    assert [(q["position"], q["session"], q["note"]) for q in view["queue"]] == \
        [(1, sids["b2"][:8], "later")]
    # the one-slot fields: the oldest active session and slot 1's lab
    assert view["holder"] == one["holder"]
    assert {k: v for k, v in one["lab"].items() if k != "warm_until"} == view["lab"]
    # bob sees his own in full, alice's short; root (an admin) all of them
    bob = apis["bob"].req("GET", "/status")[1]
    assert slot_of(bob, 1)["holder"]["session"] == sids["a"][:8]
    assert slot_of(bob, 2)["holder"]["you"] and bob["queue"][0]["session"] == sids["b2"]
    root = apis["root"].req("GET", "/status")[1]
    assert [slot_of(root, k)["holder"]["session"] for k in (1, 2)] == [sids["a"], sids["b"]]
    assert sids["b"] not in str(view) and sids["b2"] not in str(view)


def test_the_status_page_shows_every_slot(lab2):
    srv, apis, sids = lab2
    status, page, _ = apis["alice"].req("GET", "/", headers=HTML)
    assert status == 200
    assert "<h2>Lab holders</h2>" in page and "<h2>Labs</h2>" in page
    holders = re.search(r'<div id="holder-body">(.*?)</div></section>', page, re.S).group(1)
    assert "2 of 2 slots busy" in holders
    assert '<code class="you">%s</code>' % sids["a"] in holders
    assert "<code>%s</code>" % sids["b"][:8] in holders and "<code>mapping.yml</code>" in holders
    labs = re.search(r'<div id="lab-body">(.*?)</div></section>', page, re.S).group(1)
    assert re.findall(r'data-slot="(\d)"><h3>slot \d</h3>', labs) == ["1", "2"]
    assert "<code>192.168.1.101</code>" in labs and "<code>192.168.2.101</code>" in labs
    assert '<td>1</td><td><b class="owner">bob</b> <code>%s</code>' % sids["b2"][:8] in page
    assert sids["b"] not in page and sids["b2"] not in page  # (ids shortened in the data too)


def test_root_and_debug_health_list_the_slots(lab2):
    srv, apis, sids = lab2
    root = apis["alice"].req("GET", "/")[1]
    assert root["slots"] == 2
    assert [(s["slot"], s["session"], s["topology"], s["state"]) for s in root["labs"]] == \
        [(1, sids["a"], "simple.yml", "running"), (2, sids["b"][:8], "mapping.yml", "running")]
    assert sorted(root["labs"][1]["devices"]) == ["leaf1", "leaf2", "spine"]
    assert root["active_session"] == sids["a"] and root["lab"]["topology"] == "simple.yml"
    health = apis["alice"].req("GET", "/debug/health")[1]
    assert health["slots"] == 2 and health["sessions"] == 3
    assert [(lab["slot"], lab["topology"], lab["holder"]) for lab in health["labs"]] == \
        [(1, "simple.yml", sids["a"]), (2, "mapping.yml", sids["b"][:8])]
    assert health["lab"] == {k: v for k, v in health["labs"][0].items() if k != "slot"}
    assert [(s["slot"], s["status"]) for s in health["session_list"]] == \
        [(1, "active"), (2, "active"), (None, "waiting")]


def test_metrics_label_the_lab_gauges_with_their_slot(lab2):
    srv, apis, sids = lab2
    text = apis["alice"].req("GET", "/metrics")[1]
    families = parse_exposition(text)  # (valid text format 0.0.4)
    assert {labels["slot"] for _, labels, _ in families["remote_lab_lab_devices"]["samples"]} \
        == {"1", "2"}
    v = lambda name, **labels: metric_sample(text, name, **labels)  # noqa: E731
    assert v("remote_lab_slots") == 2
    assert v("remote_lab_lab_running", slot="1") == 1 == v("remote_lab_lab_running", slot="2")
    assert v("remote_lab_lab_state", slot="2", state="running") == 1
    assert v("remote_lab_lab_ref_count", slot="1") == 1
    assert v("remote_lab_lab_devices", slot="1") == 2
    assert v("remote_lab_sessions", status="active") == 2
    assert v("remote_lab_sessions", status="waiting") == 1
    assert v("remote_lab_sessions_overtaking_total") == 0
    assert not re.search(r"^remote_lab_lab_running ", text, re.M)  # no slot-less series


def test_systemd_status_counts_the_busy_slots(lab2):
    srv, apis, sids = lab2
    line = "2/2 slots busy, 2 labs up (simple.yml,mapping.yml), 1 waiting"
    wait_until(lambda: line in srv.notify.values("STATUS"), 10, what=line)


def test_the_page_in_headless_chromium_shows_both_slots(lab2, chromium):
    """The page as a browser shows it once its script ran (credentials in the URL)."""
    srv, apis, sids = lab2
    dom = chromium("--dump-dom", srv.url.replace("://", "://alice:%s@" % TOKENS["alice"]) + "/")
    assert re.search(r'<span id="live" class="on">live', dom), "the script did not start"
    assert "2 of 2 slots busy" in dom and dom.count('<tr class="slot-busy">') == 2
    assert '<code class="you">%s</code>' % sids["a"] in dom
    assert "<code>192.168.1.101</code>" in dom and "<code>192.168.2.101</code>" in dom


def test_a_slot_kept_warm_says_until_when(lab2):
    """Last (it ends sessions): alice's reusable lab outlives her session by --keep-warm."""
    srv, apis, sids = lab2
    assert apis["bob"].delete_session(sids["b2"]) == 204
    assert apis["alice"].delete_session(sids["a"]) == 204
    before = time.time()
    view = wait_until(lambda: apis["root"].req("GET", "/status")[1], 5)
    one = slot_of(view, 1)
    assert one["holder"] is None and one["lab"]["state"] == "running"
    assert before + 50 < one["lab"]["warm_until"] < before + 61
    assert slot_of(view, 2)["lab"]["warm_until"] is None  # bob still holds his
    assert "1 of 2 slots busy" in view["html"]["holder"] and "kept warm" in view["html"]["lab"]
