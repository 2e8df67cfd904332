"""The pytest plugin of remote_lab_client, in pytester runs against a real server.

Every inner run is a subprocess whose only copy of the client is the file vendored into the
pytester directory (no PYTHONPATH to the repo, plugin autoload off), like a suite that copied it.
"""
import shutil

import pytest

from client_support import SIMPLE, sessions, vendored_project
from client_support import clean_env, servers  # noqa: F401  (fixtures; clean_env autouse)
from helpers import CLIENT

pytest_plugins = ["pytester"]

CONFTEST = '''
import os
import remote_lab_client
from remote_lab_client import remote_lab_fixture

pytest_plugins = ["remote_lab_client"]

# the vendored copy next to this file is the one in use
assert os.path.dirname(os.path.abspath(remote_lab_client.__file__)) == \\
    os.path.dirname(os.path.abspath(__file__)), remote_lab_client.__file__

lab_simple = remote_lab_fixture("topologies/simple.yml")
_mapping = remote_lab_fixture("topologies/mapping.yml", name="lab_map")
'''

ORDER_TESTS = '''
import os

LOG = os.path.join(os.path.dirname(__file__), "order.log")


def ran(name):
    with open(LOG, "a") as f:
        f.write(name + "\\n")


def test_a_map(lab_map):
    ran("test_a_map")
    assert [d.name for d in lab_map] == ["spine", "leaf1", "leaf2"]


def test_b_plain():
    ran("test_b_plain")


def test_c_simple(lab_simple, remote_lab_client, request):
    ran("test_c_simple")
    assert [d.name for d in lab_simple] == ["r1", "r2"]
    assert dict(lab_simple[0])["ansible_host"]
    assert remote_lab_client.status()["ref_count"] == 1
    assert request.node.get_closest_marker("remote_lab") is not None


def test_d_map_fails(lab_map):
    ran("test_d_map_fails")
    assert False, "deliberate failure"


def test_e_simple(lab_simple):
    ran("test_e_simple")
    assert len(lab_simple) == 2


def test_f_after_all(remote_lab_client, request):
    ran("test_f_after_all")
    # every lab fixture released, the failing test's too
    assert remote_lab_client.status()["ref_count"] == 0
    assert request.node.get_closest_marker("remote_lab") is None
'''


@pytest.fixture(autouse=True)
def plugin_env(clean_env, monkeypatch):
    """The inner pytest runs see only the plugins and paths the project gives them."""
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")


@pytest.fixture
def srv(servers, monkeypatch):
    """A fresh server, named by REMOTE_LAB_URL (as the plugin's users do)."""
    srv = servers.start()
    monkeypatch.setenv("REMOTE_LAB_URL", srv.url)
    return srv


@pytest.fixture
def project(pytester):
    """A test suite with the client file vendored into it and two topologies."""
    return vendored_project(pytester, CONFTEST)


def run(pytester, *args):
    return pytester.runpytest_subprocess("-p", "no:cacheprovider", *args, timeout=120)


@pytest.mark.timeout(180)
def test_order_release_on_failure_and_vendored_use(project, srv):
    project.makepyfile(test_order=ORDER_TESTS)
    result = run(project, "-v")
    result.assert_outcomes(passed=5, failed=1)
    result.stdout.fnmatch_lines(["*deliberate failure*"])
    order = (project.path / "order.log").read_text().split()
    assert order == ["test_c_simple", "test_e_simple", "test_a_map", "test_d_map_fails",
                     "test_b_plain", "test_f_after_all"]
    # -v prints the order, grouped by lab fixture in definition order
    result.stdout.fnmatch_lines([
        "remote lab test order (tests sharing a lab run together):",
        "  1. lab_simple (simple.yml): 2 tests",
        "  2. lab_map (mapping.yml): 2 tests",
        "  3. without a remote lab: 2 tests",
    ])
    result.stdout.fnmatch_lines(["*test_c_simple PASSED*", "*test_e_simple PASSED*",
                                 "*test_a_map PASSED*", "*test_d_map_fails FAILED*",
                                 "*test_b_plain PASSED*", "*test_f_after_all PASSED*"])
    # the session was ended and every acquisition released
    assert sessions(srv) == []
    assert srv.log().count("lab released") == 4


