"""TLS: --tls-cert/--tls-key serve HTTPS (TLS >= 1.2) with a self-signed certificate made by the
openssl command; the client with REMOTE_LAB_CA_FILE, the launchers (local and over SSH, flags in
--server-args), socket activation and a reload. Plain HTTP, silent connections and old TLS
versions at the HTTPS port are refused without disturbing anyone else.
"""
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import warnings

import pytest

import client_support
from helpers import ROOT, SERVER, TOPOLOGIES, ServerProcess, read_json, stop_launched, wait_until
from chromium_support import chromium  # noqa: F401  (fixture)
from sshd_support import sshd  # noqa: F401  (fixture)
from systemd_support import _listening_socket, start_socket_activated

sys.path.insert(0, str(ROOT))
import remote_lab_client as rlc  # noqa: E402

pytestmark = pytest.mark.timeout(90)

SIMPLE = TOPOLOGIES / "simple.yml"


# --------------------------------------------------------------------------------------------
# Certificates and HTTPS helpers
# --------------------------------------------------------------------------------------------


def make_cert(directory, name, san):
    """A self-signed certificate (its own CA) with subjectAltName ``san``: (cert, key)."""
    cert, key = directory / (name + ".pem"), directory / (name + ".key")
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-keyout", str(key), "-out", str(cert), "-subj", "/CN=" + name,
                    "-addext", "subjectAltName=" + san],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=60)
    return cert, key


class Certs:
    def __init__(self, directory):
        # for the lab host as the tests reach it: 127.0.0.1 and localhost
        self.cert, self.key = make_cert(directory, "lab", "IP:127.0.0.1,DNS:localhost")
        # a name only: what the launchers check where their URL says 127.0.0.1
        self.named_cert, self.named_key = make_cert(directory, "named", "DNS:localhost")
        self.other_cert, self.other_key = make_cert(directory, "other",
                                                    "IP:127.0.0.1,DNS:localhost")
        self.both = directory / "both.pem"  # a CA file with lab and other
        self.both.write_bytes(self.cert.read_bytes() + self.other_cert.read_bytes())

    def args(self, named=False):
        if named:
            return ["--tls-cert", str(self.named_cert), "--tls-key", str(self.named_key)]
        return ["--tls-cert", str(self.cert), "--tls-key", str(self.key)]


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    if not shutil.which("openssl"):
        pytest.skip("the openssl command is needed to make the test certificates "
                    "(apt-get install openssl)")
    return Certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    client_support.clean_client_env(monkeypatch, tmp_path)


def verifying(cafile):
    return ssl.create_default_context(cafile=str(cafile))


def https(port, method, path, cafile, body=None, headers=None, timeout=10):
    """(status, parsed JSON or text or None, headers) of one request over HTTPS."""
    conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout,
                                       context=verifying(cafile))
    try:
        data = json.dumps(body).encode() if isinstance(body, dict) else body
        conn.request(method, path, body=data, headers=headers or {})
        resp = conn.getresponse()
        raw = resp.read()
    finally:
        conn.close()
    if not raw:
        return resp.status, None, resp.headers
    try:
        return resp.status, json.loads(raw), resp.headers
    except ValueError:
        return resp.status, raw.decode(errors="replace"), resp.headers


@pytest.fixture
def tls_server(tmp_path, certs):
    """Factory: a server with --tls-cert/--tls-key (and ``args``); stopped at the end."""
    started = []

    def start(*args, named=False):
        srv = ServerProcess(tmp_path / ("srv%d" % len(started)), *(certs.args(named) + list(args)))
        started.append(srv)
        return srv.start()

    yield start
    for srv in started:
        srv.stop()


def url_of(srv):
    return "https://127.0.0.1:%d" % srv.port


def no_traceback(srv):
    assert "Traceback" not in srv.log(), srv.log()


# --------------------------------------------------------------------------------------------
# The server over HTTPS, with the client
# --------------------------------------------------------------------------------------------


def test_https_end_to_end_with_the_client_and_the_ca_file(tls_server, certs, monkeypatch):
    srv = tls_server()
    assert "Listening on https://127.0.0.1:%d " % srv.port in srv.log()
    monkeypatch.setenv("REMOTE_LAB_CA_FILE", str(certs.cert))
    with client_support.client(url_of(srv)) as lab:
        assert lab.base_url == url_of(srv)
        devices = lab.acquire(SIMPLE)
        assert [d.name for d in devices] and lab.status()["running"] is True
        assert lab.session_id.startswith(
            https(srv.port, "GET", "/status", certs.cert)[1]["holder"]["session"])
        lab.release()
        sid = lab.session_id
    assert https(srv.port, "GET", "/session/" + sid, certs.cert)[0] == 404  # ended
    assert "up" in srv.netlab_verbs()
    no_traceback(srv)


