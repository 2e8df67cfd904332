"""The client declares the lab it will ask for (issue 13, item 2): POST /session's
``fingerprint`` = lab_fingerprint(topology, extra_files), from RemoteLabClient(topology=...),
the CLI's ``run`` and ``acquire`` and the pytest plugin (the first lab fixture of the run, after
ordering), read back from a real server's GET /session/{id}; none without a topology; a foreign
older server that refuses the field is asked again without it, keeping who and why."""
import json
import shutil
import signal
import subprocess
import sys
import threading
from http.server import ThreadingHTTPServer

import pytest

from client_support import (MAPPING, SIMPLE, ForeignServer, cli, client, client_env, http,
                            sessions, wait_until)
from client_support import clean_env  # noqa: F401  (fixture, autouse)
from helpers import CLIENT, ServerProcess, kill_if_running

import remote_lab_client as rlc  # noqa: E402  (after client_support: repo root on sys.path)

pytest_plugins = ["pytester"]

BROKEN = "provider: clab\ndefaults.device: frr\nnodes: [r1, r2]\nlinks: [r1-r3]\n"
WHO = {"owner": "alice@ci", "note": "", "link": "", "heartbeat_interval": 0}  # (not CI's)
READ_DECLARED = ("import json, os, sys, urllib.request\n"
                 "url = sys.argv[1] + '/session/' + os.environ['REMOTE_LAB_SESSION']\n"
                 "print(json.load(urllib.request.urlopen(url))['fingerprint'])\n")


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    """One server (fake netlab) for the module; each test ends the sessions it made."""
    server = ServerProcess(tmp_path_factory.mktemp("fingerprint-srv")).start()
    yield server
    server.stop()


@pytest.fixture
def extra(tmp_path):
    """An extra file next to a copy of simple.yml: (topology, [extra file])."""
    topo = tmp_path / "lab" / "simple.yml"
    (topo.parent / "configs").mkdir(parents=True)
    shutil.copy(str(SIMPLE), str(topo))
    (topo.parent / "configs" / "r1.cfg").write_text("hostname r1\n")
    return topo, [topo.parent / "configs" / "r1.cfg"]


def declared(srv, sid):
    status, body, _ = http("GET", srv.url + "/session/" + sid)
    assert status == 200, body
    return body["fingerprint"]


def test_the_client_declares_its_topologys_fingerprint(srv, extra):
    topo, files = extra
    with client(srv.url, topology=topo, extra_files=files) as c:
        assert c.fingerprint == rlc.lab_fingerprint(topo, files)
        assert declared(srv, c.session_id) == c.fingerprint
        assert c.acquire(topo, extra_files=files).reused is not None
    with client(srv.url, topology=MAPPING) as c:  # no extra files
        assert declared(srv, c.session_id) == rlc.lab_fingerprint(MAPPING) != \
            rlc.lab_fingerprint(topo, files)
    with client(srv.url) as c:  # no topology: nothing declared
        assert c.fingerprint is None and declared(srv, c.session_id) is None
    assert sessions(srv) == []


def test_a_missing_topology_fails_before_any_session(srv, tmp_path):
    with pytest.raises(FileNotFoundError, match="topology file not found"):
        client(srv.url, topology=tmp_path / "nope.yml")
    assert sessions(srv) == []


def test_cli_run_declares_the_fingerprint(srv, extra):
    topo, files = extra
    proc = cli("--url", srv.url, "run", topo, "--extra", *files, "--", sys.executable, "-c",
               READ_DECLARED, srv.url)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == rlc.lab_fingerprint(topo, files)
    assert sessions(srv) == []


@pytest.mark.timeout(90)
def test_cli_acquire_declares_the_fingerprint(srv, extra, tmp_path):
    topo, files = extra
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, str(CLIENT), "--url", srv.url, "acquire",
                                 str(topo), "--extra"] + [str(f) for f in files],
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=err,
                                text=True, env=client_env())
        try:
            wait_until(lambda: "press Ctrl-C" in err_path.read_text(), timeout=30,
                       what="the lab acquired")
            (session,) = sessions(srv)
            assert declared(srv, session["session_id"]) == rlc.lab_fingerprint(topo, files)
            proc.send_signal(signal.SIGINT)
            assert proc.wait(30) == 0, err_path.read_text()
        finally:
            kill_if_running(proc)
    assert sessions(srv) == []


