"""The pytest plugin under pytest-xdist, in pytester runs against real servers.

Inner runs are subprocesses using the client file vendored into the pytester directory, plugin
autoload off (xdist is loaded with ``-p xdist.plugin``). pytest-xdist is installed for these
tests only (.ci/run); without it they skip, except the one that checks the opt-in does no harm
without xdist.
"""
import json
import re

import pytest

from client_support import sessions, vendored_project
from client_support import clean_env, servers  # noqa: F401  (fixtures; clean_env autouse)
from server_support import calls_of

pytest_plugins = ["pytester"]

CONFTEST = '''
import json
import os
import time

from remote_lab_client import remote_lab_fixture

pytest_plugins = ["remote_lab_client"]

lab_simple = remote_lab_fixture("topologies/simple.yml", reuse_lab=True)
lab_map = remote_lab_fixture("topologies/mapping.yml", reuse_lab=True)

RAN = os.path.join(os.path.dirname(__file__), "ran")


def ran(name, client, hold_until=None):
    """Record a lab test: worker, host, start and end. ``hold_until``: hold the lab until that
    test holds one too (at most 30 s), then 1 s more."""
    os.makedirs(RAN, exist_ok=True)
    start = time.time()
    open(os.path.join(RAN, name + ".start"), "w").close()
    if hold_until:
        deadline = time.time() + 30
        while not os.path.exists(os.path.join(RAN, hold_until + ".start")) \\
                and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)
    with open(os.path.join(RAN, name + ".json"), "w") as f:
        json.dump({"worker": os.environ.get("PYTEST_XDIST_WORKER"),
                   "host": client.host, "base_url": client.base_url,
                   "session": client.session_id, "start": start, "end": time.time()}, f)
'''

TWO_HOLDING = '''
from conftest import ran


def test_one(lab_simple, remote_lab_client):
    ran("test_one", remote_lab_client, hold_until="test_two")


def test_two(lab_simple, remote_lab_client):
    ran("test_two", remote_lab_client, hold_until="test_one")
'''

TWO_FIXTURES = '''
from conftest import ran


def test_simple(lab_simple, remote_lab_client):
    ran("test_simple", remote_lab_client)


def test_map(lab_map, remote_lab_client):
    ran("test_map", remote_lab_client)
'''

GROUPED = '''
import pytest

from conftest import ran


@pytest.mark.parametrize("n", range(3))
def test_simple(lab_simple, remote_lab_client, n):
    ran("test_simple_%d" % n, remote_lab_client)


def test_map(lab_map, remote_lab_client):
    ran("test_map", remote_lab_client)
'''

NOTE = re.compile(r"remote lab: \d+ xdist workers share one lab host with one slot")


@pytest.fixture
def xdist():
    pytest.importorskip("xdist", reason="pytest-xdist is not installed (.ci/run installs it "
                        "for these tests: pip install pytest-xdist)")


@pytest.fixture(autouse=True)
def plugin_env(clean_env, monkeypatch):
    """The inner pytest runs see only the plugins and paths the project gives them."""
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")


@pytest.fixture
def project(pytester):
    """A test suite with the client file vendored into it and two topologies."""
    return vendored_project(pytester, CONFTEST)


def run_xdist(pytester, *args):
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "xdist.plugin",
                                         "-n", "2", *args, timeout=150)


def records(project):
    return {p.stem: json.loads(p.read_text()) for p in (project.path / "ran").glob("*.json")}


def sessions_created(srv):
    return srv.log().count("created session")


def ups_of(srv, topology):
    return [c for c in calls_of(srv, "up") if c["argv"][-1].endswith(topology)]


def lines_matching(text, pattern):
    return [line for line in text.splitlines() if re.search(pattern, line)]


@pytest.mark.timeout(180)
def test_each_worker_has_its_own_session_the_controller_none(xdist, project, servers,
                                                              monkeypatch):
    srv = servers.start("--slots", "2")
    monkeypatch.setenv("REMOTE_LAB_URL", srv.url)
    project.makepyfile(test_two=TWO_HOLDING)
    result = run_xdist(project)
    result.assert_outcomes(passed=2)
    ran = records(project)
    assert {r["worker"] for r in ran.values()} == {"gw0", "gw1"}
    assert len({r["session"] for r in ran.values()}) == 2
    assert sessions_created(srv) == 2  # the workers' two; the controller opened none
    one, two = ran["test_one"], ran["test_two"]
    assert max(one["start"], two["start"]) < min(one["end"], two["end"])  # two slots at once
    out = result.stdout.str()
    for worker in ("gw0", "gw1"):  # each worker's host, shown by the controller
        assert lines_matching(out, r"^remote lab: \[%s\] got lab host %s$"
                              % (worker, re.escape(srv.url))), out
    assert not NOTE.search(out)  # two slots: no turns