def test_healthz_the_status_page_and_the_docs_over_https(tls_server, certs):
    srv = tls_server()
    assert https(srv.port, "GET", "/healthz", certs.cert)[0] == 204
    status, page, headers = https(srv.port, "GET", "/", certs.cert, headers={"Accept": "text/html"})
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    # the page's script asks its own origin's URLs (location.origin): they stay on https
    assert 'var url = location.origin + location.pathname' in page and "http://" not in page
    status, body, _ = https(srv.port, "GET", "/status?wait=1&since=x", certs.cert)
    assert status == 200 and "html" in body
    assert https(srv.port, "GET", "/docs", certs.cert)[0] == 200
    # a browser's same-origin POST over https passes the Origin check
    status, body, _ = https(srv.port, "POST", "/session", certs.cert,
                            headers={"Origin": url_of(srv), "Content-Length": "0"})
    assert status == 201, body


def test_a_wrong_ca_is_a_clear_client_error(tls_server, certs):
    srv = tls_server()
    with pytest.raises(rlc.ConnectionFailed) as caught:
        client_support.client(url_of(srv), ca_file=str(certs.other_cert), retries=0)
    message = str(caught.value)
    assert "TLS with 127.0.0.1:%d failed" % srv.port in message
    assert "certificate verify failed" in message and "REMOTE_LAB_CA_FILE" in message
    env = client_support.client_env(REMOTE_LAB_URL=url_of(srv),
                                    REMOTE_LAB_CA_FILE=str(certs.other_cert))
    line = client_support.one_error_line(client_support.cli("status", env=env))
    assert "certificate verify failed" in line, line
    no_traceback(srv)


def _tls11_context():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # OpenSSL 3 allows TLS 1.1 at level 0 only
    return ctx


def local_openssl_offers_tls11(certs):
    """Can this machine's OpenSSL speak TLS 1.1 at all (to a server that accepts it)?"""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            server_ctx.minimum_version = ssl.TLSVersion.TLSv1_1
        server_ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
        server_ctx.load_cert_chain(str(certs.cert), str(certs.key))
        client_ctx = _tls11_context()
    except (ValueError, ssl.SSLError):
        return False
    listener = _listening_socket()
    result = {}

    def serve():
        conn, _ = listener.accept()
        try:
            with server_ctx.wrap_socket(conn, server_side=True) as tls:
                result["version"] = tls.version()
        except (OSError, ssl.SSLError):
            pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with socket.create_connection(listener.getsockname(), timeout=5) as raw:
            with client_ctx.wrap_socket(raw) as tls:
                return tls.version() == "TLSv1.1"
    except (OSError, ssl.SSLError):
        return False
    finally:
        thread.join(5)
        listener.close()


def test_tls_1_2_is_accepted(tls_server, certs):
    srv = tls_server()
    ctx = verifying(certs.cert)
    ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            assert tls.version() == "TLSv1.2"
            tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            assert tls.recv(4096).startswith(b"HTTP/1.1 204 ")


def test_tls_1_1_is_refused(tls_server, certs):
    if not local_openssl_offers_tls11(certs):
        pytest.skip("this machine's OpenSSL cannot offer TLS 1.1 even to a server that accepts "
                    "it, so the server's refusal cannot be told apart")
    srv = tls_server()
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as raw:
        with pytest.raises(ssl.SSLError):
            _tls11_context().wrap_socket(raw).close()
    assert https(srv.port, "GET", "/healthz", certs.cert)[0] == 204
    no_traceback(srv)


