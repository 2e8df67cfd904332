"""Operations: single-instance guard, missing netlab, signals, --version, logging, --simulate,
start-up cleanup after a crash."""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from helpers import FAKE_NETLAB, ROOT, SERVER, TOPOLOGIES, ServerProcess
from server_support import (MAPPING, SIMPLE, Api, acquire_while_up_hangs, calls_of,  # noqa: F401
                            lab_dirs, pid_alive, start_server, up_dirs, wait_until)

sys.path.insert(0, str(ROOT))
import remote_lab  # noqa: E402


def run_server(*args, timeout=20, env=None):
    """Run remote_lab.py to completion (for start-up failures): (rc, stdout+stderr)."""
    e = dict(os.environ)
    e.update(env or {})
    p = subprocess.run([sys.executable, str(SERVER)] + [str(a) for a in args],
                       stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       timeout=timeout, env=e)
    return p.returncode, p.stdout.decode(errors="replace")


LINE_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d) \| (DEBUG|INFO|WARNING|ERROR|CRITICAL) "
                     r"\| remote-lab-server \| (\S.*?) \| (.*)$")


# ------------------------------------------------------------------------------------------
# start-up
# ------------------------------------------------------------------------------------------


def test_version():
    rc, out = run_server("--version")
    assert rc == 0
    assert out.strip() == "remote-lab " + remote_lab.__version__


def test_second_server_with_the_same_state_dir_exits_1_naming_the_first(start_server):
    srv, api = start_server()
    rc, out = run_server("--host", "127.0.0.1", "--port", "0", "--state-dir", srv.state_dir,
                         "--netlab", FAKE_NETLAB)
    assert rc == 1, out
    assert "already running" in out
    assert "pid %d" % srv.proc.pid in out
    assert "port %d" % srv.port in out
    assert "Listening on" not in out
    # the first one is unharmed
    assert api.req("GET", "/healthz")[0] == 204


def test_missing_netlab_exits_1_with_a_clear_message(tmp_path):
    rc, out = run_server("--port", "0", "--state-dir", tmp_path / "state",
                         "--netlab", "/nonexistent/netlab")
    assert rc == 1
    assert "netlab not found" in out and "/nonexistent/netlab" in out
    assert "--simulate" in out
    assert "Traceback" not in out and "Listening on" not in out
    # netlab not on PATH (the default command)
    rc, out = run_server("--port", "0", "--state-dir", tmp_path / "state",
                         env={"PATH": str(tmp_path)})
    assert rc == 1
    assert "netlab not found" in out and "Traceback" not in out


def test_simulate_needs_no_netlab(tmp_path):
    srv = ServerProcess(tmp_path, "--teardown-on-exit", simulate=True, env={"PATH": "/nonexistent"})
    srv.env.pop("REMOTE_LAB_SIM_HOME", None)
    srv.start()
    try:
        api = Api(srv)
        sid = api.new_session()
        status, body = api.post_lab(sid)
        assert status == 200, body
        assert [d["name"] for d in body["devices"]] == ["r1", "r2"]
        # default home of the simulated netlab: under the state dir
        registry = srv.state_dir / "simulated-netlab" / "status.json"
        assert list(json.loads(registry.read_text())) == ["default"]
    finally:
        assert srv.stop() == 0
    assert json.loads(registry.read_text()) == {}


# ------------------------------------------------------------------------------------------
# signals
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_with_teardown_on_exit_tears_the_lab_down_and_exits_0(start_server, sig):
    srv, api = start_server("--teardown-on-exit")
    sid = api.new_session()
    assert api.post_lab(sid)[0] == 200
    workdir = up_dirs(srv)[0]
    assert calls_of(srv, "down") == []
    srv.proc.send_signal(sig)
    assert srv.proc.wait(20) == 0
    downs = calls_of(srv, "down")
    assert [d["cwd"] for d in downs] == [workdir]
    assert lab_dirs(srv) == []
    assert "received %s" % sig.name in srv.log()
    registry = json.loads((srv.fake_dir / "status.json").read_text())
    assert registry == {}


