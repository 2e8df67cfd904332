#!/usr/bin/env python3
"""Run the suite's test files in parallel pytest processes (stdlib only; what CI runs).

    python3 tests/run.py [-j N] [--group-below S] [pytest args...]

Most of the suite's time is waiting (server start-ups, the timeouts the tests measure, real
netlab, Chromium), not CPU, so N concurrent ``python3 -m pytest`` runs finish it in a fraction of
the serial time. Files go heaviest first (WEIGHTS, seconds measured on 2 cores) to whichever
worker is free; light files are run a few per pytest process (saving start-ups); files that
share something global (SERIAL) run in one process, one after another. Each run's output is
printed as one block when it ends, then a summary. Exit status: 0 when every run passed, 1 when
a test failed or a run errored, 5 when no test ran, 130 on Ctrl-C (every run is stopped first).
pytest arguments go to every run; paths among them replace the default file list (tests/test_*.py
as pytest collects them); ``-x`` stops all runs at the first failure.
"""
import argparse
import fnmatch
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TESTS = "tests"

# seconds per file (pytest start-up included), from a -j 2 run on a busy 2-core machine; only
# the order and the grouping depend on them
WEIGHTS = {
    "test_real_netlab.py": 100, "test_real_netlab_check.py": 5,
    "test_client.py": 82, "test_client_safety.py": 73, "test_launcher.py": 70,
    "test_restart_client.py": 70, "test_server_queue.py": 56, "test_server_restart.py": 37,
    "test_client_cli.py": 36, "test_server_hardening_limits.py": 35, "test_client_local.py": 31,
    "test_auth.py": 30, "test_ops.py": 29, "test_client_plugin.py": 28, "test_tls.py": 26,
    "test_client_cli_messages.py": 25, "test_reload.py": 22, "test_server_ops.py": 20,
    "test_server_hardening_lab.py": 20, "test_client_who.py": 17, "test_server_lab.py": 15,
    "test_client_hold.py": 14, "test_status_page_chromium.py": 14, "test_server_api.py": 14,
    "test_client_check.py": 13, "test_readme.py": 13, "test_origin_chromium.py": 11,
    "test_systemd.py": 11, "test_auth_client.py": 11, "test_server_uploads.py": 7,
    "test_server_hold.py": 7, "test_docs_page.py": 6, "test_status_page_who_chromium.py": 6,
    "test_server_origin.py": 6, "test_server_check.py": 5, "test_server_hardening_http.py": 4,
    "test_fingerprint.py": 4, "test_ops_parts.py": 4, "test_queue.py": 3, "test_fake_netlab.py": 3,
    "test_lab_planner.py": 2, "test_lab_logic.py": 2, "test_suite_runner.py": 8,
}
DEFAULT_WEIGHT = 10.0  # a new file: neither last nor grouped until measured
GROUP_BELOW = 6.0      # files lighter than this share pytest runs ...
GROUP_UP_TO = 12.0     # ... of about this many seconds together

# files that must not run at the same time as each other: each pattern is one run, in order
# (the real-netlab files share netlab's per-user state and are heavy on their own)
SERIAL = ["tests/test_real_netlab*.py"]

# pytest options that take a value as the next argument (so it is not taken for a path)
VALUE_OPTIONS = {"-k", "-m", "-p", "-o", "-c", "-W", "--deselect", "--ignore", "--rootdir",
                 "--basetemp", "--confcutdir", "--junitxml", "--junit-xml", "--maxfail",
                 "--timeout", "--durations", "--tb", "-r", "--color", "--log-level",
                 "--override-ini", "--ignore-glob", "--capture", "--import-mode"}
EXIT_FIRST = {"-x", "--exitfirst"}
NORECURSE = {"_darcs", "build", "CVS", "dist", "node_modules", "venv", "{arch}", "__pycache__"}

# the counts of pytest's last line ("3 passed, 1 failed, 2 skipped in 4.56s")
COUNT_RE = re.compile(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed|deselected)\b")
ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")
# marks every process of this runner's pytest runs (conftest drops REMOTE_LAB_* variables)
MARK_VAR = "SUITE_RUN_MARK"


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description="Run the test files in N parallel pytest processes; other arguments go to "
                    "pytest.", add_help=True)
    parser.add_argument("-j", "--jobs", type=int, default=default_jobs(),
                        help="concurrent pytest runs (default %(default)s)")
    parser.add_argument("--group-below", type=float, default=GROUP_BELOW, metavar="SECONDS",
                        help="run files lighter than this a few per pytest process "
                             "(default %(default)s; 0: one process per file)")
    opts, pytest_args = parser.parse_known_args(argv)
    if opts.jobs < 1:
        parser.error("-j must be at least 1")
    return opts, pytest_args


