"""Who and why on the status page, in a real browser: headless Chromium driven over the DevTools
protocol (tests/chromium_support.py ``browser``). Skipped only when no Chromium is installed.

1. a server with --auth-file: the page, loaded with HTTP Basic credentials (the browser answers
   the server's 401 challenge with the URL's user and token), names the holder, its note and
   its link (clickable, rel="noopener noreferrer") and the waiting user; its script keeps
   long-polling with the same credentials and shows the hand-over;
2. hostile owner, note and link (script tags, attribute breakers, event handlers) inject
   nothing, neither in the server-rendered page nor in what the script swaps in: no alert,
   no element or attribute that was not there, the text shown as it was sent; a javascript:
   link is refused by the server and never rendered as a link.
"""
import json
import re
import sys

import pytest

from chromium_support import browser  # noqa: F401  (fixture)
from helpers import ROOT, wait_until
from server_support import TOKENS, start_server, write_auth_file  # noqa: F401

sys.path.insert(0, str(ROOT))

pytestmark = pytest.mark.timeout(120)

JSON = {"Content-Type": "application/json"}
# every alert() a page would run is recorded instead (and so is any other sign of injection)
RECORD_ALERTS = ("window.__alerts = []; "
                 "window.alert = function (m) { window.__alerts.push(String(m)); };")


def new_session(api, **who):
    status, body, _ = api.req("POST", "/session", body=json.dumps(who).encode(), headers=JSON)
    assert status == 201, (status, body)
    return body["session_id"]


def wait_for(chromium, tab, expression, what, timeout=30):
    wait_until(lambda: chromium.evaluate(tab, expression), timeout=timeout, what=what)


def test_the_page_with_basic_auth_names_the_holder_and_links_its_job(start_server, browser,
                                                                      tmp_path):
    auth = write_auth_file(tmp_path / "users")
    srv, anonymous = start_server("--auth-file", auth)
    alice, bob = anonymous.as_user(TOKENS["alice"]), anonymous.as_user(TOKENS["bob"])
    link = "https://ci.example/core/-/jobs/812?tab=log&x=1"
    a = new_session(alice, note="CI: core #812", link=link)
    b = new_session(bob, note="bisecting")
    chromium = browser()

    tab = chromium.open("http://alice:%s@127.0.0.1:%d/" % (TOKENS["alice"], srv.port))
    holder = chromium.evaluate(tab, "document.getElementById('holder-body').innerText")
    assert re.search(r"^alice %s( \(you\))? holds the lab for \d+ s" % a, holder), holder
    assert "CI: core #812" in holder and link in holder
    anchor = chromium.evaluate(tab, """(function () {
        var a = document.querySelector('#holder-body a');
        return a && {href: a.getAttribute('href'), rel: a.rel, text: a.textContent};
    })()""")
    assert anchor == {"href": link, "rel": "noopener noreferrer", "text": link}, anchor
    assert chromium.evaluate(tab, "document.getElementById('status').dataset.holder") == a
    queue = chromium.evaluate(tab, "document.getElementById('queue-body').innerText")
    assert "bob %s" % b[:8] in queue and "bisecting" in queue and b not in queue, queue

    # the script's long-poll carries the credentials too: it shows bob taking over
    assert bob.delete_session(a) == 403  # (not his)
    assert alice.delete_session(a) == 204
    wait_for(chromium, tab, "document.getElementById('status').dataset.waiting === '0'",
             "the page to show the hand-over")
    holder = chromium.evaluate(tab, "document.getElementById('holder-body').innerText")
    assert holder.startswith("bob %s holds the lab" % b[:8]) and "bisecting" in holder, holder
    assert chromium.evaluate(tab, "document.getElementById('live').textContent").startswith(
        "live, updated")


HOSTILE = [
    {"owner": "<script>alert('owner')</script>", "note": '"onmouseover="alert(\'note\')" x="',
     "link": "https://evil.example/\"><script>alert('link')</script>"},
    {"owner": "<img src=x onerror=alert('img')>", "note": "</td></tr></table><b>bold</b>&amp;",
     "link": "http://evil.example/' onmouseover='alert(5)' x='"},
]

LOOK = """(function () {
    var all = document.querySelectorAll('*'), i, j, handlers = [];
    for (i = 0; i < all.length; i++) {
        all[i].dispatchEvent(new MouseEvent('mouseover', {bubbles: true}));
        for (j = 0; j < all[i].attributes.length; j++)
            if (/^on/i.test(all[i].attributes[j].name)) handlers.push(all[i].tagName);
    }
    var links = document.querySelectorAll('#holder-body a, #queue-body a');
    return {alerts: window.__alerts, handlers: handlers, scripts: document.scripts.length,
            imgs: document.images.length,
            bold: document.querySelectorAll('main b:not(.owner)').length,
            links: Array.prototype.map.call(links, function (a) {
                return [a.getAttribute('href'), a.textContent, a.rel]; }),
            owners: Array.prototype.map.call(document.querySelectorAll('b.owner'),
                                             function (b) { return b.textContent; }),
            notes: Array.prototype.map.call(document.querySelectorAll('.note'),
                                            function (n) { return n.textContent; })};
})()"""


def test_hostile_owner_note_and_link_inject_nothing(start_server, browser):
    srv, api = start_server()
    status, body, _ = api.req("POST", "/session", headers=JSON,
                              body=json.dumps({"link": "javascript:alert(1)"}).encode())
    assert status == 400 and "http:// or https://" in body["detail"], body
    sids = [new_session(api, **who) for who in HOSTILE]
    extra = new_session(api, owner="third")  # its end makes the page's script swap sections
    chromium = browser()
    tab = chromium.open(srv.url + "/", init_script=RECORD_ALERTS)
    assert chromium.evaluate(tab, "typeof window.__alerts") == "object"

    def check(waiting):
        seen = chromium.evaluate(tab, LOOK)
        assert seen["alerts"] == [] and seen["handlers"] == [], seen
        assert seen["scripts"] == 2 and seen["imgs"] == 0 and seen["bold"] == 0, seen
        assert seen["owners"] == [w["owner"] for w in HOSTILE] + ["third"] * waiting, seen
        assert seen["notes"] == [w["note"] for w in HOSTILE], seen
        assert seen["links"] == [[w["link"], w["link"], "noopener noreferrer"]
                                 for w in HOSTILE], seen
        text = chromium.evaluate(tab, "document.getElementById('status').innerText")
        for who in HOSTILE:
            assert all(value in text for value in who.values()), (who, text)

    check(waiting=1)  # as the server rendered it
    assert api.delete_session(extra) == 204
    wait_for(chromium, tab, "document.getElementById('status').dataset.waiting === '1'",
             "the script to swap in the new queue")
    check(waiting=0)  # as the script swapped it in
    assert chromium.evaluate(tab, "document.getElementById('status').dataset.holder") == \
        sids[0][:8]


def test_a_link_that_is_not_http_is_shown_as_text_only():
    """A session restored from an older state database may hold any link: only http(s) ones
    become <a href> (the page's own rendering, no server needed)."""
    import remote_lab
    for link in ("javascript:alert(1)", " javascript:alert(1)", "JaVaScRiPt:alert(1)",
                 "data:text/html,<script>alert(1)</script>", "vbscript:x"):
        html = remote_lab._link_html(link)
        assert "<a" not in html and "<script" not in html, html
    assert remote_lab._link_html("HTTPS://ok.example/?a=1&b=2") == (
        '<a href="HTTPS://ok.example/?a=1&amp;b=2" rel="noopener noreferrer" target="_blank">'
        "HTTPS://ok.example/?a=1&amp;b=2</a>")