def test_sigterm_during_a_hung_up_kills_it_cleans_and_exits_0(start_server):
    """The default --up-timeout is 30 min: a stop must not wait for it."""
    srv, api = start_server()
    sid = api.new_session()
    srv.switch("up_hang")
    result = {}
    t = threading.Thread(target=lambda: result.update(r=api.post_lab(sid, timeout=30)),
                         daemon=True)
    t.start()
    up = wait_until(lambda: calls_of(srv, "up"), 5, what="up started")[0]
    srv.proc.send_signal(signal.SIGTERM)
    assert srv.proc.wait(15) == 0
    assert not pid_alive(up["pid"])
    # the killed `up` may have registered the instance: cleaned in its dir, dir removed
    downs = calls_of(srv, "down")
    assert downs and all(d["cwd"] == up["cwd"] for d in downs)
    assert lab_dirs(srv) == []
    t.join(5)
    assert result["r"][0] >= 500  # the acquire failed (no hang until the client gives up)


def test_an_up_killed_by_a_stop_answers_503_with_retry_after(start_server):
    """The acquire whose `netlab up` a stop killed was not the client's fault: 503 with
    Retry-After, so the client retries it once the server is back (not a 502 'netlab failed')."""
    srv, api = start_server()
    t, result = acquire_while_up_hangs(srv, api, api.new_session())
    srv.proc.send_signal(signal.SIGTERM)
    t.join(15)
    status, data, headers = result["r"]
    assert status == 503, (status, data)
    assert "stopping" in data["detail"] and "retry" in data["detail"], data
    assert int(headers["Retry-After"]) >= 1
    assert srv.proc.wait(15) == 0


def test_shutdown_abort_racing_with_the_start_of_an_up_kills_it(monkeypatch, tmp_path):
    """The stop signal lands between the runner's `closing` check and the new `up` being
    tracked: abort() cannot see that process, the runner must kill it itself."""
    runner = remote_lab.NetlabRunner([sys.executable, "-c", "import time; time.sleep(60)"],
                                     up_timeout=10, timeout=10, stream=False)
    real_popen = subprocess.Popen

    def popen_then_abort(*args, **kwargs):
        proc = real_popen(*args, **kwargs)
        runner.abort()
        return proc

    monkeypatch.setattr(subprocess, "Popen", popen_then_abort)
    t0 = time.monotonic()
    with pytest.raises(remote_lab.NetlabError) as err:
        runner.run(["up", "topology.yml"], str(tmp_path), runner.up_timeout)
    assert time.monotonic() - t0 < 5, "the up ran until its timeout"
    assert not err.value.timed_out


def test_startup_cleans_lab_dirs_left_by_a_crash(tmp_path):
    """Lab dirs the saved state does not account for (here: a crash, and the state database
    lost with it, as from a server that kept none) are cleaned at the next start."""
    first = ServerProcess(tmp_path).start()
    api = Api(first)
    sid = api.new_session()
    assert api.post_lab(sid)[0] == 200
    workdir = up_dirs(first)[0]
    first.stop(sig=signal.SIGKILL)  # a crash: no teardown
    for db in first.state_dir.glob("state.db*"):
        db.unlink()
    assert lab_dirs(first) == [os.path.basename(workdir)]
    n = len(first.calls())
    os.rename(first.log_path, tmp_path / "crashed.log")
    second = ServerProcess(tmp_path).start()
    try:
        api = Api(second)
        wait_until(lambda: lab_dirs(second) == [], 10, what="leftover lab dir cleaned")
        downs = calls_of(second, "down", n)
        assert [(d["argv"], d["cwd"]) for d in downs] == [(["down", "--cleanup", "--force"],
                                                          workdir)]
        # the stale instance is gone: a new lab starts
        sid = api.new_session()
        status, body = api.post_lab(sid)
        assert (status, body["reused"]) == (200, False), body
    finally:
        assert second.stop() == 0


# ------------------------------------------------------------------------------------------
# logging
# ------------------------------------------------------------------------------------------


