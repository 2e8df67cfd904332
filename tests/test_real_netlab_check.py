"""POST /lab/check against REAL netlab (see tests/test_real_netlab.py for how it is found and
isolated): `netlab create` accepts a good topology (its node names), rejects a broken one with
its own error, writes nothing and registers no instance."""
import pytest

from helpers import ServerProcess
from server_support import Api, build_multipart
from test_real_netlab import EXTRAS, GOOD, NETLAB, WITH_EXTRAS, RealNetlab

pytestmark = [
    pytest.mark.real_netlab,
    pytest.mark.timeout(120),
    pytest.mark.skipif(NETLAB is None, reason="real netlab not installed "
                       "(run .ci/netlab-venv.sh or set REMOTE_LAB_NETLAB_VENV)"),
]

BROKEN = b"provider: clab\ndefaults.device: frr\nnodes: [r1, r2]\nlinks: [r1-r3]\n"


def check(api, topology, extras=()):
    files = [("topology", "topology.yml", topology)] + [("extra_files", n, d) for n, d in extras]
    body, ctype = build_multipart({}, files)
    return api.req("POST", "/lab/check", body=body, headers={"Content-Type": ctype},
                   timeout=100)[:2]


def test_real_netlab_checks_a_good_and_a_broken_topology(tmp_path):
    real = RealNetlab(tmp_path)
    with ServerProcess(tmp_path, netlab=NETLAB, env=real.env) as srv:
        api = Api(srv)
        assert check(api, GOOD) == (200, {"ok": True, "nodes": ["r1", "r2"]})
        assert check(api, WITH_EXTRAS, EXTRAS) == (200, {"ok": True, "nodes": ["r1", "r2"]})
        status, body = check(api, BROKEN)
        assert status == 422, body
        assert "Link string r1-r3 in links[1] refers to an unknown node r3" in body["detail"]
        assert not (srv.state_dir / "checks").exists() or \
            list((srv.state_dir / "checks").iterdir()) == []
        assert api.lab_state() == "stopped"
    real.assert_no_lab_registered()
