"""Local mode (REMOTE_LAB_URL unset): one server per host, and never a different one silently.

Real server processes in a private HOME: a server started by hand with the default state dir
(~/.remote-lab), servers started by the launcher, the CLI and pytester runs against them.
"""
import json
import shutil
import subprocess
import sys

import pytest

from client_support import SIMPLE, Servers, clean_client_env, client_env, cli
from helpers import (CLIENT, FAKE_NETLAB, SERVER, ServerProcess, http, pid_alive, read_json,
                     stop_launched, wait_until)

import remote_lab_client as rlc  # noqa: E402  (after client_support: repo root on sys.path)

pytest_plugins = ["pytester"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private HOME (launcher state, ~/.remote-lab) and no REMOTE_LAB_* from outside."""
    clean_client_env(monkeypatch, tmp_path)
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("HOME", str(h))
    yield h
    stop_launched(h)  # never leave one behind


@pytest.fixture
def by_hand(home, tmp_path):
    """`remote_lab.py --simulate` started by hand with the default state dir (~/.remote-lab)."""
    started = []

    def start(*args, simulate=True):
        srv = ServerProcess(tmp_path / ("hand%d" % len(started)), "--state-dir",
                            str(home / ".remote-lab"), *args, simulate=simulate,
                            env={"HOME": str(home)})
        started.append(srv)
        return srv.start()
    yield start
    for srv in started:
        srv.stop()


def launched_servers(home):
    """Pids of the servers the launcher started (its server status files, still running)."""
    pids = []
    for f in (home / ".remote-http-launcher" / "server").glob("remote-lab-*.json"):
        data = read_json(f) or {}
        if data.get("status") == "running" and pid_alive(data.get("pid") or 0):
            pids.append(data["pid"])
    return pids


def home_env(home, **extra):
    return client_env(HOME=str(home), **extra)


# --------------------------------------------------------------------------------------------
# one server per host
# --------------------------------------------------------------------------------------------


def test_local_mode_uses_the_server_started_by_hand(home, by_hand, monkeypatch):
    srv = by_hand()
    monkeypatch.setenv("REMOTE_LAB_SERVER_ARGS", "--simulate")
    found = rlc.launch()
    assert found.url == srv.url and found.server_pid == srv.proc.pid
    assert found.reused is True and found.external is True
    assert launched_servers(home) == []  # no second server (no second netlab lab)
    with rlc.RemoteLabClient(progress=False) as client:
        assert client.base_url == srv.url
        assert [d.name for d in client.acquire(SIMPLE)] == ["r1", "r2"]
    out = cli("launch", env=home_env(home, REMOTE_LAB_SERVER_ARGS="--simulate"))
    assert out.returncode == 0, out.stderr
    assert srv.url in out.stdout and "pid %d" % srv.proc.pid in out.stdout
    assert "simulated" in out.stdout and "not started by the launcher" in out.stdout
    # `stop` leaves a server it did not start alone, and says so
    out = cli("stop", env=home_env(home))
    assert out.returncode == 0, out.stderr
    assert "not started by the launcher" in out.stdout and str(srv.proc.pid) in out.stdout
    assert srv.proc.poll() is None


def test_a_server_started_by_hand_after_local_mode_is_refused(home, tmp_path, monkeypatch):
    monkeypatch.setenv("REMOTE_LAB_SERVER_ARGS", "--simulate")
    mine = rlc.launch()
    hand = ServerProcess(tmp_path / "late", "--state-dir", str(home / ".remote-lab"),
                         simulate=True, env={"HOME": str(home)})
    with pytest.raises(RuntimeError, match="another server is already running"):
        hand.start()
    hand.stop()
    assert rlc.Launcher().stop() is True
    wait_until(lambda: not pid_alive(mine.server_pid), what="server exit")


def test_local_mode_refuses_a_hand_started_server_of_another_kind(home, by_hand, monkeypatch):
    srv = by_hand()  # simulated
    monkeypatch.setenv("REMOTE_LAB_SERVER_ARGS", "--netlab %s" % FAKE_NETLAB)  # real netlab
    with pytest.raises(rlc.LaunchError) as err:
        rlc.launch(timeout=20)
    message = str(err.value)
    assert "pid %d" % srv.proc.pid in message and srv.url in message
    assert "simulated" in message and "REMOTE_LAB_URL" in message
    assert launched_servers(home) == [] and srv.proc.poll() is None


# --------------------------------------------------------------------------------------------
# no silent reuse of a different server
# --------------------------------------------------------------------------------------------


def test_root_says_simulated_netlab_and_pid(tmp_path):
    servers = Servers(tmp_path)
    try:
        sim = servers.start(simulate=True)
        real = servers.start()  # the fake netlab stands for a real one
        status, body, _ = http("GET", sim.url + "/")
        assert status == 200 and body["simulated"] is True and body["pid"] == sim.proc.pid
        assert "simulat" in body["netlab"]
        status, body, _ = http("GET", real.url + "/")
        assert body["simulated"] is False and body["pid"] == real.proc.pid
        assert body["netlab"] == str(FAKE_NETLAB)
    finally:
        servers.stop_all()


def test_idle_local_server_with_other_flags_is_restarted(home, monkeypatch):
    first = rlc.launch(server_args=["--simulate"])
    same = rlc.launch(server_args=["--simulate"])
    assert same.reused is True and same.server_pid == first.server_pid
    other = rlc.launch(server_args=["--simulate", "--keep-warm", "5"])
    assert other.reused is False and other.server_pid != first.server_pid
    assert "--keep-warm" in (other.replaced or "")
    wait_until(lambda: not pid_alive(first.server_pid), what="the old server to stop")
    # and back to real netlab (the fake one): restarted again, not reused as simulated
    real = rlc.launch(server_args=["--netlab", str(FAKE_NETLAB)])
    assert real.reused is False and real.simulated is False
    assert http("GET", real.url + "/")[1]["simulated"] is False
    assert rlc.Launcher().stop() is True


def test_busy_local_server_with_other_flags_is_refused(home, monkeypatch):
    monkeypatch.setenv("REMOTE_LAB_SERVER_ARGS", "--simulate")
    with rlc.RemoteLabClient(progress=False) as client:
        first = rlc.launch()
        assert client.base_url == first.url
        with pytest.raises(rlc.LaunchError) as err:
            rlc.launch(server_args=["--netlab", str(FAKE_NETLAB)])
        message = str(err.value)
        assert "busy" in message and "1 session" in message
        assert "'--simulate'" in message and "remote-lab-client stop" in message
        assert pid_alive(first.server_pid)
        client.acquire(SIMPLE)  # the session goes on
    assert rlc.Launcher().stop() is True


def test_a_changed_remote_lab_py_restarts_the_idle_server(home, tmp_path):
    vendored = tmp_path / "vendored"  # local mode runs the remote_lab.py next to the client
    vendored.mkdir()
    shutil.copy(str(CLIENT), str(vendored / "remote_lab_client.py"))
    shutil.copy(str(SERVER), str(vendored / "remote_lab.py"))
    env = home_env(home, REMOTE_LAB_SERVER_ARGS="--simulate", PYTHONPATH="")

    def launch():
        out = subprocess.run([sys.executable, str(vendored / "remote_lab_client.py"), "launch",
                              "--json"], capture_output=True, text=True, timeout=90, env=env)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)

    first = launch()
    assert launch()["server_pid"] == first["server_pid"]
    with open(str(vendored / "remote_lab.py"), "a") as f:
        f.write("\n# a new version\n")
    second = launch()
    assert second["reused"] is False and second["server_pid"] != first["server_pid"]
    assert "remote_lab.py changed" in second["replaced"]
    subprocess.run([sys.executable, str(vendored / "remote_lab_client.py"), "stop"], env=env,
                   capture_output=True, timeout=90)


def test_health_status_and_launch_show_pid_and_simulated(home, tmp_path):
    servers = Servers(tmp_path / "srv")
    try:
        srv = servers.start(simulate=True)
        env = home_env(home, REMOTE_LAB_URL=srv.url)
        out = cli("health", env=env)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("%s: ok (remote-lab " % srv.url)
        assert "pid %d" % srv.proc.pid in out.stdout and "simulated" in out.stdout
        out = cli("status", env=env)
        first = out.stdout.splitlines()[0]
        assert srv.url in first and "pid %d" % srv.proc.pid in first and "simulated" in first
        out = cli("status", "--json", env=env)
        data = json.loads(out.stdout)
        assert data["pid"] == srv.proc.pid and data["simulated"] is True
        real = servers.start()
        out = cli("health", env=home_env(home, REMOTE_LAB_URL=real.url))
        assert "pid %d" % real.proc.pid in out.stdout and "simulated" not in out.stdout
    finally:
        servers.stop_all()
    out = cli("launch", env=home_env(home, REMOTE_LAB_SERVER_ARGS="--simulate"))
    assert out.returncode == 0, out.stderr
    assert "remote-lab %s" % rlc.__version__ in out.stdout and "simulated" in out.stdout
    assert "started" in out.stdout and "pid " in out.stdout
    assert rlc.Launcher().stop() is True


@pytest.mark.timeout(120)
def test_pytest_header_shows_the_servers_pid_and_simulated(pytester, tmp_path, monkeypatch):
    clean_client_env(monkeypatch, pytester.path)
    monkeypatch.delenv("PYTHONPATH", raising=False)
    monkeypatch.setenv("PYTEST_DISABLE_PLUGIN_AUTOLOAD", "1")
    servers = Servers(tmp_path / "srv")
    try:
        srv = servers.start(simulate=True)
        monkeypatch.setenv("REMOTE_LAB_URL", srv.url)
        shutil.copy(str(CLIENT), str(pytester.path / "remote_lab_client.py"))
        pytester.makepyfile(test_x="def test_x():\n    pass\n")
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p",
                                               "remote_lab_client", timeout=60)
        result.assert_outcomes(passed=1)
        result.stdout.fnmatch_lines(["remote lab: %s (REMOTE_LAB_URL) (remote-lab *, pid %d, "
                                      "simulated)" % (srv.url, srv.proc.pid), "remote lab: lab free"])
    finally:
        servers.stop_all()
