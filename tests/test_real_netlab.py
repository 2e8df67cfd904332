"""The server against REAL netlab (PyPI `networklab`), no Docker needed.

Skipped only when netlab is absent: we look for ``$REMOTE_LAB_NETLAB_VENV/bin/netlab`` (default
``~/.cache/remote-lab/netlab-venv``, installed by ``.ci/netlab-venv.sh``), then ``netlab`` on PATH.

How it runs for real without containers (see shared notes netlab-cli.md / testing-tips.md):
- the ``external`` provider, and a two-line wrapper passed as the server's ``--netlab`` that adds
  ``-q --no-config`` to ``up`` (no Ansible; plain ``up`` on external prompts and crashes);
- a private ``HOME`` for the server process, so netlab's ``~/.netlab/status.yaml`` registry (the
  ``default`` instance) is isolated from the machine's and from other tests;
- ``provider: clab`` fails at ``up`` in ~1-2 s without containerlab, *after* registering
  ``default``: the real failure path (the trap the server must clean up).
"""
import json
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import ServerProcess, http
from server_support import Api, lab_dirs


def find_netlab():
    venv = os.environ.get("REMOTE_LAB_NETLAB_VENV") or os.path.join(
        os.path.expanduser("~"), ".cache", "remote-lab", "netlab-venv")
    candidate = os.path.join(venv, "bin", "netlab")
    if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
        return candidate
    return shutil.which("netlab")


NETLAB = find_netlab()

pytestmark = [
    pytest.mark.real_netlab,
    pytest.mark.timeout(120),
    pytest.mark.skipif(NETLAB is None, reason="real netlab not installed "
                       "(run .ci/netlab-venv.sh or set REMOTE_LAB_NETLAB_VENV)"),
]

GOOD = b"""\
provider: external
defaults.device: frr
defaults.multilab.id: default
nodes: [r1, r2]
links: [r1-r2]
"""

# clab without containerlab: `up` creates its files, registers `default`, then fails (rc 1)
FAILING = b"""\
provider: clab
defaults.device: frr
defaults.multilab.id: default
nodes: [r1, r2]
links: [r1-r2]
"""

# needs files relative to the topology: nodes/*.yml via _include, and defaults/site.yml
WITH_EXTRAS = b"""\
provider: external
defaults.device: frr
defaults.multilab.id: default
defaults.sources.extra: [defaults/site.yml]
nodes:
  _include: [nodes/*.yml]
links: [r1-r2]
"""
EXTRAS = [("nodes/r1.yml", b"id: 11\n"),
          ("nodes/r2.yml", b"id: 12\n"),
          ("defaults/site.yml", b"addressing:\n  mgmt:\n    ipv4: 192.168.77.0/24\n")]


class RealNetlab:
    """Paths of one test's private netlab world: the wrapper, HOME, and helpers to inspect it."""

    def __init__(self, tmp_path):
        self.tmp = Path(tmp_path)
        self.home = self.tmp / "home"
        self.home.mkdir()
        self.wrapper = self.tmp / "netlab-wrapper"
        self.wrapper.write_text(
            "#!/bin/sh\n"
            'if [ "$1" = up ]; then shift; exec %s up -q --no-config "$@"; fi\n'
            'exec %s "$@"\n' % (NETLAB, NETLAB))
        self.wrapper.chmod(0o755)
        self.env = {"HOME": str(self.home)}

    def server(self, *args):
        return ServerProcess(self.tmp, *args, netlab=self.wrapper, env=self.env)

    def status(self, *args):
        """`netlab status ARGS` with the private HOME: (rc, combined output)."""
        env = dict(os.environ, HOME=str(self.home))
        p = subprocess.run([NETLAB, "status"] + list(args), stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, env=env, cwd=str(self.tmp), timeout=60)
        return p.returncode, p.stdout.decode(errors="replace")

    def registry_text(self):
        path = self.home / ".netlab" / "status.yaml"
        return path.read_text() if path.exists() else ""

    def assert_no_lab_registered(self):
        rc, out = self.status()
        assert rc == 1 and "No netlab-managed labs" in out, (rc, out, self.registry_text())
        assert "default" not in self.registry_text()


