"""systemd integration without a running systemd: the unit files (systemd-analyze verify, the
settings they must carry, the example flags), sd_notify datagrams (READY, STATUS,
WATCHDOG, STOPPING) on a test socket, and socket activation (an inherited fd with
LISTEN_FDS/LISTEN_PID, and systemd-socket-activate itself).
"""
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time

import pytest

from helpers import FAKE_NETLAB, ROOT, SERVER, ServerProcess, http
from server_support import Api, wait_until
from systemd_support import (BASH, INSTALLED_BINARY, UNITS, NotifySocket,  # noqa: F401
                             _listening_socket, notify_socket, spare_fd, start_process,
                             start_socket_activated, unit)

sys.path.insert(0, str(ROOT))
import remote_lab  # noqa: E402

pytestmark = pytest.mark.timeout(60)

def seconds(text):
    """A systemd time span ("10min", "60s", "1h 30s") in seconds."""
    units = {"s": 1, "sec": 1, "min": 60, "m": 60, "h": 3600, "hr": 3600, "ms": 0.001}
    total = 0.0
    for number, suffix in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", text):
        total += float(number) * units[suffix or "s"]
    return total


def recording_netlab(tmp_path):
    """A netlab wrapper that records its environment and open fds, then runs the fake netlab."""
    wrapper = tmp_path / "netlab-wrapper"
    wrapper.write_text('#!/bin/sh\nenv > "$FAKE_NETLAB_DIR/env.$$"\n'
                       'ls /proc/$$/fd > "$FAKE_NETLAB_DIR/fds.$$"\n'
                       'exec "%s" "%s" "$@"\n' % (sys.executable, FAKE_NETLAB))
    wrapper.chmod(0o755)
    return wrapper


# ---------------------------------------------------------------------------------------------
# unit files


def test_units_pass_systemd_analyze_verify(tmp_path):
    tool = shutil.which("systemd-analyze")
    if not tool:
        pytest.skip("systemd-analyze is not installed")
    # ExecStart must name an existing executable for verify: point it at a copy of the server
    binary = tmp_path / "remote-lab"
    shutil.copy(SERVER, binary)
    binary.chmod(0o755)
    for name in ("remote-lab.service", "remote-lab.socket"):
        text = (UNITS / name).read_text().replace(INSTALLED_BINARY, str(binary))
        (tmp_path / name).write_text(text)
    assert INSTALLED_BINARY in (UNITS / "remote-lab.service").read_text()
    files = [str(tmp_path / "remote-lab.service"), str(tmp_path / "remote-lab.socket")]
    proc = subprocess.run([tool, "verify"] + files, capture_output=True, text=True, timeout=60,
                          cwd=str(tmp_path))
    output = proc.stdout + proc.stderr
    if proc.returncode != 0 and str(tmp_path) not in output and "remote-lab" not in output:
        pytest.skip("systemd-analyze cannot verify in this environment: %s" % output.strip())
    assert proc.returncode == 0, output
    # unknown keys, bad values etc. are only warnings: there must be none about our units
    ours = [line for line in output.splitlines() if "remote-lab" in line]
    assert ours == [], output

    # a broken copy must fail: proves verify really checked our files
    (tmp_path / "remote-lab.service").write_text(
        (tmp_path / "remote-lab.service").read_text().replace(str(binary), str(tmp_path / "nope")))
    broken = subprocess.run([tool, "verify"] + files, capture_output=True, text=True, timeout=60)
    assert broken.returncode != 0 and "nope" in broken.stdout + broken.stderr


def test_service_unit_settings():
    svc = unit("remote-lab.service")["Service"]
    assert svc["Type"] == "notify"
    assert svc["NotifyAccess"] == "main"
    watchdog = seconds(svc["WatchdogSec"])
    assert 10 <= watchdog <= 600
    assert svc["Restart"] == "on-failure"
    assert svc["KillMode"] == "mixed"
    assert seconds(svc["TimeoutStopSec"]) >= 300  # netlab down of a large lab
    assert svc["EnvironmentFile"] == "-/etc/default/remote-lab"
    assert svc["StateDirectory"] == "remote-lab"
    argv = shlex.split(svc["ExecStart"])
    assert argv[0] == INSTALLED_BINARY
    assert argv[1:3] == ["--state-dir", "/var/lib/remote-lab"] and "$REMOTE_LAB_ARGS" in argv
    # hardening: present where netlab tolerates it, absent where it would break netlab
    assert svc["ProtectSystem"] == "true"
    for key in ("NoNewPrivileges", "PrivateDevices", "PrivateTmp", "ProtectHome",
                "ProtectKernelTunables", "ProtectKernelModules", "ProtectClock",
                "RestrictNamespaces", "SystemCallFilter", "PrivateNetwork"):
        assert key not in svc, "%s would break netlab/containerlab" % key
    text = (UNITS / "remote-lab.service").read_text()
    for key in ("NoNewPrivileges", "PrivateDevices", "ProtectSystem=full|strict", "ProtectHome",
                "PrivateTmp", "ProtectClock"):
        assert re.search(r"^#\s+%s" % re.escape(key), text, re.M), "%s: no reason given" % key
    sock = unit("remote-lab.socket")["Socket"]
    assert sock["ListenStream"] == "8000" and sock.get("Accept", "no") == "no"


