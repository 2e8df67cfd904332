#!/usr/bin/env -S python3 -S
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
  create_delay  `create` (a topology check) sleeps N seconds (file content) before working

Every call is appended to $FAKE_NETLAB_DIR/calls.jsonl as {"argv", "cwd", "pid", "time",
"pgid", "stdin"} (stdin: what fd 0 is, e.g. /dev/null).
The registry lives in $FAKE_NETLAB_DIR too (REMOTE_LAB_SIM_HOME), so each test is isolated.

Speed: the server runs this script hundreds of times per test run, and importing all of
remote_lab.py (argparse, http.server, email, dataclasses, ...) took most of each call. So it runs
only remote_lab.py's section 10 (the simulation: stdlib json/os/re/sys/time only), compiled from
remote_lab.py's own text with its line numbers -- the same code, not a copy -- and falls back to
importing the module when that section cannot be found (tests/test_fake_netlab.py checks both).
It runs without `site` (python3 -S): it needs nothing beyond the standard library.
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


def section_text(source):
    """remote_lab.py's text with only section 10 and the lines it needs kept, the others blank
    (so tracebacks point at remote_lab.py's real line numbers); None when the file's layout is
    not the expected one."""
    spans = []
    for need in SECTION_NEEDS:
        if source.count("\n" + need) != 1:
            return None
        begin = source.index("\n" + need) + 1
        spans.append((begin, source.index("\n", begin) + 1))
    if source.count("\n" + SECTION_START) != 1:
        return None
    begin = source.index("\n" + SECTION_START) + 1
    end = source.find("\n" + SECTION_END, begin)
    if end < 0:
        return None
    spans.append((begin, end + 1))
    out, at = [], 0
    for begin, end in sorted(spans):
        if begin >= at:  # (a needed line inside the section is in it already)
            out += ["\n" * source.count("\n", at, begin), source[begin:end]]
            at = end
    return "".join(out)


def compiled(text, path):
    """``text`` compiled (annotations kept as strings: the section's typing names need no
    import), cached under PYTHONPYCACHEPREFIX when the tests set it (compiling is ~1/4 of a
    call), keyed by the CRC of the path and the text (the code names its file) and the text's
    length."""
    import __future__
    import marshal
    import zlib
    cache = None
    if sys.pycache_prefix:
        cache = os.path.join(sys.pycache_prefix, "fake_netlab.%s.%08x.%d.marshal" % (
            sys.implementation.cache_tag, zlib.crc32((path + "\0" + text).encode()), len(text)))
        try:
            with open(cache, "rb") as f:
                return marshal.load(f)
        except (OSError, EOFError, ValueError, TypeError):
            pass
    code = compile(text, path, "exec", flags=__future__.annotations.compiler_flag,
                   dont_inherit=True)
    if cache:
        try:
            os.makedirs(sys.pycache_prefix, exist_ok=True)
            tmp = "%s.%d.tmp" % (cache, os.getpid())
            with open(tmp, "wb") as f:
                marshal.dump(code, f)
            os.replace(tmp, cache)
        except OSError:
            pass
    return code


def load_simulation(path=REMOTE_LAB):
    """remote_lab.py's simulated netlab (section 10) as a module, or None when the file's
    layout is not the expected one."""
    with open(path) as f:
        text = section_text(f.read())
    if text is None:
        return None
    module = types.ModuleType("remote_lab")
    module.__file__ = path
    exec(compiled(text, path), module.__dict__)
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
    if verb == "create" and switch("create_delay"):
        time.sleep(float(switch("create_delay")))
    if verb == "inspect" and switch("inspect_fail"):
        print("FatalError in inspect: fake failure (switch inspect_fail)", file=sys.stderr)
        return 1
    return remote_lab.simulated_netlab_main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
