"""Who and why (issue 12, item 3) on the client's side, against real servers: the session's
owner, note and link the client fills in by itself (user@host, the CI job, REMOTE_LAB_OWNER /
_NOTE / _LINK), read back from GET /session/{id}; a server that refuses the body; the CLI's
``status`` and waiting line and the pytest header naming who holds the lab."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
from http.server import ThreadingHTTPServer

import pytest

from client_support import SIMPLE, ForeignServer, cli, client, client_env, wait_until
from client_support import clean_env, servers, srv  # noqa: F401  (fixtures; clean_env autouse)
from helpers import CLIENT, http as http_request, kill_if_running

import remote_lab_client as rlc  # noqa: E402  (after client_support: repo root on sys.path)

pytest_plugins = ["pytester"]

CI_VARIABLES = ("GITHUB_ACTIONS", "GITHUB_SERVER_URL", "GITHUB_REPOSITORY", "GITHUB_RUN_ID",
                "GITHUB_RUN_NUMBER", "GITHUB_WORKFLOW", "GITHUB_ACTOR", "GITHUB_TRIGGERING_ACTOR",
                "GITLAB_CI", "CI_JOB_URL", "CI_PROJECT_PATH", "CI_JOB_NAME", "CI_JOB_ID",
                "GITLAB_USER_LOGIN", "JENKINS_URL", "BUILD_URL", "JOB_NAME", "BUILD_NUMBER")
HOST = socket.gethostname().split(".")[0]


@pytest.fixture(autouse=True)
def no_ci(monkeypatch):
    """Not in CI (whatever runs this suite), as user alice."""
    for name in CI_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("LOGNAME", "alice")
    monkeypatch.setenv("USER", "alice")


def who(srv, sid):
    """The owner, note and link GET /session/{sid} answers."""
    status, body, _ = http_request("GET", srv.url + "/session/" + sid)
    assert status == 200, body
    return {k: body[k] for k in ("owner", "note", "link")}


def test_outside_ci_the_owner_is_user_at_host(srv):
    with client(srv.url) as c:
        assert who(srv, c.session_id) == {"owner": "alice@" + HOST, "note": None, "link": None}


def test_github_actions_gives_the_runs_note_and_link(srv, monkeypatch):
    for name, value in (("GITHUB_ACTIONS", "true"), ("GITHUB_SERVER_URL", "https://gh.example"),
                        ("GITHUB_REPOSITORY", "net/core"), ("GITHUB_RUN_ID", "4711"),
                        ("GITHUB_RUN_NUMBER", "812"), ("GITHUB_WORKFLOW", "lab tests"),
                        ("GITHUB_ACTOR", "bob")):
        monkeypatch.setenv(name, value)
    with client(srv.url) as c:
        assert who(srv, c.session_id) == {
            "owner": "alice@" + HOST, "note": "GitHub Actions: net/core lab tests #812 by bob",
            "link": "https://gh.example/net/core/actions/runs/4711"}


def test_gitlab_and_jenkins_give_the_jobs_note_and_link(srv, monkeypatch):
    gitlab = {"GITLAB_CI": "true", "CI_JOB_URL": "https://gitlab.example/net/core/-/jobs/99",
              "CI_PROJECT_PATH": "net/core", "CI_JOB_NAME": "lab", "CI_JOB_ID": "99"}
    for name, value in gitlab.items():
        monkeypatch.setenv(name, value)
    with client(srv.url) as c:
        assert who(srv, c.session_id) == {"owner": "alice@" + HOST,
                                          "note": "GitLab CI: net/core lab #99",
                                          "link": gitlab["CI_JOB_URL"]}
    for name in gitlab:
        monkeypatch.delenv(name)
    jenkins = {"JENKINS_URL": "https://ci.example/", "BUILD_URL": "https://ci.example/job/core/7/",
               "JOB_NAME": "core", "BUILD_NUMBER": "7"}
    for name, value in jenkins.items():
        monkeypatch.setenv(name, value)
    with client(srv.url) as c:
        assert who(srv, c.session_id) == {"owner": "alice@" + HOST, "note": "Jenkins: core #7",
                                          "link": jenkins["BUILD_URL"]}


def test_the_variables_override_and_an_empty_one_says_nothing(srv, monkeypatch, tmp_path):
    monkeypatch.setenv("GITLAB_CI", "true")
    monkeypatch.setenv("CI_JOB_URL", "https://gitlab.example/j/1")
    monkeypatch.setenv("REMOTE_LAB_OWNER", "release-bot")
    monkeypatch.setenv("REMOTE_LAB_NOTE", "")  # no note, although CI would give one
    (tmp_path / ".env").write_text("REMOTE_LAB_LINK=https://wiki.example/lab-use\n")
    with client(srv.url) as c:
        assert who(srv, c.session_id) == {"owner": "release-bot", "note": None,
                                          "link": "https://wiki.example/lab-use"}
    # arguments win over the variables
    with client(srv.url, owner="carol@desk", note="bisecting #12") as c:
        assert who(srv, c.session_id) == {"owner": "carol@desk", "note": "bisecting #12",
                                          "link": "https://wiki.example/lab-use"}
    assert dict(os.environ).get("REMOTE_LAB_LINK") is None  # read, never written


def test_with_tokens_the_server_names_the_owner_and_keeps_the_note(servers, tmp_path,
                                                                   monkeypatch):
    from server_support import TOKENS, write_auth_file
    srv = servers.start("--auth-file", write_auth_file(tmp_path / "users"))
    monkeypatch.setenv("REMOTE_LAB_NOTE", "nightly")
    with client(srv.url, token=TOKENS["bob"]) as c:
        status = c.session_status()
        assert (status["owner"], status["note"]) == ("bob", "nightly"), status


def test_values_are_cut_to_the_servers_limits_and_bad_links_dropped(srv, monkeypatch):
    monkeypatch.setenv("REMOTE_LAB_OWNER", "o" * 100)
    monkeypatch.setenv("REMOTE_LAB_NOTE", "line one\nline\ttwo \x1b[31mred " + "n" * 300)
    for link in ("javascript:alert(1)", "ftp://files.example/x", "https://x.example/" + "a" * 500,
                 "https://x.example/a b"):
        monkeypatch.setenv("REMOTE_LAB_LINK", link)
        with client(srv.url) as c:  # the server took the body (it refuses what breaks its rules)
            got = who(srv, c.session_id)
        assert got["owner"] == "o" * 61 + "..."
        assert len(got["note"]) == 200 and got["note"].startswith("line one line two [31mred nnn")
        assert got["note"].endswith("...") and got["link"] is None, (link, got)


def test_the_owner_without_a_user_name_anywhere(srv, tmp_path):
    """A container's uid without a passwd entry and no LOGNAME/USER: "uidN@host"."""
    python = "/usr/bin/python3"  # (the test's own may live where that uid cannot go)
    if os.geteuid() != 0 or not os.access(python, os.X_OK):
        pytest.skip("needs root and %s to run a client as a uid without a passwd entry" % python)
    uid = 54321
    env = {k: v for k, v in client_env().items()
           if k not in ("LOGNAME", "USER", "LNAME", "USERNAME", "HOME") + CI_VARIABLES}
    code = ("import json, remote_lab_client as r, sys; c = r.RemoteLabClient(sys.argv[1], "
            "progress=False, heartbeat_interval=0); print(json.dumps(c.session_status())); "
            "c.close()")
    proc = subprocess.run([python, "-c", code, srv.url], env=env, cwd="/",
                          capture_output=True, text=True, timeout=60, user=uid, group=uid)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["owner"] == "uid%d@%s" % (uid, HOST), proc.stdout


