"""Shared systemd test pieces: the unit files as data, a stand-in for systemd's notification
socket, and starting a server with inherited fds (socket activation)."""
import configparser
import fcntl
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid

import pytest

from helpers import _LISTEN_RE, ROOT
from server_support import wait_until

UNITS = ROOT / "systemd"
INSTALLED_BINARY = "/usr/local/bin/remote-lab"
BASH = shutil.which("bash")


def unit(name):
    """A unit file as {section: {key: [values]}} (systemd allows repeated keys)."""
    parser = configparser.RawConfigParser(strict=False, interpolation=None, delimiters=("=",),
                                          comment_prefixes=("#", ";"), empty_lines_in_values=False)
    parser.optionxform = str
    parser.read(UNITS / name)
    return {s: dict(parser.items(s)) for s in parser.sections()}


def start_process(srv, pass_fds=(), wait_for_listen=True):
    """ServerProcess.start() with extra fds passed to the child (socket activation)."""
    srv._log = open(srv.log_path, "ab")
    srv.proc = subprocess.Popen(srv.cmd, stdin=subprocess.DEVNULL, stdout=srv._log,
                                stderr=subprocess.STDOUT, env=srv.env, start_new_session=True,
                                pass_fds=pass_fds)
    if wait_for_listen:
        m = wait_until(lambda: _LISTEN_RE.search(srv.log()) or srv.proc.poll() is not None,
                       timeout=15, what="the server to listen")
        assert m is not True and srv.proc.poll() is None, srv.log()
        srv.port = int(m.group(2))
    return srv


class NotifySocket:
    """An AF_UNIX datagram socket standing in for systemd's notification socket."""

    def __init__(self, path=None):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if path is None:  # abstract namespace
            self.name = "remote-lab-test-%s" % uuid.uuid4().hex
            self.sock.bind("\0" + self.name)
            self.address = "@" + self.name
        else:
            self.sock.bind(str(path))
            self.address = str(path)
        self.sock.settimeout(0.2)
        self.messages = []  # (monotonic time, {key: value})
        self.lock = threading.Lock()
        self.running = True
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self):
        while self.running:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            with self.lock:
                self.messages.append((time.monotonic(), fields))

    def all(self):
        with self.lock:
            return list(self.messages)

    def values(self, key):
        return [f[key] for _, f in self.all() if key in f]

    def close(self):
        self.running = False
        self.thread.join(2)
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path):
    s = NotifySocket(tmp_path / "notify.sock")
    yield s
    s.close()


def spare_fd(sock):
    """A duplicate of ``sock`` on an fd above 3 (moved to fd 3 in the child by bash; dash only
    redirects fds 0-9, which pytest may all have in use)."""
    return fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, 10)


def _listening_socket():
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s


def start_socket_activated(srv, before=None):
    """Start ``srv`` (a ServerProcess made with ``--port 1``, which the inherited socket
    overrides) as systemd's socket activation does: a listening socket on fd 3, LISTEN_FDS=1,
    LISTEN_PID its pid (set by bash before the exec). ``before(port)`` runs once the socket
    listens, before the server starts. Returns the socket's port; only the server holds it."""
    if not BASH:
        import pytest
        pytest.skip("bash is not installed")
    listener = _listening_socket()
    port = listener.getsockname()[1]
    high = spare_fd(listener)
    if before is not None:
        before(port)
    srv.cmd = [BASH, "-c", 'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@" 3<&%d %d<&-' % (high, high),
               "sh"] + srv.cmd
    try:
        start_process(srv, pass_fds=(high,))
    finally:
        os.close(high)
        listener.close()
    return port
