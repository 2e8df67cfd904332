"""Lab control against the fake netlab: failed up/inspect (502), up timeout (504, group killed),
keep-warm reuse across sessions."""
import io
import json
import os
import subprocess
import sys
import time

import pytest

from helpers import FAKE_NETLAB, ROOT
from server_support import (api, shared_server, srv,  # noqa: F401 (fixtures)
                            MAPPING, build_multipart, calls_of, lab_dirs, pid_alive,
                            start_server, up_dirs, wait_until)  # noqa: F401 (fixture)


shared = shared_server("lab")


def registry(srv):
    """The fake netlab's instance registry (like ~/.netlab/status.yaml)."""
    path = srv.fake_dir / "status.json"
    return json.loads(path.read_text()) if path.exists() else {}


# ------------------------------------------------------------------------------------------
# failed up / inspect: 502 with netlab's output, cleaned, the session can try again
# ------------------------------------------------------------------------------------------


def test_up_fail_502_cleans_the_failed_dir_and_a_retry_succeeds(api, srv):
    sid = api.new_session()
    n = len(srv.calls())
    srv.switch("up_fail")
    status, body = api.post_lab(sid)
    assert status == 502, body
    # the detail carries the tail of netlab's output
    assert "fake failure of 'netlab up' (switch up_fail)" in body["detail"]
    calls = srv.calls()[n:]
    failed_dir = calls[0]["cwd"]
    assert calls[0]["argv"] == ["up", "./simple.yml"]
    # the stale `default` instance was cleaned in the failed dir before it was removed
    assert [c["argv"] for c in calls[1:]] == [["down", "--cleanup", "--force"]]
    assert calls[1]["cwd"] == failed_dir
    assert not os.path.exists(failed_dir)
    assert lab_dirs(srv) == []
    assert "default" not in registry(srv)
    lab = api.lab(sid)[1]
    assert (lab["running"], lab["ref_count"], lab["devices"]) == (False, 0, [])
    assert api.session(sid)[1]["status"] == "active"  # still the active session
    # a retry (failure switched off) succeeds: nothing stale blocks the next `up`
    srv.switch("up_fail", on=False)
    status, body = api.post_lab(sid)
    assert (status, body["reused"]) == (200, False), body
    assert [d["name"] for d in body["devices"]] == ["r1", "r2"]
    new_dir = up_dirs(srv, n)[-1]
    assert new_dir != failed_dir and registry(srv)["default"]["dir"] == new_dir
    assert lab_dirs(srv) == [os.path.basename(new_dir)]


def test_up_fail_twice_then_success_in_a_new_session(api, srv):
    a = api.new_session()
    srv.switch("up_fail")
    assert api.post_lab(a)[0] == 502
    assert api.post_lab(a, MAPPING, "mapping.yml")[0] == 502
    assert lab_dirs(srv) == []
    assert api.delete_session(a) == 204
    srv.switch("up_fail", on=False)
    b = api.new_session()
    status, body = api.post_lab(b, MAPPING, "mapping.yml")
    assert status == 200, body
    assert sorted(d["name"] for d in body["devices"]) == ["leaf1", "leaf2", "spine"]


def test_inspect_fail_502_cleans_and_a_retry_succeeds(api, srv):
    sid = api.new_session()
    n = len(srv.calls())
    srv.switch("inspect_fail")
    status, body = api.post_lab(sid)
    assert status == 502, body
    assert "fake failure (switch inspect_fail)" in body["detail"]
    calls = srv.calls()[n:]
    workdir = calls[0]["cwd"]
    assert calls[0]["argv"][0] == "up"
    downs = [c for c in calls if c["argv"][0] == "down"]
    assert len(downs) == 1 and downs[0]["cwd"] == workdir
    assert downs[0]["argv"][:2] == ["down", "--cleanup"]
    assert downs[0]["time"] > max(c["time"] for c in calls if c["argv"][0] == "inspect")
    assert not os.path.exists(workdir)
    assert "default" not in registry(srv)
    assert api.lab(sid)[1]["running"] is False
    srv.switch("inspect_fail", on=False)
    status, body = api.post_lab(sid)
    assert (status, body["reused"]) == (200, False)


