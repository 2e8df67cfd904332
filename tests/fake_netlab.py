#!/usr/bin/env python3
"""A faithful fake `netlab` for tests: records every call, switchable failures.

Behaviour (outputs, the instance registry and its traps) comes from remote_lab's simulated netlab,
which mirrors real netlab 26.10 (see shared notes netlab-cli.md). On top of it, files in
$FAKE_NETLAB_DIR switch failures on:

  up_fail       `up` registers the `default` instance (as real netlab does) then fails, rc 1
  up_hang       `up` sleeps forever (tests the process-group kill on timeout)
  up_delay      `up` sleeps N seconds (file content) before working
  down_fail     `down` fails, rc 1
  inspect_fail  `inspect` fails, rc 1
  inspect_delay `inspect` sleeps N seconds (file content) before working

Every call is appended to $FAKE_NETLAB_DIR/calls.jsonl as {"argv", "cwd", "pid", "time",
"pgid", "stdin"} (stdin: what fd 0 is, e.g. /dev/null).
The registry lives in $FAKE_NETLAB_DIR too (REMOTE_LAB_SIM_HOME), so each test is isolated.
"""
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import remote_lab  # noqa: E402


def main(argv):
    control = os.environ.get("FAKE_NETLAB_DIR") or os.getcwd()
    os.makedirs(control, exist_ok=True)
    os.environ["REMOTE_LAB_SIM_HOME"] = control
    try:
        stdin = os.readlink("/proc/self/fd/0")
    except OSError:
        stdin = None  # closed
    with open(os.path.join(control, "calls.jsonl"), "a") as f:
        f.write(json.dumps({"argv": argv, "cwd": os.getcwd(), "pid": os.getpid(),
                            "time": time.time(), "pgid": os.getpgid(0), "stdin": stdin}) + "\n")

    def switch(name):
        path = os.path.join(control, name)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return f.read().strip() or "1"

    verb = argv[0] if argv else ""
    if verb == "up":
        if switch("up_hang"):
            time.sleep(3600)
        delay = switch("up_delay")
        if delay:
            time.sleep(float(delay))
        if switch("up_fail"):
            cwd = os.getcwd()
            remote_lab.sim_registry(lambda d: d.__setitem__("default", {"dir": cwd, "status": "failed"}))
            # a failed up still leaves a snapshot behind, so `down --cleanup` in the dir works
            with open(os.path.join(cwd, remote_lab.SIM_SNAPSHOT), "w") as f:
                json.dump({"nodes": {}}, f)
            print("Fatal error in netlab: fake failure of 'netlab up' (switch up_fail)", file=sys.stderr)
            return 1
    if verb == "down":
        delay = switch("down_delay")
        if delay:
            time.sleep(float(delay))
        if switch("down_fail"):
            print("Fatal error in netlab: fake failure of 'netlab down' (switch down_fail)",
                  file=sys.stderr)
            return 1
    if verb == "inspect" and switch("inspect_delay"):
        time.sleep(float(switch("inspect_delay")))
    if verb == "inspect" and switch("inspect_fail"):
        print("FatalError in inspect: fake failure (switch inspect_fail)", file=sys.stderr)
        return 1
    return remote_lab.simulated_netlab_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