def default_jobs():
    """The CPU count, at least 2: the suite waits far more than it computes."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(2, cpus)


def split_paths(pytest_args):
    """(paths, options): positional arguments naming existing files/dirs (or file::test) are
    paths; everything else is passed through."""
    paths, options = [], []
    previous = None
    for arg in pytest_args:
        takes_value = previous in VALUE_OPTIONS
        previous = arg
        if not takes_value and not arg.startswith("-") and (ROOT / arg.split("::")[0]).exists():
            paths.append(arg)
        else:
            options.append(arg)
    return paths, options


def suite_files(paths):
    """The test files to run, relative to ROOT, as pytest collects them from testpaths."""
    if not paths:
        paths = [TESTS]
    files = []
    for path in paths:
        full = ROOT / path.split("::")[0]
        if full.is_dir():
            found = sorted(set(full.rglob("test_*.py")) | set(full.rglob("*_test.py")))
            files += [str(p.relative_to(ROOT)) for p in found if collected(p.relative_to(full))]
        else:
            files.append(path)
    return list(dict.fromkeys(files))


def collected(relative):
    """False under the directories pytest does not recurse into (its norecursedirs default)."""
    return not any(d.startswith(".") or d.endswith(".egg") or d in NORECURSE
                   for d in relative.parts[:-1])


def weight(path):
    return WEIGHTS.get(Path(path.split("::")[0]).name, DEFAULT_WEIGHT)


def plan_runs(files, group_below):
    """The pytest runs as lists of files, heaviest first: SERIAL groups as one run each, light
    files packed a few to a run, the rest one run each."""
    runs, rest = [], list(files)
    for pattern in SERIAL:
        group = [f for f in rest if fnmatch.fnmatch(f.split("::")[0], pattern)]
        if group:
            runs.append(group)
            rest = [f for f in rest if f not in group]
    heavy = [f for f in rest if weight(f) >= group_below]
    light = sorted((f for f in rest if weight(f) < group_below), key=weight, reverse=True)
    runs += [[f] for f in heavy]
    while light:  # first fit: each group takes the heaviest files that still fit
        group, total = [], 0.0
        for f in list(light):
            if not group or total + weight(f) <= GROUP_UP_TO:
                group.append(f)
                total += weight(f)
                light.remove(f)
        runs.append(group)
    return sorted(runs, key=lambda run: -sum(weight(f) for f in run))


class Run:
    """One pytest process over some files; its output goes to a file until it ends."""

    def __init__(self, files, options, out_dir, mark):
        self.files = files
        self.options = options
        self.out_path = os.path.join(out_dir, "run-%s.log" % uuid.uuid4().hex[:8])
        self.mark = mark
        self.proc = None
        self.rc = None
        self.seconds = 0.0
        self.interrupted = False

    @property
    def name(self):
        return " ".join(self.files)

    def start(self):
        env = dict(os.environ)
        env[MARK_VAR] = self.mark
        argv = [sys.executable, "-m", "pytest"] + self.options + self.files
        self.started = time.monotonic()
        with open(self.out_path, "wb") as out:
            self.proc = subprocess.Popen(argv, cwd=str(ROOT), env=env, stdin=subprocess.DEVNULL,
                                         stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def wait(self):
        self.rc = self.proc.wait()
        self.seconds = time.monotonic() - self.started
        return self.rc

    def output(self):
        with open(self.out_path, "rb") as f:
            return f.read().decode("utf-8", "replace")

    def counts(self):
        """{"passed": n, ...} from pytest's last summary line; {} when there is none."""
        for line in reversed(ANSI_RE.sub("", self.output()).splitlines()):
            summary = COUNT_RE.search(line) or "no tests ran" in line
            if summary and re.search(r" in [\d.]+s\b", line):
                found = {}
                for n, what in COUNT_RE.findall(line):
                    what = "error" if what.startswith("error") else what
                    found[what] = found.get(what, 0) + int(n)
                return found
        return {}

    @property
    def ok(self):
        # 5: nothing collected or all deselected (-k) -- not a failure of this run by itself
        return not self.interrupted and self.rc in (0, 5)

    def signal_group(self, sig):
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass


class Scheduler:
    """N workers, each taking the next run (heaviest first) when its last one ends."""

    def __init__(self, runs, jobs, stop_on_failure):
        self.pending = list(runs)
        self.jobs = jobs
        self.stop_on_failure = stop_on_failure
        self.done = []
        self.running = []
        self.stopping = False
        self.lock = threading.Lock()

    def next_run(self):
        with self.lock:
            if self.stopping or not self.pending:
                return None
            run = self.pending.pop(0)
            run.start()
            self.running.append(run)
            return run

    def worker(self):
        while True:
            run = self.next_run()
            if run is None:
                return
            run.wait()
            with self.lock:
                self.running.remove(run)
                run.interrupted = run.interrupted or (self.stopping and not run.ok)
                self.done.append(run)
                print_block(run)
                if self.stop_on_failure and not run.ok and not self.stopping:
                    self.stopping = True
                    threading.Thread(target=self.stop_running, daemon=True).start()

    def run_all(self):
        threads = [threading.Thread(target=self.worker, daemon=True)
                   for _ in range(min(self.jobs, len(self.pending)))]
        try:
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(0.2)
        except KeyboardInterrupt:
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # one Ctrl-C will do: the stop is bounded
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            with self.lock:
                self.stopping = True
            print("\nInterrupted: stopping %d pytest run(s)..." % len(self.running), flush=True)
            self.stop_running()
            for t in threads:
                if t.ident is not None:  # started
                    t.join(30)
            raise

    def stop_running(self, grace=15.0):
        """SIGINT first (pytest runs its teardowns: servers stopped), then SIGKILL the groups."""
        with self.lock:
            running = list(self.running)
        for run in running:
            run.interrupted = True
            run.signal_group(signal.SIGINT)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(r.proc.poll() is None for r in running):
            time.sleep(0.1)
        for run in running:
            run.signal_group(signal.SIGKILL)


def kill_marked(mark):
    """SIGKILL any process left with our mark in its environment (a server or browser a test
    started in a session of its own, when its pytest had to be killed). Linux /proc only."""
    if not mark or not os.path.isdir("/proc"):
        return
    needle = ("%s=%s" % (MARK_VAR, mark)).encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open("/proc/%s/environ" % pid, "rb") as f:
                if needle in f.read().split(b"\0"):
                    os.kill(int(pid), signal.SIGKILL)
        except (OSError, ProcessLookupError):
            pass


def print_block(run):
    status = "ok" if run.ok else "FAILED (exit %s)" % run.rc
    text = run.output()
    head = "##### %s: %s in %.1f s " % (run.name, "interrupted" if run.interrupted else status,
                                        run.seconds)
    end = "" if text.endswith("\n") else "\n"
    sys.stdout.write("\n%s\n%s%s" % (head.ljust(100, "#"), text, end))
    sys.stdout.flush()


def summarize(runs, wall, slowest=8):
    """Print the totals; return the exit status."""
    totals = {}
    for run in runs:
        for what, n in run.counts().items():
            totals[what] = totals.get(what, 0) + n
    failed_runs = [r for r in runs if not r.ok]
    crashed = [r for r in failed_runs if not r.counts()]  # no summary line: died or was killed
    order = ("passed", "failed", "error", "skipped", "xfailed", "xpassed", "deselected")
    counts = ", ".join("%d %s" % (totals[w], w) for w in order if totals.get(w))
    print("\n" + " summary ".center(100, "="))
    print("%d files in %d pytest runs: %s in %.1f s wall"
          % (sum(len(r.files) for r in runs), len(runs), counts or "no tests ran", wall))
    print("slowest runs:")
    for run in sorted(runs, key=lambda r: -r.seconds)[:slowest]:
        print("  %6.1f s  %s" % (run.seconds, run.name))
    for run in failed_runs:
        print("FAILED run: %s (%s)" % (run.name, "interrupted" if run.interrupted else
                                        "no summary line, exit %s" % run.rc if run in crashed
                                        else "exit %s" % run.rc))
    ran = sum(totals.get(w, 0) for w in ("passed", "failed", "error", "xfailed", "xpassed"))
    if failed_runs or totals.get("failed") or totals.get("error"):
        return 1
    return 0 if ran else 5


def interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv=None):
    # Ctrl-C (even when started with SIGINT ignored, as a shell's background job) and SIGTERM
    # (a CI timeout) both stop every run and leave nothing behind
    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    opts, pytest_args = parse_args(sys.argv[1:] if argv is None else argv)
    paths, options = split_paths(pytest_args)
    if sys.stdout.isatty() and not any(o.startswith("--color") for o in options):
        options.append("--color=yes")  # pytest writes to a file, which it would not colour
    stop_on_failure = any(o in EXIT_FIRST or o.startswith("--maxfail") for o in options)
    files = suite_files(paths)
    mark = uuid.uuid4().hex
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="remote-lab-run-") as out_dir:
        runs = [Run(group, options, out_dir, mark) for group in plan_runs(files, opts.group_below)]
        print("%d test files in %d pytest runs, %d at a time" % (len(files), len(runs), opts.jobs),
              flush=True)
        scheduler = Scheduler(runs, opts.jobs, stop_on_failure)
        try:
            scheduler.run_all()
        except KeyboardInterrupt:
            summarize(scheduler.done, time.monotonic() - started)
            return 130
        finally:
            kill_marked(mark)
        return summarize(scheduler.done, time.monotonic() - started)


if __name__ == "__main__":
    sys.exit(main())
