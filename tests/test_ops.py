"""Operations endpoints against a real server process with the fake netlab:
the status page (GET / for browsers) and its JSON long-poll (GET /status), the event list,
Prometheus /metrics parsed line by line, the OpenAPI document against App.endpoints and against
the status codes the server really answers, and the /docs page.
"""
import functools
import math
import re
import socket
import sys
import threading
import time

import pytest

from helpers import ROOT, file_size_limit
from server_support import (SIMPLE, TOKENS, build_multipart, start_server,  # noqa: F401
                            wait_until, write_auth_file)

sys.path.insert(0, str(ROOT))
import remote_lab  # noqa: E402

pytestmark = pytest.mark.timeout(60)

HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
EXTERNAL_REF = re.compile(r"""(?:src|href|action)\s*=\s*["']?\s*(?:[a-z][a-z0-9+.-]*:|//)""", re.I)


def page(api, path="/"):
    status, body, headers = api.req("GET", path, headers=HTML)
    assert status == 200, (status, body)
    assert headers["Content-Type"].startswith("text/html"), headers["Content-Type"]
    return body, headers


def status_json(api, query=""):
    status, body, _ = api.req("GET", "/status" + query)
    assert status == 200, (status, body)
    return body


def metric_value(text, name, **labels):
    """The value of one sample of a metrics text (None when absent)."""
    for family in parse_exposition(text).values():
        for sample, lab, value in family["samples"]:
            if sample == name and lab == labels:
                return value
    return None


# ---------------------------------------------------------------------------------------------
# the status page