def raw_exchange(port, data, timeout=10):
    """Send ``data`` on a plain TCP connection; everything answered until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)


def test_plain_http_to_the_https_port_gets_a_clear_400_and_breaks_nothing(tls_server, certs):
    srv = tls_server("--debug")
    answer = raw_exchange(srv.port, b"POST /session HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                    b"Content-Length: 0\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 ") and b"Connection: close" in head
    assert "https://" in json.loads(body)["detail"]
    assert raw_exchange(srv.port, b"\x00\x01garbage\r\n\r\n") == b""  # neither HTTP nor TLS
    assert https(srv.port, "GET", "/healthz", certs.cert)[0] == 204
    status, body, _ = https(srv.port, "POST", "/session", certs.cert)
    assert status == 201 and body["position"] == 0  # the plain POST made no session
    assert "plain HTTP request from 127.0.0.1 on the HTTPS port" in srv.log()
    no_traceback(srv)


def test_the_python_client_with_an_http_url_is_told_to_use_https(tls_server, certs):
    srv = tls_server()
    with pytest.raises(rlc.RemoteLabError) as caught:
        client_support.client("http://127.0.0.1:%d" % srv.port, retries=0)
    assert "speaks HTTPS" in str(caught.value), caught.value


def test_a_silent_connection_does_not_hold_up_others(tls_server, certs):
    """The handshake happens in the connection's thread: one that connects and says nothing
    (or stops halfway through its ClientHello) waits alone, and is dropped at --header-timeout."""
    srv = tls_server("--header-timeout", "5", "--debug")
    silent = socket.create_connection(("127.0.0.1", srv.port), timeout=20)
    halfway = socket.create_connection(("127.0.0.1", srv.port), timeout=20)
    halfway.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # a ClientHello's start
    try:
        started = time.monotonic()
        for _ in range(3):
            assert https(srv.port, "GET", "/healthz", certs.cert, timeout=5)[0] == 204
        assert time.monotonic() - started < 4  # not after the silent ones' 5 s deadline
        for conn in (silent, halfway):
            assert conn.recv(1) == b""  # dropped by the server, within the timeouts
        assert time.monotonic() - started < 30
        assert "TLS handshake with 127.0.0.1 failed" in srv.log()
    finally:
        silent.close()
        halfway.close()
    no_traceback(srv)


def test_the_connection_cap_closes_an_idle_tls_connection_to_make_room(tls_server, certs):
    srv = tls_server("--max-connections", "2")
    kept = []
    for _ in range(2):  # two kept-alive connections, idle after their first answer
        conn = http.client.HTTPSConnection("127.0.0.1", srv.port, timeout=10,
                                           context=verifying(certs.cert))
        conn.request("GET", "/healthz")
        assert conn.getresponse().read() == b""
        kept.append(conn)
    assert https(srv.port, "GET", "/healthz", certs.cert)[0] == 204  # room was made
    assert kept[0].sock.recv(1) == b""  # the oldest idle one was closed for it
    kept[1].request("GET", "/healthz")
    assert kept[1].getresponse().status == 204
    for conn in kept:
        conn.close()
    no_traceback(srv)


def test_a_long_poll_over_https_ends_when_its_client_goes(tls_server, certs):
    """_peer_closed() on a TLS socket: a status page watcher that closes stops watching."""
    srv = tls_server()
    conn = http.client.HTTPSConnection("127.0.0.1", srv.port, timeout=10,
                                       context=verifying(certs.cert))
    token = https(srv.port, "GET", "/status", certs.cert)[1]["token"]
    conn.request("GET", "/status?wait=30&since=" + token)
    time.sleep(0.3)
    conn.sock.close()
    conn.close()
    wait_until(lambda: "remote_lab_status_page_watchers 0" in
               https(srv.port, "GET", "/metrics", certs.cert)[1], timeout=5,
               what="the watcher to go")


def test_the_status_page_updates_itself_over_https_in_chromium(tls_server, certs, chromium):  # noqa: F811
    """The page's script long-polls its relative URL "status?...": over https too. The page
    loads, its long-poll waits; a new session changes the status and the script renders it."""
    srv = tls_server()

    def watchers():
        text = https(srv.port, "GET", "/metrics", certs.cert)[1]
        return "remote_lab_status_page_watchers 0" not in text

    proc = chromium("--ignore-certificate-errors", "--virtual-time-budget=500", "--dump-dom",
                    url_of(srv) + "/", background=True)
    try:
        wait_until(lambda: watchers() or proc.poll() is not None, timeout=60,
                   what="the page's long-poll")
        assert proc.poll() is None, proc.stderr.read().decode(errors="replace")[-3000:]
        status, body, _ = https(srv.port, "POST", "/session", certs.cert)
        assert status == 201
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    dom = out.decode(errors="replace")
    assert 'data-holder="%s"' % body["session_id"][:8] in dom, dom[:3000]
    assert '<span id="live" class="on">live, updated ' in dom


# --------------------------------------------------------------------------------------------
# Start-up errors: one clear line, nothing started
# --------------------------------------------------------------------------------------------


def start_fails(tmp_path, *args):
    status = tmp_path / "status.json"
    status.write_text(json.dumps({"uid": os.getuid(), "pid": 0, "status": "starting"}))
    proc = subprocess.run([sys.executable, str(SERVER), "--simulate", "--port", "0",
                           "--state-dir", str(tmp_path / "state"), "--status-file", str(status)]
                          + [str(a) for a in args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("remote-lab: "), proc.stderr
    assert read_json(status)["status"] == "failed" and read_json(status)["error"] == lines[0]
    return lines[0]


def test_one_tls_flag_alone_is_refused(tmp_path, certs):
    assert "--tls-cert and --tls-key go together (only --tls-cert given)" in \
        start_fails(tmp_path, "--tls-cert", certs.cert)
    assert "(only --tls-key given)" in start_fails(tmp_path, "--tls-key", certs.key)


def test_bad_certificate_or_key_files_are_refused(tmp_path, certs):
    missing = tmp_path / "missing.pem"
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    assert "cannot read --tls-cert %s: No such file or directory" % missing in \
        start_fails(tmp_path, "--tls-cert", missing, "--tls-key", certs.key)
    assert "cannot read --tls-key %s: Is a directory" % tmp_path in \
        start_fails(tmp_path, "--tls-cert", certs.cert, "--tls-key", tmp_path)
    assert "--tls-cert %s is not a PEM certificate" % junk in \
        start_fails(tmp_path, "--tls-cert", junk, "--tls-key", certs.key)
    assert "--tls-key %s is not a PEM private key" % certs.cert in \
        start_fails(tmp_path, "--tls-cert", certs.cert, "--tls-key", certs.cert)
    assert "the key does not belong to the certificate" in \
        start_fails(tmp_path, "--tls-cert", certs.cert, "--tls-key", certs.named_key)
    locked = tmp_path / "locked.key"
    subprocess.run(["openssl", "pkey", "-in", str(certs.key), "-aes256", "-passout", "pass:pw",
                    "-out", str(locked)], check=True, capture_output=True, timeout=30)
    assert "is protected by a passphrase" in \
        start_fails(tmp_path, "--tls-cert", certs.cert, "--tls-key", locked)


# --------------------------------------------------------------------------------------------
# Socket activation and reload
# --------------------------------------------------------------------------------------------


def test_socket_activation_serves_https(tmp_path, certs):
    srv = ServerProcess(tmp_path, "--port", "1", *certs.args())
    port = start_socket_activated(srv)
    try:
        assert srv.port == port and "Listening on https://127.0.0.1:%d " % port in srv.log()
        assert "socket activation: serving the listening socket" in srv.log()
        assert https(port, "GET", "/healthz", certs.cert)[0] == 204
        with client_support.client(url_of(srv), ca_file=str(certs.cert)) as lab:
            lab.acquire(SIMPLE)
    finally:
        rc = srv.stop()
    assert rc == 0, srv.log()
    no_traceback(srv)


def test_a_reload_keeps_serving_https_and_takes_a_renewed_certificate(tls_server, certs,
                                                                      tmp_path):
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    shutil.copy(certs.cert, cert)
    shutil.copy(certs.key, key)
    srv = ServerProcess(tmp_path / "srv", "--tls-cert", cert, "--tls-key", key).start()
    try:
        with client_support.client(url_of(srv), ca_file=str(certs.both),
                                   heartbeat_interval=0.2) as lab:
            lab.acquire(SIMPLE)
            # a renewed certificate that does not load: the reload is refused, HTTPS goes on
            cert.write_text("oops\n")
            srv.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: "| ERROR |" in srv.log(), timeout=40, what="the refusal")
            line = [x for x in srv.log().splitlines() if "| ERROR |" in x][0]
            assert "reload refused" in line and "is not a PEM certificate" in line, line
            assert https(srv.port, "GET", "/healthz", certs.cert)[0] == 204
            # renewed for real (another certificate): the reload serves it on the same socket
            shutil.copy(certs.other_cert, cert)
            shutil.copy(certs.other_key, key)
            srv.proc.send_signal(signal.SIGHUP)
            wait_until(lambda: srv.log().count("Listening on https://") == 2, timeout=40,
                       what="the reload")
            wait_until(lambda: https_serves(srv.port, certs.other_cert, "127.0.0.1"),
                       timeout=10, what="the renewed certificate")
            assert lab.lost is None
            lab.acquire(SIMPLE)  # the session survived; its client reconnects over https
            assert lab.reused is True
    finally:
        rc = srv.stop()
    assert rc == 0, srv.log()
    no_traceback(srv)


def https_serves(port, cafile, name):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            with verifying(cafile).wrap_socket(raw, server_hostname=name):
                return True
    except (OSError, ssl.SSLError):
        return False


# --------------------------------------------------------------------------------------------
# The launchers: the flags in --server-args, the scheme from the status file
# --------------------------------------------------------------------------------------------


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private HOME for the launcher's files; what it started is stopped at the end."""
    h = tmp_path / "home"
    h.mkdir()
    monkeypatch.setenv("HOME", str(h))
    yield h
    stop_launched(h)


