"""Test-session setup: a private HOME, and no REMOTE_LAB_* settings leaking in from outside.

The launcher keeps state under ~/.remote-http-launcher and local servers under ~/.remote-lab;
the tests must never touch (or be influenced by) the real ones.
"""
import json
import os
import shutil
import sys
import signal
import tempfile

_KEEP = ("REMOTE_LAB_NETLAB_VENV", "REMOTE_LAB_TEST_VENV")
_home = None


def pytest_configure(config):
    global _home
    real_home = os.path.expanduser("~")
    # real netlab is installed under the real HOME unless told otherwise (see .ci/netlab-venv.sh)
    os.environ.setdefault("REMOTE_LAB_NETLAB_VENV",
                          os.path.join(real_home, ".cache", "remote-lab", "netlab-venv"))
    for key in list(os.environ):
        if key.startswith("REMOTE_LAB_") and key not in _KEEP:
            del os.environ[key]
    _home = tempfile.mkdtemp(prefix="remote-lab-test-home-")
    os.environ["HOME"] = _home


def pytest_unconfigure(config):
    """Stop any server a test launched into the private HOME, then remove it."""
    if not _home:
        return
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from remote_lab_client import _same_process  # pid AND start time: never a reused pid

    state = os.path.join(_home, ".remote-http-launcher")
    for side, field, started in (("server", "pid", "start_time"),
                                 ("client", "tunnel_pid", "tunnel_start_time")):
        folder = os.path.join(state, side)
        for name in os.listdir(folder) if os.path.isdir(folder) else ():
            try:
                with open(os.path.join(folder, name)) as f:
                    data = json.load(f)
                pid = data.get(field)
                if _same_process(pid, data.get(started)):
                    os.killpg(pid, signal.SIGKILL) if side == "server" else os.kill(pid, signal.SIGKILL)
            except (OSError, ValueError, AttributeError):
                pass
    shutil.rmtree(_home, ignore_errors=True)