def test_status_page_shows_the_live_state_and_shortens_session_ids(start_server):
    srv, api = start_server()
    a = api.new_session()
    assert api.post_lab(a)[0] == 200
    b = api.new_session()

    body, headers = page(api)
    # the holder, with its topology; the waiting session at position 1; the devices with their
    # management addresses; version; events
    assert 'data-holder="%s"' % a[:8] in body
    assert 'data-waiting="1"' in body and 'data-lab-state="running"' in body
    assert "<code>%s</code> holds the lab" % a[:8] in body
    assert "<td>1</td><td><code>%s</code></td>" % b[:8] in body
    assert "simple.yml" in body
    for name, addr in (("r1", "192.168.121.101"), ("r2", "192.168.121.102")):
        assert re.search(r"<td>%s</td><td>frr</td><td><code>%s</code></td>" % (name, addr), body)
    assert "version %s" % remote_lab.__version__ in body
    assert "session %s is active at once" % a[:8] in body
    assert "netlab up OK" in body
    # full ids of others never appear (the embedded JSON included)
    assert a not in body and b not in body
    # self-contained: no external script, style, image or link; a policy that enforces it
    assert not EXTERNAL_REF.findall(body), EXTERNAL_REF.findall(body)
    assert "<script src" not in body and "<link" not in body
    csp = headers["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "connect-src 'self'" in csp
    assert headers["Cache-Control"] == "no-store"
    assert '<meta name="viewport"' in body  # readable on a phone
    assert "<noscript>" in body  # refreshes itself without JavaScript too

    # the viewer's own session (?sid=) is shown in full and marked
    mine, _ = page(api, "/?sid=%s" % b)
    assert '<code class="you">%s</code>' % b in mine
    assert a not in mine

    # GET / without text/html: still the JSON summary (curl, the launcher handshake)
    for accept in (None, "*/*", "application/json"):
        status, data, hdrs = api.req("GET", "/", headers={"Accept": accept} if accept else {})
        assert status == 200 and hdrs["Content-Type"] == "application/json"
        assert data["service"] == "remote-lab" and data["active_session"] == a
        assert data["docs"] == "/docs"


def test_status_page_is_not_a_sign_of_life(start_server):
    srv, api = start_server("--active-timeout", "1.5")
    a = api.new_session()
    deadline = time.monotonic() + 6
    while time.monotonic() < deadline and api.health()["queue_length"]:
        page(api)
        status_json(api)
        time.sleep(0.2)
    assert api.health()["queue_length"] == 0, "watching the page kept the session alive"
    events = status_json(api)["events"]
    assert events[0]["kind"] == "expired"
    assert events[0]["text"] == "active session %s expired (no sign of life)" % a[:8]


def test_status_long_poll_wakes_on_change_and_lists_events_in_order(start_server):
    srv, api = start_server()
    a = api.new_session()
    assert api.post_lab(a)[0] == 200
    b = api.new_session()
    first = status_json(api, "?sid=%s" % b)
    assert first["holder"]["session"] == a[:8] and not first["holder"]["you"]
    assert first["holder"]["topology"] == "simple.yml"
    assert [q["session"] for q in first["queue"]] == [b] and first["queue"][0]["you"]
    assert first["lab"]["devices"] == [
        {"name": "r1", "device": "frr", "mgmt": "192.168.121.101"},
        {"name": "r2", "device": "frr", "mgmt": "192.168.121.102"}]

    # nothing changes: the long-poll is held for `wait` seconds, then answers the same token
    t0 = time.monotonic()
    same = status_json(api, "?wait=1&since=%s" % first["token"])
    assert 0.9 <= time.monotonic() - t0 < 3
    assert same["token"] == first["token"]

    # a change wakes the waiting request at once
    result = {}

    def waiter():
        result["t0"] = time.monotonic()
        result["body"] = status_json(api, "?wait=20&since=%s" % first["token"])
        result["t1"] = time.monotonic()

    t = threading.Thread(target=waiter)
    t.start()
    wait_until(lambda: metric_value(api.req("GET", "/metrics")[1],
                                    "remote_lab_status_page_watchers") == 1,
               what="the long-poll to be waiting")
    changed_at = time.monotonic()
    assert api.delete_session(a) == 204
    t.join(10)
    assert not t.is_alive()
    new = result["body"]
    assert result["t1"] - changed_at < 2.0, "the long-poll did not wake on the change"
    assert new["token"] != first["token"]
    assert new["holder"]["session"] == b[:8] and new["queue"] == []
    # (the wake-up may come before the end is recorded: the next answer has both events)
    texts = [e["text"] for e in status_json(api)["events"]]  # newest first
    ended = texts.index("active session %s ended (deleted by client)" % a[:8])
    promoted = [i for i, x in enumerate(texts)
                if x.startswith("session %s got the lab after waiting" % b[:8])]
    assert promoted and promoted[0] < ended, texts  # the promotion is listed after its cause

    # bad wait values
    for bad in ("x", "-1", "61"):
        status, body, _ = api.req("GET", "/status?wait=%s&since=1" % bad)
        assert status == 400 and "wait" in body["detail"]


def test_a_closed_page_stops_watching(start_server):
    srv, api = start_server()
    token = status_json(api)["token"]

    def watchers():
        return metric_value(api.req("GET", "/metrics")[1], "remote_lab_status_page_watchers")

    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    s.sendall(b"GET /status?wait=30&since=" + token.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    wait_until(lambda: watchers() == 1, what="the long-poll to wait")
    s.close()
    t0 = time.monotonic()
    wait_until(lambda: watchers() == 0, timeout=5, what="the closed long-poll to end")
    assert time.monotonic() - t0 < 2
    assert api.req("GET", "/healthz")[0] == 204


def test_netlab_failure_is_an_event_with_its_detail(start_server):
    srv, api = start_server()
    a = api.new_session()
    srv.switch("up_fail")
    status, body = api.post_lab(a)
    assert status == 502
    st = status_json(api)
    failures = [e for e in st["events"] if e["kind"] == "failure"]
    assert failures, st["events"]
    up = [e for e in failures if e["text"].startswith("netlab up failed")]
    assert up and "fake failure of 'netlab up' (switch up_fail)" in up[0]["detail"]
    assert "sid=%s" % a[:8] in up[0]["text"]
    assert "fake failure of 'netlab up'" in st["lab"]["last_error"]
    html_page, _ = page(api)
    assert "fake failure of &#x27;netlab up&#x27; (switch up_fail)" in html_page
    assert "netlab up failed" in html_page


def test_event_list_is_bounded(start_server):
    srv, api = start_server()
    for _ in range(remote_lab.EVENT_LIMIT // 2 + 10):  # two events per session: active + ended
        sid = api.new_session()
        api.delete_session(sid)
    st = status_json(api)
    assert len(st["events"]) == remote_lab.PAGE_EVENTS
    m = api.req("GET", "/metrics")[1]
    assert metric_value(m, "remote_lab_events_total") == 2 * (remote_lab.EVENT_LIMIT // 2 + 10)


# ---------------------------------------------------------------------------------------------
# /metrics: the Prometheus text exposition format, line by line

_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_VALUE = r"(?:[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|[+-]?Inf|NaN)"
HELP_RE = re.compile(r"^# HELP (%s) (.*)$" % _NAME)
TYPE_RE = re.compile(r"^# TYPE (%s) (counter|gauge|histogram|summary|untyped)$" % _NAME)
SAMPLE_RE = re.compile(r"^(%s)(\{(?:%s(?:,%s)*)?\})? (%s)(?: -?\d+)?$" % (_NAME, _LABEL, _LABEL, _VALUE))
LABEL_RE = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\[\\"n])*)"')


def parse_exposition(text):
    """Parse (and validate) text format 0.0.4: {family: {type, help, samples[(name, labels, v)]}}."""
    assert text.endswith("\n"), "the exposition must end with a newline"
    families = {}
    current = None
    for n, line in enumerate(text[:-1].split("\n"), 1):
        assert line, "line %d: empty line" % n
        m = HELP_RE.match(line)
        if m:
            name = m.group(1)
            assert name not in families, "line %d: family %s declared twice" % (n, name)
            families[name] = {"help": m.group(2), "type": None, "samples": []}
            current = name
            continue
        m = TYPE_RE.match(line)
        if m:
            assert m.group(1) == current and families[current]["type"] is None, \
                "line %d: TYPE of %s must follow its HELP, once" % (n, m.group(1))
            assert not families[current]["samples"], "line %d: TYPE after samples" % n
            families[current]["type"] = m.group(2)
            continue
        assert not line.startswith("#"), "line %d: unexpected comment %r" % (n, line)
        m = SAMPLE_RE.match(line)
        assert m, "line %d: not a valid sample line: %r" % (n, line)
        name, labels, value = m.group(1), m.group(2) or "", m.group(3)
        fam = families.get(current)
        assert fam is not None and fam["type"], "line %d: sample before HELP/TYPE" % n
        kind = fam["type"]
        allowed = {current} if kind in ("gauge", "untyped") else \
            {current} if kind == "counter" else \
            {current + "_bucket", current + "_sum", current + "_count"}
        assert name in allowed, "line %d: sample %s outside its family %s" % (n, name, current)
        if kind == "counter":
            assert name.endswith("_total"), "line %d: counter without _total" % n
        parsed = dict(LABEL_RE.findall(labels))
        assert len(parsed) == labels.count('="'), "line %d: duplicate label" % n
        v = float(value.replace("Inf", "inf").replace("NaN", "nan"))
        if kind == "counter":
            assert v >= 0, "line %d: negative counter" % n
        fam["samples"].append((name, parsed, v))
    for name, fam in families.items():
        assert fam["type"], "%s has no TYPE" % name
        if fam["type"] != "histogram":
            continue
        series = {}
        for sample, labels, v in fam["samples"]:
            key = tuple(sorted((k, x) for k, x in labels.items() if k != "le"))
            series.setdefault(key, {"buckets": [], "sum": None, "count": None})
            if sample.endswith("_bucket"):
                series[key]["buckets"].append((float(labels["le"].replace("Inf", "inf")), v))
            else:
                series[key][sample.rsplit("_", 1)[1]] = v
        for key, s in series.items():
            bounds = [b for b, _ in s["buckets"]]
            counts = [c for _, c in s["buckets"]]
            assert bounds == sorted(bounds) and bounds[-1] == math.inf, (name, key, bounds)
            assert counts == sorted(counts), "%s%s: buckets not cumulative" % (name, key)
            assert s["count"] == counts[-1], "%s%s: +Inf bucket != _count" % (name, key)
            assert s["sum"] is not None and s["sum"] >= 0
    return families


def test_metrics_exposition_format_and_values(start_server):
    srv, api = start_server()
    a = api.new_session()
    body, ctype = build_multipart({}, [("topology", "simple.yml", SIMPLE)])
    status, _, _ = api.req("POST", "/lab", a, body, {"Content-Type": ctype})
    assert status == 200
    b = api.new_session()
    assert api.req("GET", "/nope")[0] == 404
    assert api.req("PUT", "/session")[0] == 405
    assert api.req("GET", "/lab", b)[0] == 423
    for _ in range(3):
        assert api.session(b)[0] == 200

    status, text, headers = api.req("GET", "/metrics")
    assert status == 200
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    fams = parse_exposition(text)
    for name in ("remote_lab_queue_length", "remote_lab_sessions", "remote_lab_lab_running",
                 "remote_lab_lab_ref_count", "remote_lab_sessions_created_total",
                 "remote_lab_sessions_ended_total", "remote_lab_sessions_expired_total",
                 "remote_lab_netlab_commands_total", "remote_lab_netlab_failures_total",
                 "remote_lab_netlab_duration_seconds", "remote_lab_queue_wait_seconds",
                 "remote_lab_upload_bytes_total", "remote_lab_http_requests_total"):
        assert name in fams, name
    assert fams["remote_lab_netlab_duration_seconds"]["type"] == "histogram"
    assert fams["remote_lab_queue_wait_seconds"]["type"] == "histogram"

    v = lambda name, **labels: metric_value(text, name, **labels)  # noqa: E731
    assert v("remote_lab_queue_length") == 2
    assert v("remote_lab_sessions", status="active") == 1
    assert v("remote_lab_sessions", status="waiting") == 1
    assert v("remote_lab_lab_running") == 1 and v("remote_lab_lab_ref_count") == 1
    assert v("remote_lab_lab_state", state="running") == 1
    assert v("remote_lab_lab_state", state="stopped") == 0
    assert v("remote_lab_sessions_created_total") == 2
    assert v("remote_lab_netlab_commands_total", command="up") == 1
    assert v("remote_lab_netlab_commands_total", command="inspect") == 3  # list + 2 nodes
    assert v("remote_lab_netlab_failures_total", command="up") == 0
    assert v("remote_lab_netlab_duration_seconds_count", command="up") == 1
    assert v("remote_lab_netlab_duration_seconds_count", command="down") == 0
    assert 0 < v("remote_lab_netlab_duration_seconds_sum", command="up") < 30
    assert v("remote_lab_queue_wait_seconds_count") == 1  # a, active at once
    assert v("remote_lab_upload_bytes_total") == len(body)
    assert v("remote_lab_http_requests_total", route="post_session", status="201") == 2
    assert v("remote_lab_http_requests_total", route="post_lab", status="200") == 1
    assert v("remote_lab_http_requests_total", route="get_session", status="200") == 3
    assert v("remote_lab_http_requests_total", route="get_lab", status="423") == 1
    assert v("remote_lab_http_requests_total", route="unmatched", status="404") == 1
    assert v("remote_lab_http_requests_total", route="unmatched", status="405") == 1
    assert v("remote_lab_info", version=remote_lab.__version__) == 1

    # the hand-over: a ends, b waited; then a failed up and its teardown
    time.sleep(0.3)
    assert api.delete_session(a) == 204
    api.wait_lab_state("stopped")
    srv.switch("up_fail")
    assert api.post_lab(b)[0] == 502
    assert api.delete_session(b) == 204
    text = api.req("GET", "/metrics")[1]
    parse_exposition(text)
    assert v("remote_lab_queue_length") == 0 and v("remote_lab_lab_running") == 0
    assert v("remote_lab_sessions_ended_total") == 2
    assert v("remote_lab_queue_wait_seconds_count") == 2
    assert v("remote_lab_queue_wait_seconds_sum") >= 0.3
    assert v("remote_lab_queue_wait_seconds_bucket", le="0.1") == 1  # a
    assert v("remote_lab_netlab_commands_total", command="up") == 2
    assert v("remote_lab_netlab_failures_total", command="up") == 1
    assert v("remote_lab_netlab_duration_seconds_count", command="up") == 2
    assert v("remote_lab_netlab_duration_seconds_count", command="down") >= 1


def test_metric_counters_lose_no_increment_under_concurrency(tmp_path):
    """Request threads and concurrent inspects bump the same counters; `c[k] += 1` from several
    threads loses increments on Python < 3.10 (about 2 in 3 in a tight loop on 3.8)."""
    app = remote_lab.App(remote_lab.Settings(simulate=True, state_dir=str(tmp_path)))
    m = app.metrics
    counters = (m.counters, m.http_requests, m.netlab_calls, m.netlab_failures)
    threads, rounds = 8, 5000

    def hammer():
        for i in range(rounds):
            for c in counters:
                c.add("k%d" % (i % 3))

    workers = [threading.Thread(target=hammer) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join(30)
    for c in counters:
        assert sum(c.values()) == threads * rounds, c
        assert c["k0"] == threads * len(range(0, rounds, 3)), c


def test_metrics_expired_counter(start_server):
    srv, api = start_server("--waiting-timeout", "1", "--active-timeout", "1")
    api.new_session()
    api.new_session()
    wait_until(lambda: api.health()["queue_length"] == 0, timeout=10, what="expiry")
    # (counted right after the queue dropped them: the count may lag the queue by a moment)
    wait_until(lambda: metric_value(api.req("GET", "/metrics")[1],
                                    "remote_lab_sessions_expired_total") >= 2, timeout=5,
               what="the expiries counted")
    text = api.req("GET", "/metrics")[1]
    assert metric_value(text, "remote_lab_sessions_expired_total") == 2
    assert metric_value(text, "remote_lab_sessions_ended_total") == 0


# ---------------------------------------------------------------------------------------------
# OpenAPI: complete, consistent, and true to what the server answers


def _openapi(api):
    status, doc, headers = api.req("GET", "/openapi.json")
    assert status == 200 and headers["Content-Type"] == "application/json"
    return doc


def _operations(doc):
    for path, item in doc["paths"].items():
        for method, op in item.items():
            yield method.upper(), path, op


def test_openapi_documents_exactly_the_routes(start_server):
    srv, api = start_server()
    doc = _openapi(api)
    assert doc["openapi"] == "3.1.0"
    assert doc["info"]["version"] == remote_lab.__version__
    # every declared endpoint is documented once, and every documented one is served
    declared = remote_lab.App.endpoints.endpoints
    documented = [(m, path, op["operationId"]) for m, path, op in _operations(doc)]
    assert sorted((e.method, e.path, e.name) for e in declared) == sorted(documented)
    for method, path, op_id in documented:
        concrete = re.sub(r"\{[^}]+\}", "no-such-session", path)
        assert remote_lab.App.endpoints.match(method, concrete)[0].name == op_id
        status, body, _ = api.req(method, concrete)
        assert status != 405 and not (status == 404 and "no such endpoint" in body["detail"]), \
            (method, path, status, body)

    # every $ref resolves; every operation has responses; path parameters are declared
    def refs(node):
        if isinstance(node, dict):
            for k, x in node.items():
                if k == "$ref":
                    yield x
                else:
                    yield from refs(x)
        elif isinstance(node, list):
            for x in node:
                yield from refs(x)

    for ref in set(refs(doc)):
        node = doc
        for part in ref.lstrip("#/").split("/"):
            assert part in node, "unresolved $ref %s" % ref
            node = node[part]

    def resolve(x):
        while "$ref" in x:
            node = doc
            for part in x["$ref"].lstrip("#/").split("/"):
                node = node[part]
            x = node
        return x

    for method, path, op in _operations(doc):
        assert op["responses"] and op.get("summary"), (method, path)
        params = [resolve(p) for p in op.get("parameters", [])]
        declared = {p["name"] for p in params if p["in"] == "path"}
        assert declared == set(re.findall(r"\{([^}]+)\}", path)), (method, path)
        needs_session = op["operationId"] in ("post_heartbeat", "post_lab", "get_lab",
                                              "delete_lab", "get_lab_devices", "post_lab_release")
        has_header = any(p["in"] == "header" and p["name"] == "X-Session-ID" and p["required"]
                         for p in params)
        assert has_header == needs_session, (method, path)
    ops = {op["operationId"]: op for _, _, op in _operations(doc)}
    get_session_params = [resolve(p) for p in ops["get_session"]["parameters"]]
    assert any(p["name"] == "wait" and p["in"] == "query" for p in get_session_params)
    delete_lab_params = [resolve(p) for p in ops["delete_lab"]["parameters"]]
    assert any(p["name"] == "force" and p["in"] == "query" for p in delete_lab_params)
    body = ops["post_lab"]["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert body["required"] == ["topology"]
    assert set(body["properties"]) == {"topology", "reuse", "extra_files"}
    assert body["properties"]["extra_files"]["type"] == "array"
    assert "text/plain; version=0.0.4" in ops["get_metrics"]["responses"]["200"]["content"]


def test_openapi_status_codes_match_the_server(start_server, tmp_path):
    """Drive every endpoint through its success and error paths; each status the server answers
    must be documented for that operation (and each documented code is seen at least once)."""
    srv, api = start_server("--max-upload-mb", "0.01", "--up-timeout", "4")
    doc = _openapi(api)
    documented = {op["operationId"]: set(op["responses"]) - {"default"}
                  for _, _, op in _operations(doc)}
    seen = {}

    def call(method, path, sid=None, body=None, headers=None, expect=None, timeout=15, on=api):
        status, data, _ = on.req(method, path, sid, body, headers, timeout=timeout)
        handler = remote_lab.App.endpoints.match(method, path.split("?")[0])[0].name
        seen.setdefault(handler, set()).add(str(status))
        if expect is not None:
            assert status == expect, (method, path, status, data)
        return status, data

    def upload(sid, content=SIMPLE, name="simple.yml", expect=None, timeout=15, path="/lab",
               on=api, headers=None):
        body, ctype = build_multipart({}, [("topology", name, content)])
        return call("POST", path, sid, body, dict(headers or {}, **{"Content-Type": ctype}),
                    expect, timeout, on=on)

    def check(content=SIMPLE, name="simple.yml", expect=None, on=api, headers=None):
        return upload(None, content, name, expect, path="/lab/check", on=on, headers=headers)

    call("GET", "/", expect=200)
    call("GET", "/", headers=HTML, expect=200)
    call("GET", "/healthz", expect=204)
    call("GET", "/debug/health", expect=200)
    call("GET", "/status", expect=200)
    call("GET", "/status?wait=nope", expect=400)
    call("GET", "/openapi.json", expect=200)
    call("GET", "/docs", expect=200)
    call("GET", "/metrics", expect=200)
    call("GET", "/active-session", expect=404)
    call("POST", "/session", body=b'{"link": "javascript:1"}', expect=400)
    a = call("POST", "/session", expect=201)[1]["session_id"]
    b = call("POST", "/session", expect=201)[1]["session_id"]
    call("GET", "/active-session", expect=200)
    call("GET", "/sessions", expect=200)
    call("POST", "/session/heartbeat", expect=400)
    call("POST", "/session/heartbeat", "nope", expect=404)
    call("POST", "/session/heartbeat", b, expect=204)
    call("GET", "/session/%s" % b, expect=200)
    call("GET", "/session/%s?wait=x" % b, expect=400)
    call("GET", "/session/nope", expect=404)
    call("DELETE", "/session/nope", expect=404)
    for method, path in (("GET", "/lab"), ("DELETE", "/lab"), ("GET", "/lab/devices"),
                         ("POST", "/lab/release")):
        call(method, path, expect=400)
        call(method, path, "nope", expect=404)
        call(method, path, b, expect=423)
    call("GET", "/lab", a, expect=200)
    call("GET", "/lab/devices", a, expect=404)
    call("POST", "/lab/release", a, expect=404)
    call("DELETE", "/lab", a, expect=204)
    upload(None, expect=400)
    upload("nope", expect=404)
    upload(b, expect=423)
    upload(a, name="lab.txt", expect=400)
    upload(a, content=b"x" * 20000, expect=413)
    check(expect=200)
    check(name="lab.txt", expect=400)
    check(content=b"x" * 20000, expect=413)
    check(content=b"defaults.device: frr\nnodes: [r1, r2]\nlinks: [r1-r3]\n", expect=422)
    upload(a, expect=200)
    upload(a, content=SIMPLE + b"# other\n", name="other.yml", expect=423)  # busy
    call("GET", "/lab/devices", a, expect=200)
    call("DELETE", "/lab?force=false", a, expect=409)
    call("DELETE", "/lab?force=maybe", a, expect=400)
    call("POST", "/lab/release", a, expect=204)
    call("DELETE", "/lab?force=true", a, expect=202)
    api.wait_lab_state("stopped")
    srv.switch("up_fail")
    upload(a, expect=502)
    srv.switch("up_fail", on=False)
    srv.switch("up_hang")
    upload(a, expect=504, timeout=30)
    srv.switch("up_hang", on=False)
    evil = {"Origin": "http://evil.example"}  # another site's page (403 before anything else)
    for method, path in (("POST", "/session"), ("POST", "/session/heartbeat"),
                         ("DELETE", "/session/%s" % b), ("POST", "/lab"), ("DELETE", "/lab"),
                         ("POST", "/lab/release")):
        call(method, path, a, headers=evil, expect=403)
    check(headers=evil, expect=403)
    call("DELETE", "/session/%s" % a, expect=204)
    call("DELETE", "/session/%s" % b, expect=204)

    full, fsrv_api = start_server("--max-queue", "1", sub="full")
    fsrv_api.new_session()
    status, _, _ = fsrv_api.req("POST", "/session")
    assert status == 429
    seen["post_session"].add("429")

    with file_size_limit(64 * 1024):  # a full disk
        small, small_api = start_server(sub="small-disk")
    body, ctype = build_multipart({}, [("topology", "simple.yml", SIMPLE),
                                       ("extra_files", "big.bin", b"x" * 100000)])
    status, _, _ = small_api.req("POST", "/lab", small_api.new_session(), body,
                                 {"Content-Type": ctype})
    assert status == 503
    seen["post_lab"].add("503")
    status, _, _ = small_api.req("POST", "/lab/check", None, body, {"Content-Type": ctype})
    assert status == 503
    seen["post_lab_check"].add("503")
    _drive_check_limits(start_server, check)

    # with --auth-file: 401 on every endpoint but /healthz, 403 on another user's session
    _drive_auth_errors(start_server, tmp_path, call)

    for handler, codes in seen.items():
        assert codes <= documented[handler], \
            "%s answered %s, documented %s" % (handler, sorted(codes), sorted(documented[handler]))
    assert set(seen) == set(documented), set(documented) - set(seen)
    for handler, codes in documented.items():
        assert codes <= seen[handler], "%s: documented %s never seen" % (handler, codes - seen[handler])


def _drive_check_limits(start_server, check):
    """POST /lab/check's 429 (two checks run already) and 504 (--netlab-timeout)."""
    srv, api = start_server("--netlab-timeout", "2", sub="checks")
    srv.switch("create_delay", value="6")
    slow = [threading.Thread(target=check, kwargs={"expect": 504, "on": api}) for _ in range(2)]
    for t in slow:
        t.start()
    wait_until(lambda: sum(c["argv"][:1] == ["create"] for c in srv.calls()) == 2, timeout=10,
               what="two checks running")
    check(expect=429, on=api)
    for t in slow:
        t.join(20)


def _drive_auth_errors(start_server, tmp_path, call):
    """401 (no credentials) on every endpoint but /healthz; 403 with another user's session
    on each endpoint that takes one (``call`` records what the server answered)."""
    auth = write_auth_file(tmp_path / "users")
    srv, api = start_server("--auth-file", str(auth), sub="auth")
    alice, bob = ({"Authorization": "Bearer " + TOKENS[n]} for n in ("alice", "bob"))
    call_auth = functools.partial(call, on=api)
    for e in remote_lab.App.endpoints.endpoints:
        if not e.public:
            call_auth(e.method, e.path.replace("{session_id}", "x"), expect=401)
    a = api.as_user(TOKENS["alice"]).new_session()
    call_auth("GET", "/healthz", expect=204)
    for method, path in (("DELETE", "/session/" + a), ("POST", "/session/heartbeat"),
                         ("POST", "/lab"), ("GET", "/lab"), ("GET", "/lab/devices"),
                         ("POST", "/lab/release"), ("DELETE", "/lab")):
        call_auth(method, path, a, headers=bob, expect=403)
    call_auth("DELETE", "/session/" + a, headers=alice, expect=204)


def test_docs_page_renders_every_operation(start_server):
    srv, api = start_server()
    body, headers = page(api, "/docs")
    doc = _openapi(api)
    ops = list(_operations(doc))
    for method, path, op in ops:
        assert 'id="op-%s"' % op["operationId"] in body
        assert '<form class="try" data-method="%s" data-path="%s"' % (method, path) in body
    assert body.count('<form class="try"') == len(ops)
    assert 'data-body="multipart"' in body and 'type="file" name="extra_files"' in body
    assert 'name="X-Session-ID" data-in="header" required' in body
    assert 'name="wait" data-in="query"' in body and 'name="force" data-in="query"' in body
    assert "example:" in body  # response examples from the document
    assert not EXTERNAL_REF.findall(body), EXTERNAL_REF.findall(body)
    assert "default-src 'none'" in headers["Content-Security-Policy"]
