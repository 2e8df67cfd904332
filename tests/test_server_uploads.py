"""POST /lab uploads: safe names, malformed bodies, size limit, relative dirs, streaming parser."""
import hashlib
import os
import random
import socket
from pathlib import Path

import pytest

from helpers import file_size_limit
from server_support import (api, shared_server, srv, start_server,  # noqa: F401 (fixtures)
                            SIMPLE, lab_dirs, parse_raw_response, raw_http,
                            up_dirs)

MAX_MB = 0.3
MAX_BYTES = int(MAX_MB * 1024 * 1024)


shared = shared_server("uploads", "--max-upload-mb", MAX_MB)


def tree(root):
    """Every path under ``root`` except the files a running server legitimately appends to."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.relpath(os.path.join(dirpath, name), root)
            out.add(p)
    return out


def post_raw_multipart(api, sid, body, ctype):
    return api.req("POST", "/lab", sid, body, {"Content-Type": ctype})[:2]


def part(boundary, name, filename, content, disposition=None):
    disp = disposition or 'form-data; name="%s"; filename="%s"' % (name, filename)
    return (b"--" + boundary + b"\r\nContent-Disposition: " + disp.encode("utf-8", "surrogateescape")
            + b"\r\nContent-Type: application/octet-stream\r\n\r\n" + content + b"\r\n")


# ------------------------------------------------------------------------------------------
# traversal and bad names: 400 and nothing written anywhere
# ------------------------------------------------------------------------------------------

STRAY = "remote-lab-stray-file"
BAD_EXTRA_NAMES = [
    "../" + STRAY, "../../" + STRAY, "../../../" + STRAY, "../../../../" + STRAY,
    "nodes/../../" + STRAY, "/etc/" + STRAY, "/tmp/" + STRAY, "a\\b", "..\\..\\" + STRAY,
    "a//b", "a/./b", "./" + STRAY, "a/b/", "..", ".", "a\x00b", "\x00", "a\nb", "",
]
BAD_TOPOLOGY_NAMES = [
    "../%s.yml" % STRAY, "../../../%s.yml" % STRAY, "/tmp/%s.yml" % STRAY, "a\\%s.yml" % STRAY,
    "sub//%s.yml" % STRAY, "sub/./%s.yml" % STRAY, "%s\x00.yml" % STRAY, "../x/../%s.yml" % STRAY,
]


def with_quotings(names):
    """Each name quoted as remote_lab_client/requests/curl do; backslash names also as browsers
    send them (a lone backslash inside the quoted filename)."""
    return [(n, True) for n in names] + [(n, False) for n in names if "\\" in n]


def quoting_id(value):
    if isinstance(value, bool):
        return "client-quoting" if value else "browser-quoting"
    return repr(value)


def _assert_nothing_written(srv, before):
    root = srv.tmp
    after = tree(root)
    new = {p for p in after - before if not p.startswith("fake-netlab") and p != "state/labs"}
    assert new == set(), "files appeared: %s" % sorted(new)
    assert lab_dirs(srv) == []
    for base in ("/tmp", "/etc", str(root.parent), "/"):
        assert not os.path.exists(os.path.join(base, STRAY))
        assert not os.path.exists(os.path.join(base, STRAY + ".yml"))


@pytest.mark.parametrize("name,escape", with_quotings(BAD_EXTRA_NAMES), ids=quoting_id)
def test_bad_extra_file_name_400_nothing_written(api, srv, name, escape):
    sid = api.new_session()
    n_calls = len(srv.calls())
    before = tree(srv.tmp)
    status, body = api.post_lab(sid, extras=[("nodes/ok.yml", b"ok\n"), (name, b"evil\n")],
                                escape=escape)
    assert status == 400, (name, body)
    assert isinstance(body["detail"], str) and body["detail"]
    _assert_nothing_written(srv, before)
    assert len(srv.calls()) == n_calls  # netlab never ran
    assert api.session(sid)[1]["status"] == "active"


@pytest.mark.parametrize("name,escape", with_quotings(BAD_TOPOLOGY_NAMES), ids=quoting_id)
def test_bad_topology_name_400_nothing_written(api, srv, name, escape):
    sid = api.new_session()
    n_calls = len(srv.calls())
    before = tree(srv.tmp)
    status, body = api.post_lab(sid, SIMPLE, name, extras=[("banner.j2", b"hi\n")],
                                escape=escape)
    assert status == 400, (name, body)
    assert body["detail"]
    _assert_nothing_written(srv, before)
    assert len(srv.calls()) == n_calls


def test_percent_encoded_traversal_filename_star_400(api, srv):
    sid = api.new_session()
    before = tree(srv.tmp)
    b = b"----b0undary"
    body = (part(b, "topology", "simple.yml", SIMPLE)
            + part(b, None, None, b"evil",
                   "form-data; name=\"extra_files\"; filename*=utf-8''..%2F..%2F" + STRAY)
            + b"--" + b + b"--\r\n")
    status, resp = post_raw_multipart(api, sid, body, "multipart/form-data; boundary=" + b.decode())
    assert status == 400, resp
    _assert_nothing_written(srv, before)


@pytest.mark.parametrize("name", ["topology.txt", "topo.json", "topo", "topo.yml.txt",
                                  "yml", "topo.yml.bak", "topo.ym"])
def test_non_yaml_topology_400(api, srv, name):
    sid = api.new_session()
    n_calls = len(srv.calls())
    status, body = api.post_lab(sid, SIMPLE, name)
    assert status == 400, body
    assert "yml" in body["detail"] or "yaml" in body["detail"]
    assert lab_dirs(srv) == []
    assert len(srv.calls()) == n_calls


# ------------------------------------------------------------------------------------------
# malformed bodies
# ------------------------------------------------------------------------------------------

B = b"XyZzY-boundary-1234"
CT = "multipart/form-data; boundary=" + B.decode()
GOOD_TOPO = part(B, "topology", "simple.yml", SIMPLE)
END = b"--" + B + b"--\r\n"

MALFORMED = {
    "no-boundary-in-body": (CT, b"just some bytes, no delimiter at all\r\n" * 10),
    "wrong-boundary": (CT, part(b"other", "topology", "simple.yml", SIMPLE) + b"--other--\r\n"),
    "missing-closing-boundary": (CT, b"--" + B + b"\r\nContent-Disposition: form-data; "
                                 b"name=\"topology\"; filename=\"simple.yml\"\r\n\r\n" + SIMPLE),
    "truncated-part-headers": (CT, b"--" + B + b"\r\nContent-Disposition: form-data; name=\"topo"),
    "truncated-after-boundary": (CT, GOOD_TOPO + b"--" + B),
    "garbage-after-boundary": (CT, b"--" + B + b"GARBAGE\r\n" + GOOD_TOPO + END),
    "no-content-disposition": (CT, b"--" + B + b"\r\nContent-Type: text/plain\r\n\r\nx\r\n"
                               + GOOD_TOPO + END),
    "not-form-data": (CT, b"--" + B + b"\r\nContent-Disposition: attachment; name=\"x\"\r\n\r\n"
                      b"x\r\n" + GOOD_TOPO + END),
    "header-without-colon": (CT, b"--" + B + b"\r\nthis is not a header\r\n\r\nx\r\n"
                             + GOOD_TOPO + END),
    "part-without-name": (CT, GOOD_TOPO + part(B, None, None, b"x", "form-data; filename=\"a.j2\"")
                          + END),
    "unknown-field": (CT, GOOD_TOPO + part(B, None, None, b"x", "form-data; name=\"bogus\"") + END),
    "unknown-file-field": (CT, GOOD_TOPO + part(B, "bogus", "a.j2", b"x") + END),
    "missing-topology": (CT, part(B, "extra_files", "a.j2", b"x") + END),
    "only-closing-boundary": (CT, END),
    "empty-body": (CT, b""),
    "two-topologies": (CT, GOOD_TOPO + part(B, "topology", "other.yml", SIMPLE) + END),
    "topology-without-filename": (CT, part(B, None, None, SIMPLE, "form-data; name=\"topology\"")
                                  + END),
    "duplicate-extra-file": (CT, GOOD_TOPO + part(B, "extra_files", "a/b.j2", b"1")
                             + part(B, "extra_files", "a/b.j2", b"2") + END),
    "file-where-dir-is-needed": (CT, GOOD_TOPO + part(B, "extra_files", "a", b"1")
                                 + part(B, "extra_files", "a/b.j2", b"2") + END),
    "extra-named-like-topology": (CT, GOOD_TOPO + part(B, "extra_files", "simple.yml", b"1") + END),
    "bad-reuse-value": (CT, GOOD_TOPO + part(B, None, None, b"maybe", "form-data; name=\"reuse\"")
                        + END),
    "huge-part-headers": (CT, b"--" + B + b"\r\nX-Filler: " + b"a" * 40000 + b"\r\n\r\nx\r\n" + END),
    "not-multipart": ("application/json", b'{"topology": "simple.yml"}'),
    "urlencoded": ("application/x-www-form-urlencoded", b"topology=simple.yml"),
    "no-boundary-param": ("multipart/form-data", GOOD_TOPO + END),
    "empty-boundary-param": ("multipart/form-data; boundary=", GOOD_TOPO + END),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_multipart_400(api, srv, case):
    ctype, body = MALFORMED[case]
    sid = api.new_session()
    n_calls = len(srv.calls())
    status, resp = post_raw_multipart(api, sid, body, ctype)
    assert status == 400, (case, resp)
    assert isinstance(resp, dict) and resp["detail"]
    assert lab_dirs(srv) == []
    assert len(srv.calls()) == n_calls  # netlab never ran
    # the server and the session are fine afterwards
    assert api.session(sid) == (200, {"session_id": sid, "status": "active", "position": 0})


def test_body_shorter_than_content_length_400(api, srv):
    sid = api.new_session()
    body = GOOD_TOPO + END
    head = ("POST /lab HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Session-ID: %s\r\nContent-Type: %s\r\n"
            "Content-Length: %d\r\n\r\n" % (sid, CT, len(body) + 5000)).encode()
    raw = raw_http(srv.port, head + body)  # then half-close: the body ends early
    status, resp = parse_raw_response(raw)
    assert status == 400, resp
    assert lab_dirs(srv) == []


def test_chunked_upload_without_content_length_400(api, srv):
    sid = api.new_session()
    body = GOOD_TOPO + END
    head = ("POST /lab HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Session-ID: %s\r\nContent-Type: %s\r\n"
            "Transfer-Encoding: chunked\r\n\r\n" % (sid, CT)).encode()
    chunked = b"%x\r\n" % len(body) + body + b"\r\n0\r\n\r\n"
    status, resp = parse_raw_response(raw_http(srv.port, head + chunked))
    assert status == 400, resp
    assert lab_dirs(srv) == []


def test_invalid_content_length_400(api, srv):
    sid = api.new_session()
    head = ("POST /lab HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Session-ID: %s\r\nContent-Type: %s\r\n"
            "Content-Length: -5\r\n\r\n" % (sid, CT)).encode()
    status, resp = parse_raw_response(raw_http(srv.port, head))
    assert status == 400, resp
    assert lab_dirs(srv) == []


# ------------------------------------------------------------------------------------------
# size limit
# ------------------------------------------------------------------------------------------


def test_declared_too_large_413_without_reading_the_body(api, srv):
    sid = api.new_session()
    head = ("POST /lab HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Session-ID: %s\r\nContent-Type: %s\r\n"
            "Content-Length: %d\r\n\r\n" % (sid, CT, 10 * 1024 ** 3)).encode()
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=5)
    try:
        s.sendall(head + b"--" + B)  # a 10 GiB promise: the answer comes before the body
        raw = b""
        while b"\r\n\r\n" not in raw or len(raw.split(b"\r\n\r\n", 1)[1]) < 10:
            chunk = s.recv(65536)
            if not chunk:
                break
            raw += chunk
    finally:
        s.close()
    status, resp = parse_raw_response(raw)
    assert status == 413, resp
    assert "limit" in resp["detail"] or "large" in resp["detail"]
    assert lab_dirs(srv) == []


def test_real_too_large_upload_413(api, srv):
    sid = api.new_session()
    n_calls = len(srv.calls())
    before = tree(srv.tmp)
    big = os.urandom(MAX_BYTES + 1024)
    status, body = api.post_lab(sid, extras=[("big.bin", big)])
    assert status == 413, body
    assert body["detail"]
    _assert_nothing_written(srv, before)
    assert len(srv.calls()) == n_calls
    assert api.session(sid)[1]["status"] == "active"


def test_disk_full_503_with_a_clear_detail_and_nothing_kept(start_server):
    with file_size_limit(128 * 1024):  # the server's files cannot grow past 128 KiB
        srv, api = start_server(sub="small-disk")
    sid = api.new_session()
    status, body = api.post_lab(sid, extras=[("big.bin", os.urandom(256 * 1024))])
    assert status == 503, body
    assert body["detail"].startswith("no room to store the upload"), body
    assert "File too large" in body["detail"]  # the system's own words (EFBIG here)
    assert lab_dirs(srv) == []
    assert "Traceback" not in srv.log()  # an expected condition, not a server bug
    status, body = api.post_lab(sid)  # what fits is still accepted
    assert (status, body["reused"]) == (200, False), body


# ------------------------------------------------------------------------------------------
# accepted uploads: relative dirs kept, bytes intact (streaming across chunk boundaries)
# ------------------------------------------------------------------------------------------


def test_extra_files_keep_relative_dirs_and_bytes(api, srv):
    rnd = random.Random(7)
    # binary content full of near-boundaries, larger than the parser's 64 KiB chunks
    blob = bytearray()
    while len(blob) < 200 * 1024:
        blob += bytes(rnd.getrandbits(8) for _ in range(rnd.randint(1, 300)))
        blob += rnd.choice([b"\r\n--", b"\r\n--" + B[:5], b"\r\n", b"--", b"\r\n\r\n"])
    blob = bytes(blob)
    extras = [
        ("nodes/r1.yml", b"device: frr\n"),
        ("templates/ospf/frr.j2", b"router ospf\n"),
        ("banner.j2", b"banner motd hi\n"),
        ("deep/a/b/c/d.txt", b"deep\n"),
        ("empty.txt", b""),
        ("blob.bin", blob),
        ("t\u00e9l\u00e9phone.j2", "caf\u00e9\n".encode()),
    ]
    assert sum(len(d) for _, d in extras) + len(SIMPLE) < MAX_BYTES
    sid = api.new_session()
    n = len(srv.calls())
    status, body = api.post_lab(sid, extras=extras)
    assert status == 200, body
    workdir = Path(up_dirs(srv, n)[0])
    assert workdir.parent == Path(srv.state_dir) / "labs"
    assert (workdir / "simple.yml").read_bytes() == SIMPLE
    for name, data in extras:
        path = workdir.joinpath(*name.split("/"))
        assert path.is_file(), name
        assert hashlib.sha256(path.read_bytes()).hexdigest() == hashlib.sha256(data).hexdigest(), name
    # netlab ran in that dir, with the topology's plain name as a relative path
    assert srv.calls()[n]["argv"] == ["up", "./simple.yml"]
    # every inspect ran in the lab dir too
    assert {c["cwd"] for c in srv.calls()[n:]} == {str(workdir)}
    assert api.delete_session(sid) == 204


def test_reuse_field_false_is_honoured_and_yaml_suffix_accepted(api, srv):
    sid = api.new_session()
    n = len(srv.calls())
    assert api.post_lab(sid, SIMPLE, "lab.yaml")[0] == 200
    assert api.req("POST", "/lab/release", sid)[0] == 204
    status, body = api.post_lab(sid, SIMPLE, "lab.yaml", reuse="false")
    assert (status, body["reused"]) == (200, False)
    assert [c["argv"][0] for c in srv.calls()[n:]].count("up") == 2
    assert api.lab(sid)[1]["topology"] == "lab.yaml"
