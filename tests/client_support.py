"""Helpers for the client tests (tests/test_client*.py).

Everything runs against real server processes (tests/helpers.py ServerProcess, fake netlab); the
only thing in between is an optional TCP forwarder (TLS termination, request recording, or a
rewrite that makes the server ignore ``?wait=``) which works on bytes, not on our HTTP code.

Fixtures (import them into a test module to use them): ``clean_env`` (autouse there: no
REMOTE_LAB_* from outside, cwd = tmp_path), ``servers`` (a Servers for the test) and ``srv``.
"""
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from helpers import CLIENT, ROOT, TOPOLOGIES, ServerProcess, http, wait_until  # noqa: F401

if str(ROOT) not in sys.path:  # `pytest` (not `python3 -m pytest`) does not add the repo root
    sys.path.insert(0, str(ROOT))

import remote_lab_client as rlc  # noqa: E402

SIMPLE = TOPOLOGIES / "simple.yml"
MAPPING = TOPOLOGIES / "mapping.yml"


def clean_client_env(monkeypatch, tmp_path):
    """No REMOTE_LAB_* from the developer's environment, and no stray .env (cwd = tmp_path)."""
    for key in list(os.environ):
        if key.startswith("REMOTE_LAB_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """Autouse in every module that imports it: clean_client_env for each test."""
    clean_client_env(monkeypatch, tmp_path)


class Servers:
    """Start servers for one test; all stopped at the end."""

    def __init__(self, tmp_path):
        self.tmp = Path(tmp_path)
        self.started = []

    def start(self, *args, name=None, **kw):
        srv = ServerProcess(self.tmp / (name or "srv%d" % len(self.started)), *args, **kw)
        self.started.append(srv)
        return srv.start()

    def stop_all(self):
        for srv in self.started:
            srv.stop()


@pytest.fixture
def servers(tmp_path):
    """Servers for this test (under tmp_path/servers), all stopped at the end."""
    s = Servers(tmp_path / "servers")
    yield s
    s.stop_all()


@pytest.fixture
def srv(servers):
    """One fresh server (fake netlab) for this test."""
    return servers.start()


def client(url, **kw):
    """A RemoteLabClient for ``url`` without progress lines (unless ``progress`` is given)."""
    kw.setdefault("progress", False)
    return rlc.RemoteLabClient(url, **kw)


def health(srv):
    status, body, _ = http("GET", srv.url + "/debug/health")
    assert status == 200, body
    return body


def sessions(srv):
    return health(srv)["session_list"]


def active_session(srv):
    status, body, _ = http("GET", srv.url + "/active-session")
    return body["session_id"] if status == 200 else None


def session_state(srv, sid):
    """GET /session/{sid}: (status, the seed's fields; the additive ones checked, then left out)."""
    from server_support import seed_fields
    status, body, _ = http("GET", srv.url + "/session/" + sid)
    return seed_fields((status, body))


def lab_idle(srv):
    lab = health(srv)["lab"]
    return lab["state"] in ("stopped", "running") and lab["ref_count"] == 0


def client_env(**extra):
    """Environment for a subprocess that imports the client from the repo (no REMOTE_LAB_*)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMOTE_LAB_")}
    env["PYTHONPATH"] = str(ROOT)
    env["PYTHONUNBUFFERED"] = "1"
    env.update({k: str(v) for k, v in extra.items()})
    return env


def cli(*args, env=None, timeout=60, cwd=None):
    """Run ``python3 remote_lab_client.py ARGS``; returns CompletedProcess (text)."""
    return subprocess.run([sys.executable, str(CLIENT)] + [str(a) for a in args],
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, timeout=timeout,
                          env=env if env is not None else client_env(), cwd=cwd)


def one_error_line(proc, besides_waiting=False):
    """The CLI's one error line on stderr, no traceback.

    With ``besides_waiting``, ``health``'s "waiting for URL to answer" progress line (written
    after a second without an answer) may stand beside it: it is not an error line.
    """
    lines = [line for line in proc.stderr.strip().splitlines()
             if not (besides_waiting and line.startswith("remote-lab-client: waiting for ")
                     and "to answer GET /healthz" in line)]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith("remote-lab-client: ")
    return lines[0]


def make_cert(directory):
    """A self-signed certificate for 127.0.0.1/localhost: (cert path, key path)."""
    openssl = shutil.which("openssl")
    if not openssl:
        pytest.skip("the openssl command is needed to make a test certificate")
    cert, key = Path(directory) / "cert.pem", Path(directory) / "key.pem"
    subprocess.run([openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
    return cert, key


class TcpForwarder:
    """127.0.0.1:PORT -> the server, byte for byte; optionally TLS on the listening side.

    ``received`` collects what clients sent (for header checks), ``connections`` counts accepted
    TCP connections, ``rewrite`` (old, new) replaces bytes in client data (same length).
    """

    def __init__(self, target_port, tls=None, rewrite=None):
        self.fail_next = 0  # answer this many new connections with 503 (+ Connection: close)
        self.injected = 0
        self.target_port = target_port
        self.tls = tls
        self.rewrite = rewrite
        self.received = bytearray()
        self.connections = 0
        self.handshake_errors = []
        self.lock = threading.Lock()
        self.listener = loopback_listener()
        self.port = self.listener.getsockname()[1]
        self.closed = False
        self.sockets = []
        threading.Thread(target=accept_each, args=(self.listener, self._serve, self.is_closed),
                         daemon=True).start()

    @property
    def url(self):
        return "%s://127.0.0.1:%d" % ("https" if self.tls else "http", self.port)

    def is_closed(self):
        return self.closed

    def _serve(self, conn):
        with self.lock:
            self.connections += 1
        try:
            if self.tls:
                conn = self.tls.wrap_socket(conn, server_side=True)
            with self.lock:
                inject = self.fail_next > 0
                if inject:
                    self.fail_next -= 1
            if inject:
                self._answer_503(conn)
                return
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
        except (OSError, ssl.SSLError) as e:
            self.handshake_errors.append(e)
            conn.close()
            return
        self.sockets += [conn, upstream]
        threading.Thread(target=pump, args=(upstream, conn), daemon=True).start()
        pump(conn, upstream, self._from_client)

    def _answer_503(self, conn):
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = conn.recv(65536)
            if not chunk:
                break
            data += chunk
        with self.lock:
            self.injected += 1
            self.received += data
        body = b'{"detail": "proxy: upstream warming up"}'
        conn.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        conn.close()

    def _from_client(self, data):
        if self.rewrite:
            data = data.replace(*self.rewrite)
        with self.lock:
            self.received += data
        return data

    def close(self):
        self.closed = True
        self.listener.close()
        close_quietly(*self.sockets)


def loopback_listener(port=0, backlog=64):
    """A listening TCP socket on 127.0.0.1:``port`` (0: any free port), SO_REUSEADDR set."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port))
    s.listen(backlog)
    return s


def accept_each(listener, serve, is_closed=lambda: False):
    """``serve(conn)`` in a new daemon thread for each connection ``listener`` accepts, until
    it is closed."""
    while not is_closed():
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def pump(src, dst, transform=None):
    """Copy bytes from ``src`` to ``dst`` (each chunk through ``transform``, if given) until
    either side ends; then close both."""
    try:
        while True:
            data = src.recv(65536)
            if not data:
                break
            dst.sendall(transform(data) if transform else data)
    except OSError:
        pass
    finally:
        close_quietly(src, dst)


def close_quietly(*sockets):
    for s in sockets:
        try:
            s.close()
        except OSError:
            pass


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tls_server_context(cert, key):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def find_python38():
    """A working Python 3.8 interpreter, if this machine has one (pyenv or PATH)."""
    candidates = []
    root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    if root.is_dir():
        candidates += [str(p / "bin" / "python3.8") for p in sorted(root.glob("3.8*"))]
    candidates.append(shutil.which("python3.8"))
    for c in candidates:
        if not c or not os.access(c, os.X_OK):
            continue
        try:
            out = subprocess.run([c, "-c", "import sys; print(sys.version_info[:2] == (3, 8))"],
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                 timeout=30)
        except (OSError, subprocess.SubprocessError):
            continue
        if out.stdout.strip() == "True":
            return c
    return None


def vendored_project(pytester, conftest):
    """A pytester suite with the client file vendored into it, the two topologies under
    topologies/ and ``conftest``."""
    shutil.copy(str(CLIENT), str(pytester.path / "remote_lab_client.py"))
    (pytester.path / "topologies").mkdir()
    shutil.copy(str(SIMPLE), str(pytester.path / "topologies" / "simple.yml"))
    shutil.copy(str(MAPPING), str(pytester.path / "topologies" / "mapping.yml"))
    pytester.makeconftest(conftest)
    return pytester


class ForeignServer(BaseHTTPRequestHandler):
    """Base of small stand-ins for a foreign (older, other-make) server, which no server of
    ours can play: JSON answers, DELETE 204, no access log."""

    def _answer(self, status, body=None):
        data = json.dumps(body).encode() if body is not None else b""
        self.send_response(status)
        if data:
            self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_DELETE(self):
        self._answer(204)

    def log_message(self, *args):
        pass