def test_log_line_format_and_debug_streaming(start_server):
    """Every line: `YYYY-MM-DD HH:MM:SS | LEVEL | remote-lab-server | ctx | msg`; with --debug
    netlab's output is streamed into the log line by line."""
    srv, api = start_server("--debug")
    sid = api.new_session()
    assert api.post_lab(sid)[0] == 200
    api.delete_session(sid)
    api.wait_lab_state("stopped")
    text = srv.log()
    lines = [ln for ln in text.splitlines() if re.match(r"^\d{4}-", ln)]
    assert lines
    for ln in lines:
        assert LINE_RE.match(ln), ln
    short = sid[:8]
    up = [ln for ln in lines if "running netlab up ./simple.yml" in ln]
    assert up and LINE_RE.match(up[0]).group(2, 3) == ("INFO", "sid=%s topo=simple.yml" % short)
    assert re.search(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d \| INFO \| remote-lab-server \| "
                     r"sid=%s topo=simple\.yml \| running netlab up \./simple\.yml" % short,
                     text, re.M)
    created = [ln for ln in lines if "created session" in ln]
    assert LINE_RE.match(created[0]).group(3) == "sid=%s" % short
    listening = [ln for ln in lines if "Listening on" in ln]
    assert LINE_RE.match(listening[0]).group(3) == "-"
    streamed = [LINE_RE.match(ln) for ln in lines if "[SUCCESS] Lab started (simulated)" in ln]
    assert streamed and streamed[0].group(2, 3) == ("DEBUG", "sid=%s topo=simple.yml" % short)


def test_log_level_warning_keeps_quiet_but_says_where_it_listens(start_server):
    srv, api = start_server("--log-level", "WARNING")  # the harness finds the port in the log
    sid = api.new_session()
    assert api.post_lab(sid)[0] == 200
    api.delete_session(sid)
    api.wait_lab_state("stopped")
    lines = [ln for ln in srv.log().splitlines() if re.match(r"^\d{4}-", ln)]
    levels = [LINE_RE.match(ln).group(2) for ln in lines]
    assert "INFO" not in levels and "DEBUG" not in levels, lines
    assert [ln for ln in lines if "Listening on http://127.0.0.1:%d" % srv.port in ln]


def test_log_config_json(start_server, tmp_path):
    logfile = tmp_path / "custom.log"
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"custom": {"format": "CUSTOM %(levelname)s [%(ctx)s] %(message)s"}},
        "handlers": {
            "file": {"class": "logging.FileHandler", "filename": str(logfile),
                     "formatter": "custom", "level": "DEBUG"},
            "console": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                        "formatter": "custom"},
        },
        "loggers": {"remote-lab-server": {"level": "DEBUG", "handlers": ["file", "console"],
                                          "propagate": False}},
    }
    cfg = tmp_path / "logging.json"
    cfg.write_text(json.dumps(config))
    srv, api = start_server("--log-config", cfg, sub="srv")
    sid = api.new_session()
    assert api.req("GET", "/healthz")[0] == 204
    wait_until(lambda: logfile.exists() and "created session" in logfile.read_text(), 5,
               what="custom log file written")
    text = logfile.read_text()
    assert "CUSTOM INFO [-] remote-lab %s: Listening on" % remote_lab.__version__ in text
    assert "CUSTOM INFO [sid=%s] created session" % sid[:8] in text
    assert "CUSTOM DEBUG" in text  # the configured level applies
    assert " | remote-lab-server | " not in srv.log()  # the built-in format is not used


def test_bad_log_config_exits_1(tmp_path):
    cfg = tmp_path / "bad.json"
    cfg.write_text("{not json")
    rc, out = run_server("--port", "0", "--state-dir", tmp_path / "state", "--netlab", FAKE_NETLAB,
                         "--log-config", cfg)
    assert rc == 1
    assert "log-config" in out and "Listening on" not in out


# ------------------------------------------------------------------------------------------
# --simulate: a full cycle through the same lab/runner code paths
# ------------------------------------------------------------------------------------------