def test_netlab_runs_without_stdin_in_its_own_group_and_node_inspects_run_at_once(api, srv):
    sid = api.new_session()
    n = len(srv.calls())
    srv.switch("inspect_delay", value="0.8")
    status, body = api.post_lab(sid, MAPPING, "mapping.yml")
    assert status == 200, body
    calls = srv.calls()[n:]
    assert [c["pgid"] for c in calls] == [c["pid"] for c in calls]  # its own process group
    nodes = [c for c in calls if c["argv"][:1] == ["inspect"] and "--node" in c["argv"]]
    assert sorted(c["argv"][c["argv"].index("--node") + 1] for c in nodes) == \
        ["leaf1", "leaf2", "spine"]
    # one round: every node inspect started before the first could end (0.8 s each)
    starts = [c["time"] for c in nodes]
    assert max(starts) - min(starts) < 0.6, starts


def test_inspect_timeout_504_kills_it_and_cleans(start_server):
    # the server's stdin is an open pipe here: netlab must get /dev/null instead (its prompts
    # would wait on the pipe forever)
    srv, api = start_server("--netlab-timeout", "2", stdin=subprocess.PIPE)
    sid = api.new_session()
    srv.switch("inspect_delay", value="60")
    t0 = time.monotonic()
    status, body = api.post_lab(sid)
    assert status == 504 and "timed out after 2 s" in body["detail"], body
    assert time.monotonic() - t0 < 10
    inspect = calls_of(srv, "inspect")[0]
    wait_until(lambda: not pid_alive(inspect["pid"]), 5, what="hung inspect killed")
    assert [(d["argv"], d["cwd"]) for d in calls_of(srv, "down")] == \
        [(["down", "--cleanup", "--force"], inspect["cwd"])]
    assert lab_dirs(srv) == [] and registry(srv) == {}
    assert {c["stdin"] for c in srv.calls()} == {"/dev/null"}


# ------------------------------------------------------------------------------------------
# up timeout: 504, the whole process group killed
# ------------------------------------------------------------------------------------------

HANG_WRAPPER = """#!/bin/sh
# `up` with a grandchild: the server must kill the whole process group on timeout
if [ "$1" = up ] && [ -e "$FAKE_NETLAB_DIR/hang_group" ]; then
  echo $$ > "$FAKE_NETLAB_DIR/leader.pid"
  sleep 3600 &
  echo $! > "$FAKE_NETLAB_DIR/grandchild.pid"
  wait
fi
exec "%s" "%s" "$@"
"""


@pytest.mark.timeout(60)
def test_up_timeout_504_kills_the_hung_process_group(start_server, tmp_path):
    wrapper = tmp_path / "netlab-wrapper"
    wrapper.write_text(HANG_WRAPPER % (sys.executable, FAKE_NETLAB))
    wrapper.chmod(0o755)
    srv, api = start_server("--up-timeout", "1", netlab=wrapper, sub="srv")
    sid = api.new_session()

    # 1. the fake's own hang: `up` sleeps forever
    srv.switch("up_hang")
    t0 = time.monotonic()
    status, body = api.post_lab(sid)
    elapsed = time.monotonic() - t0
    assert status == 504, body
    assert "timed out" in body["detail"]
    assert 0.9 <= elapsed < 10, elapsed
    up = calls_of(srv, "up")[0]
    wait_until(lambda: not pid_alive(up["pid"]), 5, what="hung netlab up killed")
    downs = calls_of(srv, "down")
    assert [(d["argv"], d["cwd"]) for d in downs] == [(["down", "--cleanup", "--force"],
                                                      up["cwd"])]
    assert lab_dirs(srv) == []
    srv.switch("up_hang", on=False)

    # 2. a hung `up` with a grandchild in its process group: both die
    srv.switch("hang_group")
    status, body = api.post_lab(sid)
    assert status == 504, body
    leader = int((srv.fake_dir / "leader.pid").read_text())
    grandchild = int((srv.fake_dir / "grandchild.pid").read_text())
    wait_until(lambda: not pid_alive(leader) and not pid_alive(grandchild), 5,
               what="the whole process group killed")
    assert lab_dirs(srv) == []
    srv.switch("hang_group", on=False)

    # 3. the session tries again: the lab starts
    status, body = api.post_lab(sid)
    assert (status, body["reused"]) == (200, False), body
    assert [d["name"] for d in body["devices"]] == ["r1", "r2"]


