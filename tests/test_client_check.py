"""The client checks a topology before queueing (POST /lab/check, issue 13 item 3): a broken
one fails in seconds, not after the queue; a server without the endpoint is not asked again."""
import shutil
import time

import pytest

from client_support import (SIMPLE, http, TcpForwarder, cli, client, client_env, one_error_line,
                            sessions)
from client_support import clean_env, servers, srv  # noqa: F401  (fixtures; clean_env autouse)

import remote_lab_client as rlc  # noqa: E402

BROKEN = "provider: clab\ndefaults.device: frr\nnodes: [r1, r2]\nlinks: [r1-r3]\n"

pytest_plugins = ["pytester"]


def metric(srv, name):
    from server_support import metric_sample
    return metric_sample(http("GET", srv.url + "/metrics")[1], name)


def broken_topology(tmp_path):
    path = tmp_path / "broken.yml"
    path.write_text(BROKEN)
    return path


def test_check_answers_the_nodes_and_a_broken_topology_raises_topology_invalid(srv, tmp_path):
    c = client(srv.url, start_session=False)
    try:
        assert c.check(SIMPLE) == ["r1", "r2"]
        with pytest.raises(rlc.TopologyInvalid) as e:
            c.check(broken_topology(tmp_path))
        assert e.value.status == 422 and isinstance(e.value, rlc.BadRequest)
        assert str(e.value) == ("netlab rejects topology broken.yml: IncorrectValue in links: "
                                "Link string r1-r3 in links[1] refers to an unknown node r3")
        assert "Fatal error in netlab" in e.value.detail  # the whole tail
        assert c.session_id is None and sessions(srv) == []  # no session was needed
    finally:
        c.close()


def test_acquire_without_a_session_yet_checks_before_joining_the_queue(srv, tmp_path):
    c = client(srv.url, start_session=False)
    try:
        with pytest.raises(rlc.TopologyInvalid):
            c.acquire(broken_topology(tmp_path))
        assert c.session_id is None and sessions(srv) == []
        assert [d.name for d in c.acquire(SIMPLE)] == ["r1", "r2"]
    finally:
        c.close()


@pytest.mark.timeout(60)
def test_cli_run_with_a_broken_topology_fails_at_once_while_another_holds_the_lab(srv, tmp_path):
    holder = rlc.RemoteLabClient(srv.url, progress=False)  # the CLI would have to wait
    try:
        t0 = time.monotonic()
        for args in (["run", broken_topology(tmp_path), "--", "true"],
                     ["acquire", broken_topology(tmp_path)]):
            proc = cli("--url", srv.url, *args,
                       env=client_env(REMOTE_LAB_SESSION_TIMEOUT=30))
            assert proc.returncode == 1
            line = one_error_line(proc)
            assert line == ("remote-lab-client: error: netlab rejects topology broken.yml: "
                            "IncorrectValue in links: Link string r1-r3 in links[1] refers to "
                            "an unknown node r3"), line
        assert time.monotonic() - t0 < 25  # generous: not the 30 s queue wait
        assert [s["session_id"] for s in sessions(srv)] == [holder.session_id]
    finally:
        holder.close()


def test_a_server_without_the_endpoint_is_not_asked_again_and_acquire_works(srv, tmp_path):
    # the forwarder renames the path on the way: the server answers 404 "no such endpoint",
    # as the seed's server does
    proxy = TcpForwarder(srv.port, rewrite=(b"POST /lab/check ", b"POST /lab/chekk "))
    c = client(proxy.url, start_session=False)
    try:
        assert c.check(SIMPLE) is None
        assert c.check(broken_topology(tmp_path)) is None  # not asked
        assert [d.name for d in c.acquire(SIMPLE)] == ["r1", "r2"]
        assert bytes(proxy.received).count(b"/lab/chekk") == 1
        assert [x["argv"][0] for x in srv.calls()].count("create") == 0
    finally:
        c.close()
        proxy.close()


PLUGIN_CONFTEST = '''
from remote_lab_client import remote_lab_fixture

pytest_plugins = ["remote_lab_client"]

lab_simple = remote_lab_fixture("simple.yml")
lab_broken = remote_lab_fixture("broken.yml")
'''


@pytest.mark.timeout(180)
def test_plugin_fails_a_broken_topologys_tests_at_session_start(pytester, srv, tmp_path,
                                                                 monkeypatch):
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    monkeypatch.setenv("REMOTE_LAB_URL", srv.url)
    shutil.copy(str(rlc.__file__), str(pytester.path / "remote_lab_client.py"))
    shutil.copy(str(SIMPLE), str(pytester.path / "simple.yml"))
    (pytester.path / "broken.yml").write_text(BROKEN)
    pytester.makeconftest(PLUGIN_CONFTEST)
    pytester.makepyfile(test_labs='''
def test_good(lab_simple):
    assert len(lab_simple) == 2


def test_bad(lab_broken):
    pass
''')
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=120)
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*remote lab: netlab rejects topology broken.yml: *unknown "
                                 "node r3*"])
    created = metric(srv, "remote_lab_sessions_created_total")
    assert created == 1
    # only the broken one: no session at all
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-k", "bad", timeout=120)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*remote lab: netlab rejects topology broken.yml: *"])
    assert metric(srv, "remote_lab_sessions_created_total") == created