PLUGIN_CONFTEST = '''
from remote_lab_client import remote_lab_fixture

pytest_plugins = ["remote_lab_client"]

lab_broken = remote_lab_fixture("broken.yml")
lab_simple = remote_lab_fixture("simple.yml", extra_files=["configs/r1.cfg"])
lab_map = remote_lab_fixture("mapping.yml")
'''

PLUGIN_TESTS = '''
import os


def note(client):
    with open(os.path.join(os.path.dirname(__file__), "declared.txt"), "a") as f:
        f.write("%s\\n" % client.session_status()["fingerprint"])


def test_map(lab_map, remote_lab_client):
    note(remote_lab_client)


def test_simple(lab_simple, remote_lab_client):
    note(remote_lab_client)


def test_bad(lab_broken):
    pass
'''


@pytest.mark.timeout(120)
def test_the_plugin_declares_the_first_lab_of_the_run(srv, pytester, monkeypatch, extra):
    """Collected first: test_map; run first: lab_broken's test (the first fixture defined), but
    its check rejects it; so the first lab asked for is lab_simple's, with its extra file."""
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("REMOTE_LAB_URL", srv.url)
    shutil.copy(str(rlc.__file__), str(pytester.path / "remote_lab_client.py"))
    topo, files = extra
    shutil.copytree(str(topo.parent), str(pytester.path), dirs_exist_ok=True)
    shutil.copy(str(MAPPING), str(pytester.path / "mapping.yml"))
    (pytester.path / "broken.yml").write_text(BROKEN)
    pytester.makeconftest(PLUGIN_CONFTEST)
    pytester.makepyfile(test_labs=PLUGIN_TESTS)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=100)
    result.assert_outcomes(passed=2, errors=1)
    want = rlc.lab_fingerprint(pytester.path / "simple.yml",
                               [pytester.path / "configs" / "r1.cfg"])
    assert want == rlc.lab_fingerprint(topo, files)  # (the same files)
    assert (pytester.path / "declared.txt").read_text().split() == [want, want]
    assert sessions(srv) == []


class OldServer(ForeignServer):
    """A foreign older server: POST /session refuses what it does not know (REFUSES: the
    fingerprint field, or any body) with a 400; seen: the bodies it was sent."""
    REFUSES = "fingerprint"
    seen = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path != "/session":
            return self._answer(204)
        self.seen.append(json.loads(body) if body else None)
        if body and (self.REFUSES == "body" or "fingerprint" in json.loads(body)):
            return self._answer(400, {"detail": "unknown field(s) 'fingerprint'"})
        self._answer(201, {"session_id": "s%d" % len(self.seen), "position": 0,
                           "status": "active"})

    def do_GET(self):
        self._answer(404, {"detail": "no such endpoint"})


@pytest.fixture
def old_server():
    OldServer.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), OldServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield "http://127.0.0.1:%d" % server.server_address[1]
    server.shutdown()
    server.server_close()


def test_a_server_that_refuses_the_fingerprint_gets_who_and_why_without(old_server):
    OldServer.REFUSES = "fingerprint"
    fingerprint = rlc.lab_fingerprint(SIMPLE)
    with client(old_server, topology=SIMPLE, **WHO) as c:
        assert c.session_id == "s2"
    assert OldServer.seen == [{"owner": "alice@ci", "fingerprint": fingerprint},
                              {"owner": "alice@ci"}]
    OldServer.seen = []
    with client(old_server, **WHO) as c:  # nothing to declare
        assert c.session_id == "s1"
    assert OldServer.seen == [{"owner": "alice@ci"}]


def test_a_server_that_refuses_any_body_is_asked_without_one_at_last(old_server):
    OldServer.REFUSES = "body"
    with client(old_server, topology=SIMPLE, **WHO) as c:
        assert c.session_id == "s3"
    assert OldServer.seen == [{"owner": "alice@ci", "fingerprint": rlc.lab_fingerprint(SIMPLE)},
                              {"owner": "alice@ci"}, None]