def records(folder):
    return [read_json(p) for p in sorted(folder.glob("remote-lab-*.json"))]


def test_the_local_launcher_serves_https_with_tls_server_args(home, certs, monkeypatch):
    """Local mode: the certificate is checked for "localhost" (the URL says 127.0.0.1)."""
    monkeypatch.setenv("REMOTE_LAB_SERVER_ARGS", " ".join(["--simulate"] + certs.args(named=True)))
    monkeypatch.setenv("REMOTE_LAB_CA_FILE", str(certs.named_cert))
    with client_support.client(None) as lab:
        assert lab.base_url.startswith("https://127.0.0.1:")
        lab.acquire(SIMPLE)
        lab.release()
    (server,) = records(home / ".remote-http-launcher" / "server")
    assert server["status"] == "running" and server["scheme"] == "https"
    (conn,) = records(home / ".remote-http-launcher" / "client")
    assert conn["url"] == lab.base_url and conn["tls_name"] == "localhost"
    out = client_support.cli("ps", env=os.environ.copy())
    assert "https://127.0.0.1:%d" % server["port"] in out.stdout, out.stdout
    out = client_support.cli("health", env=os.environ.copy())
    assert out.returncode == 0, out.stderr
    assert rlc.Launcher().stop() is True


def test_the_ssh_launcher_with_tls_server_args_gives_an_https_client(home, sshd, certs,  # noqa: F811
                                                                      monkeypatch):
    """Through the tunnel the URL says 127.0.0.1; the certificate is checked for the lab host's
    name as the ssh:// URL gives it (here "localhost", the only name the certificate has)."""
    target = "%s@localhost:%d" % (sshd.user, sshd.port)
    monkeypatch.setenv("REMOTE_LAB_SSH_ARGS", sshd.ssh_args)
    monkeypatch.setenv("REMOTE_LAB_URL", "ssh://" + target)
    monkeypatch.setenv("REMOTE_LAB_SERVER_ARGS", " ".join(["--simulate"] + certs.args(named=True)))
    monkeypatch.setenv("REMOTE_LAB_CA_FILE", str(certs.named_cert))
    try:
        with client_support.client(None) as lab:
            assert lab.base_url.startswith("https://127.0.0.1:")
            lab.acquire(SIMPLE)
            lab.release()
        (server,) = records(sshd.remote_home / ".remote-http-launcher" / "server")
        assert server["scheme"] == "https" and server["port"] != int(lab.base_url.split(":")[2])
        (conn,) = records(home / ".remote-http-launcher" / "client")
        assert conn["tls_name"] == "localhost" and conn["url"] == lab.base_url
        # a certificate the client does not trust: one clear error naming what was checked
        with pytest.raises(rlc.ConnectionFailed) as caught:
            client_support.client(None, ca_file=str(certs.other_cert), retries=0)
        assert "(certificate checked for localhost) failed" in str(caught.value)
        assert "certificate verify failed" in str(caught.value)
    finally:
        rlc.Launcher(target).stop()
        stop_launched(sshd.remote_home)