def test_example_environment_file_has_valid_flags():
    """The env example's REMOTE_LAB_ARGS, expanded into ExecStart as systemd does, parses."""
    values = {}
    for line in (UNITS / "remote-lab.env").read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = shlex.split(value)[0] if value.strip() else ""
    assert "REMOTE_LAB_ARGS" in values
    argv = []
    for word in shlex.split(unit("remote-lab.service")["Service"]["ExecStart"])[1:]:
        argv += values["REMOTE_LAB_ARGS"].split() if word == "$REMOTE_LAB_ARGS" else [word]
    settings = remote_lab.settings_from_args(argv)
    assert settings.state_dir == "/var/lib/remote-lab"
    assert settings.port == 8000 and settings.host == "0.0.0.0"
    # the commented alternatives are valid too
    for line in (UNITS / "remote-lab.env").read_text().splitlines():
        m = re.match(r'^#REMOTE_LAB_ARGS="(.*)"$', line)
        if m:
            remote_lab.settings_from_args(["--state-dir", "/x"] + m.group(1).split())


# ---------------------------------------------------------------------------------------------
# sd_notify


def test_sd_notify_ready_status_watchdog_stopping(tmp_path, notify_socket):
    # a netlab wrapper that records its environment: the notify variables must not leak to it
    srv = ServerProcess(tmp_path, netlab=recording_netlab(tmp_path),
                        env={"NOTIFY_SOCKET": notify_socket.address, "WATCHDOG_USEC": "1000000"})
    srv.start()
    try:
        api = Api(srv)
        wait_until(lambda: notify_socket.values("READY"), what="READY=1")
        first = notify_socket.all()[0][1]
        assert first == {"READY": "1", "STATUS": "idle"}

        a = api.new_session()
        wait_until(lambda: "sid=%s active, no lab" % a[:8] in notify_socket.values("STATUS"),
                   what="STATUS for an active session")
        assert api.post_lab(a)[0] == 200
        held = "lab r1,r2 (simple.yml) held by sid=%s" % a[:8]
        wait_until(lambda: held in notify_socket.values("STATUS"), what="STATUS lab held")
        b = api.new_session()
        api.new_session()
        wait_until(lambda: held + ", 2 waiting" in notify_socket.values("STATUS"),
                   what="STATUS with waiting sessions")
        assert api.delete_session(a) == 204
        wait_until(lambda: any(s.startswith("sid=%s active" % b[:8]) and s.endswith("1 waiting")
                               for s in notify_socket.values("STATUS")),
                   what="STATUS after the hand-over")
        statuses = notify_socket.values("STATUS")
        assert all(x != y for x, y in zip(statuses, statuses[1:])), "repeated STATUS lines"

        # WATCHDOG=1 every half WATCHDOG_USEC (0.5 s here), from the housekeeping thread
        start = time.monotonic()
        wait_until(lambda: len([t for t, f in notify_socket.all()
                                if "WATCHDOG" in f and t >= start]) >= 4,
                   timeout=5, what="4 watchdog pings")
        pings = [t for t, f in notify_socket.all() if f.get("WATCHDOG") == "1"]
        gaps = [y - x for x, y in zip(pings, pings[1:])]
        assert max(gaps) < 0.9, gaps  # never close to the 1 s limit
        assert min(gaps) > 0.2, gaps  # and not a busy loop

        # netlab never saw the variables
        envs = [p.read_text() for p in srv.fake_dir.glob("env.*")]
        assert envs and not any("NOTIFY_SOCKET" in e or "WATCHDOG_USEC" in e for e in envs)
        assert all("LISTEN_FDS" not in e for e in envs)
    finally:
        rc = srv.stop()
    assert rc == 0
    assert notify_socket.values("STOPPING") == ["1"]
    stopping = [f for _, f in notify_socket.all() if "STOPPING" in f][0]
    assert stopping["STATUS"].startswith("stopping")
    # no watchdog ping after STOPPING=1
    t_stop = [t for t, f in notify_socket.all() if "STOPPING" in f][0]
    assert not [t for t, f in notify_socket.all() if "WATCHDOG" in f and t > t_stop + 0.05]


def test_sd_notify_abstract_socket_and_no_watchdog(tmp_path):
    notify = NotifySocket()  # @name
    try:
        srv = ServerProcess(tmp_path, env={"NOTIFY_SOCKET": notify.address})
        with srv:
            wait_until(lambda: notify.values("READY"), what="READY=1 on an abstract socket")
            time.sleep(1.0)
            assert notify.values("WATCHDOG") == []  # no WATCHDOG_USEC: no pings
        assert notify.values("STOPPING") == ["1"]
    finally:
        notify.close()


