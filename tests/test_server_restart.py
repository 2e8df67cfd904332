"""A restart or a crash loses no session and no lab: the state database in --state-dir, what a
start-up restores and adopts, a stop that leaves the lab for the next start, --cleanup.

Each test runs a server, stops or kills it, and starts another on the same state dir (and the
same fake netlab, whose registry and recorded calls carry over).
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import SERVER, FAKE_NETLAB, ServerProcess
from server_support import (MAPPING, SIMPLE, Api, calls_of, lab_dirs, metric_sample,  # noqa: F401
                            saved_sessions, state_db, state_rows, up_dirs, wait_until)

pytestmark = pytest.mark.timeout(90)


class Restartable:
    """One state dir and one fake netlab, served by a server after another."""

    def __init__(self, tmp_path, *args):
        self.tmp = tmp_path
        self.args = args
        self.count = 0
        self.first = None
        self.srv = None

    def start(self, *extra):
        self.count += 1
        base = self.tmp / ("run%d" % self.count)
        if self.first is None:
            srv = ServerProcess(base, *(self.args + extra))
            self.first = srv
        else:
            srv = ServerProcess(base, "--state-dir", self.first.state_dir, *(self.args + extra),
                                env={"FAKE_NETLAB_DIR": str(self.first.fake_dir)})
            srv.fake_dir = self.first.fake_dir
            srv.state_dir = self.first.state_dir
        self.srv = srv.start()
        return self.srv, Api(self.srv)

    def stop(self, sig=signal.SIGTERM):
        if sig == signal.SIGKILL:
            self.srv.proc.send_signal(signal.SIGKILL)
            self.srv.proc.wait(10)
        rc = self.srv.stop(sig)
        return rc

    def close(self):
        if self.srv is not None:
            self.srv.stop()


@pytest.fixture
def restartable(tmp_path):
    made = []

    def make(*args):
        r = Restartable(tmp_path, *args)
        made.append(r)
        return r

    yield make
    for r in made:
        r.close()


def start_with_lab(r):
    """The first server of ``r``, one session and its lab up: (srv, api, sid, lab dir)."""
    srv, api = r.start()
    sid = api.new_session()
    assert api.post_lab(sid)[0] == 200
    return srv, api, sid, up_dirs(srv)[0]


def session_order(api):
    return [(s["session_id"], s["status"]) for s in api.health()["session_list"]]


# ------------------------------------------------------------------------------------------
# restore and adopt
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["SIGKILL", "SIGTERM"])
def test_sessions_and_the_running_lab_survive_a_restart(restartable, sig):
    r = restartable()
    srv, api = r.start()
    active, w1, w2 = api.new_session(), api.new_session(), api.new_session()
    status, body = api.post_lab(active)
    assert status == 200, body
    assert api.post_lab(active)[1]["reused"] is True  # ref count 2
    devices = body["devices"]
    before = session_order(api)
    calls = len(srv.calls())
    assert r.stop(sig) in (0, -signal.SIGKILL)

    srv, api = r.start()
    assert session_order(api) == before == [(active, "active"), (w1, "waiting"),
                                            (w2, "waiting")]
    status, lab = api.lab(active)
    assert status == 200 and lab["running"] is True, lab
    assert lab["ref_count"] == 2 and lab["devices"] == devices
    assert api.req("GET", "/lab/devices", active)[1] == devices
    new_calls = [c["argv"][0] for c in srv.calls()[calls:]]
    assert "up" not in new_calls and "down" not in new_calls, new_calls
    assert api.health()["lab"]["holder"] == active
    # the adopted lab behaves as before: reuse, release, and the end of its session
    status, body = api.post_lab(active)
    assert (status, body["reused"]) == (200, True)
    api.delete_session(active)
    assert api.session(w1)[1]["status"] == "active"
    api.wait_lab_state("stopped")
    assert lab_dirs(srv) == []
    assert [c["argv"][0] for c in srv.calls()[calls:]].count("up") == 0


def test_a_201_means_the_session_is_on_disk(restartable):
    r = restartable()
    srv, api = r.start()
    a, b = api.new_session(), api.new_session()
    # read as an operator would, with the server running
    assert saved_sessions(srv.state_dir) == [(a, True), (b, False)]
    api.delete_session(a)
    assert saved_sessions(srv.state_dir) == [(b, True)]
    mode = state_rows(srv.state_dir, "PRAGMA journal_mode")[0][0]
    assert mode == "wal"


def test_restored_sessions_get_a_full_timeout_from_the_start_up(restartable):
    r = restartable("--waiting-timeout", "2", "--active-timeout", "2")
    srv, api = r.start()
    a, b = api.new_session(), api.new_session()
    r.stop(signal.SIGKILL)
    time.sleep(2.5)  # longer than both timeouts, while no server runs
    srv, api = r.start()
    assert session_order(api) == [(a, "active"), (b, "waiting")]
    # nobody comes back: they expire a timeout after the start-up
    wait_until(lambda: api.health()["queue_length"] == 0, 15, what="restored sessions expired")


def test_a_lab_netlab_no_longer_runs_is_cleaned_and_its_holder_told(restartable):
    r = restartable()
    srv, api, sid, workdir = start_with_lab(r)
    r.stop(signal.SIGKILL)
    (r.first.fake_dir / "status.json").write_text("{}")  # e.g. the host rebooted

    srv, api = r.start()
    assert api.session(sid)[1]["status"] == "active"
    api.wait_lab_state("stopped")
    status, lab = api.lab(sid)
    assert status == 200 and lab["running"] is False
    assert "lost in a restart" in lab["last_error"] and "no longer runs" in lab["last_error"]
    wait_until(lambda: not os.path.exists(workdir), 10, what="the lost lab's dir cleaned")
    assert api.post_lab(sid)[1]["reused"] is False  # a new `up`
    events = [e["text"] for e in api.req("GET", "/status")[1]["events"]]
    assert any("restarted after a crash" in e and "the lab lost" in e for e in events), events


def test_a_lab_whose_files_changed_is_not_adopted(restartable):
    r = restartable()
    srv, api, sid, workdir = start_with_lab(r)
    r.stop(signal.SIGTERM)
    with open(os.path.join(workdir, "simple.yml"), "ab") as f:
        f.write(b"# edited behind our back\n")
    srv, api = r.start()
    api.wait_lab_state("stopped")
    assert "its files changed" in api.lab(sid)[1]["last_error"]
    downs = calls_of(srv, "down")
    assert downs and downs[-1]["cwd"] == workdir


def test_a_stale_netlab_instance_in_our_labs_dir_goes_to_netlabs_own_cleanup(restartable):
    """netlab registers an instance in our labs dir whose dir is gone (deleted by hand): only
    netlab may drop it (`status -i ID --cleanup`, its prompt answered; never its status file).
    netlab 26.10 cannot (it must chdir there): an ERROR says what the operator can do."""
    r = restartable()
    srv, api = r.start()
    sid = api.new_session()
    assert api.post_lab(sid)[0] == 200
    r.stop(signal.SIGKILL)
    for d in (r.first.state_dir / "labs").iterdir():
        shutil.rmtree(str(d))
    calls = len(r.first.calls())

    srv, api = r.start()
    api.wait_lab_state("stopped")
    cleanup = [c for c in srv.calls()[calls:] if c["argv"][:1] == ["status"]
               and "--cleanup" in c["argv"]]
    assert [c["argv"] for c in cleanup] == [["status", "-i", "default", "--cleanup"]]
    assert cleanup[0]["stdin"].startswith("pipe:")  # its confirmation prompt was answered
    errors = [line for line in srv.log().splitlines() if "| ERROR |" in line]
    assert any("netlab cannot remove its instance default" in line
               and "netlab status --reset" in line for line in errors), errors
    assert "lost in a restart" in api.lab(sid)[1]["last_error"]


def test_a_first_start_asks_netlab_nothing(restartable):
    r = restartable()
    srv, api = r.start()
    assert api.new_session()
    assert srv.calls() == []
    r.stop()
    srv, api = r.start()  # a restart with no lab and no lab dir: nothing to reconcile
    assert srv.calls() == []


def test_restart_events_and_metrics(restartable):
    r = restartable()
    srv, api, sid, _ = start_with_lab(r)
    api.new_session()
    r.stop(signal.SIGTERM)
    srv, api = r.start()
    events = api.req("GET", "/status")[1]["events"]
    texts = [e["text"] for e in events]
    assert "restarted after a stop; 2 sessions restored, the lab simple.yml adopted" in texts
    assert any("netlab up OK" in t for t in texts)  # the previous server's events are kept
    r.stop(signal.SIGKILL)
    srv, api = r.start()
    text = api.req("GET", "/metrics")[1]
    assert metric_sample(text, "remote_lab_restarts_total", after="stop") == 1
    assert metric_sample(text, "remote_lab_restarts_total", after="crash") == 1
    assert metric_sample(text, "remote_lab_sessions_restored_total") == 4
    assert metric_sample(text, "remote_lab_labs_adopted_total") == 2
    assert metric_sample(text, "remote_lab_state_write_errors_total") == 0
    texts = [e["text"] for e in api.req("GET", "/status")[1]["events"]]
    assert any(t.startswith("restarted after a crash (no clean stop); 2 sessions restored")
               for t in texts), texts


def test_keep_warm_deadline_survives_a_restart(restartable):
    r = restartable("--keep-warm", "6")  # long enough for a stop and a start on a busy machine
    srv, api = r.start()
    sid = api.new_session()
    assert api.post_lab(sid, reuse=True)[0] == 200
    api.delete_session(sid)  # kept warm for 6 s
    r.stop()
    srv, api = r.start()
    assert api.lab_state() == "running"
    sid = api.new_session()
    assert api.post_lab(sid, reuse=True)[1]["reused"] is True  # the warm lab, adopted
    api.delete_session(sid)
    api.wait_lab_state("stopped", timeout=15)  # and its new deadline still ends it


# ------------------------------------------------------------------------------------------
# an unusable state database
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_a_corrupt_state_database_is_moved_aside_and_the_server_starts_clean(restartable,
                                                                               damage):
    r = restartable()
    srv, api = r.start()
    for _ in range(50):
        api.new_session()
    r.stop()
    db = state_db(r.first.state_dir)
    data = db.read_bytes()
    if damage == "garbage":
        db.write_bytes(b"\x00garbage, not SQLite\xff" * 300)
    else:
        db.write_bytes(data[:len(data) // 2])
    srv, api = r.start()
    assert api.health()["queue_length"] == 0
    assert api.new_session()
    aside = list(r.first.state_dir.glob("state.db.corrupt-*"))
    assert len(aside) == 1 and not aside[0].name.endswith("-wal"), aside
    errors = [line for line in srv.log().splitlines() if "| ERROR |" in line]
    assert any("state database" in line and "moved aside" in line for line in errors), errors
    r.stop()
    srv, api = r.start()  # the new database works
    assert api.health()["queue_length"] == 1


# ------------------------------------------------------------------------------------------
# --teardown-on-exit and --cleanup
# ------------------------------------------------------------------------------------------


def run_cleanup(state_dir, fake_dir, *extra):
    env = dict(os.environ, FAKE_NETLAB_DIR=str(fake_dir))
    return subprocess.run([sys.executable, str(SERVER), "--cleanup", "--state-dir",
                           str(state_dir), "--netlab", str(FAKE_NETLAB)] + list(extra),
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, env=env, timeout=60)


def test_cleanup_tears_down_what_a_state_dir_holds(restartable):
    r = restartable()
    srv, api, sid, workdir = start_with_lab(r)
    api.new_session()
    # refused while a server runs on the state dir
    p = run_cleanup(r.first.state_dir, r.first.fake_dir)
    assert p.returncode == 1 and b"another server is already running" in p.stdout, p.stdout
    r.stop()
    assert os.path.isdir(workdir)  # a stop left it running
    p = run_cleanup(r.first.state_dir, r.first.fake_dir)
    assert p.returncode == 0, p.stdout
    assert b"2 session(s) forgotten, 1 lab dir(s) torn down" in p.stdout, p.stdout
    downs = calls_of(r.first, "down")
    assert [(d["argv"], d["cwd"]) for d in downs] == [(["down", "--cleanup"], workdir)]
    assert not os.path.exists(workdir)
    assert json.loads((r.first.fake_dir / "status.json").read_text()) == {}
    srv, api = r.start()
    assert api.health()["queue_length"] == 0 and api.lab_state() == "stopped"


def test_teardown_on_exit_keeps_sessions_but_not_the_lab(restartable):
    r = restartable("--teardown-on-exit")
    srv, api = r.start()
    sid = api.new_session()
    assert api.post_lab(sid)[0] == 200
    r.stop()
    assert lab_dirs(r.first) == []
    srv, api = r.start()
    assert session_order(api) == [(sid, "active")]
    assert api.lab(sid)[1]["running"] is False
    assert api.post_lab(sid)[1]["reused"] is False


def test_an_adopted_lab_whose_session_ended_just_before_a_crash_is_torn_down(restartable):
    r = restartable()
    srv, api = r.start()
    sid = api.new_session()
    assert api.post_lab(sid)[0] == 200
    r.stop(signal.SIGKILL)
    # the crash came between the end of the session and the lab's teardown
    import sqlite3
    db = sqlite3.connect(str(state_db(r.first.state_dir)))
    db.execute("DELETE FROM sessions WHERE id = ?", (sid,))
    db.commit()
    db.close()
    srv, api = r.start()
    api.wait_lab_state("stopped")
    assert lab_dirs(srv) == []
    assert calls_of(srv, "down"), "the lab nobody holds any more was not torn down"
