"""The status page in a real browser: headless Chromium (tests/chromium_support.py). Skipped
only when no Chromium is installed.

1. the page loaded while a session waits shows the holder, the queue and the devices;
2. a screenshot of it (desktop and phone width) is saved under the pytest tmp dir;
3. loaded again, its script long-polls GET /status; the holder ends while the page waits and the
   DOM the script rendered shows the new holder (the server-rendered HTML showed the old one);
4. a fresh load afterwards shows the new holder too.
"""
import json
import re
import sys

import pytest

from chromium_support import chromium  # noqa: F401  (fixture)
from helpers import ROOT, kill_if_running
from server_support import start_server, wait_until  # noqa: F401

sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.timeout(180)

HTML = {"Accept": "text/html"}


def attr(dom, name):
    m = re.search(r'<main id="status"[^>]*\b%s="([^"]*)"' % name, dom)
    assert m, "no %s on <main id=status> in:\n%s" % (name, dom[:3000])
    return m.group(1)


def watchers(api):
    return api.metric("remote_lab_status_page_watchers")


def test_status_page_in_headless_chromium(start_server, chromium, tmp_path):
    srv, api = start_server()
    a = api.new_session()
    assert api.post_lab(a)[0] == 200
    b = api.new_session()  # waiting behind a

    # 1. the page while b waits: DOM after load (scripts ran; long-poll pending)
    dom = chromium("--dump-dom", srv.url + "/")
    assert attr(dom, "data-holder") == a[:8]
    assert attr(dom, "data-waiting") == "1"
    assert attr(dom, "data-lab-state") == "running"
    assert "<code>%s</code> holds the lab" % a[:8] in dom
    assert "<td>1</td><td><code>%s</code></td>" % b[:8] in dom
    assert "192.168.121.101" in dom and "192.168.121.102" in dom
    assert a not in dom and b not in dom  # only short ids
    assert re.search(r'<span id="live" class="on">live</span>', dom), "the script did not start"

    # 2. screenshots
    for name, size in (("status.png", "1200,900"), ("status-phone.png", "390,844")):
        shot = tmp_path / name
        chromium("--screenshot=%s" % shot, "--window-size=%s" % size, srv.url + "/")
        data = shot.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, (name, len(data))
        print("screenshot:", shot)

    # 3. the script updates the page: load it, wait until its long-poll waits on the server,
    # end a's session; virtual time stands still while the long-poll is pending, and the budget
    # runs out during the 1 s pause after the update, so the dump is the script's rendering
    before, _ = api.req("GET", "/", headers=HTML)[1:]
    assert 'data-holder="%s"' % a[:8] in before
    # the pages loaded above are closed: the server noticed, nobody is watching any more
    wait_until(lambda: watchers(api) == 0, timeout=10, what="closed pages to stop watching")
    proc = chromium("--virtual-time-budget=500", "--dump-dom", srv.url + "/", background=True)
    try:
        wait_until(lambda: watchers(api) >= 1 or proc.poll() is not None, timeout=60,
                   what="the page's long-poll")
        assert proc.poll() is None, proc.stderr.read().decode(errors="replace")[-3000:]
        assert api.delete_session(a) == 204
        out, err = proc.communicate(timeout=60)
    finally:
        kill_if_running(proc)
    assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
    dom = out.decode(errors="replace")
    assert attr(dom, "data-holder") == b[:8], "the page did not follow the hand-over"
    assert attr(dom, "data-waiting") == "0"
    assert "<code>%s</code> holds the lab" % b[:8] in dom
    assert "Nobody is waiting." in dom
    assert re.search(r'<span id="live" class="on">live, updated [^<]+</span>', dom)
    assert "session %s got the lab after waiting" % b[:8] in dom

    # 4. a fresh load shows the new holder too
    dom = chromium("--dump-dom", srv.url + "/")
    assert attr(dom, "data-holder") == b[:8]
    assert attr(dom, "data-lab-state") in ("stopping", "stopped")


def test_docs_page_in_headless_chromium(start_server, chromium):
    srv, api = start_server()
    dom = chromium("--dump-dom", srv.url + "/docs")
    assert dom.count('<form class="try"') == len(
        [1 for item in api.req("GET", "/openapi.json")[1]["paths"].values() for _ in item])
    assert 'id="op-post_lab"' in dom and 'id="op-get_metrics"' in dom


def out_of(dom, op):
    m = re.search(r'<section class="card op" id="op-%s">.*?<pre class="out"[^>]*>(.*?)</pre>'
                  % op, dom, re.S)
    assert m, op
    return m.group(1)


def test_docs_try_it_forms_in_headless_chromium(start_server, chromium, tmp_path):
    """The "try it" forms really send requests: a copy of /docs whose added script submits
    POST /session, GET /healthz, then GET /session/{id} (the id filled in from the first
    answer). Served from a file with <base> pointing at the server (hence no CSP and
    --disable-web-security for the cross-origin fetches); the page's own script is unchanged."""
    srv, api = start_server()
    status, docs, _ = api.req("GET", "/docs", headers=HTML)
    assert status == 200
    driver = """<script>
    function go(op) { document.querySelector("#op-" + op + " form").requestSubmit(); }
    function answered(op) {  // "201 Created ..." (while sending it says "POST /session ...")
        return /^([0-9]{3} |request failed)/.test(
            document.querySelector("#op-" + op + " pre.out").textContent);
    }
    function then(op, next) {  // the next form once op's answer is shown: a busy machine may
        if (answered(op)) { next(); } else { setTimeout(function () { then(op, next); }, 20); }
    }                          // take longer than any fixed delay
    document.querySelector('#op-post_session input[name="note"]').value = "tried in /docs";
    go("post_session");
    then("post_session", function () {
        go("get_healthz");
        then("get_healthz", function () { go("get_session"); });
    });
    </script></body>"""
    page = docs.replace("<head>", '<head><base href="%s/">' % srv.url, 1) \
        .replace("</body>", driver, 1)
    path = tmp_path / "docs.html"
    path.write_text(page)
    dom = chromium("--disable-web-security", "--virtual-time-budget=10000", "--dump-dom",
                   path.as_uri())
    created = out_of(dom, "post_session")
    assert created.startswith("201 Created"), created
    sid = json.loads(created.split("\n", 1)[1])["session_id"]
    assert out_of(dom, "get_healthz").startswith("204 No Content")
    got = out_of(dom, "get_session")
    assert got.startswith("200 OK") and '"status": "active"' in got and sid in got, got
    assert '"note": "tried in /docs"' in got and '"owner": null' in got, got  # the JSON body
    assert [s["session_id"] for s in api.health()["session_list"]] == [sid]
