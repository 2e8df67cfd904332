"""POST /lab/check (issue 13 item 3): netlab validates an upload early, in a scratch dir under
the state dir, for any session or none; the lab itself is not touched."""
import os
import threading

from helpers import wait_until
from server_support import (api, shared_server, srv,  # noqa: F401 (fixtures)
                            SIMPLE, TOKENS, build_multipart, calls_of, lab_dirs, start_server,
                            write_auth_file)  # noqa: F401 (fixture)

shared = shared_server("check", "--max-upload-mb", "1")

BROKEN = b"provider: clab\ndefaults.device: frr\nnodes: [r1, r2]\nlinks: [r1-r3]\n"


def check(api, topology=SIMPLE, name="simple.yml", extras=(), fields=None, sid=None,
          headers=None):
    files = [("topology", name, topology)] + [("extra_files", n, d) for n, d in extras]
    body, ctype = build_multipart(fields or {}, files)
    hdrs = {"Content-Type": ctype}
    hdrs.update(headers or {})
    status, data, _ = api.req("POST", "/lab/check", sid, body, hdrs, timeout=30)
    return status, data


def checks_dir(srv):
    path = srv.state_dir / "checks"
    return sorted(os.listdir(path)) if path.exists() else []


def test_a_good_topology_answers_its_nodes_from_netlab_create_in_a_scratch_dir(api, srv):
    n = len(srv.calls())
    status, body = check(api, fields={"reuse": "false"},  # reuse: allowed and ignored
                         extras=[("nodes/extra.yml", b"x: 1\n")])
    assert (status, body) == (200, {"ok": True, "nodes": ["r1", "r2"]})
    calls = srv.calls()[n:]
    assert [c["argv"] for c in calls] == [["create", "-o", "json:nodes=-", "./simple.yml"]]
    scratch = calls[0]["cwd"]
    assert os.path.dirname(scratch) == str(srv.state_dir / "checks")
    assert calls[0]["stdin"] == "/dev/null"
    assert not os.path.exists(scratch) and checks_dir(srv) == []
    assert lab_dirs(srv) == [] and api.lab_state() == "stopped"  # the lab is not touched


def test_a_broken_topology_answers_422_with_netlabs_error_tail(api, srv):
    status, body = check(api, BROKEN, "broken.yml")
    assert status == 422, body
    assert body["detail"].startswith("netlab rejects broken.yml:")
    assert "refers to an unknown node r3" in body["detail"]
    assert checks_dir(srv) == []
    assert "netlab create failed" not in str(api.req("GET", "/status")[1])


def test_bad_uploads_get_the_same_400_and_413_as_post_lab(api, srv):
    n = len(srv.calls())
    assert check(api, name="lab.txt")[0] == 400
    assert check(api, name="../x.yml")[0] == 400
    status, body, _ = api.req("POST", "/lab/check", body=b"{}",
                              headers={"Content-Type": "application/json"})
    assert status == 400 and "multipart/form-data" in body["detail"]
    assert check(api, fields={"bogus": "1"})[0] == 400
    status, body = check(api, b"x" * (2 * 1024 * 1024))
    assert status == 413, body
    assert calls_of(srv, "create", n) == [] and checks_dir(srv) == []


def test_a_waiting_session_may_check_and_so_may_no_session(api, srv):
    holder = api.new_session()
    waiting = api.new_session()
    assert api.session(waiting)[1]["status"] == "waiting"
    assert check(api, sid=waiting)[0] == 200
    assert check(api)[0] == 200
    assert check(api, sid="not-a-session")[0] == 200  # X-Session-ID is not looked at
    assert api.session(waiting)[1]["status"] == "waiting"
    assert api.session(holder)[1]["status"] == "active"


def test_at_most_two_checks_run_at_once_a_third_gets_429(api, srv):
    srv.switch("create_delay", value="2")
    try:
        results = []
        threads = [threading.Thread(target=lambda: results.append(check(api)[0]))
                   for _ in range(2)]
        for t in threads:
            t.start()
        wait_until(lambda: len(calls_of(srv, "create")) >= 2 and
                   sum(1 for c in calls_of(srv, "create") if os.path.exists(c["cwd"])) == 2,
                   10, what="two checks running")
        status, body = check(api)
        assert status == 429 and "too many topology checks" in body["detail"], body
        for t in threads:
            t.join(20)
        assert results == [200, 200]
    finally:
        srv.switch("create_delay", on=False)
    assert check(api)[0] == 200
    assert checks_dir(srv) == []


def test_with_an_auth_file_a_check_needs_a_token(start_server, tmp_path):
    auth = write_auth_file(tmp_path / "users")
    srv, api = start_server("--auth-file", auth)
    status, body = check(api)
    assert status == 401, body
    assert check(api.as_user(TOKENS["bob"]))[0] == 200
    alice = api.as_user(TOKENS["alice"])
    sid = alice.new_session()
    assert check(api.as_user(TOKENS["bob"]), sid=sid)[0] == 200  # not looked at: no 403


def test_a_scratch_dir_left_by_a_crash_is_removed_at_start(start_server, tmp_path):
    stale = tmp_path / "state" / "checks" / "lab-0123456789ab"
    stale.mkdir(parents=True)
    (stale / "topology.yml").write_text("nodes: [r1]\n")
    srv, api = start_server()
    assert check(api)[0] == 200
    assert not stale.exists() and checks_dir(srv) == []
