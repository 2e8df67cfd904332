"""Shared helpers for the server API tests (tests/test_server_*.py).

Thin conveniences over tests/helpers.py: a per-server client, lab uploads, polling, process checks.
Everything talks to a real server process over HTTP; nothing of the server is mocked.
"""
import json
import re
import socket
import sqlite3
import sys
from pathlib import Path

import pytest

from helpers import TOPOLOGIES, ServerProcess, http, parse_head, pid_alive, wait_until  # noqa: F401
from helpers import multipart as build_multipart  # noqa: F401

SIMPLE = (TOPOLOGIES / "simple.yml").read_bytes()
MAPPING = (TOPOLOGIES / "mapping.yml").read_bytes()
# a third topology, different from both above (one node)
SINGLE = b"provider: external\ndefaults.device: frr\nnodes: [solo]\n"


SEED_SESSION_FIELDS = ("session_id", "status", "position")
ADDED_SESSION_FIELDS = ("owner", "note", "link", "fingerprint", "held_s", "eta_s",
                        "hold_left_s", "slot")


def seed_fields(answer):
    """(status, body) of GET /session/{id} with only the seed's fields, after checking that
    a 200's other fields are exactly the additive ones of issues 12 and 13."""
    status, body = answer
    if status != 200 or not isinstance(body, dict):
        return status, body
    assert sorted(body) == sorted(SEED_SESSION_FIELDS + ADDED_SESSION_FIELDS), body
    return status, {k: body[k] for k in SEED_SESSION_FIELDS}


class Api:
    """A small client bound to one ServerProcess."""

    def __init__(self, srv, token=None):
        self.srv = srv
        self.token = token  # sent as Authorization: Bearer (a server with --auth-file)

    def as_user(self, token):
        """The same server, as the user of ``token``."""
        return Api(self.srv, token)

    @property
    def url(self):
        return self.srv.url

    def req(self, method, path, sid=None, body=None, headers=None, timeout=15):
        hdrs = {"Authorization": "Bearer " + self.token} if self.token else {}
        hdrs.update(headers or {})
        if sid is not None:
            hdrs["X-Session-ID"] = sid
        return http(method, self.url + path, body, hdrs, timeout=timeout)

    def new_session(self):
        status, body, _ = self.req("POST", "/session")
        assert status == 201, (status, body)
        return body["session_id"]

    def session(self, sid, wait=None, timeout=15):
        """GET /session/{sid}: (status, the seed's fields). The additive fields are checked to
        be exactly the documented ones, then left out: the seed's answer compares as it was."""
        return seed_fields(self.session_full(sid, wait, timeout))

    def session_full(self, sid, wait=None, timeout=15):
        """GET /session/{sid}: (status, the whole answer)."""
        path = "/session/%s" % sid + ("" if wait is None else "?wait=%s" % wait)
        return self.req("GET", path, timeout=timeout)[:2]

    def delete_session(self, sid):
        return self.req("DELETE", "/session/%s" % sid)[0]

    def post_lab(self, sid, topology=SIMPLE, name="simple.yml", extras=(), reuse=None,
                 timeout=30, escape=True):
        fields = {} if reuse is None else {"reuse": "true" if reuse is True else
                                           "false" if reuse is False else reuse}
        files = [("topology", name, topology)] + [("extra_files", n, data) for n, data in extras]
        body, ctype = build_multipart(fields, files, escape)
        status, data, _ = self.req("POST", "/lab", sid, body, {"Content-Type": ctype},
                                   timeout=timeout)
        return status, data

    def lab(self, sid):
        return self.req("GET", "/lab", sid)[:2]

    def health(self):
        status, body, _ = self.req("GET", "/debug/health")
        assert status == 200, (status, body)
        return body

    def lab_state(self):
        return self.health()["lab"]["state"]

    def queue_length(self):
        return self.health()["queue_length"]

    def metric(self, name, **labels):
        """One sample of GET /metrics (labels in the order given), 0 when it is absent."""
        return metric_sample(self.req("GET", "/metrics")[1], name, **labels)

    def wait_lab_state(self, *states, timeout=10):
        return wait_until(lambda: self.lab_state() in states, timeout,
                          what="lab state in %s" % (states,))


def metric_sample(text, name, **labels):
    """The value of the sample ``name{labels}`` in a metrics text, 0 when it is absent."""
    inner = ",".join('%s="%s"' % item for item in labels.items())
    sample = name + ("{%s}" % inner if labels else "")
    m = re.search(r"^%s (\S+)$" % re.escape(sample), text, re.M)
    return float(m.group(1)) if m else 0


def assert_detail(body):
    """An error answer: a JSON object with a non-empty ``detail`` string."""
    assert isinstance(body, dict) and isinstance(body.get("detail"), str) and body["detail"], body


def labs_dir(srv):
    return Path(srv.state_dir) / "labs"


def lab_dirs(srv):
    d = labs_dir(srv)
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def state_db(state_dir):
    return Path(state_dir) / "state.db"


