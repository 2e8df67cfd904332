"""Other sites' web pages against the server, in a real browser (issue 8 item 11).

Headless Chromium (skipped only when none is installed), driven over the DevTools protocol on a
pipe (--remote-debugging-pipe: no port, stdlib only), so scripts run in the page's own origin:

1. a page of another origin (a tiny HTTP server on another loopback port) fires 51 `no-cors`
   POST /session fetches and a form post at the server: none creates a session;
2. a DNS-rebound name (rebind.example mapped to 127.0.0.1 inside Chromium, no DNS involved)
   gets neither the status page nor a session, although its requests are "same-origin";
3. the server's own /docs page: its "try it" forms create, read, heartbeat and delete a session
   (Chromium sends the page's own Origin with each POST/DELETE); under a rebound name the page
   is refused.
The status page from the server's own origin: tests/test_status_page_chromium.py.
"""
import fcntl
import http.server
import json
import os
import re
import select
import subprocess
import threading
import time

import pytest

from server_support import start_server  # noqa: F401
from test_status_page_chromium import find_chromium

pytestmark = pytest.mark.timeout(120)


class Chromium:
    """Headless Chromium speaking the DevTools protocol on fds 3 (commands in) and 4 (out)."""

    def __init__(self, path, profile, log, *flags):
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()
        # fds >= 10 in the child, so bash's 3<& / 4>& never overwrite one another (dash, sh,
        # takes single-digit fds only)
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (cmd_r, out_w)]
        for fd in (cmd_r, out_w):
            os.close(fd)
        argv = [path, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                "--user-data-dir=%s" % profile, "--remote-debugging-pipe"] + list(flags)
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(["bash", "-c", 'exec "$@" 3<&%d 4>&%d' % tuple(high), "bash"]
                                     + argv, pass_fds=high, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        for fd in high:
            os.close(fd)
        self._next_id = 0
        self._buffer = b""
        self._messages = []

    def close(self):
        os.close(self._cmd_w)  # Chromium exits when its command pipe closes
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        os.close(self._out_r)
        self._log.close()

    def _wait_for(self, match, timeout):
        deadline = time.monotonic() + timeout
        while True:
            for msg in self._messages:
                if match(msg):
                    self._messages.remove(msg)
                    return msg
            left = deadline - time.monotonic()
            assert left > 0, "no DevTools answer within %s s" % timeout
            if select.select([self._out_r], [], [], left)[0]:
                data = os.read(self._out_r, 1 << 20)
                assert data, "Chromium closed its DevTools pipe (rc %s)" % self.proc.poll()
                self._buffer += data
                *done, self._buffer = self._buffer.split(b"\0")
                self._messages += [json.loads(m) for m in done]

    def call(self, method, params=None, session=None, timeout=30):
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        answer = self._wait_for(lambda m, i=self._next_id: m.get("id") == i, timeout)
        assert "error" not in answer, (method, answer)
        return answer["result"]

    def open(self, url):
        """A new tab showing ``url`` (after its load event): the tab's session id."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        tab = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Page.enable", session=tab)
        nav = self.call("Page.navigate", {"url": url}, session=tab)
        assert "errorText" not in nav, nav
        self._wait_for(lambda m: m.get("method") == "Page.loadEventFired"
                       and m.get("sessionId") == tab, 30)
        return tab

    def evaluate(self, tab, expression, timeout=30):
        """The value of a JS expression in the tab's page (promises awaited)."""
        result = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True}, session=tab,
                           timeout=timeout)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")


@pytest.fixture
def browser(tmp_path):
    path = find_chromium()
    if not path:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    started = []

    def start(*flags):
        profile = tmp_path / ("profile-%d" % len(started))
        profile.mkdir()
        chromium = Chromium(path, profile, tmp_path / ("chromium-%d.log" % len(started)), *flags)
        started.append(chromium)
        return chromium

    yield start
    for chromium in started:
        chromium.close()


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


def queue_length(api):
    return api.req("GET", "/debug/health")[1]["queue_length"]


def requests_seen(api, route, status):
    text = api.req("GET", "/metrics")[1]
    m = re.search(r'^remote_lab_http_requests_total\{route="%s",status="%s"\} (\S+)$'
                  % (route, status), text, re.M)
    return float(m.group(1)) if m else 0


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
    assert queue_length(api) == 0


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
    assert queue_length(api) == 1


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
    assert queue_length(api) == 0
    assert requests_seen(api, "delete_session", 204) == 1
    # the same page under a rebound name has no forms to try: only the refusal
    tab = chromium.open("http://rebind.example:%d/docs" % srv.port)
    text = chromium.evaluate(tab, "document.body.innerText")
    assert "refused" in text and not chromium.evaluate(tab, "document.forms.length"), text
