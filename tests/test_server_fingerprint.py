"""The declared lab fingerprint (issue 13, item 2) on the server's side: POST /session's
``fingerprint`` (64 hex characters, kept in lowercase), shown by GET /session/{id}, saved in
the state DB with the rest of the session's meta and restored by the next start; anything
else is a 400 that queues nothing. Real server processes (fake netlab)."""
import hashlib

import pytest

from helpers import ServerProcess
from server_support import Api

pytestmark = pytest.mark.timeout(90)

LAB_A = hashlib.sha256(b"lab A").hexdigest()
LAB_B = hashlib.sha256(b"lab B").hexdigest()


def post_session(api, body):
    status, data, _ = api.req("POST", "/session", body=body)
    return status, data


def declared(api, sid):
    status, body = api.session_full(sid)
    assert status == 200, body
    return body["fingerprint"]


def test_a_declared_fingerprint_is_shown_and_survives_a_restart(tmp_path):
    first = ServerProcess(tmp_path / "first").start()
    try:
        api = Api(first)
        status, a = post_session(api, {"owner": "alice@ci", "fingerprint": LAB_A.upper()})
        assert (status, a["status"]) == (201, "active"), a
        status, b = post_session(api, {"fingerprint": LAB_B})
        assert (status, b["position"]) == (201, 1), b
        plain = api.new_session()  # no body: nothing declared
        named = post_session(api, {"owner": "bob", "fingerprint": None})[1]["session_id"]
        assert declared(api, a["session_id"]) == LAB_A  # lowercase
        assert declared(api, b["session_id"]) == LAB_B
        assert declared(api, plain) is None and declared(api, named) is None
        assert api.session_full(a["session_id"])[1]["owner"] == "alice@ci"
    finally:
        assert first.stop() == 0  # (SIGTERM: a stop; a new start restores the sessions)
    second = ServerProcess(tmp_path / "second", "--state-dir", first.state_dir,
                           env={"FAKE_NETLAB_DIR": str(first.fake_dir)}).start()
    try:
        api = Api(second)
        assert declared(api, a["session_id"]) == LAB_A
        assert declared(api, b["session_id"]) == LAB_B
        assert declared(api, plain) is None
        assert api.session_full(b["session_id"])[1]["position"] == 1
    finally:
        second.stop()


@pytest.mark.parametrize("value", [
    LAB_A[:63], LAB_A + "0", "g" * 64, " " + LAB_A[1:], LAB_A[:63] + "\n", "", 42,
    [LAB_A], {"sha256": LAB_A}, True, "\u0660" * 64], ids=[
    "63-chars", "65-chars", "not-hex", "a-space", "a-newline", "empty", "number", "list",
    "object", "bool", "arabic-digits"])
def test_a_bad_fingerprint_is_a_400_and_queues_nothing(shared, value):
    api = shared
    status, data = post_session(api, {"owner": "alice", "fingerprint": value})
    assert status == 400, data
    assert data["detail"].startswith("fingerprint must be 64 hex characters"), data
    assert api.health()["queue_length"] == 0


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One server for the bad values (each leaves the queue as it was: empty)."""
    srv = ServerProcess(tmp_path_factory.mktemp("fingerprint")).start()
    yield Api(srv)
    srv.stop()