class Refuser(ForeignServer):
    """An older server of another make: POST /session with a body answers STATUS."""
    STATUS = 400
    seen = []

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.seen.append((self.path, body))
        if self.path == "/session" and body:
            self._answer(self.STATUS, {"detail": "no body expected"})
        elif self.path == "/session":
            self._answer(201, {"session_id": "s1", "position": 0, "status": "active"})
        else:
            self._answer(204)


@pytest.mark.parametrize("status", [400, 415, 422])
def test_a_server_that_refuses_the_body_gets_a_session_without(status):
    Refuser.STATUS, Refuser.seen = status, []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuser)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with client("http://127.0.0.1:%d" % server.server_address[1],
                    heartbeat_interval=0) as c:
            assert c.session_id == "s1"
    finally:
        server.shutdown()
        server.server_close()
    posts = [body for path, body in Refuser.seen if path == "/session"]
    assert len(posts) == 2 and json.loads(posts[0])["owner"] == "alice@" + HOST, posts
    assert posts[1] == b""


# ------------------------------------------------------------------------------------------
# who holds the lab: status, the waiting line, the pytest header
# ------------------------------------------------------------------------------------------

def holder_client(srv):
    return client(srv.url, owner="alice@laptop", note="CI: core #812",
                  link="https://ci.example/core/812")


def test_status_names_the_holder_and_the_waiting_owners(srv):
    a = holder_client(srv)
    b = client(srv.url, start_session=False, owner="bob@box")
    b._create_session()  # waiting behind a (no wait for the turn)
    try:
        proc = cli("--url", srv.url, "status")
        assert proc.returncode == 0, proc.stderr
        out = proc.stdout
        assert re.search(r"^holder   alice@laptop for \d+ s \(session %s\)$" % a.session_id[:8],
                         out, re.M), out
        assert "\n         note  CI: core #812\n" in out
        assert "\n         link  https://ci.example/core/812\n" in out
        assert re.search(r"^  0 +active +%s .* alice@laptop$" % a.session_id, out, re.M), out
        assert re.search(r"^  1 +waiting +%s .* bob@box$" % b.session_id, out, re.M), out

        proc = cli("--url", srv.url, "status", "--json")
        assert proc.returncode == 0, proc.stderr
        data = json.loads(proc.stdout)
        holder = data["holder"]
        assert (holder["owner"], holder["note"], holder["link"]) == (
            "alice@laptop", "CI: core #812", "https://ci.example/core/812")
        assert isinstance(holder["held_s"], (int, float)) and holder["held_s"] >= 0
        assert [s["owner"] for s in data["sessions"]] == ["alice@laptop", "bob@box"]
    finally:
        b.close()
        a.close()


