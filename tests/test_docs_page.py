"""The /docs page: Markdown inline code in the OpenAPI descriptions is shown as <code>
(escaped), and the status column never wraps inside a status code.

Rendered in-process from the server's own OpenAPI document, served over HTTP by a real server,
and laid out by headless Chromium (skipped without it) at phone width.
"""
import copy
import json
import re
import sys

import pytest

from chromium_support import chromium  # noqa: F401  (fixture)
from helpers import ROOT
from server_support import start_server  # noqa: F401

sys.path.insert(0, str(ROOT))
import remote_lab  # noqa: E402

pytestmark = pytest.mark.timeout(120)

HTML = {"Accept": "text/html"}


def main_part(page):
    """The page between <main> and </main>: what the document's texts became."""
    m = re.search(r"<main>(.*)</main>", page, re.S)
    assert m, page[:2000]
    return m.group(1)


def test_backticks_in_descriptions_become_code():
    page = remote_lab.render_docs_page(remote_lab.openapi_document()).decode()
    body = main_part(page)
    assert "`" not in body, re.findall(r".{40}`.{40}", body)[:5]
    # a response description, a parameter description, an operation summary and the intro
    assert "The <code>X-Session-ID</code> header is missing." in body
    assert "Seconds to wait for a change of <code>token</code>" in body
    assert "Status and position (long-poll with <code>wait</code>)" in body
    assert "named by <code>X-Session-ID</code>" in body


def test_inline_code_is_escaped_and_unpaired_backticks_stay_text():
    doc = copy.deepcopy(remote_lab.openapi_document())
    op = doc["paths"]["/session"]["post"]
    op["description"] = "Send `<b>&amp;</b>` or `a`b and a lone ` tick <i>."
    body = main_part(remote_lab.render_docs_page(doc).decode())
    assert ("<p>Send <code>&lt;b&gt;&amp;amp;&lt;/b&gt;</code> or <code>a</code>b and a lone "
            "` tick &lt;i&gt;.</p>") in body
    assert "<b>" not in body and "<i>" not in body


def test_status_codes_are_kept_on_one_line_over_http(start_server):  # noqa: F811
    srv, api = start_server()
    status, page, _ = api.req("GET", "/docs", headers=HTML)
    assert status == 200
    cells = re.findall(r'<td class="status">(.*?)</td>', page)
    doc = remote_lab.openapi_document()
    assert len(cells) == sum(len(o["responses"]) for p in doc["paths"].values()
                             for o in p.values())
    assert '<td class="status"><code>default</code></td>' in page
    css = re.search(r"<style>(.*?)</style>", page, re.S).group(1)
    rule = re.search(r"td\.status[^{]*\{([^}]*)\}", css)
    assert rule and "white-space:nowrap" in rule.group(1).replace(" ", ""), css[-800:]


# after load: for every status cell (first column of the tables headed "status"), how many line
# boxes its <code> takes, into <body data-status-lines>
MEASURE = """<script>
var lines = [];
Array.prototype.forEach.call(document.querySelectorAll("table"), function (t) {
  var th = t.querySelector("thead th");
  if (!th || th.textContent !== "status") return;
  Array.prototype.forEach.call(t.querySelectorAll("tbody tr"), function (tr) {
    var c = tr.querySelector("td code");
    lines.push([c.textContent, c.getClientRects().length]);
  });
});
document.body.setAttribute("data-status-lines", JSON.stringify(lines));
</script></body>"""


def test_status_codes_do_not_wrap_in_chromium_at_phone_width(start_server, chromium,  # noqa: F811
                                                             tmp_path):
    srv, api = start_server()
    status, page, _ = api.req("GET", "/docs", headers=HTML)
    assert status == 200
    path = tmp_path / "docs.html"
    path.write_text(page.replace("</body>", MEASURE, 1))
    dom = chromium("--window-size=360,800", "--virtual-time-budget=1000", "--dump-dom",
                   path.as_uri())
    m = re.search(r'data-status-lines="([^"]*)"', dom)
    assert m, dom[-2000:]
    lines = json.loads(m.group(1).replace("&quot;", '"'))
    assert len(lines) > 20 and any(code == "default" for code, _ in lines)
    wrapped = [code for code, n in lines if n != 1]
    assert not wrapped, "status codes broken over lines: %s" % wrapped