@pytest.mark.timeout(120)
def test_marker_selects_tests_using_a_lab(project):
    project.makepyfile(test_order=ORDER_TESTS)
    result = run(project, "--collect-only", "-q", "-m", "not remote_lab")
    result.stdout.fnmatch_lines(["test_order.py::test_b_plain", "test_order.py::test_f_after_all",
                                 "*2/6 tests collected (4 deselected)*"])
    result = run(project, "--collect-only", "-q", "-m", "remote_lab")
    result.stdout.fnmatch_lines(["*4/6 tests collected (2 deselected)*"])
    result = run(project, "--markers")
    result.stdout.fnmatch_lines(["@pytest.mark.remote_lab:*"])


@pytest.mark.timeout(120)
def test_a_test_using_two_lab_fixtures_is_a_collection_error(project):
    project.makepyfile(test_two='''
import pytest


@pytest.fixture
def combo(lab_map):
    return lab_map


def test_fine(lab_simple):
    pass


def test_both(lab_simple, lab_map):
    pass


def test_indirect(lab_simple, combo):
    pass
''')
    result = run(project)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines([
        "*ERROR collecting test_two.py*",
        "*test_two.py::test_both uses 2 remote lab fixtures (lab_simple, lab_map)*",
        "*test_two.py::test_indirect uses 2 remote lab fixtures (lab_simple, lab_map)*",
    ])
    assert "test_fine uses" not in result.stdout.str()


@pytest.mark.timeout(120)
def test_missing_topology_fails_at_collection_with_a_clear_message(project):
    project.makepyfile(test_missing='''
from remote_lab_client import remote_lab_fixture

lab_missing = remote_lab_fixture("topologies/nope.yml")


def test_x(lab_missing):
    pass
''')
    result = run(project)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines([
        "*ERROR collecting test_missing.py*",
        "*remote_lab_fixture('topologies/nope.yml'): topology file not found*",
    ])
    assert "Traceback" not in result.stdout.str()


@pytest.mark.timeout(120)
def test_missing_topology_in_conftest_fails_the_tests_using_it_at_collection(project):
    project.makeconftest(CONFTEST + '\nlab_gone = remote_lab_fixture("gone.yml")\n'
                         'lab_bad_extra = remote_lab_fixture("topologies/simple.yml", '
                         'extra_files=["nodes/missing.yml"])\n')
    project.makepyfile(test_gone="def test_gone(lab_gone):\n    pass\n",
                       test_extra="def test_extra(lab_bad_extra):\n    pass\n",
                       test_other="def test_other():\n    pass\n")
    result = run(project)
    assert result.ret == pytest.ExitCode.INTERRUPTED
    result.stdout.fnmatch_lines([
        "*ERROR collecting test_extra.py*",
        "remote_lab_fixture('topologies/simple.yml'): extra file 'nodes/missing.yml' not found",
        "*ERROR collecting test_gone.py*",
        "remote_lab_fixture('gone.yml'): topology file not found*",
    ])
    assert "Traceback" not in result.stdout.str() + result.stderr.str()
    # a run that does not use the broken fixtures is not affected
    result = run(project, "test_other.py")
    result.assert_outcomes(passed=1)


@pytest.mark.timeout(120)
def test_without_remote_lab_url_the_fixtures_say_what_to_set(project):
    project.makepyfile(test_order=ORDER_TESTS)
    result = run(project, "-k", "test_c_simple or test_b_plain")
    result.assert_outcomes(passed=1, errors=1)
    result.stdout.fnmatch_lines(["*set REMOTE_LAB_URL=http://HOST:PORT*"])


@pytest.mark.timeout(120)
def test_loads_as_a_named_plugin_like_the_entry_point(pytester, srv):
    # `-p remote_lab_client` is what the pytest11 entry point does: no pytest_plugins needed
    shutil.copy(str(CLIENT), str(pytester.path / "remote_lab_client.py"))
    shutil.copy(str(SIMPLE), str(pytester.path / "simple.yml"))
    pytester.makepyfile(test_ep='''
from remote_lab_client import remote_lab_fixture

lab = remote_lab_fixture("simple.yml", reuse_lab=True)


def test_one(lab):
    assert [d.name for d in lab] == ["r1", "r2"]


def test_two(lab, remote_lab_client):
    assert lab.reused is True  # reuse_lab=True keeps the running lab
    assert remote_lab_client.status()["ref_count"] == 1
''')
    result = run(pytester, "-p", "remote_lab_client", "-v")  # pytester puts its dir on the path
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["remote lab: http://127.0.0.1:*"])
    assert srv.netlab_verbs().count("up") == 1


