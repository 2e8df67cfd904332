#!/bin/sh
# Install real netlab (PyPI package `networklab`, ~90 MB) into a venv for tests/test_real_netlab.py.
# Idempotent: a venv whose netlab already runs is left alone (works offline once installed).
#   location: ${REMOTE_LAB_NETLAB_VENV:-$HOME/.cache/remote-lab/netlab-venv}
#   prints the netlab version at the end (first line of `netlab version`).
set -eu

VENV="${REMOTE_LAB_NETLAB_VENV:-$HOME/.cache/remote-lab/netlab-venv}"
PYTHON="${PYTHON:-python3}"

# stdin closed: several netlab commands prompt and would otherwise wait on a terminal
if ! VERSION=$("$VENV/bin/netlab" version </dev/null 2>/dev/null); then
    if [ ! -x "$VENV/bin/python" ]; then
        mkdir -p "$(dirname "$VENV")"
        "$PYTHON" -m venv "$VENV"
    fi
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check networklab </dev/null
    VERSION=$("$VENV/bin/netlab" version </dev/null)
fi

# (not `netlab version | head -1`: netlab dies of EPIPE with a traceback when the pipe closes)
printf '%s\n' "$VERSION" | sed -n 1p
