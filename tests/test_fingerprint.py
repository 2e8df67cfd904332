"""The client's lab_fingerprint() is the fingerprint the server computes for the same upload
(issue 13: a session declares the lab it will ask for). Real server, fake netlab."""
import pytest

from client_support import SIMPLE, clean_env, client, health, rlc, servers, srv  # noqa: F401

pytestmark = pytest.mark.timeout(60)


def test_the_clients_fingerprint_is_the_servers(srv, tmp_path):
    lab = tmp_path / "lab"
    (lab / "nodes").mkdir(parents=True)
    topo = lab / "simple.yml"
    topo.write_bytes(SIMPLE.read_bytes())
    (lab / "nodes" / "r1.yml").write_text("hostname: r1\n")
    (lab / "banner.j2").write_text("hello\n")
    outside = tmp_path / "vars.yml"
    outside.write_text("x: 1\n")
    extra = ["nodes", "banner.j2", str(outside), ("templates/b.j2", str(lab / "banner.j2"))]
    with client(srv.url) as c:
        c.acquire(topo, extra_files=extra)
        server_side = health(srv)["lab"]["fingerprint"]
        assert server_side == rlc.lab_fingerprint(topo, extra)
        c.release()
    assert rlc.lab_fingerprint(topo, list(reversed(extra))) == rlc.lab_fingerprint(topo, extra)
    plain = rlc.lab_fingerprint(topo)
    assert plain != rlc.lab_fingerprint(topo, extra)
    (lab / "banner.j2").write_text("changed\n")
    assert rlc.lab_fingerprint(topo, extra) != server_side
    assert len(plain) == 64 and int(plain, 16) >= 0