def state_rows(state_dir, sql, args=()):
    """Rows of a query on a server's state database, read as an operator would (read-only)."""
    db = sqlite3.connect("file:%s?mode=ro" % state_db(state_dir), uri=True, timeout=10)
    try:
        return db.execute(sql, args).fetchall()
    finally:
        db.close()


def saved_sessions(state_dir):
    """[(session id, activated?)] in queue order, as the state database holds them."""
    return [(sid, activated is not None) for sid, activated in
            state_rows(state_dir, "SELECT id, activated FROM sessions ORDER BY seq")]


def proc_records(state_dir):
    """The records of running netlab commands in the state database."""
    return [json.loads(r) for (r,) in state_rows(state_dir, "SELECT record FROM netlab_procs")]


def seed_proc_record(state_dir, record):
    """Leave a netlab process record in a state dir, as a killed server would have."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import remote_lab
    Path(state_dir).mkdir(parents=True, exist_ok=True)
    store = remote_lab.StateStore(str(state_db(state_dir)))
    store.add_proc(record)
    store.close()


def acquire_while_up_hangs(srv, api, sid, timeout=30):
    """POST /lab of ``sid`` in a thread, with the fake `up` hanging; returns once that `up`
    runs: (the thread, a dict whose "r" is the answer (status, body, headers) once it came)."""
    import threading
    srv.switch("up_hang")
    body, ctype = build_multipart({}, [("topology", "simple.yml", SIMPLE)])
    result = {}
    t = threading.Thread(target=lambda: result.update(r=api.req(
        "POST", "/lab", sid, body, {"Content-Type": ctype}, timeout=timeout)), daemon=True)
    t.start()
    wait_until(lambda: calls_of(srv, "up"), 5, what="up started")
    return t, result


def calls_of(srv, verb, since=0):
    return [c for c in srv.calls()[since:] if c["argv"][:1] == [verb]]


def up_dirs(srv, since=0):
    return [c["cwd"] for c in calls_of(srv, "up", since)]


def raw_http(port, data, timeout=5.0):
    """Send raw bytes, half-close, return the raw response (until the server closes)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        s.sendall(data)
        try:
            s.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, socket.timeout):
                break
            if not chunk:
                break
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        s.close()


def parse_raw_response(raw):
    """(status, json body or None) of a raw HTTP/1.1 response with Content-Length."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    status_line, headers = parse_head(head)
    status = int(status_line.split()[1])
    body = rest[:int(headers.get("content-length", "0"))]
    return status, (json.loads(body) if body else None)


# users of the auth files of tests: name -> token (admin: the last one)
TOKENS = {"alice": "alice-token-0123456789", "bob": "bob-token-0123456789ab",
          "root": "root-token-0123456789a"}


def write_auth_file(path, text=None, mode=0o600):
    """An --auth-file (alice, bob; root an admin unless ``text`` says otherwise)."""
    if text is None:
        text = "# users of this test\nalice:%s\nbob:%s\nroot:%s:admin\n" % (
            TOKENS["alice"], TOKENS["bob"], TOKENS["root"])
    path = Path(path)
    path.write_text(text)
    path.chmod(mode)
    return path


@pytest.fixture
def start_server(tmp_path):
    """Factory: start_server(*args, **kw) -> (srv, Api); every server is stopped at the end."""
    started = []

    def start(*args, sub=None, **kw):
        base = tmp_path / sub if sub else tmp_path
        srv = ServerProcess(base, *args, **kw).start()
        started.append(srv)
        return srv, Api(srv)

    yield start
    for srv in started:
        srv.stop()


def drain_server(srv, api, timeout=15):
    """Bring a shared server back to a clean state; fail if a work dir leaked."""
    for name in ("up_fail", "up_hang", "up_delay", "down_fail", "down_delay", "inspect_fail",
                 "inspect_delay"):
        srv.switch(name, on=False)
    for s in api.health()["session_list"]:
        api.delete_session(s["session_id"])
    api.wait_lab_state("stopped", "running", timeout=timeout)
    if api.lab_state() == "running":  # an idle lab left running by a test: destroy it
        sid = api.new_session()
        assert api.req("DELETE", "/lab?force=true", sid)[0] in (202, 204)
        api.delete_session(sid)
        api.wait_lab_state("stopped", timeout=timeout)
    assert api.health()["queue_length"] == 0
    wait_until(lambda: lab_dirs(srv) == [], 5, what="no lab work dir left")
    registry = srv.fake_dir / "status.json"
    if registry.exists():  # no netlab instance left registered either
        assert json.loads(registry.read_text()) == {}


def shared_server(name, *args):
    """A module-scoped fixture ``shared``: one server for a test module, (srv, Api).

    Use with the ``srv``/``api`` fixtures below, which drain it between tests.
    """
    @pytest.fixture(scope="module")
    def shared(tmp_path_factory):
        srv = ServerProcess(tmp_path_factory.mktemp(name), *args).start()
        yield srv, Api(srv)
        assert srv.stop() == 0
    return shared


@pytest.fixture
def srv(shared):
    srv, api = shared
    drain_server(srv, api)
    yield srv
    drain_server(srv, api)


@pytest.fixture
def api(shared, srv):
    return shared[1]