@pytest.fixture
def real(tmp_path):
    return RealNetlab(tmp_path)


def new_session(srv):
    status, body, _ = http("POST", srv.url + "/session")
    assert status == 201, body
    assert body["position"] == 0
    return body["session_id"]


def post_lab(srv, sid, topology, extras=(), reuse="true", name="topology.yml"):
    """POST /lab, real netlab behind it: (status, answer, seconds it took)."""
    t0 = time.monotonic()
    status, resp = Api(srv).post_lab(sid, topology, name, extras, reuse, timeout=100)
    return status, resp, time.monotonic() - t0


def start_good_lab(srv):
    """A new session gets the GOOD lab up: (session id, POST /lab answer)."""
    sid = new_session(srv)
    status, resp, _ = post_lab(srv, sid, GOOD)
    assert status == 200, (resp, srv.log())
    return sid, resp


def wait_teardown(srv, timeout=60):
    """Teardown is asynchronous: wait until no lab dir is left and the lab is stopped."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, health, _ = http("GET", srv.url + "/debug/health")
        if not lab_dirs(srv) and health["lab"]["state"] == "stopped":
            return health
        time.sleep(0.1)
    raise AssertionError("lab not torn down: dirs %s\n%s" % (lab_dirs(srv), srv.log()))


def check_devices(devices):
    assert [d["name"] for d in devices] == ["r1", "r2"]
    for d in devices:
        raw = d["raw"]
        # netlab's own node data as Ansible sees it (inspect --node N): no `name` key, but
        # ansible_* host vars, mgmt, interfaces (the topology view `inspect nodes` has no ansible_*)
        assert raw["_netlab_version"]
        assert raw["ansible_network_os"] == "frr"
        assert raw["ansible_host"] == raw["mgmt"]["ipv4"]
        assert raw["interfaces"][0]["neighbors"][0]["node"] == ("r2" if d["name"] == "r1" else "r1")
    return {d["name"]: d["raw"] for d in devices}


def test_full_cycle_external_provider(real):
    with real.server() as srv:
        sid = new_session(srv)
        status, resp, took = post_lab(srv, sid, GOOD)
        assert status == 200, (resp, srv.log())
        assert resp["reused"] is False
        raws = check_devices(resp["devices"])
        assert raws["r1"]["id"] == 1 and raws["r2"]["id"] == 2

        # the lab really is up: registered in netlab's (private) status registry, in our lab dir
        dirs = lab_dirs(srv)
        assert len(dirs) == 1
        registry = real.registry_text()
        assert "default:" in registry and dirs[0] in registry, registry
        labdir = srv.state_dir / "labs" / dirs[0]
        assert (labdir / "netlab.snapshot.pickle").exists()
        assert (labdir / "topology.yml").read_bytes() == GOOD

        status, devices, _ = http("GET", srv.url + "/lab/devices", headers={"X-Session-ID": sid})
        assert status == 200 and devices == resp["devices"]
        status, lab, _ = http("GET", srv.url + "/lab", headers={"X-Session-ID": sid})
        assert status == 200 and lab["running"] is True and lab["ref_count"] == 1

        status, _, _ = http("POST", srv.url + "/lab/release", headers={"X-Session-ID": sid})
        assert status == 204
        status, _, _ = http("DELETE", srv.url + "/session/" + sid)
        assert status == 204

        health = wait_teardown(srv)
        assert health["netlab_failures"] == {}, srv.log()
        assert health["netlab_calls"] == {"up": 1, "inspect": 3, "down": 1}, health
        real.assert_no_lab_registered()
        print("\nreal netlab: POST /lab (up + inspects) took %.2f s" % took)
    assert "Traceback" not in srv.log()


def test_failed_up_then_good_topology(real):
    with real.server() as srv:
        sid = new_session(srv)
        status, resp, took = post_lab(srv, sid, FAILING, name="broken.yml")
        assert status == 502, (status, resp, srv.log())
        detail = resp["detail"]
        assert "netlab up" in detail and "netlab output" in detail
        assert "Containerlab is not installed" in detail, detail  # netlab's own words
        # the failed lab was cleaned: `down --cleanup --force` in its dir, then the dir removed
        assert lab_dirs(srv) == []
        assert "default" not in real.registry_text(), real.registry_text()
        print("\nreal netlab: failing up answered in %.2f s" % took)

        # same session may try again: the stale `default` must not block the next `up`
        status, resp, took = post_lab(srv, sid, GOOD)
        assert status == 200, (resp, srv.log())
        check_devices(resp["devices"])
        status, _, _ = http("DELETE", srv.url + "/session/" + sid)
        assert status == 204
        wait_teardown(srv)

        # and a failure followed by a good topology in the NEXT session
        sid = new_session(srv)
        status, resp, _ = post_lab(srv, sid, FAILING, name="broken.yml")
        assert status == 502
        http("DELETE", srv.url + "/session/" + sid)
        sid2 = new_session(srv)
        status, resp, _ = post_lab(srv, sid2, GOOD)
        assert status == 200, (resp, srv.log())
        check_devices(resp["devices"])
        http("DELETE", srv.url + "/session/" + sid2)
        wait_teardown(srv)
        real.assert_no_lab_registered()


def test_extra_files_in_subdirectories(real):
    with real.server() as srv:
        sid = new_session(srv)
        # without the extra files netlab cannot find nodes/*.yml: up fails, nothing leaks
        status, resp, _ = post_lab(srv, sid, WITH_EXTRAS)
        assert status == 502, (resp, srv.log())
        assert "nodes/*.yml" in resp["detail"], resp["detail"]
        assert lab_dirs(srv) == []

        status, resp, _ = post_lab(srv, sid, WITH_EXTRAS, extras=EXTRAS)
        assert status == 200, (resp, srv.log())
        raws = check_devices(resp["devices"])
        assert raws["r1"]["id"] == 11 and raws["r2"]["id"] == 12  # from nodes/r1.yml, r2.yml
        assert raws["r1"]["mgmt"]["ipv4"].startswith("192.168.77.")  # from defaults/site.yml
        labdir = srv.state_dir / "labs" / lab_dirs(srv)[0]
        assert (labdir / "nodes" / "r1.yml").read_bytes() == b"id: 11\n"
        http("DELETE", srv.url + "/session/" + sid)
        wait_teardown(srv)
        real.assert_no_lab_registered()


def test_server_shutdown_with_teardown_on_exit_tears_real_lab_down(real):
    srv = real.server("--teardown-on-exit").start()
    try:
        start_good_lab(srv)
    finally:
        rc = srv.stop()
    assert rc == 0, srv.log()
    assert lab_dirs(srv) == []
    real.assert_no_lab_registered()


def test_restart_after_crash_cleans_stale_real_lab(real):
    """A server killed with a real lab up leaves its dir and netlab's `default` registered; a
    next server that has no saved state for it (the database lost with the crash) runs
    `down --cleanup --force` there, and `up` works again."""
    first = real.server().start()
    try:
        start_good_lab(first)
    finally:
        first.stop(sig=signal.SIGKILL)
    stale = lab_dirs(first)
    assert len(stale) == 1 and stale[0] in real.registry_text()
    for db in first.state_dir.glob("state.db*"):
        db.unlink()

    (real.tmp / "second").mkdir()
    second = ServerProcess(real.tmp / "second", "--state-dir", first.state_dir,
                           netlab=real.wrapper, env=real.env)
    with second:
        sid, resp = start_good_lab(second)  # waits for the start-up cleanup
        check_devices(resp["devices"])
        assert stale[0] not in lab_dirs(first)
        http("DELETE", second.url + "/session/" + sid)
        wait_teardown(second)
        real.assert_no_lab_registered()
    assert "cleaning up lab dir left from a previous run" in second.log()


def test_restart_after_crash_adopts_the_running_real_lab(real):
    """SIGKILL with a real lab up: the next server on the same state dir adopts it (netlab
    still shows it; a reuse=true acquire is `reused` with no new `up`); a normal session end
    then tears it down and netlab's registry is empty."""
    first = real.server().start()
    try:
        sid, resp = start_good_lab(first)
    finally:
        first.stop(sig=signal.SIGKILL)
    labdir = first.state_dir / "labs" / lab_dirs(first)[0]
    (real.tmp / "second").mkdir()
    second = ServerProcess(real.tmp / "second", "--state-dir", first.state_dir,
                           netlab=real.wrapper, env=real.env)
    with second:
        rc, out = real.status("--all", "--format", "json")
        assert rc == 0 and json.loads(out)["default"]["dir"] == str(labdir), out  # still up
        status, lab, _ = http("GET", second.url + "/lab", headers={"X-Session-ID": sid})
        assert status == 200 and lab["running"] is True and lab["ref_count"] == 1, lab
        status, again, _ = post_lab(second, sid, GOOD)
        assert status == 200 and again["reused"] is True, again
        assert again["devices"] == resp["devices"]
        assert "running netlab up" not in second.log()
        assert "netlab status --all --format json" in second.log()
        http("DELETE", second.url + "/session/" + sid)
        wait_teardown(second)
        real.assert_no_lab_registered()
    assert "restored the state of a crash" in second.log()