@pytest.mark.timeout(90)
def test_the_waiting_line_names_who_holds_the_lab(srv, tmp_path):
    holder = holder_client(srv)
    err_path = tmp_path / "stderr.txt"
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, str(CLIENT), "--url", srv.url, "run", SIMPLE,
                                 "--", sys.executable, "-c", "pass"], stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=err, text=True, env=client_env())
        try:
            wait_until(lambda: "position 1" in err_path.read_text(), timeout=30,
                       what="the waiting line")
            holder.close()
            assert proc.wait(30) == 0, err_path.read_text()
        finally:
            kill_if_running(proc)
            holder.close()
    line = next(x for x in err_path.read_text().splitlines() if "position 1" in x)
    assert re.search(r"; lab held by alice@laptop for \d+ s \(CI: core #812\)$", line), line


@pytest.mark.timeout(120)
def test_the_pytest_header_names_who_holds_the_lab(srv, pytester, monkeypatch):
    shutil.copy(str(CLIENT), str(pytester.path / "remote_lab_client.py"))
    pytester.makeconftest('pytest_plugins = ["remote_lab_client"]\n')
    pytester.makepyfile(test_x="def test_x():\n    pass\n")
    monkeypatch.setenv("REMOTE_LAB_URL", srv.url)
    holder, waiting = holder_client(srv), client(srv.url, start_session=False)
    waiting._create_session()
    try:
        result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=60)
    finally:
        waiting.close()
        holder.close()
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["remote lab: %s (REMOTE_LAB_URL) (remote-lab *)" % srv.url,
                                 "remote lab: lab held by alice@laptop for * (CI: core #812), "
                                 "1 waiting, *"])
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", timeout=60)
    result.stdout.fnmatch_lines(["remote lab: lab free"])


def test_holder_text_of_a_status_answer():
    status = {"server_time": 1000.0, "holder": {"session": "d013cd02", "since": 760.0,
                                                "owner": "alice@laptop\x1b[2J", "note": None}}
    assert rlc.holder_text(status) == "lab held by alice@laptop [2J for 4 min"  # no escapes
    status["holder"].update(held_s=7300, owner=None, note="CI: core #812")
    assert rlc.holder_text(status, later=5) == \
        "lab held by session d013cd02 for 2 h 01 min (CI: core #812)"
    assert rlc.holder_text({"holder": None}) is None and rlc.holder_text(None) is None


def test_holder_text_with_several_slots_names_each_holder():
    labs = [{"slot": 1, "holder": {"session": "d013cd02", "owner": "alice@laptop"}},
            {"slot": 2, "holder": None}, {"slot": 3, "holder": {"session": "9c1d44e0"}}]
    status = {"holder": labs[0]["holder"], "labs": labs}
    assert rlc.holder_text(status) == "2 of 3 lab slots busy (alice@laptop, session 9c1d44e0)"


@pytest.mark.timeout(90)
def test_on_a_narrow_terminal_the_waiting_line_is_cut_to_fit(srv):
    """The status line is rewritten in place: a line longer than the terminal would wrap and
    leave a trail of copies; it is cut to the width instead."""
    import fcntl
    import pty
    import select
    import struct
    import termios
    holder = client(srv.url, owner="alice@laptop", note="a long note " * 10)
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    proc = subprocess.Popen([sys.executable, str(CLIENT), "--url", srv.url, "run", SIMPLE, "--",
                             sys.executable, "-c", "pass"], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=slave, env=client_env())
    os.close(slave)
    seen = b""
    try:
        while seen.count(b"\r\x1b[K") < 3 and proc.poll() is None:
            if select.select([master], [], [], 0.5)[0]:
                seen += os.read(master, 65536)
        holder.close()
        assert proc.wait(30) == 0
    finally:
        kill_if_running(proc)
        holder.close()
        os.close(master)
    lines = [x for x in seen.decode().split("\r\x1b[K") if x.startswith("remote lab: waiting")]
    assert len(lines) >= 3, seen
    for line in lines:
        assert len(line) <= 79 and "\n" not in line, line
        assert line.startswith("remote lab: waiting in the queue at position 1, ")
        assert line.endswith("..."), line  # "; lab held by alice@laptop for ..." cut
        assert "; lab held" in line  # (the estimated wait before it leaves less of the owner)
