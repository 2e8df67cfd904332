"""A private sshd on a loopback port for the launcher tests (no system sshd involved).

It gets a generated host key, a temporary authorized key and its own HOME for the "remote" side
(SetEnv HOME=...), so nothing lands in the real home directory. Skips when sshd cannot be had.
"""
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateSSHD:
    def __init__(self, base: Path):
        self.base = base
        self.port = _free_port()
        self.key = base / "id"
        self.remote_home = base / "remote-home"
        self.remote_home.mkdir(parents=True)
        self.proc = None

    def start(self):
        b = self.base
        for name in ("host_key", "id"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(b / name)],
                           check=True)
        shutil.copy(b / "id.pub", b / "authorized_keys")
        os.makedirs("/run/sshd", exist_ok=True)
        (b / "sshd_config").write_text("\n".join([
            "Port %d" % self.port,
            "ListenAddress 127.0.0.1",
            "HostKey %s" % (b / "host_key"),
            "AuthorizedKeysFile %s" % (b / "authorized_keys"),
            "PidFile %s" % (b / "sshd.pid"),
            "StrictModes no",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "PermitRootLogin prohibit-password",
            "AllowTcpForwarding yes",
            "SetEnv HOME=%s" % self.remote_home,
            "",
        ]))
        self.log = open(b / "sshd.log", "wb")
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(b / "sshd_config")],
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("sshd exited: " + (b / "sshd.log").read_text())
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("sshd did not listen")

    @property
    def user(self):
        import pwd
        return pwd.getpwuid(os.getuid()).pw_name

    @property
    def target(self):
        return "%s@127.0.0.1:%d" % (self.user, self.port)

    @property
    def ssh_args(self):
        """Options for our launcher (REMOTE_LAB_SSH_ARGS)."""
        return "-i %s -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR" % self.key

    def ssh(self, command, timeout=20):
        argv = ["ssh", "-p", str(self.port)] + self.ssh_args.split() + ["-o", "BatchMode=yes",
                                                                       "%s@127.0.0.1" % self.user, command]
        return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)

    def stop(self):
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)
        self.log.close()


def sshd_available():
    return os.path.exists(SSHD) and shutil.which("ssh") and shutil.which("ssh-keygen") and os.getuid() == 0


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if not sshd_available():
        pytest.skip("no sshd/ssh/ssh-keygen available (apt-get install openssh-server), or not root")
    d = PrivateSSHD(tmp_path_factory.mktemp("sshd")).start()
    yield d
    d.stop()
