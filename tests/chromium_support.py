"""Headless Chromium for the page tests; a test that needs it is skipped where none is installed
(Debian package `chromium`, installed by .ci/run from .ci/apt-packages.txt).

Two drivers: the ``chromium`` fixture runs the browser once per call (``--dump-dom``,
``--screenshot``: the page as it loads), the ``browser`` fixture starts Chromium sessions
(class Chromium) driven over the DevTools protocol on a pipe (``--remote-debugging-pipe``: no
port, stdlib only), so scripts run inside a page's own origin.
"""
import fcntl
import json
import os
import select
import shutil
import subprocess
import time

import pytest

# a quiet, throw-away browser: no GPU, no sandbox (containers), no calls home
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage"]


def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def chromium_or_skip():
    path = find_chromium()
    if not path:
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return path


def chromium_argv(path, profile):
    return [path] + FLAGS + ["--user-data-dir=%s" % profile]


@pytest.fixture
def chromium(tmp_path):
    """run(*args, timeout=60, background=False): Chromium with ``args`` in a fresh profile; its
    stdout (text) once it exited 0, or the Popen with ``background``."""
    path = chromium_or_skip()
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    base = chromium_argv(path, profile)

    def run(*args, timeout=60, background=False):
        cmd = base + list(args)
        if background:
            return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        proc = subprocess.run(cmd, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-3000:]
        return proc.stdout.decode(errors="replace")

    return run


class Chromium:
    """Headless Chromium speaking the DevTools protocol on fds 3 (commands in) and 4 (out)."""

    def __init__(self, path, profile, log, *flags):
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()
        # fds >= 10 in the child, so bash's 3<& / 4>& never overwrite one another (dash, sh,
        # takes single-digit fds only)
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 10) for fd in (cmd_r, out_w)]
        for fd in (cmd_r, out_w):
            os.close(fd)
        argv = chromium_argv(path, profile) + ["--remote-debugging-pipe"] + list(flags)
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(["bash", "-c", 'exec "$@" 3<&%d 4>&%d' % tuple(high), "bash"]
                                     + argv, pass_fds=high, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        for fd in high:
            os.close(fd)
        self._next_id = 0
        self._buffer = b""
        self._messages = []

    def close(self):
        os.close(self._cmd_w)  # Chromium exits when its command pipe closes
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        os.close(self._out_r)
        self._log.close()

    def _wait_for(self, match, timeout):
        deadline = time.monotonic() + timeout
        while True:
            for msg in self._messages:
                if match(msg):
                    self._messages.remove(msg)
                    return msg
            left = deadline - time.monotonic()
            assert left > 0, "no DevTools answer within %s s" % timeout
            if select.select([self._out_r], [], [], left)[0]:
                data = os.read(self._out_r, 1 << 20)
                assert data, "Chromium closed its DevTools pipe (rc %s)" % self.proc.poll()
                self._buffer += data
                *done, self._buffer = self._buffer.split(b"\0")
                self._messages += [json.loads(m) for m in done]

    def call(self, method, params=None, session=None, timeout=30):
        self._next_id += 1
        msg = {"id": self._next_id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        answer = self._wait_for(lambda m, i=self._next_id: m.get("id") == i, timeout)
        assert "error" not in answer, (method, answer)
        return answer["result"]

    def open(self, url, init_script=None):
        """A new tab showing ``url`` (after its load event): the tab's session id.
        ``init_script``: JavaScript run in the page before any of its own."""
        target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
        tab = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.call("Page.enable", session=tab)
        if init_script:
            self.call("Page.addScriptToEvaluateOnNewDocument", {"source": init_script},
                      session=tab)
        nav = self.call("Page.navigate", {"url": url}, session=tab)
        assert "errorText" not in nav, nav
        self._wait_for(lambda m: m.get("method") == "Page.loadEventFired"
                       and m.get("sessionId") == tab, 30)
        return tab

    def evaluate(self, tab, expression, timeout=30):
        """The value of a JS expression in the tab's page (promises awaited)."""
        result = self.call("Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                                "returnByValue": True}, session=tab,
                           timeout=timeout)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")


@pytest.fixture
def browser(tmp_path):
    path = chromium_or_skip()
    started = []

    def start(*flags):
        profile = tmp_path / ("profile-%d" % len(started))
        profile.mkdir()
        chromium = Chromium(path, profile, tmp_path / ("chromium-%d.log" % len(started)), *flags)
        started.append(chromium)
        return chromium

    yield start
    for chromium in started:
        chromium.close()