@pytest.mark.timeout(180)
def test_one_host_with_one_slot_says_once_that_workers_take_turns(xdist, project, servers,
                                                                 monkeypatch):
    srv = servers.start()
    monkeypatch.setenv("REMOTE_LAB_URL", srv.url)
    project.makepyfile(test_two=TWO_FIXTURES)
    result = run_xdist(project)
    result.assert_outcomes(passed=2)
    out = result.stdout.str()
    notes = lines_matching(out, NOTE.pattern)
    assert notes == ["remote lab: 2 xdist workers share one lab host with one slot: they will "
                     "take turns; add hosts to REMOTE_LAB_URL or --slots on the server"], out
    assert out.index(notes[0]) < out.index("created: 2/2 workers")  # in the header
    ran = records(project)
    assert {r["worker"] for r in ran.values()} == {"gw0", "gw1"}
    one, two = sorted(ran.values(), key=lambda r: r["start"])
    assert one["end"] <= two["start"]  # they took turns
    assert len(lines_matching(out, r"^remote lab: \[gw\d\] got lab host ")) == 2, out


@pytest.mark.timeout(180)
def test_two_workers_on_a_pool_of_two_hosts_hold_a_lab_each_at_once(xdist, project, servers,
                                                                   monkeypatch):
    a, b = servers.start(), servers.start()
    monkeypatch.setenv("REMOTE_LAB_URL", "%s,%s" % (a.url, b.url))
    project.makepyfile(test_two=TWO_HOLDING)
    result = run_xdist(project)
    result.assert_outcomes(passed=2)
    ran = records(project)
    one, two = ran["test_one"], ran["test_two"]
    assert {one["worker"], two["worker"]} == {"gw0", "gw1"}
    assert {one["host"], two["host"]} == {a.url, b.url}  # a host each
    assert max(one["start"], two["start"]) < min(one["end"], two["end"])  # at the same time
    out = result.stdout.str()
    for record in (one, two):
        assert lines_matching(out, r"^remote lab: \[%s\] got lab host %s$"
                              % (record["worker"], re.escape(record["host"]))), out
    assert not NOTE.search(out)
    for srv in (a, b):  # spread: each host did its own up of the fixture's lab
        assert len(ups_of(srv, "simple.yml")) == 1
        assert sessions(srv) == []  # and no session stayed behind in a queue


@pytest.mark.timeout(240)
@pytest.mark.parametrize("opt_in, hosts", [("--remote-lab-xdist-group", 1), ("ini", 2)])
def test_the_group_opt_in_keeps_a_fixtures_tests_in_one_worker(xdist, project, servers,
                                                              monkeypatch, opt_in, hosts):
    pool = [servers.start() for _ in range(hosts)]
    monkeypatch.setenv("REMOTE_LAB_URL", ",".join(srv.url for srv in pool))
    project.makepyfile(test_grouped=GROUPED)
    if opt_in == "ini":
        project.makeini("[pytest]\nremote_lab_xdist_group = true\n")
    result = run_xdist(project, "--dist", "loadgroup", "-v",
                       *([opt_in] if opt_in != "ini" else []))
    result.assert_outcomes(passed=4)
    ran = records(project)
    assert len({ran["test_simple_%d" % n]["worker"] for n in range(3)}) == 1, ran
    # one netlab up (over the whole pool) for the fixture's 3 tests, one for the other's
    assert sum(len(ups_of(srv, "simple.yml")) for srv in pool) == 1
    assert sum(len(ups_of(srv, "mapping.yml")) for srv in pool) == 1
    out = result.stdout.str()  # (-v) the node ids with their group, as xdist names them
    for nodeid in ["test_simple[%d]@lab_simple" % n for n in range(3)] + ["test_map@lab_map"]:
        assert lines_matching(out, r"PASSED test_grouped\.py::%s\s*$" % re.escape(nodeid)), out


@pytest.mark.timeout(120)
def test_the_group_opt_in_without_xdist_does_nothing(project, servers, monkeypatch):
    srv = servers.start()
    monkeypatch.setenv("REMOTE_LAB_URL", srv.url)
    project.makepyfile(test_marks='''
def test_marks(lab_simple, request):
    assert [m.name for m in request.node.iter_markers()] == ["remote_lab"]
''')
    project.makeini("[pytest]\nremote_lab_xdist_group = true\n")
    result = project.runpytest_subprocess("-p", "no:cacheprovider", "--strict-markers",
                                          "-W", "error", "--remote-lab-xdist-group",
                                          timeout=120)
    result.assert_outcomes(passed=1)


@pytest.mark.timeout(120)
def test_the_header_names_each_server_of_a_pool_and_the_run_the_host_it_got(project, servers,
                                                                            monkeypatch):
    one, two = servers.start(), servers.start("--slots", "2")
    monkeypatch.setenv("REMOTE_LAB_URL", "%s,%s" % (one.url, two.url))
    project.makepyfile(test_plain="def test_plain():\n    pass\n\n\n"
                                  "def test_lab(lab_simple):\n    pass\n")
    result = project.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=2)
    out = result.stdout.str()
    for srv in (one, two):
        assert lines_matching(out, r"^remote lab: %s \(REMOTE_LAB_URL\) \(remote-lab .*pid %d"
                              % (re.escape(srv.url), srv.proc.pid)), out
    assert len(lines_matching(out, r"^remote lab: lab free$")) == 2, out
    got = lines_matching(out, r"^remote lab: got lab host ")
    assert got in (["remote lab: got lab host %s" % srv.url] for srv in (one, two)), out
    assert sessions(one) == sessions(two) == []
