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

Speed: the server runs this script hundreds of times per test run, and importing all of
remote_lab.py (argparse, http.server, email, dataclasses, ...) took most of each call. So it runs
only remote_lab.py's section 10 (the simulation: stdlib json/os/re/sys/time only), compiled from
remote_lab.py's own text with its line numbers -- the same code, not a copy -- and falls back to
importing the module when that section cannot be found.
"""
import json
import os
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REMOTE_LAB = os.path.join(ROOT, "remote_lab.py")
SECTION_START = "# 10. Simulated netlab"
SECTION_END = "# 11. "
# what the section takes from the rest of the file: one constant and five stdlib modules (their
# import lines kept too, so the compiled code is the module's own, byte for byte)
SECTION_NEEDS = ("NETLAB_SNAPSHOT = ", "import json\n", "import os\n", "import re\n",
                 "import sys\n", "import time\n")


def load_simulation(path=REMOTE_LAB):
    """remote_lab.py's simulated netlab (section 10) as a module, or None when the file's
    layout is not the expected one."""
    import __future__  # annotations stay strings: the section's typing names are not needed
    with open(path) as f:
        lines = f.readlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(SECTION_START)]
    needs = [i for i, line in enumerate(lines) if line.startswith(SECTION_NEEDS)]
    if len(starts) != 1 or len(needs) != len(SECTION_NEEDS):
        return None
    start = starts[0]
    ends = [i for i, line in enumerate(lines) if i > start and line.startswith(SECTION_END)]
    if not ends:
        return None
    keep = set(needs) | set(range(start, ends[0]))
    # other lines blank: tracebacks point at remote_lab.py's real line numbers
    text = "".join(line if i in keep else "\n" for i, line in enumerate(lines))
    code = compile(text, path, "exec", flags=__future__.annotations.compiler_flag,
                   dont_inherit=True)
    module = types.ModuleType("remote_lab")
    module.__file__ = path
    exec(code, module.__dict__)
    return module


remote_lab = load_simulation()
if remote_lab is None:  # remote_lab.py's sections moved: slower, same behaviour
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
