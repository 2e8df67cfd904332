"""The client against a server with --auth-file (issue 12): the token sent, 401/403 as clear
errors, the CLI's one line. Real server processes."""
import shutil

import pytest

from client_support import (SIMPLE, clean_env, cli, client, client_env,  # noqa: F401
                            one_error_line, rlc, servers)
from helpers import CLIENT, http
from server_support import TOKENS, write_auth_file

pytest_plugins = ["pytester"]
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def auth_srv(servers, tmp_path):
    return servers.start("--auth-file", str(write_auth_file(tmp_path / "users")))


def test_the_client_sends_its_token_and_its_session_is_its_users(auth_srv):
    c = client(auth_srv.url, token=TOKENS["alice"])
    devices = c.acquire(SIMPLE)
    assert [d.name for d in devices] == ["r1", "r2"]
    status, body, _ = http("GET", auth_srv.url + "/session/" + c.session_id,
                           headers={"Authorization": "Bearer " + TOKENS["bob"]})
    assert status == 200 and body["owner"] == "alice" and body["session_id"] == c.session_id[:8]
    c.release()
    c.close()
    status, body, _ = http("GET", auth_srv.url + "/debug/health",
                           headers={"Authorization": "Bearer " + TOKENS["root"]})
    assert body["session_list"] == []


@pytest.mark.parametrize("token, detail", [(None, "authentication required"),
                                           ("w" * 20, "invalid token")])
def test_a_missing_or_wrong_token_is_a_clear_error(auth_srv, token, detail):
    with pytest.raises(rlc.AuthFailed) as e:
        client(auth_srv.url, token=token)  # the session is created at once
    assert e.value.status == 401 and detail in str(e.value)
    assert str(e.value).startswith("cannot create a remote lab session: ")
    assert "REMOTE_LAB_TOKEN" in str(e.value) and "HTTP 401" in str(e.value)


def test_the_cli_uses_remote_lab_token_and_says_in_one_line_when_it_is_missing(auth_srv):
    out = cli("--url", auth_srv.url, "status")
    assert out.returncode != 0
    line = one_error_line(out)
    assert "HTTP 401" in line and "REMOTE_LAB_TOKEN" in line, line
    ok = cli("--url", auth_srv.url, "status", env=client_env(REMOTE_LAB_TOKEN=TOKENS["bob"]))
    assert ok.returncode == 0, ok.stderr
    run = cli("--url", auth_srv.url, "run", SIMPLE, "--", "true",
              env=client_env(REMOTE_LAB_TOKEN=TOKENS["bob"]))
    assert run.returncode == 0, run.stderr


def test_the_pytest_header_reads_the_server_with_the_token(auth_srv, pytester, monkeypatch):
    shutil.copy(str(CLIENT), str(pytester.path / "remote_lab_client.py"))
    pytester.makeconftest('pytest_plugins = ["remote_lab_client"]\n')
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    monkeypatch.setenv("REMOTE_LAB_URL", auth_srv.url)
    monkeypatch.setenv("REMOTE_LAB_TOKEN", TOKENS["bob"])
    holder = client(auth_srv.url, token=TOKENS["alice"])
    try:
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=60)
    finally:
        holder.close()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["remote lab: %s (REMOTE_LAB_URL) (remote-lab *)" % auth_srv.url,
                                 "remote lab: lab held by alice for *"])