# --------------------------------------------------------------------------------------------
# The README's example, as written
# --------------------------------------------------------------------------------------------


def test_the_readme_tls_example_works_as_written(tmp_path, certs):
    import shlex

    from test_readme import commands, section, sh_blocks

    text = section("TLS")
    make, chmod, serve = commands(sh_blocks(text)[0])
    assert make.startswith("openssl req ") and chmod == "chmod 600 key.pem"
    subprocess.run(shlex.split(make), cwd=str(tmp_path), check=True, capture_output=True,
                   timeout=60)
    subprocess.run(shlex.split(chmod), cwd=str(tmp_path), check=True, timeout=10)
    assert oct((tmp_path / "key.pem").stat().st_mode & 0o777) == "0o600"
    words = shlex.split(serve)
    assert words[:2] == ["python3", "remote_lab.py"], serve
    words[words.index("--port") + 1] = "0"
    words[words.index("--host") + 1] = "127.0.0.1"  # (tests talk to loopback only)
    srv = ServerProcess(tmp_path / "srv", *words[2:], simulate=True)
    # (the files are named relative to the working directory, as in the README: clean_env
    # made it tmp_path)
    with srv:
        assert "Listening on https://127.0.0.1:" in srv.log()
        for name in ("127.0.0.1", "localhost"):  # the names its subjectAltName lists
            assert https_serves(srv.port, tmp_path / "cert.pem", name)
        assert https(srv.port, "GET", "/healthz", tmp_path / "cert.pem")[0] == 204
    assert 'REMOTE_LAB_CA_FILE=' in text and "--server-args" in text
