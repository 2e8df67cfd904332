"""Test harness: start a real remote_lab.py server process on an ephemeral port.

Every test that needs a server goes through ServerProcess so ports, state dirs, logs and the
fake netlab are set up the same way everywhere.
"""
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "remote_lab.py"
CLIENT = ROOT / "remote_lab_client.py"
FAKE_NETLAB = ROOT / "tests" / "fake_netlab.py"
TOPOLOGIES = ROOT / "tests" / "topologies"

_LISTEN_RE = re.compile(r"Listening on https?://([^:/\s]+|\[[^\]]+\]):(\d+)")


class ServerProcess:
    """A remote_lab.py server in its own process group, with a private state dir.

    fake_dir: the fake netlab's control/record directory (FAKE_NETLAB_DIR): create files
    `up_fail`, `up_hang`, `down_fail`, `inspect_fail` there to switch failures on, and read
    `calls.jsonl` to see the commands it got (see tests/fake_netlab.py).
    """

    def __init__(self, tmp_path, *args, simulate=False, env=None, netlab=None,
                 stdin=subprocess.DEVNULL):
        self.tmp = Path(tmp_path)
        self.state_dir = self.tmp / "state"
        self.fake_dir = self.tmp / "fake-netlab"
        self.fake_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.tmp / "server.log"
        cmd = [sys.executable, str(SERVER), "--host", "127.0.0.1", "--port", "0",
               "--state-dir", str(self.state_dir)]
        if simulate:
            cmd.append("--simulate")
        else:
            cmd += ["--netlab", str(netlab or FAKE_NETLAB)]
        cmd += [str(a) for a in args]
        self.cmd = cmd
        self.env = dict(os.environ)
        self.env["FAKE_NETLAB_DIR"] = str(self.fake_dir)
        self.env["PYTHONUNBUFFERED"] = "1"
        if env:
            self.env.update(env)
        self.stdin = stdin  # the server's own stdin (netlab must never get it)
        self.proc = None
        self.port = None

    def start(self, timeout=15):
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, stdin=self.stdin, stdout=self._log,
                                     stderr=subprocess.STDOUT, env=self.env,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = _LISTEN_RE.search(self.log_path.read_text(errors="replace"))
            if m:
                self.port = int(m.group(2))
                return self
            if self.proc.poll() is not None:
                raise RuntimeError("server exited rc=%s:\n%s" % (self.proc.returncode, self.log()))
            time.sleep(0.02)
        raise RuntimeError("server did not start:\n" + self.log())

    @property
    def url(self):
        return "http://127.0.0.1:%d" % self.port

    def log(self):
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def calls(self):
        """The fake netlab's recorded invocations: a list of dicts {argv, cwd, ...}."""
        path = self.fake_dir / "calls.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def netlab_verbs(self):
        return [c["argv"][0] if c["argv"] else "" for c in self.calls()]

    def switch(self, name, on=True, value=""):
        """Turn a fake-netlab failure switch on/off (e.g. switch('up_fail'))."""
        path = self.fake_dir / name
        if on:
            path.write_text(str(value))
        elif path.exists():
            path.unlink()

    def stop(self, sig=signal.SIGTERM, timeout=20):
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            try:
                self.proc.send_signal(sig)
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # leftovers of the group (netlab children)
        except OSError:
            pass
        self._log.close()
        return self.proc.returncode

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