# ------------------------------------------------------------------------------------------
# keep-warm over HTTP: the flag, the session end and the housekeeping expiry wired together
# (the rules themselves, reuse=false and a warm lab in use past its deadline included, are
# tested in-process on a fake clock: tests/test_lab_logic.py)
# ------------------------------------------------------------------------------------------


def test_keep_warm_one_up_for_three_sessions(start_server):
    srv, api = start_server("--keep-warm", "30")
    devices = None
    for i in range(3):
        sid = api.new_session()
        status, body = api.post_lab(sid, reuse=True)
        assert status == 200, body
        assert body["reused"] is (i > 0), i
        devices = devices or body["devices"]
        assert body["devices"] == devices
        lab = api.lab(sid)[1]
        assert (lab["running"], lab["ref_count"]) == (True, 1)
        assert api.delete_session(sid) == 204
        assert api.lab_state() == "running"  # kept warm, not torn down
    assert len(calls_of(srv, "up")) == 1
    assert calls_of(srv, "down") == []
    assert len(lab_dirs(srv)) == 1
    # a different topology: the warm lab (ref 0) is torn down and the new one started
    sid = api.new_session()
    status, body = api.post_lab(sid, MAPPING, "mapping.yml")
    assert (status, body["reused"]) == (200, False)
    assert len(calls_of(srv, "up")) == 2 and len(calls_of(srv, "down")) == 1


def test_keep_warm_expires(start_server):
    srv, api = start_server("--keep-warm", "1")
    a = api.new_session()
    assert api.post_lab(a)[0] == 200
    workdir = up_dirs(srv)[0]
    t0 = time.monotonic()
    assert api.delete_session(a) == 204
    assert api.lab_state() == "running"
    wait_until(lambda: calls_of(srv, "down"), 6, what="keep-warm expiry teardown")
    assert time.monotonic() - t0 >= 0.9
    api.wait_lab_state("stopped")
    assert calls_of(srv, "down")[0]["cwd"] == workdir
    assert lab_dirs(srv) == []
    # the next session gets a fresh lab
    b = api.new_session()
    assert api.post_lab(b)[1]["reused"] is False


# ------------------------------------------------------------------------------------------
# a teardown that raises (not a netlab failure) must not leave the lab stuck
# ------------------------------------------------------------------------------------------


def test_a_teardown_that_cannot_even_run_leaves_no_lab_stuck(tmp_path, monkeypatch):
    """`netlab down` that raises something else than NetlabError (here what starting its output
    reader threads raises when no thread can be had) must be logged like a failed down; it left
    an acquire's lab in "stopping" for good (every later acquire waited forever)."""
    sys.path.insert(0, str(ROOT))
    import remote_lab

    class NoThreadForDown(remote_lab.NetlabRunner):
        def run(self, args, cwd, timeout, check=True, ctx="-"):
            if args[0] == "down":
                raise RuntimeError("can't start new thread")
            return super().run(args, cwd, timeout, check, ctx)

    monkeypatch.setenv("FAKE_NETLAB_DIR", str(tmp_path / "fake"))
    settings = remote_lab.Settings(state_dir=str(tmp_path / "state"))
    runner = NoThreadForDown([sys.executable, str(FAKE_NETLAB)], 30, 30, False)
    lab = remote_lab.Lab(runner, settings, lambda sid: True)
    old = tmp_path / "state" / "labs" / "lab-old"
    old.mkdir(parents=True)
    lab.info = remote_lab.LabInfo(state=remote_lab.RUNNING, workdir=str(old), topology="old.yml",
                                  fingerprint="old", ref_count=0)
    body, ctype = build_multipart({}, [("topology", "mapping.yml", MAPPING)])
    upload = remote_lab.receive_upload(io.BytesIO(body), {"Content-Type": ctype,
                                                          "Content-Length": str(len(body))},
                                       settings.labs_dir, 1 << 20)
    reused, devices = lab.acquire("s1", upload, True)  # tears the idle old lab down first
    assert reused is False and len(devices) == 3
    assert lab.snapshot()["state"] == remote_lab.RUNNING
    assert not old.exists()  # netlab never knew it (no snapshot): removed
    lab.session_ended("s1")
    assert lab.wait_idle(10) and lab.snapshot()["state"] == remote_lab.STOPPED
    assert list(lab.unclean) == [upload.workdir]  # netlab still knows it: kept for a retry
