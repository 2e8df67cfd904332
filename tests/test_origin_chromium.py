"""Other sites' web pages against the server, in a real browser.

Headless Chromium (skipped only when none is installed), driven over the DevTools protocol
(tests/chromium_support.py ``browser``), so scripts run in the page's own origin:

1. a page of another origin (a tiny HTTP server on another loopback port) fires 51 `no-cors`
   POST /session fetches and a form post at the server: none creates a session;
2. a DNS-rebound name (rebind.example mapped to 127.0.0.1 inside Chromium, no DNS involved)
   gets neither the status page nor a session, although its requests are "same-origin";
3. the server's own /docs page: its "try it" forms create, read, heartbeat and delete a session
   (Chromium sends the page's own Origin with each POST/DELETE); under a rebound name the page
   is refused.
The status page from the server's own origin: tests/test_status_page_chromium.py.
"""
import http.server
import json
import threading

import pytest

from chromium_support import browser  # noqa: F401  (fixture)
from server_support import start_server  # noqa: F401

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def other_site():
    """A web site on another loopback port: serves PAGES[path] (HTML) at each path."""
    pages = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            data = pages.get(self.path, "not here").encode()
            self.send_response(200 if self.path in pages else 404)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield pages, "http://127.0.0.1:%d" % server.server_address[1]
    server.shutdown()
    server.server_close()


def requests_seen(api, route, status):
    return api.metric("remote_lab_http_requests_total", route=route, status=status)


ATTACK_PAGE = """<!doctype html><html><body>
<iframe name="sink"></iframe>
<form id="f" method="POST" action="%(lab)s/session" target="sink" enctype="text/plain">
<input name="x" value="y"></form>
<script>
window.attack = (function () {
  var sent = [], i;
  for (i = 0; i < 50; i++) sent.push(fetch("%(lab)s/session", {method: "POST", mode: "no-cors"}));
  sent.push(fetch("%(lab_localhost)s/session", {method: "POST", mode: "no-cors"}));
  return Promise.all(sent).then(function (answers) {
    return new Promise(function (resolve) {  // then the form post, answered into the iframe
      document.querySelector("iframe").onload = function () { resolve(answers.length + 1); };
      document.getElementById("f").submit();
    });
  });
})();
</script></body></html>"""


def test_a_page_of_another_origin_creates_no_session(start_server, browser, other_site):
    srv, api = start_server()
    pages, site = other_site
    pages["/attack.html"] = ATTACK_PAGE % {"lab": srv.url,
                                           "lab_localhost": "http://localhost:%d" % srv.port}
    chromium = browser()
    tab = chromium.open(site + "/attack.html")
    assert chromium.evaluate(tab, "window.attack") == 52  # 51 fetches + the form post answered
    # the requests did reach the server, and each was refused
    assert requests_seen(api, "post_session", 403) == 52
    assert api.queue_length() == 0


def test_a_dns_rebound_name_reads_and_changes_nothing(start_server, browser):
    srv, api = start_server()
    api.new_session()  # someone holds the lab: there is something to read and to disturb
    chromium = browser("--host-resolver-rules=MAP rebind.example 127.0.0.1")
    tab = chromium.open("http://rebind.example:%d/" % srv.port)  # the attacker's name, our IP
    text = chromium.evaluate(tab, "document.body.innerText")
    assert "refused" in text and "--allow-host" in text, text
    assert "holds the lab" not in text
    # the page's own requests: same-origin for the browser, so only the Host gives them away
    statuses = chromium.evaluate(tab, """Promise.all([
        fetch("/session", {method: "POST"}), fetch("/status"), fetch("/debug/health"),
        fetch("/lab", {method: "DELETE", headers: {"X-Session-ID": "x"}})
    ].map(function (p) { return p.then(function (r) { return r.status; }); }))""")
    assert statuses == [403, 403, 403, 403], statuses
    assert api.queue_length() == 1


DRIVE_DOCS = """(async function () {
  function go(op) {
    var form = document.querySelector("#op-" + op + " form"), out = form.querySelector("pre.out");
    form.requestSubmit();
    return new Promise(function (resolve) {
      (function poll() {
        if (/^([0-9]{3} |request failed)/.test(out.textContent)) resolve(out.textContent);
        else setTimeout(poll, 20);
      })();
    });
  }
  var seen = {}, ops = ["post_session", "get_session", "post_heartbeat", "delete_session"], i;
  for (i = 0; i < ops.length; i++) seen[ops[i]] = await go(ops[i]);
  return seen;
})()"""


def test_docs_try_it_forms_work_from_the_servers_own_origin_only(start_server, browser):
    srv, api = start_server()
    chromium = browser("--host-resolver-rules=MAP rebind.example 127.0.0.1")
    tab = chromium.open(srv.url + "/docs")
    assert chromium.evaluate(tab, "location.origin") == srv.url
    seen = chromium.evaluate(tab, DRIVE_DOCS)
    assert seen["post_session"].startswith("201 Created"), seen
    sid = json.loads(seen["post_session"].split("\n", 1)[1])["session_id"]
    got = seen["get_session"]
    assert got.startswith("200 OK") and sid in got and '"status": "active"' in got, seen
    assert seen["post_heartbeat"].startswith("204 No Content"), seen
    assert seen["delete_session"].startswith("204 No Content"), seen
    assert api.queue_length() == 0
    assert requests_seen(api, "delete_session", 204) == 1
    # the same page under a rebound name has no forms to try: only the refusal
    tab = chromium.open("http://rebind.example:%d/docs" % srv.port)
    text = chromium.evaluate(tab, "document.body.innerText")
    assert "refused" in text and not chromium.evaluate(tab, "document.forms.length"), text
