"""Test-session setup: a private HOME, and no REMOTE_LAB_* settings leaking in from outside.

The launcher keeps state under ~/.remote-http-launcher and local servers under ~/.remote-lab;
the tests must never touch (or be influenced by) the real ones.
"""
import os
import shutil
import tempfile

from helpers import stop_launched

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
    # every server start and CLI run imports remote_lab*.py (hundreds per run): compile them once,
    # caching bytecode outside the checkout, even where the environment turns caching off
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["PYTHONPYCACHEPREFIX"] = os.path.join(_home, ".pycache")


def pytest_unconfigure(config):
    """Stop any server a test launched into the private HOME, then remove it."""
    if not _home:
        return
    stop_launched(_home)
    shutil.rmtree(_home, ignore_errors=True)
