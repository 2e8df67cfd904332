"""A pool in REMOTE_LAB_URL: a session joins every host's queue, takes the first host that makes
it active, and leaves the others (two real server processes, the fake netlab)."""
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import remote_lab_client as rlc  # noqa: E402
from server_support import SIMPLE, start_server, wait_until  # noqa: E402,F401


@pytest.fixture
def two_hosts(start_server):
    """Two servers (lab1, lab2): (Api of lab1, Api of lab2)."""
    return start_server(sub="lab1")[1], start_server("--keep-warm", "60", sub="lab2")[1]


def closed_port_url():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return "http://127.0.0.1:%d" % s.getsockname()[1]


def queue_of(api):
    return [(s["status"], s["position"]) for s in api.req("GET", "/sessions")[1]["sessions"]]


def client(url, **kw):
    return rlc.RemoteLabClient(url, request_timeout=10, session_timeout=30, heartbeat_interval=0,
                               **kw)


def test_a_pool_session_takes_the_free_host_at_once_and_leaves_the_other_queue(two_hosts):
    lab1, lab2 = two_hosts
    holder = lab1.new_session()  # lab1 is held
    pool = "%s,%s" % (lab1.url, lab2.url)
    lines = []
    with client(pool, progress=rlc._LineProgress(lines.append)) as c:
        assert c.host == lab2.url and c.base_url == lab2.url
        assert lines == []  # no waiting line: a host was free at once
        assert queue_of(lab1) == [("active", 0)]  # only its holder: ours left at once
        assert queue_of(lab2) == [("active", 0)]
        assert lab2.session_full(c.session_id)[1]["status"] == "active"
        assert [d.name for d in c.acquire(_topology(c))] == ["r1", "r2"]
    assert queue_of(lab2) == []
    assert lab1.delete_session(holder) == 204


def _topology(_client, _cache={}):
    if "path" not in _cache:
        import tempfile
        d = tempfile.mkdtemp(prefix="pool-topo-")
        path = os.path.join(d, "simple.yml")
        with open(path, "wb") as f:
            f.write(SIMPLE)
        _cache["path"] = path
    return _cache["path"]


def test_while_waiting_the_line_shows_the_best_positions_then_the_first_turn_wins(two_hosts):
    lab1, lab2 = two_hosts
    held = [lab1.new_session(), lab1.new_session(), lab1.new_session(), lab2.new_session()]
    lines = []
    pool = "%s,%s" % (lab1.url, lab2.url)
    names = rlc.pool_names([lab1.url, lab2.url])
    got = {}
    import threading

    def join():
        got["client"] = client(pool, progress=rlc._LineProgress(lines.append))
    t = threading.Thread(target=join)
    t.start()
    wait_until(lambda: any("1 on %s, 3 on %s" % (names[1], names[0]) in x for x in lines),
               10, what="the waiting line")
    assert "remote lab: waiting in the pool's queues at position 1 on %s, 3 on %s" % (
        names[1], names[0]) in lines[-1]
    assert lab2.delete_session(held[3]) == 204  # lab2's turn comes first
    t.join(15)
    c = got["client"]
    try:
        assert c.host == lab2.url
        assert queue_of(lab1) == [("active", 0), ("waiting", 1), ("waiting", 2)]
    finally:
        c.close()
    for sid in held[:3]:
        lab1.delete_session(sid)


def test_an_interrupted_wait_leaves_every_queue(two_hosts):
    lab1, lab2 = two_hosts
    lab1.new_session()
    lab2.new_session()
    script = textwrap.dedent("""
        import sys; sys.path.insert(0, %r)
        import remote_lab_client as rlc
        print("joining", flush=True)
        rlc.RemoteLabClient(%r, session_timeout=60, progress=False)
    """ % (str(ROOT), "%s,%s" % (lab1.url, lab2.url)))
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: len(queue_of(lab1)) == 2 and len(queue_of(lab2)) == 2, 10,
                   what="a waiting session on both hosts")
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=15)[0].decode()
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "KeyboardInterrupt" in out
    assert queue_of(lab1) == [("active", 0)] and queue_of(lab2) == [("active", 0)]