BLOCK_LIST = b"""provider: external
defaults.device: frr
nodes:
  - a1
  - name: a2
links: [a1-a2]
"""


def test_simulate_full_cycle_mapping_and_list_topologies(start_server, tmp_path):
    sim_home = tmp_path / "sim-home"
    srv, api = start_server(simulate=True, env={"REMOTE_LAB_SIM_HOME": str(sim_home)},
                            sub="srv")
    sid = api.new_session()
    status, body = api.post_lab(sid, MAPPING, "mapping.yml")
    assert (status, body["reused"]) == (200, False), body
    devices = {d["name"]: d["raw"] for d in body["devices"]}
    assert sorted(devices) == ["leaf1", "leaf2", "spine"]
    assert devices["spine"]["device"] == "eos" and devices["leaf1"]["device"] == "frr"
    assert all("ansible_host" in raw and "mgmt" in raw for raw in devices.values())
    # a real work dir, with what the simulated `netlab up` generated in it
    dirs = lab_dirs(srv)
    assert len(dirs) == 1
    workdir = srv.state_dir / "labs" / dirs[0]
    assert (workdir / "mapping.yml").read_bytes() == MAPPING
    assert (workdir / "netlab.snapshot.pickle").exists()
    log = srv.log()
    assert "running netlab up ./mapping.yml (in %s)" % workdir in log
    assert "running netlab inspect -q --node spine --format json" in log
    assert api.post_lab(sid, MAPPING, "mapping.yml")[1]["reused"] is True
    assert api.req("POST", "/lab/release", sid)[0] == 204
    assert api.req("POST", "/lab/release", sid)[0] == 204
    # list form: the idle mapping lab is torn down, the new one started
    status, body = api.post_lab(sid, SIMPLE, "simple.yml")
    assert (status, body["reused"]) == (200, False)
    assert [d["name"] for d in body["devices"]] == ["r1", "r2"]
    assert not workdir.exists()
    assert "running netlab down --cleanup (in %s)" % workdir in srv.log()
    assert api.req("POST", "/lab/release", sid)[0] == 204
    status, body = api.post_lab(sid, BLOCK_LIST, "block.yml")
    assert [d["name"] for d in body["devices"]] == ["a1", "a2"]
    assert api.delete_session(sid) == 204
    api.wait_lab_state("stopped")
    assert lab_dirs(srv) == []
    registry = sim_home / "status.json"
    assert json.loads(registry.read_text()) == {}  # every simulated instance taken down
    assert not (srv.fake_dir / "calls.jsonl").exists()  # the fake netlab was not involved


def test_simulate_failed_up_is_a_502_with_netlab_output(start_server, tmp_path):
    srv, api = start_server(simulate=True, env={"REMOTE_LAB_SIM_HOME": str(tmp_path / "sim")},
                            sub="srv")
    sid = api.new_session()
    status, body = api.post_lab(sid, b"provider: external\nlinks: []\n", "empty.yml")
    assert status == 502
    assert "has no nodes" in body["detail"]
    assert lab_dirs(srv) == []
    status, body = api.post_lab(sid, (TOPOLOGIES / "simple.yml").read_bytes(), "simple.yml")
    assert status == 200, body


def test_sigterm_answers_a_waiting_long_poll_at_once(start_server):
    """A stop does not hold (or drop) a session long-poll for its wait: it answers with the
    current state, and the server exits without 'requests still unanswered'."""
    srv, api = start_server()
    api.new_session()
    waiter = api.new_session()
    result = {}
    t = threading.Thread(target=lambda: result.update(r=api.session(waiter, wait=30, timeout=30)),
                         daemon=True)
    t.start()
    time.sleep(0.5)  # the poll is held by now
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    t.join(10)
    assert result["r"][0] == 200 and result["r"][1]["status"] == "waiting", result
    assert srv.proc.wait(15) == 0
    assert time.monotonic() - t0 < 5
    assert "unanswered" not in srv.log()