OTHER = b"""\
provider: external
defaults.device: frr
nodes: [x1, x2, x3]
links: [x1-x2, x2-x3]
"""


def test_two_topologies_run_at_once_in_two_slots(real):
    """--slots 2: each slot's lab is its own multilab instance (ids 1 and 2), with its own
    management subnet; both go at the end, and netlab's registry is empty."""
    import threading
    with real.server("--slots", "2") as srv:
        a, b = new_session(srv), new_session(srv)
        answers = {}
        threads = [threading.Thread(target=lambda s=s, t=t: answers.__setitem__(
            s, post_lab(srv, s, t))) for s, t in ((a, GOOD), (b, OTHER))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(100)
        (sa, ra, _), (sb, rb, _) = answers[a], answers[b]
        assert sa == 200 and sb == 200, (ra, rb, srv.log())
        check_devices(ra["devices"])
        assert [d["name"] for d in rb["devices"]] == ["x1", "x2", "x3"]
        assert {d["raw"]["mgmt"]["ipv4"].rsplit(".", 1)[0] for d in ra["devices"]} == \
            {"192.168.1"}
        assert {d["raw"]["mgmt"]["ipv4"].rsplit(".", 1)[0] for d in rb["devices"]} == \
            {"192.168.2"}
        rc, out = real.status("--all", "--format", "json")
        registry = json.loads(out)
        assert sorted(registry) == ["1", "2"], out
        assert {k: (Path(v["dir"]).parent.name, v["status"]) for k, v in registry.items()} \
            == {"1": ("slot-1", "started"), "2": ("slot-2", "started")}
        for sid in (a, b):
            assert http("POST", srv.url + "/lab/release", headers={"X-Session-ID": sid})[0] == 204
            assert http("DELETE", srv.url + "/session/" + sid)[0] == 204
        deadline = time.monotonic() + 60
        while list((srv.state_dir / "labs").glob("slot-*/lab-*")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not list((srv.state_dir / "labs").glob("slot-*/lab-*")), srv.log()
        health = http("GET", srv.url + "/debug/health")[1]
        assert health["netlab_failures"] == {}, srv.log()
        assert health["netlab_calls"]["up"] == 2 and health["netlab_calls"]["down"] == 2
        real.assert_no_lab_registered()
    assert "Traceback" not in srv.log()
