"""The command line on a pool of hosts (issue 14 item 3): status, health, run and acquire with
a comma-separated --url / REMOTE_LAB_URL.

Two real server processes (fake netlab) for the whole module: "busy" has a session holding it
(so the two queues differ), "free" has none; a third URL is a closed port (a host that is down).
"""
import json
import signal
import subprocess
import sys

import pytest

from client_support import SIMPLE, cli, client_env, free_port, one_error_line, sessions
from client_support import clean_env  # noqa: F401  (fixture, autouse)
from helpers import CLIENT, ServerProcess, kill_if_running

import remote_lab_client as rlc  # noqa: E402  (after client_support: repo root on sys.path)


class Pool:
    def __init__(self, free, busy, holder):
        self.free, self.busy, self.holder = free, busy, holder
        self.down = "http://127.0.0.1:%d" % free_port()  # nothing listens there

    def url(self, *servers):
        return ",".join(s if isinstance(s, str) else s.url for s in servers)


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pool")
    free, busy = ServerProcess(tmp / "free"), ServerProcess(tmp / "busy")
    holder = None
    try:
        free.start()
        busy.start()
        holder = rlc.RemoteLabClient(busy.url, progress=False, heartbeat_interval=5)
        yield Pool(free, busy, holder)
    finally:
        if holder is not None:
            holder.close()
        free.stop()
        busy.stop()


def blocks(text):
    """``status``'s text of a pool: {first line: the block's lines}, one block per host."""
    return {b.splitlines()[0]: b.splitlines() for b in text.strip().split("\n\n")}


# --------------------------------------------------------------------------------------------
# status
# --------------------------------------------------------------------------------------------


def test_status_shows_each_host_of_the_pool_and_says_which_is_down(pool):
    proc = cli("--url", pool.url(pool.free, pool.busy, pool.down), "status")
    assert proc.returncode == 1, proc.stderr
    assert one_error_line(proc) == ("remote-lab-client: error: 1 of 3 hosts failed: %s"
                                    % pool.down)
    hosts = blocks(proc.stdout)
    first_lines = list(hosts)
    assert first_lines[:2] == ["host     %s (1 of 3 in the pool)" % pool.free.url,
                               "host     %s (2 of 3 in the pool)" % pool.busy.url]
    assert first_lines[2].startswith("host     %s (3 of 3 in the pool): error: cannot connect "
                                     "to the remote lab at %s" % (pool.down, pool.down))
    assert hosts[first_lines[2]] == [first_lines[2]]  # one line for the host that is down
    free, busy, _ = hosts.values()
    assert free[1].startswith("server   %s (remote-lab " % pool.free.url)
    assert "queue    0 sessions" in free and "lab      stopped" in free
    assert busy[1].startswith("server   %s (remote-lab " % pool.busy.url)
    assert "queue    1 session" in busy
    assert any(pool.holder.session_id in line and "active" in line for line in busy)