def http(method, url, body=None, headers=None, timeout=10):
    """A tiny raw HTTP helper for tests: returns (status, parsed JSON or text or None, headers)."""
    data = body
    hdrs = dict(headers or {})
    if isinstance(body, (dict, list)):
        data = json.dumps(body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    req = urllib.request.Request(url, data=data, method=method, headers=hdrs)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
        status, raw, rh = resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as e:
        status, raw, rh = e.code, e.read(), e.headers
    if not raw:
        return status, None, rh
    try:
        return status, json.loads(raw), rh
    except ValueError:
        return status, raw.decode(errors="replace"), rh


def parse_head(head):
    """(first line, {lower-case header name: value}) of a raw HTTP head (bytes, without the
    blank line that ends it)."""
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers


def multipart(fields, files, escape=True):
    """multipart/form-data body: fields {name: value}, files [(field, filename, bytes)].

    With ``escape`` the file names are quoted the way remote_lab_client, requests and curl do it
    (backslash and double quote escaped); without it they go on the wire as they are (browsers).
    """
    boundary = "----remotelabtest%d" % int(time.time() * 1e6)
    out = []
    for name, value in fields.items():
        out.append(("--%s\r\nContent-Disposition: form-data; name=\"%s\"\r\n\r\n%s\r\n"
                    % (boundary, name, value)).encode())
    for field, filename, content in files:
        if escape:
            filename = filename.replace("\\", "\\\\").replace('"', '\\"')
        out.append(("--%s\r\nContent-Disposition: form-data; name=\"%s\"; filename=\"%s\"\r\n"
                    "Content-Type: application/octet-stream\r\n\r\n"
                    % (boundary, field, filename)).encode("utf-8", "surrogateescape"))
        out.append(content + b"\r\n")
    out.append(("--%s--\r\n" % boundary).encode())
    return b"".join(out), "multipart/form-data; boundary=%s" % boundary


def made_by(make, stop):
    """The body of a factory fixture (``yield from made_by(make, stop)``): the test gets a
    function that calls ``make(*args, **kw)``; at the end ``stop(thing)`` for each thing made."""
    made = []

    def make_one(*args, **kw):
        made.append(make(*args, **kw))
        return made[-1]

    yield make_one
    for thing in made:
        stop(thing)


def in_thread(func, result=None):
    """Run ``func`` in a daemon thread: (thread, the ``result`` dict, which gets "value" or
    "error", then "at": the monotonic time it ended)."""
    result = {} if result is None else result

    def run():
        try:
            result["value"] = func()
        except BaseException as e:  # noqa: B902 - reported to the test
            result["error"] = e
        result["at"] = time.monotonic()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, result


def wait_until(pred, timeout=5.0, interval=0.02, what="condition"):
    """Poll ``pred`` until it returns a truthy value; return it, or fail the test on timeout."""
    import pytest
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() >= deadline:
            pytest.fail("timed out after %.1f s waiting for %s" % (timeout, what))
        time.sleep(interval)


def read_json(path):
    """The JSON in the file at ``path``, or None when it is missing or not JSON (yet)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def stop_launched(home):
    """SIGKILL what the launcher started under ``home`` and left running: each server's process
    group and each SSH tunnel. A record counts only when its pid AND start time match a live
    process, so a reused or made-up pid kills nothing."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from remote_lab_client import _same_process

    state = Path(home) / ".remote-http-launcher"
    for side, field, started in (("server", "pid", "start_time"),
                                 ("client", "tunnel_pid", "tunnel_start_time")):
        for path in sorted((state / side).glob("*.json")):
            data = read_json(path)
            data = data if isinstance(data, dict) else {}
            pid = data.get(field)
            if not _same_process(pid, data.get(started)):
                continue
            try:
                os.killpg(pid, signal.SIGKILL) if side == "server" else os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def kill_if_running(proc):
    """SIGKILL a subprocess.Popen that is still running, and reap it."""
    if proc.poll() is None:
        proc.kill()
        proc.wait(5)


def pid_alive(pid):
    """True when ``pid`` is a live (non-zombie) process."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


class file_size_limit:
    """``with file_size_limit(n): start a server``: processes started inside inherit
    RLIMIT_FSIZE = n bytes (a full disk in miniature: a bigger write fails with EFBIG)."""

    def __init__(self, nbytes):
        self.nbytes = nbytes

    def __enter__(self):
        import resource
        self.saved = resource.getrlimit(resource.RLIMIT_FSIZE)
        resource.setrlimit(resource.RLIMIT_FSIZE, (self.nbytes, self.saved[1]))
        return self

    def __exit__(self, *exc):
        import resource
        resource.setrlimit(resource.RLIMIT_FSIZE, self.saved)