@pytest.mark.timeout(120)
def test_waiting_for_the_lab_is_shown_in_the_terminal(project, srv):
    import threading

    import remote_lab_client as rlc
    holder = rlc.RemoteLabClient(srv.url, progress=False)
    timer = threading.Timer(2.0, holder.close)
    timer.start()
    try:
        project.makepyfile(test_wait="def test_wait(lab_simple):\n    assert lab_simple\n")
        result = run(project)
    finally:
        timer.join()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["remote lab: %s (*)" % srv.url,  # the header, then the lab
                                 "remote lab: lab held by * for *, *",
                                 "remote lab: waiting in the queue at position 1, * (waited 0 s), "
                                 "status page %s/?sid=*" % srv.url])
    assert result.stdout.str().count("waiting in the queue") == 1  # one line per change


@pytest.mark.timeout(180)
def test_newest_pytest_is_silent_about_the_fixtures(project, srv):
    # pytest >= 9.2 deprecates session fixtures that are instance methods (PytestRemovedIn10Warning)
    project.makepyfile(test_order=ORDER_TESTS)
    result = run(project, "-W", "error::pytest.PytestDeprecationWarning")
    result.assert_outcomes(passed=5, failed=1)
    result = run(project, "-k", "test_c_simple or test_f_after_all")
    result.assert_outcomes(passed=2)
    assert "warning" not in result.stdout.str().lower(), result.stdout.str()


def test_our_own_runs_fail_on_pytest_deprecation_warnings(pytestconfig):
    assert "error::pytest.PytestDeprecationWarning" in pytestconfig.getini("filterwarnings")


BAD_URL = "ftp://not-a-lab-server"  # refused at once ("unsupported remote lab URL")
URL_TEST = "def test_url(lab_simple, remote_lab_client):\n    assert lab_simple\n"


@pytest.mark.timeout(180)
def test_url_option_wins_over_the_environment(project, srv, monkeypatch):
    project.makepyfile(test_url=URL_TEST)
    monkeypatch.setenv("REMOTE_LAB_URL", BAD_URL)
    result = run(project, "--remote-lab-url", srv.url)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["remote lab: %s (--remote-lab-url)*" % srv.url])
    # and without the option the environment is used (proof that the option made the difference)
    result = run(project)
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*unsupported remote lab URL 'ftp://not-a-lab-server'*"])


@pytest.mark.timeout(180)
def test_ini_key_below_the_environment_above_dotenv(project, srv, monkeypatch):
    project.makepyfile(test_url=URL_TEST)
    project.makeini("[pytest]\nremote_lab_url = %s\n" % srv.url)
    (project.path / ".env").write_text("REMOTE_LAB_URL=%s\n" % BAD_URL)
    monkeypatch.delenv("REMOTE_LAB_URL")
    result = run(project)  # ini > .env
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["remote lab: %s (ini remote_lab_url)*" % srv.url])
    project.makeini("[pytest]\nremote_lab_url = %s\n" % BAD_URL)
    monkeypatch.setenv("REMOTE_LAB_URL", srv.url)
    result = run(project)  # environment > ini
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["remote lab: %s (REMOTE_LAB_URL)*" % srv.url])


DOTENV_TEST = """
import os

def test_dotenv(lab_simple, remote_lab_client):
    assert remote_lab_client.config.source("url") == ".env"
    assert remote_lab_client.heartbeat_interval == 7
    assert "REMOTE_LAB_URL" not in os.environ and "REMOTE_LAB_HEARTBEAT_INTERVAL" not in os.environ
"""


@pytest.mark.timeout(180)
def test_the_fixture_reads_dotenv_without_putting_it_into_the_environment(project, srv,
                                                                          monkeypatch):
    project.makepyfile(test_dotenv=DOTENV_TEST)
    (project.path / ".env").write_text("REMOTE_LAB_URL=%s\nREMOTE_LAB_HEARTBEAT_INTERVAL=7\n"
                                       % srv.url)
    monkeypatch.delenv("REMOTE_LAB_URL")
    result = run(project)
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["remote lab: %s (.env)*" % srv.url])


@pytest.mark.timeout(120)
def test_help_lists_the_option_and_ini_key_in_their_own_group(project):
    result = run(project, "--help")
    assert result.ret == 0
    result.stdout.fnmatch_lines([
        "remote lab (remote_lab_client):",
        "  --remote-lab-url=URL*",
    ])
    result.stdout.fnmatch_lines(["  remote_lab_url (string):*"])
