"""tests/run.py, the parallel suite runner CI uses, on a tiny generated suite of its own:
exit status, counts, one block per run, the serial group, Ctrl-C leaving nothing running."""
import re
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from helpers import ROOT, pid_alive, wait_until

pytestmark = pytest.mark.timeout(60)

PASSING = """
import time, pytest

def test_prints_slowly():
    for i in range(40):
        print("PASS-LINE %d" % i, flush=True)
        time.sleep(0.01)

@pytest.mark.skip(reason="shows up in the counts")
def test_skipped():
    pass
"""

FAILING = """
import time

def test_prints_slowly_and_fails():
    for i in range(40):
        print("FAIL-LINE %d" % i, flush=True)
        time.sleep(0.01)
    assert False, "the failing file"

def test_passes():
    pass
"""

# two files of the serial group: each holds a marker file for a second, so a run of both at the
# same time fails one of them
SERIAL = """
import os, time
from pathlib import Path

def test_alone():
    fd = os.open(str(Path(__file__).parent / "busy"), os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    time.sleep(1)
    os.close(fd)
    os.unlink(str(Path(__file__).parent / "busy"))
"""

HANGING = """
import os, subprocess, time
from pathlib import Path

def test_hangs_with_a_child_in_its_own_session():
    child = subprocess.Popen(["sleep", "60"], start_new_session=True)
    Path(__file__).with_name("pids.tmp").write_text("%d %d" % (os.getpid(), child.pid))
    os.replace(str(Path(__file__).with_name("pids.tmp")), str(Path(__file__).with_name("pids")))
    time.sleep(60)
"""


def make_suite(root, files):
    (root / "tests").mkdir()
    shutil.copy(str(ROOT / "tests" / "run.py"), str(root / "tests" / "run.py"))
    (root / "pytest.ini").write_text("[pytest]\ntestpaths = tests\n")
    for name, text in files.items():
        (root / "tests" / name).write_text(textwrap.dedent(text))
    return [sys.executable, str(root / "tests" / "run.py")]


def run(argv, timeout=40):
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout)


def lines_with(out, word):
    """Where the test's own printed lines are (not pytest's echo of its source)."""
    return [i for i, line in enumerate(out.splitlines()) if re.search(word + r" \d+$", line)]


def test_runs_files_in_parallel_blocks_and_sums_up(tmp_path):
    runner = make_suite(tmp_path, {"test_passing.py": PASSING, "test_failing.py": FAILING,
                                   "test_real_netlab_a.py": SERIAL,
                                   "test_real_netlab_b.py": SERIAL})
    out = run(runner + ["-j", "3", "-s", "-p", "no:cacheprovider"])
    assert out.returncode == 1, out.stdout + out.stderr
    text = out.stdout
    assert "4 files in 3 pytest runs: 4 passed, 1 failed, 1 skipped in" in text, text
    # the two printing files ran at the same time, yet each one's lines are one block
    for word in ("PASS-LINE", "FAIL-LINE"):
        at = lines_with(text, word)
        assert len(at) == 40 and at == list(range(at[0], at[0] + 40)), text
    assert "##### tests/test_real_netlab_a.py tests/test_real_netlab_b.py: ok" in text, text
    assert "FAILED run: tests/test_failing.py (exit 1)" in text, text
    assert "the failing file" in text  # pytest's own report is in the block

    passing = run(runner + ["tests/test_passing.py", "-q"])
    assert passing.returncode == 0, passing.stdout + passing.stderr
    assert "1 files in 1 pytest runs: 1 passed, 1 skipped" in passing.stdout, passing.stdout

    # -x: the first failing run stops the rest (one at a time, the failing file comes second)
    first = run(runner + ["-j", "1", "-x", "-k", "not alone"])
    assert first.returncode == 1, first.stdout + first.stderr
    assert "FAILED run: tests/test_failing.py" in first.stdout, first.stdout
    assert "test_passing.py" not in first.stdout, first.stdout

    nothing = run(runner + ["-k", "no_such_test"])
    assert nothing.returncode == 5, nothing.stdout + nothing.stderr
    assert "6 deselected" in nothing.stdout and "FAILED" not in nothing.stdout, nothing.stdout


def test_ctrl_c_stops_every_run_and_what_its_tests_started(tmp_path):
    runner = make_suite(tmp_path, {"test_hanging.py": HANGING, "test_passing.py": PASSING})
    proc = subprocess.Popen(runner + ["-j", "2"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        pids = tmp_path / "tests" / "pids"
        wait_until(pids.exists, timeout=20, what="the hanging test to start")
        pytest_pid, child_pid = map(int, pids.read_text().split())
        proc.send_signal(signal.SIGINT)
        out = proc.communicate(timeout=30)[0]
    finally:  # on a failure above: SIGTERM stops the runner's runs too, SIGKILL would not
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
    assert proc.returncode == 130, out
    assert "Interrupted: stopping" in out and "tests/test_hanging.py: interrupted" in out, out
    wait_until(lambda: not pid_alive(pytest_pid) and not pid_alive(child_pid), timeout=5,
               what="the pytest run and its child to be gone")


def test_ci_runs_the_command_the_readme_gives():
    readme = (ROOT / "README.md").read_text()
    tests_section = readme.split("\n## Tests\n", 1)[1].split("\n## ", 1)[0]
    block = tests_section.split("```sh\n", 1)[1].split("```", 1)[0]
    commands = [line.split("#")[0].split() for line in block.splitlines()]
    assert [".venv/bin/python", "tests/run.py"] in commands, block
    assert [".venv/bin/python", "-m", "pytest"] in commands, block  # still works, one run
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == "python3 tests/run.py", ci[-1]