def test_status_of_a_pool_that_answers_exits_0_and_reads_remote_lab_url(pool):
    proc = cli("status", env=client_env(REMOTE_LAB_URL=" %s , %s" % (pool.busy.url,
                                                                   pool.free.url)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    assert list(blocks(proc.stdout)) == [
        "host     %s (1 of 2 in the pool)" % pool.busy.url,
        "host     %s (2 of 2 in the pool)" % pool.free.url]


def test_status_json_is_a_list_with_one_object_per_host(pool):
    single = json.loads(cli("--url", pool.busy.url, "status", "--json").stdout)
    proc = cli("--url", pool.url(pool.free, pool.busy, pool.down), "status", "--json")
    assert proc.returncode == 1
    assert "1 of 3 hosts failed" in one_error_line(proc)
    free, busy, down = json.loads(proc.stdout)
    assert free["host"] == free["url"] == pool.free.url and free["error"] is None
    assert free["sessions"] == [] and free["active_session"] is None
    assert busy["host"] == pool.busy.url and busy["active_session"] == pool.holder.session_id
    assert down["host"] == pool.down
    assert down["error"].startswith("cannot connect to the remote lab at %s" % pool.down)
    assert set(down) == {"host", "error"}
    # each host's object is the single server's, plus "host" and "error"; one URL: unchanged
    assert "host" not in single and "error" not in single
    assert set(busy) == set(single) | {"host", "error"}
    assert [s["session_id"] for s in single["sessions"]] == [pool.holder.session_id]


def test_a_pool_entry_that_is_not_a_server_url_is_that_hosts_error(pool):
    proc = cli("--url", pool.url(pool.free, "ftp://lab2"), "status")
    assert proc.returncode == 1
    assert blocks(proc.stdout)["host     ftp://lab2 (2 of 2 in the pool): error: unsupported "
                               "remote lab URL 'ftp://lab2': use http(s)://HOST:PORT or "
                               "ssh://[USER@]HOST[:PORT][/WORKDIR]"]
    proc = cli("--url", "%s,,%s" % (pool.free.url, pool.busy.url), "status")
    assert proc.returncode == 1
    assert "an empty entry between commas" in one_error_line(proc)


# --------------------------------------------------------------------------------------------
# health
# --------------------------------------------------------------------------------------------


def test_health_checks_each_host(pool):
    proc = cli("--url", pool.url(pool.busy, pool.down, pool.free), "health")
    assert proc.returncode == 1
    assert one_error_line(proc) == ("remote-lab-client: error: 1 of 3 hosts failed: %s"
                                    % pool.down)
    busy, down, free = proc.stdout.splitlines()
    assert busy.startswith("%s: ok (remote-lab " % pool.busy.url) and "1 session(s)" in busy
    assert down.startswith("%s: error: cannot connect to the remote lab at %s"
                           % (pool.down, pool.down))
    assert free.startswith("%s: ok (remote-lab " % pool.free.url) and "0 session(s)" in free

    proc = cli("--url", pool.url(pool.free, pool.busy), "health")
    assert proc.returncode == 0 and proc.stderr == ""
    assert [line.split(": ok (")[0] for line in proc.stdout.splitlines()] == [pool.free.url,
                                                                             pool.busy.url]


def test_a_single_url_keeps_todays_output(pool):
    proc = cli("--url", pool.free.url, "health")
    assert proc.returncode == 0 and proc.stdout.startswith(pool.free.url + ": ok (remote-lab ")
    proc = cli("--url", pool.free.url, "status")
    assert proc.returncode == 0 and proc.stdout.startswith("server   %s (" % pool.free.url)
    assert "host " not in proc.stdout
    proc = cli("--url", pool.down, "health")
    assert proc.returncode == 1
    assert "error: cannot connect to the remote lab at %s" % pool.down in one_error_line(proc)


def test_a_host_that_refuses_is_one_line_and_the_others_are_shown(pool, tmp_path):
    from server_support import write_auth_file
    locked = ServerProcess(tmp_path / "locked", "--auth-file",
                           str(write_auth_file(tmp_path / "users"))).start()
    try:
        url = pool.url(locked, pool.free)
        health = cli("--url", url, "health")
        status = cli("--url", url, "status")
    finally:
        locked.stop()
    # GET /healthz needs no token: the host is up (what health says); its status refuses
    assert health.returncode == 0 and [line.split(": ok")[0] for line in
                                       health.stdout.splitlines()] == [locked.url, pool.free.url]
    assert status.returncode == 1
    assert one_error_line(status) == "remote-lab-client: error: 1 of 2 hosts failed: %s" % (
        locked.url)
    refused, free = blocks(status.stdout).values()
    assert len(refused) == 1 and "HTTP 401" in refused[0] and "REMOTE_LAB_TOKEN" in refused[0]
    assert refused[0].startswith("host     %s (1 of 2 in the pool): error: " % locked.url)
    assert free[1].startswith("server   %s (remote-lab " % pool.free.url)


# --------------------------------------------------------------------------------------------
# run and acquire: which host they got (the client's INFO line, once, before the lab starts)
# --------------------------------------------------------------------------------------------


def got_lines(stderr, server):
    """The lines saying which host of the pool the session got (it should be ``server``)."""
    lines = [line for line in stderr.splitlines() if " got " in line and "of the pool" in line]
    assert all(line.startswith("remote-lab-client: remote lab: got ") and
               line.endswith(" (%s) of the pool" % server.url) for line in lines), stderr
    return lines


def test_run_on_a_pool_names_the_host_it_got_and_leaves_the_other_queue(pool):
    proc = cli("--url", pool.url(pool.down, pool.busy, pool.free), "run", SIMPLE, "--",
               sys.executable, "-c", "import os; print(os.environ['REMOTE_LAB_SESSION'])")
    assert proc.returncode == 0, proc.stderr
    assert len(got_lines(proc.stderr, pool.free)) == 1
    assert "Traceback" not in proc.stderr
    assert proc.stdout.strip()  # the session of the free host
    assert sessions(pool.free) == []
    assert [s["session_id"] for s in sessions(pool.busy)] == [pool.holder.session_id]
    quiet = cli("-q", "--url", pool.url(pool.busy, pool.free), "run", SIMPLE, "--", "true")
    assert quiet.returncode == 0 and quiet.stderr == ""


@pytest.mark.timeout(60)
def test_acquire_on_a_pool_names_the_host_before_the_lab(pool):
    p = subprocess.Popen([sys.executable, str(CLIENT), "--url", pool.url(pool.busy, pool.free),
                          "acquire", SIMPLE], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=client_env())
    try:
        assert p.stdout.readline().strip() == "[", p.stderr.read()
        assert [s["status"] for s in sessions(pool.free)] == ["active"]
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=20)
    finally:
        kill_if_running(p)
    assert p.returncode == 0, err
    lines = err.splitlines()
    got = got_lines(err, pool.free)
    assert len(got) == 1
    assert lines.index(got[0]) < [i for i, line in enumerate(lines)
                                  if line.startswith("remote-lab-client: lab acquired")][0]
    assert sessions(pool.free) == []
    assert [s["session_id"] for s in sessions(pool.busy)] == [pool.holder.session_id]


def test_a_single_url_run_prints_no_pool_line(pool):
    proc = cli("--url", pool.free.url, "run", SIMPLE, "--", "true")
    assert proc.returncode == 0, proc.stderr
    assert got_lines(proc.stderr, pool.free) == [] and "pool" not in proc.stderr