def test_sd_notify_is_a_no_op_without_notify_socket(tmp_path):
    srv = ServerProcess(tmp_path, "--log-level", "DEBUG", env={"WATCHDOG_USEC": "200000"})
    srv.env.pop("NOTIFY_SOCKET", None)
    with srv:
        assert http("GET", srv.url + "/healthz")[0] == 204
        time.sleep(0.5)
    assert srv.proc.returncode == 0
    assert "| sd_notify" not in srv.log()  # nothing tried (a failed send logs at debug level)


def test_notifier_unit():
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid())}
    n = remote_lab.SystemdNotifier.from_environ(env)
    assert n.enabled and n.address == b"\0x" and n.watchdog_interval == 1.5
    assert env == {}  # removed, so that children do not inherit them
    other = remote_lab.SystemdNotifier.from_environ(
        {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": "1"})
    assert other.enabled and other.watchdog_interval is None  # the watchdog is someone else's
    off = remote_lab.SystemdNotifier.from_environ({})
    assert not off.enabled and off.notify("READY=1") is False and off.watchdog_interval is None
    assert not remote_lab.SystemdNotifier("vsock:2:1234").enabled  # unsupported: ignored


# ---------------------------------------------------------------------------------------------
# socket activation


def test_socket_activation_with_an_inherited_fd(tmp_path):
    """LISTEN_FDS=1 and LISTEN_PID=<the server's pid>, the socket on fd 3, as systemd does it:
    a shell sets LISTEN_PID=$$ and execs the server, so the pid stays the same."""
    early = []

    def connect_early(port):  # a client that connects before the server even runs: queued in
        conn = socket.create_connection(("127.0.0.1", port), timeout=20)  # the backlog, served
        conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        early.append(conn)
    # --port 1 is ignored: the inherited socket wins
    srv = ServerProcess(tmp_path, "--port", "1", netlab=recording_netlab(tmp_path))
    port = start_socket_activated(srv, before=connect_early)
    early = early[0]
    try:
        assert srv.port == port
        assert "socket activation: serving the listening socket passed by systemd" in srv.log()
        assert early.recv(4096).startswith(b"HTTP/1.1 204 ")
        early.close()
        status, body, _ = http("POST", srv.url + "/session")
        assert status == 201
        assert Api(srv).post_lab(body["session_id"])[0] == 200
        # the server holds the socket on fd 3; netlab inherited neither it nor the variables
        assert os.readlink("/proc/%d/fd/3" % srv.proc.pid).startswith("socket:")
        fds = [p.read_text().split() for p in srv.fake_dir.glob("fds.*")]
        assert fds and all("3" not in f for f in fds), fds
        envs = [p.read_text() for p in srv.fake_dir.glob("env.*")]
        assert envs and not any("LISTEN_FDS" in e or "LISTEN_PID" in e for e in envs)
    finally:
        rc = srv.stop()
    assert rc == 0, srv.log()
    with pytest.raises(OSError):  # the socket went away with the server
        socket.create_connection(("127.0.0.1", port), timeout=2)


def test_socket_activation_ignored_for_another_pid(tmp_path):
    if not BASH:
        pytest.skip("bash is not installed")
    listener = _listening_socket()
    high = spare_fd(listener)
    srv = ServerProcess(tmp_path, env={"LISTEN_FDS": "1", "LISTEN_PID": "1"})
    srv.cmd = [BASH, "-c", 'exec "$@" 3<&%d %d<&-' % (high, high), "sh"] + srv.cmd
    try:
        start_process(srv, pass_fds=(high,))
    finally:
        os.close(high)
    try:
        assert srv.port != listener.getsockname()[1]  # its own socket, on --port 0
        assert http("GET", srv.url + "/healthz")[0] == 204
        assert "socket activation" not in srv.log()
    finally:
        srv.stop()
        listener.close()


def test_systemd_socket_activate(tmp_path):
    tool = shutil.which("systemd-socket-activate")
    if not tool:
        pytest.skip("systemd-socket-activate is not installed")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = ServerProcess(tmp_path)
    srv.env["PYTHONUNBUFFERED"] = "1"
    passed = ["FAKE_NETLAB_DIR", "PYTHONUNBUFFERED"]
    srv.cmd = [tool, "-l", "127.0.0.1:%d" % port] + \
        ["-E%s=%s" % (k, srv.env[k]) for k in passed] + srv.cmd
    start_process(srv, wait_for_listen=False)
    try:
        wait_until(lambda: "Listening on 127.0.0.1:%d" % port in srv.log(), timeout=10,
                   what="systemd-socket-activate to listen")
        assert "remote-lab" not in srv.log()  # the server starts on the first connection
        srv.port = port
        assert http("GET", srv.url + "/healthz", timeout=20)[0] == 204
        assert "Listening on http://127.0.0.1:%d " % port in srv.log()
        assert "socket activation: serving the listening socket" in srv.log()
        status, body, _ = http("POST", srv.url + "/session")
        assert status == 201 and body["position"] == 0
        # exec, not fork: the pid we started is the server's
        assert "remote_lab.py" in open("/proc/%d/cmdline" % srv.proc.pid).read()
    finally:
        rc = srv.stop()
    assert rc == 0, srv.log()
