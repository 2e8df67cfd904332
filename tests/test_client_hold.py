"""How long, on the client's side (issue 12, items 4 and 5): the estimated wait in the waiting
line, the warning before the server's --max-hold ends the session, and SessionLost saying so.
Real server processes (fake netlab) with short --max-hold values."""
import logging
import re
import time

import pytest

from client_support import SIMPLE, client, sessions, wait_until
from client_support import clean_env, servers  # noqa: F401  (fixtures; clean_env autouse)
from helpers import in_thread

import remote_lab_client as rlc  # noqa: E402  (after client_support: repo root on sys.path)

pytestmark = pytest.mark.timeout(60)

WHY = r"held the lab longer than the server's maximum hold \(3 s, --max-hold\)"


def test_eta_text_words():
    assert rlc.eta_text(None) == "wait unknown"
    assert rlc.eta_text(0) == rlc.eta_text(0.4) == "any moment now"
    assert rlc.eta_text(42.4) == "about 42 s"
    assert rlc.eta_text(170) == "about 3 min"
    assert rlc.eta_text(3 * 3600 + 60) == "about 3 h"


def test_a_warning_before_max_hold_ends_the_session_then_session_lost_saying_why(servers,
                                                                                 caplog):
    caplog.set_level(logging.WARNING, logger="remote_lab_client")
    srv = servers.start("--max-hold", "3")
    c = client(srv.url, heartbeat_interval=0.3)
    try:
        # less than a minute to go from the start: the warning comes at once
        wait_until(lambda: "held longer than its --max-hold (3 s)" in caplog.text, timeout=10,
                   what="the warning")
        assert re.search(r"the remote lab server ends session %s in [0-3] s: held longer than "
                         r"its --max-hold \(3 s\)" % c.session_id, caplog.text), caplog.text
        wait_until(lambda: "maximum hold" in caplog.text, timeout=15,
                   what="the heartbeat to notice the end")
        with pytest.raises(rlc.SessionLost, match=WHY):
            c.devices()
        assert "expired or the server restarted" not in caplog.text
    finally:
        c.close()
    assert caplog.text.count("ends session") == 1  # warned once


def test_without_heartbeats_the_next_call_says_why_the_session_ended(servers):
    srv = servers.start("--max-hold", "3")
    c = client(srv.url, heartbeat_interval=0)
    try:
        c.acquire(SIMPLE)
        wait_until(lambda: "held the lab longer than 3 s" in srv.log(), timeout=15,
                   what="the server to end the session")
        with pytest.raises(rlc.SessionLost, match=WHY):
            c.devices()
    finally:
        c.close()


def test_the_waiting_line_shows_the_estimated_wait(servers, caplog):
    caplog.set_level(logging.INFO, logger="remote_lab_client")
    srv = servers.start()
    a = client(srv.url)
    time.sleep(3)
    a.close()  # one hold of about 3 s: estimates from now on
    b = client(srv.url)
    t, result = in_thread(lambda: client(srv.url, progress=None))  # not a TTY: log lines
    try:
        wait_until(lambda: len(sessions(srv)) == 2, what="the waiter")
        wait_until(lambda: "queue position 1" in caplog.text, what="the waiting line")
        line = [r.getMessage() for r in caplog.records if "queue position" in r.getMessage()][0]
        assert re.match(r"waiting for the remote lab: queue position 1, (about [1-3] s|any moment "
                        r"now) \(", line), line
    finally:
        b.close()
        t.join(10)
        if "value" in result:
            result["value"].close()