def test_a_downed_host_is_skipped_with_one_warning(two_hosts, caplog):
    lab1, _ = two_hosts
    down = closed_port_url()

    def skipped():
        return [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()]
    with caplog.at_level(logging.WARNING, logger="remote_lab_client"):
        with client("%s,%s" % (down, lab1.url)) as c:
            assert c.host == lab1.url
            assert skipped()  # said by the time the session is there, though lab1 was free
    assert len(skipped()) == 1 and down.rsplit(":", 1)[1] in skipped()[0], skipped()


def test_a_pool_none_of_which_answers_is_one_connection_failed_naming_them_all():
    urls = [closed_port_url(), closed_port_url()]
    with pytest.raises(rlc.ConnectionFailed) as e:
        client(",".join(urls))
    for url in urls:
        assert url.rsplit(":", 1)[1] in str(e.value)


def test_among_hosts_free_at_once_the_one_with_the_warm_lab_is_preferred(two_hosts):
    lab1, lab2 = two_hosts
    first = lab2.new_session()  # lab2 keeps simple.yml warm (--keep-warm 60)
    assert lab2.post_lab(first, SIMPLE)[0] == 200
    assert lab2.delete_session(first) == 204
    for _ in range(6):  # (each time both answer within milliseconds, in either order)
        with client("%s,%s" % (lab1.url, lab2.url), topology=_topology(None)) as c:
            assert c.host == lab2.url
            assert c.acquire(_topology(c)) and c.reused is True
    with client("%s,%s" % (lab1.url, lab2.url)) as c:  # declares nothing: the first listed
        assert c.host in (lab1.url, lab2.url)


def test_a_pool_of_one_is_a_single_url_and_bad_pools_are_config_errors(two_hosts):
    lab1, _ = two_hosts
    with client(lab1.url) as c:
        assert c.host == lab1.url and c._pool == [lab1.url]
    for bad in ("%s,,%s" % (lab1.url, lab1.url), "%s,%s" % (lab1.url, lab1.url), lab1.url + ","):
        with pytest.raises(rlc.ConfigError):
            client(bad)


def test_the_header_says_when_xdist_workers_outnumber_the_pools_slots(two_hosts):
    lab1, lab2 = two_hosts
    pool = "%s,%s" % (lab1.url, lab2.url)
    assert not [x for x in rlc._header_lines(pool, workers=2) if "take turns" in x]
    assert "3 xdist workers share 2 lab slots on 2 hosts: some will take turns; add hosts to " \
        "REMOTE_LAB_URL or --slots on the servers" in rlc._header_lines(pool, workers=3)
    assert not [x for x in rlc._header_lines("%s,%s" % (lab1.url, closed_port_url()), workers=3)
                if "take turns" in x]  # a host that does not answer may have more slots


def test_a_host_refusing_our_token_is_skipped_by_the_check_before_the_turn(two_hosts,
                                                                          start_server,
                                                                          tmp_path, caplog):
    from server_support import write_auth_file
    _, locked = start_server("--auth-file", str(write_auth_file(tmp_path / "users")),
                             sub="locked")
    _, open_host = two_hosts
    pool = "%s,%s" % (locked.url, open_host.url)  # no REMOTE_LAB_TOKEN: the first says 401
    with caplog.at_level(logging.WARNING, logger="remote_lab_client"):
        c = client(pool, start_session=False)
        assert c.check(_topology(c)) == ["r1", "r2"]
        assert c.base_url == open_host.url
        c.start_session()
        try:
            assert c.host == open_host.url
        finally:
            c.close()
    assert any("skipping %s" % locked.url in r.getMessage() and "HTTP 401" in r.getMessage()
               for r in caplog.records), caplog.text
    header = rlc._header_lines(pool)  # the pytest header says why, not "not answering"
    assert "%s (refuses requests without a token: REMOTE_LAB_TOKEN)" % locked.url in header
