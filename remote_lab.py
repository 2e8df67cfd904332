#!/usr/bin/env python3
"""remote-lab server: share one Netlab lab host between many test runs.

A FIFO queue of exclusive sessions (``X-Session-ID``), heartbeats, multipart topology uploads,
ref-counted lab reuse and netlab subprocess control behind a small REST API.

Standard library only, Python >= 3.8, one file: copy it to the lab host and run
``python3 remote_lab.py --port 8000`` (``--simulate`` to try it without netlab).
"""

import argparse
import ast
import collections
import dataclasses
import email.parser
import errno
import hashlib
import http.client
import http.server
import json
import logging
import logging.config
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Tuple

__version__ = "0.1.0"

LOGGER_NAME = "remote-lab-server"
log = logging.getLogger(LOGGER_NAME)

# ============================================================================================
# 1. Settings
# ============================================================================================


@dataclasses.dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = 8000
    port_range: Optional[Tuple[int, int]] = None
    netlab: str = "netlab"
    simulate: bool = False
    state_dir: str = os.path.join("~", ".remote-lab")
    waiting_timeout: float = 600.0
    active_timeout: float = 300.0
    keep_warm: float = 0.0
    up_timeout: float = 1800.0
    netlab_timeout: float = 300.0  # down / inspect
    max_upload_mb: float = 64.0
    max_queue: int = 1000
    socket_timeout: float = 60.0
    log_level: str = "INFO"
    debug: bool = False
    log_config: Optional[str] = None
    status_file: Optional[str] = None

    @property
    def labs_dir(self) -> str:
        return os.path.join(self.state_dir, "labs")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def netlab_command(self) -> List[str]:
        """The argv prefix that runs netlab (the simulator is this very file)."""
        if self.simulate:
            return [sys.executable, os.path.abspath(__file__), SIMULATED_NETLAB_FLAG]
        return [self.netlab]


def _positive(kind):
    def convert(text):
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError("must not be negative: %r" % text)
        return value
    return convert


def build_arg_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="remote-lab",
        description="Share one Netlab lab host between many test runs (REST API, FIFO queue).")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="TCP port, 0 = any free port (default 8000)")
    p.add_argument("--port-range", type=int, nargs=2, metavar=("START", "END"),
                   help="listen on the first free port in START..END (overrides --port)")
    p.add_argument("--netlab", default="netlab", help="netlab executable (default: netlab from PATH)")
    p.add_argument("--simulate", action="store_true",
                   help="use a built-in simulated netlab (no netlab needed; for trying things out)")
    p.add_argument("--state-dir", default=os.path.join("~", ".remote-lab"),
                   help="lock, lab work dirs and state (default ~/.remote-lab)")
    p.add_argument("--waiting-timeout", type=_positive(float), default=600.0, metavar="S",
                   help="drop a waiting session after S seconds without a sign of life (600)")
    p.add_argument("--active-timeout", type=_positive(float), default=300.0, metavar="S",
                   help="end an active session after S seconds without a sign of life (300)")
    p.add_argument("--keep-warm", type=_positive(float), default=0.0, metavar="S",
                   help="keep an idle reusable lab up S seconds after its session ends (0)")
    p.add_argument("--up-timeout", type=_positive(float), default=1800.0, metavar="S",
                   help="kill 'netlab up' after S seconds (1800)")
    p.add_argument("--netlab-timeout", type=_positive(float), default=300.0, metavar="S",
                   help="kill 'netlab down'/'inspect' after S seconds (300)")
    p.add_argument("--max-upload-mb", type=_positive(float), default=64.0, metavar="MB",
                   help="largest accepted upload (64)")
    p.add_argument("--max-queue", type=_positive(int), default=1000, metavar="N",
                   help="most sessions at once; more get 429 (1000)")
    p.add_argument("--socket-timeout", type=_positive(float), default=60.0, metavar="S",
                   help="drop a connection that sends nothing for S seconds (60)")
    p.add_argument("--log-level", default="INFO", type=str.upper,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])
    p.add_argument("--debug", action="store_true",
                   help="debug logging, netlab output streamed line by line")
    p.add_argument("--log-config", metavar="FILE", help="JSON logging.config.dictConfig file")
    p.add_argument("--status-file", metavar="PATH",
                   help="status file of the remote-http-launcher protocol")
    p.add_argument("--version", action="version", version="remote-lab " + __version__)
    return p


def settings_from_args(argv=None) -> Settings:
    a = build_arg_parser().parse_args(argv)
    return Settings(
        host=a.host, port=a.port, port_range=tuple(a.port_range) if a.port_range else None,
        netlab=a.netlab, simulate=a.simulate,
        state_dir=os.path.abspath(os.path.expanduser(a.state_dir)),
        waiting_timeout=a.waiting_timeout, active_timeout=a.active_timeout,
        keep_warm=a.keep_warm, up_timeout=a.up_timeout, netlab_timeout=a.netlab_timeout,
        max_upload_mb=a.max_upload_mb, max_queue=a.max_queue, socket_timeout=a.socket_timeout,
        log_level="DEBUG" if a.debug else a.log_level, debug=a.debug,
        log_config=a.log_config, status_file=a.status_file)


# ============================================================================================
# 2. The session queue: a pure state machine (no I/O, injected clock)
# ============================================================================================


class UnknownSession(KeyError):
    pass


class QueueFull(Exception):
    pass


@dataclasses.dataclass
class Session:
    id: str
    created: float
    last_seen: float
    activated: Optional[float] = None
    pins: int = 0  # requests in flight: a session busy talking to us is alive


class SessionQueue:
    """FIFO of sessions; the head is active. Thread-safe; long-poll waits on the condition.

    Positions: 0 = active head, 1.. = waiting. Every change bumps ``version`` and wakes waiters.
    """

    def __init__(self, waiting_timeout=600.0, active_timeout=300.0, max_length=1000,
                 clock: Callable[[], float] = time.monotonic):
        self.waiting_timeout = waiting_timeout
        self.active_timeout = active_timeout
        self.max_length = max_length
        self.clock = clock
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self._sessions = collections.OrderedDict()  # type: collections.OrderedDict[str, Session]
        self.version = 0

    # -- helpers (lock held) --
    def _bump(self):
        self.version += 1
        self.changed.notify_all()

    def _position(self, sid: str) -> int:
        for i, key in enumerate(self._sessions):
            if key == sid:
                return i
        raise UnknownSession(sid)

    def _session(self, sid) -> Session:
        try:
            return self._sessions[sid]
        except KeyError:
            raise UnknownSession(sid) from None

    def _activate_head(self):
        if self._sessions:
            head = next(iter(self._sessions.values()))
            if head.activated is None:
                head.activated = self.clock()
                head.last_seen = head.activated  # the active timeout counts from promotion
                return head.id
        return None

    # -- API --
    def create(self) -> Tuple[str, int]:
        with self.lock:
            if len(self._sessions) >= self.max_length:
                raise QueueFull("queue is full (%d sessions)" % self.max_length)
            now = self.clock()
            sid = str(uuid.uuid4())
            self._sessions[sid] = Session(sid, now, now)
            self._activate_head()
            self._bump()
            return sid, len(self._sessions) - 1

    def state(self, sid: str, touch: bool = True) -> Tuple[str, int]:
        with self.lock:
            s = self._session(sid)
            if touch:
                s.last_seen = self.clock()
            pos = self._position(sid)
            return ("active" if pos == 0 else "waiting"), pos

    def touch(self, sid: str) -> None:
        with self.lock:
            self._session(sid).last_seen = self.clock()

    def pin(self, sid: str) -> None:
        with self.lock:
            s = self._session(sid)
            s.pins += 1
            s.last_seen = self.clock()

    def unpin(self, sid: str) -> None:
        with self.lock:
            s = self._sessions.get(sid)
            if s is not None:
                s.pins = max(0, s.pins - 1)
                s.last_seen = self.clock()

    def wait_change(self, sid: str, timeout: float) -> Tuple[str, int]:
        """Block until ``sid``'s status/position changes or ``timeout`` passes; return the state.

        Raises UnknownSession if the session is (or becomes) unknown.
        """
        with self.lock:
            first = self.state(sid)
            deadline = self.clock() + timeout
            while True:
                remaining = deadline - self.clock()
                if remaining <= 0:
                    return self.state(sid)
                self.changed.wait(remaining)
                now = self.state(sid)
                if now != first:
                    return now

    def remove(self, sid: str) -> Tuple[bool, Optional[str]]:
        """End a session. Returns (was_active, id of a newly promoted head or None)."""
        with self.lock:
            self._session(sid)
            was_active = next(iter(self._sessions)) == sid
            del self._sessions[sid]
            promoted = self._activate_head()
            self._bump()
            return was_active, promoted

    def expire(self) -> List[Tuple[str, bool]]:
        """Drop sessions silent for too long. Returns [(sid, was_active)]."""
        with self.lock:
            now = self.clock()
            dead = []
            for i, s in enumerate(self._sessions.values()):
                limit = self.active_timeout if i == 0 else self.waiting_timeout
                if s.pins == 0 and now - s.last_seen > limit:
                    dead.append((s.id, i == 0))
            for sid, _ in dead:
                del self._sessions[sid]
            if dead:
                self._activate_head()
                self._bump()
            return dead

    def active_id(self) -> Optional[str]:
        with self.lock:
            return next(iter(self._sessions), None)

    def is_active(self, sid: str) -> bool:
        return self.active_id() == sid

    def __len__(self):
        with self.lock:
            return len(self._sessions)

    def snapshot(self) -> List[dict]:
        with self.lock:
            now = self.clock()
            return [{"session_id": s.id, "position": i, "status": "active" if i == 0 else "waiting",
                     "age": round(now - s.created, 3), "idle": round(now - s.last_seen, 3)}
                    for i, s in enumerate(self._sessions.values())]

    def next_deadline(self) -> Optional[float]:
        """Seconds until the earliest possible expiry (for the housekeeping cadence)."""
        with self.lock:
            soonest = None
            for i, s in enumerate(self._sessions.values()):
                limit = self.active_timeout if i == 0 else self.waiting_timeout
                left = s.last_seen + limit - self.clock()
                soonest = left if soonest is None else min(soonest, left)
            return soonest


# ============================================================================================
# 3. The netlab runner: the only place that spawns netlab
# ============================================================================================


class NetlabError(Exception):
    """netlab failed (status 502) or timed out (504); ``output`` is the tail of its output."""

    def __init__(self, message: str, output: str = "", timed_out: bool = False):
        super().__init__(message)
        self.output = output
        self.timed_out = timed_out

    @property
    def detail(self) -> str:
        text = str(self)
        if self.output:
            text += "\n--- netlab output (last lines) ---\n" + self.output
        return text


OUTPUT_TAIL_LINES = 30


class NetlabRunner:
    """Runs netlab commands: stdin closed, own process group, timeouts, output to the log."""

    def __init__(self, command: List[str], up_timeout: float, timeout: float, stream: bool):
        self.command = list(command)
        self.up_timeout = up_timeout
        self.timeout = timeout
        self.stream = stream
        self.calls = collections.Counter()  # verb -> count (for stats)
        self.failures = collections.Counter()

    def run(self, args: List[str], cwd: str, timeout: float, check: bool = True,
            ctx: str = "-") -> Tuple[int, str]:
        """Run ``netlab ARGS`` in ``cwd``; return (returncode, stdout). stderr goes to the log.

        Raises NetlabError on timeout, and on a non-zero exit when ``check`` is set.
        """
        verb = args[0] if args else "?"
        self.calls[verb] += 1
        argv = self.command + list(args)
        shown = "netlab " + " ".join(shlex.quote(a) for a in args)
        log.info("running %s (in %s)", shown, cwd, extra={"ctx": ctx})
        started = time.monotonic()
        try:
            proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True)
        except OSError as e:
            self.failures[verb] += 1
            raise NetlabError("cannot run %s: %s" % (shown, e)) from None
        tail = collections.deque(maxlen=OUTPUT_TAIL_LINES)
        stdout_chunks = []
        tail_lock = threading.Lock()

        def pump(stream, keep):
            for raw in iter(stream.readline, b""):
                if keep:
                    stdout_chunks.append(raw)
                line = raw.decode("utf-8", "replace").rstrip()
                with tail_lock:
                    tail.append(line)
                if self.stream:
                    log.debug("netlab %s | %s", verb, line, extra={"ctx": ctx})
            stream.close()

        readers = [threading.Thread(target=pump, args=(proc.stdout, True), daemon=True),
                   threading.Thread(target=pump, args=(proc.stderr, False), daemon=True)]
        for t in readers:
            t.start()
        timed_out = False
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_process_group(proc)
        for t in readers:
            t.join(5)
        elapsed = time.monotonic() - started
        with tail_lock:
            output = "\n".join(tail)
        if timed_out:
            self.failures[verb] += 1
            log.error("%s timed out after %.0f s; process group killed", shown, timeout,
                      extra={"ctx": ctx})
            raise NetlabError("%s timed out after %.0f s" % (shown, timeout), output, True)
        level = logging.INFO if proc.returncode == 0 else logging.WARNING
        log.log(level, "%s exited %d after %.2f s", shown, proc.returncode, elapsed,
                extra={"ctx": ctx})
        if proc.returncode != 0:
            if not self.stream and output:
                log.warning("netlab output:\n%s", output, extra={"ctx": ctx})
            if check:
                self.failures[verb] += 1
                raise NetlabError("%s failed (exit %d)" % (shown, proc.returncode), output)
        return proc.returncode, b"".join(stdout_chunks).decode("utf-8", "replace")

    # -- the commands we use --
    def up(self, labdir: str, topology: str, ctx="-") -> None:
        self.run(["up", topology], labdir, self.up_timeout, ctx=ctx)

    def node_names(self, labdir: str, ctx="-") -> List[str]:
        _, out = self.run(["inspect", "-q", "--format", "json", "list(nodes.keys())"], labdir,
                          self.timeout, ctx=ctx)
        try:
            names = ast.literal_eval(out.strip())  # a Python repr, not JSON
        except (ValueError, SyntaxError):
            raise NetlabError("cannot parse the node list from netlab inspect", out[-2000:]) from None
        if not isinstance(names, (list, tuple)) or not all(isinstance(n, str) for n in names):
            raise NetlabError("unexpected node list from netlab inspect", out[-2000:])
        return list(names)

    def inspect_node(self, labdir: str, name: str, ctx="-") -> dict:
        _, out = self.run(["inspect", "-q", "--node", name, "--format", "json"], labdir,
                          self.timeout, ctx=ctx)
        try:
            data = json.loads(out)
        except ValueError:
            raise NetlabError("cannot parse netlab inspect output for node %s" % name,
                              out[-2000:]) from None
        if not isinstance(data, dict):
            raise NetlabError("unexpected netlab inspect output for node %s" % name, out[-2000:])
        return data

    def devices(self, labdir: str, ctx="-") -> List[dict]:
        """Node names, then one inspect per node, concurrently (one round in wall time)."""
        names = self.node_names(labdir, ctx)
        if not names:
            return []
        with ThreadPoolExecutor(max_workers=min(16, len(names))) as pool:
            raws = list(pool.map(lambda n: self.inspect_node(labdir, n, ctx), names))
        return [{"name": n, "raw": raw} for n, raw in zip(names, raws)]

    def down(self, labdir: str, force: bool = False, ctx="-") -> None:
        args = ["down", "--cleanup"] + (["--force"] if force else [])
        self.run(args, labdir, self.timeout, ctx=ctx)


def kill_process_group(proc: subprocess.Popen, grace: float = 3.0) -> None:
    """SIGTERM the child's whole process group, SIGKILL whatever is left after ``grace``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except OSError:
            return
        try:
            proc.wait(grace)
            if sig == signal.SIGTERM:
                # the leader is gone; make sure no grandchild survives it
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except OSError:
                    pass
            return
        except subprocess.TimeoutExpired:
            continue


# ============================================================================================
# 4. The lab: one running lab per host, fingerprint, ref count, states
# ============================================================================================


class LabBusy(Exception):
    pass


class NoLab(Exception):
    pass


STOPPED, STARTING, RUNNING, STOPPING = "stopped", "starting", "running", "stopping"


@dataclasses.dataclass
class LabInfo:
    """Plain data describing the lab (kept serialisable for a later persistence issue)."""
    state: str = STOPPED
    workdir: Optional[str] = None
    topology: Optional[str] = None
    fingerprint: Optional[str] = None
    ref_count: int = 0
    devices: List[dict] = dataclasses.field(default_factory=list)
    holder: Optional[str] = None  # session that started / last acquired it
    reusable: bool = False  # the last acquire used reuse=true
    warm_until: Optional[float] = None  # keep-warm deadline (monotonic)
    started_at: Optional[float] = None
    last_error: Optional[str] = None


class Lab:
    """The one lab of this host. Transitions happen under ``cond``; netlab runs outside it."""

    def __init__(self, runner: NetlabRunner, settings: Settings,
                 is_active: Callable[[str], bool]):
        self.runner = runner
        self.settings = settings
        self.is_active = is_active
        self.cond = threading.Condition()
        self.info = LabInfo()
        self.teardowns = []  # type: List[threading.Thread]

    # -- queries --
    def snapshot(self) -> dict:
        with self.cond:
            i = self.info
            return {"running": i.state == RUNNING, "state": i.state, "topology": i.topology,
                    "ref_count": i.ref_count, "devices": list(i.devices),
                    "fingerprint": i.fingerprint, "holder": i.holder,
                    "last_error": i.last_error}

    def devices(self) -> List[dict]:
        with self.cond:
            if self.info.state != RUNNING:
                raise NoLab("no lab is running")
            return list(self.info.devices)

    # -- acquisition --
    def acquire(self, sid: str, upload: "Upload", reuse: bool) -> Tuple[bool, List[dict]]:
        """Apply the acquisition rules. Consumes ``upload`` (moved in as the work dir or removed)."""
        ctx = log_context(sid, upload.topology)
        old_workdir = None
        with self.cond:
            while self.info.state in (STARTING, STOPPING):  # a new up waits for a teardown
                self.cond.wait()
            i = self.info
            if i.state == RUNNING:
                if i.fingerprint == upload.fingerprint and reuse:
                    i.ref_count += 1
                    i.holder, i.reusable, i.warm_until = sid, True, None
                    log.info("reusing running lab (ref count %d)", i.ref_count, extra={"ctx": ctx})
                    upload.discard()
                    return True, list(i.devices)
                if i.ref_count > 0:
                    upload.discard()
                    raise LabBusy("Lab currently busy: %s is in use (ref count %d)"
                                  % (i.topology, i.ref_count))
                old_workdir = i.workdir
                reason = ("restart requested (reuse=false)" if i.fingerprint == upload.fingerprint
                          else "another topology requested")
            self.info = LabInfo(state=STOPPING if old_workdir else STARTING)
        if old_workdir:
            log.info("tearing down idle lab: %s", reason, extra={"ctx": ctx})
            self._teardown_dir(old_workdir, ctx)
            with self.cond:
                self.info.state = STARTING
                self.cond.notify_all()
        workdir = upload.workdir
        try:
            self.runner.up(workdir, upload.topology, ctx=ctx)
            devices = self.runner.devices(workdir, ctx=ctx)
        except NetlabError as e:
            log.error("lab start failed: %s", e, extra={"ctx": ctx})
            self._teardown_dir(workdir, ctx, force=True)
            with self.cond:
                self.info = LabInfo(last_error=e.detail)
                self.cond.notify_all()
            raise
        except BaseException:
            self._teardown_dir(workdir, ctx, force=True)
            with self.cond:
                self.info = LabInfo()
                self.cond.notify_all()
            raise
        with self.cond:
            self.info = LabInfo(state=RUNNING, workdir=workdir, topology=upload.topology,
                                fingerprint=upload.fingerprint, ref_count=1, devices=devices,
                                holder=sid, reusable=reuse, started_at=time.monotonic())
            self.cond.notify_all()
        log.info("lab up with %d devices", len(devices), extra={"ctx": ctx})
        if not self.is_active(sid):  # the session ended while netlab was working
            self.session_ended(sid)
        return False, devices

    def release(self, sid: str) -> int:
        with self.cond:
            if self.info.state != RUNNING:
                raise NoLab("no lab is running")
            self.info.ref_count = max(0, self.info.ref_count - 1)
            log.info("lab released (ref count %d)", self.info.ref_count,
                     extra={"ctx": log_context(sid, self.info.topology)})
            return self.info.ref_count

    def destroy(self, sid: str, force: bool) -> bool:
        """Tear the lab down in the background. False when there is no lab."""
        with self.cond:
            while self.info.state == STARTING:
                self.cond.wait()
            if self.info.state != RUNNING:
                return False
            if self.info.ref_count > 0 and not force:
                raise LabBusy("lab is in use (ref count %d); use force=true"
                              % self.info.ref_count)
            self._teardown_async_locked(log_context(sid, self.info.topology), "destroy requested")
            return True

    def session_ended(self, sid: str) -> None:
        """The active session is gone: its references go, the lab is torn down or kept warm."""
        with self.cond:
            i = self.info
            if i.state != RUNNING or i.holder != sid:
                return
            i.ref_count = 0
            ctx = log_context(sid, i.topology)
            if self.settings.keep_warm > 0 and i.reusable:
                i.warm_until = time.monotonic() + self.settings.keep_warm
                log.info("session ended; keeping the lab warm for %.0f s", self.settings.keep_warm,
                         extra={"ctx": ctx})
                return
            self._teardown_async_locked(ctx, "session ended")

    def expire_warm(self) -> None:
        with self.cond:
            i = self.info
            if i.state == RUNNING and i.warm_until is not None and time.monotonic() >= i.warm_until \
                    and i.ref_count == 0 and not (i.holder and self.is_active(i.holder)):
                self._teardown_async_locked(log_context(None, i.topology), "keep-warm expired")

    # -- teardown --
    def _teardown_async_locked(self, ctx: str, reason: str) -> None:
        workdir = self.info.workdir
        log.info("tearing down lab (%s)", reason, extra={"ctx": ctx})
        self.info = LabInfo(state=STOPPING)
        self.cond.notify_all()

        def work():
            try:
                self._teardown_dir(workdir, ctx)
            finally:
                with self.cond:
                    if self.info.state == STOPPING:
                        self.info.state = STOPPED
                    self.cond.notify_all()

        t = threading.Thread(target=work, name="lab-teardown", daemon=True)
        self.teardowns = [x for x in self.teardowns if x.is_alive()] + [t]
        t.start()

    def _teardown_dir(self, workdir: Optional[str], ctx: str, force: bool = False) -> None:
        """``netlab down --cleanup`` in the lab dir (retry with --force), then remove the dir.

        A failure is logged, never raised: the queue must move on.
        """
        if not workdir:
            return
        try:
            if os.path.isdir(workdir):
                try:
                    self.runner.down(workdir, force=force, ctx=ctx)
                except NetlabError as e:
                    if force:
                        log.error("netlab down failed: %s", e, extra={"ctx": ctx})
                    else:
                        log.warning("netlab down failed (%s); retrying with --force", e,
                                    extra={"ctx": ctx})
                        try:
                            self.runner.down(workdir, force=True, ctx=ctx)
                        except NetlabError as e2:
                            log.error("netlab down --force failed too: %s", e2, extra={"ctx": ctx})
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def wait_idle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        with self.cond:
            while self.info.state in (STARTING, STOPPING):
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(left)
        for t in list(self.teardowns):
            t.join(max(0.0, deadline - time.monotonic()))
        return True

    def shutdown(self) -> None:
        """Server stop: tear down whatever runs, synchronously."""
        self.wait_idle(self.settings.up_timeout)
        with self.cond:
            workdir = self.info.workdir if self.info.state == RUNNING else None
            self.info = LabInfo(state=STOPPING if workdir else STOPPED)
        if workdir:
            self._teardown_dir(workdir, log_context(None, None))
        with self.cond:
            self.info = LabInfo()

    def startup_cleanup(self) -> None:
        """Lab dirs left by a crashed predecessor: ``down --cleanup --force`` each, then remove.

        netlab registers the ``default`` instance even when ``up`` fails; it must be cleaned in
        its directory before that directory is deleted, or the next ``up`` fails.
        """
        labs = self.settings.labs_dir
        try:
            leftovers = [os.path.join(labs, d) for d in sorted(os.listdir(labs))]
        except FileNotFoundError:
            return
        leftovers = [d for d in leftovers if os.path.isdir(d)]
        if not leftovers:
            return
        with self.cond:
            self.info = LabInfo(state=STOPPING)

        def work():
            try:
                for d in leftovers:
                    log.warning("cleaning up lab dir left from a previous run: %s", d,
                                extra={"ctx": "-"})
                    self._teardown_dir(d, "-", force=True)
            finally:
                with self.cond:
                    self.info = LabInfo()
                    self.cond.notify_all()

        t = threading.Thread(target=work, name="startup-cleanup", daemon=True)
        self.teardowns.append(t)
        t.start()


# ============================================================================================
# 5. Uploads: streaming multipart into a fresh lab work dir, safe relative paths
# ============================================================================================


class BadRequest(Exception):
    status = 400


class TooLarge(BadRequest):
    status = 413


_TOPOLOGY_RE = re.compile(r"\.ya?ml$", re.IGNORECASE)


def safe_relative_path(name: str) -> str:
    """Validate an uploaded file name; return it (a relative path with '/' separators).

    Rejects absolute names, '..' and '.', backslashes, NUL/control characters, empty segments.
    """
    if not name:
        raise BadRequest("empty file name")
    if "\\" in name:
        raise BadRequest("file name %r: backslashes are not allowed" % name)
    if any(ord(c) < 32 or c == "\x7f" for c in name):
        raise BadRequest("file name %r: control characters are not allowed" % name)
    if name.startswith("/"):
        raise BadRequest("file name %r: absolute paths are not allowed" % name)
    parts = name.split("/")
    for part in parts:
        if part == "":
            raise BadRequest("file name %r: empty path segment" % name)
        if part in (".", ".."):
            raise BadRequest("file name %r: '.' and '..' are not allowed" % name)
    return name


class Upload:
    """The files of one POST /lab, written into a fresh work dir as they stream in."""

    def __init__(self, workdir: str):
        self.workdir = workdir
        self.topology = None  # type: Optional[str]
        self.files = {}  # relative name -> sha256 hex
        self.fields = {}  # type: Dict[str, str]
        self.size = 0
        self.fingerprint = None  # type: Optional[str]

    def finish(self):
        if not self.topology:
            raise BadRequest("missing file field 'topology' (a .yml/.yaml file)")
        h = hashlib.sha256()
        h.update(b"topology\0" + self.topology.encode() + b"\0" + self.files[self.topology].encode())
        for name in sorted(self.files):
            if name != self.topology:
                h.update(b"extra\0" + name.encode() + b"\0" + self.files[name].encode())
        self.fingerprint = h.hexdigest()

    def discard(self):
        shutil.rmtree(self.workdir, ignore_errors=True)


_DISPOSITION_PARAM_RE = re.compile(r';\s*([A-Za-z0-9_*-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')


def parse_disposition(value: str) -> Dict[str, str]:
    params = {}
    for key, raw in _DISPOSITION_PARAM_RE.findall(";" + value.split(";", 1)[1] if ";" in value else ""):
        raw = raw.strip()
        if raw.startswith('"') and raw.endswith('"') and len(raw) >= 2:
            # only \\ and \" are escapes: browsers send a lone backslash as is, and it must
            # still reach safe_relative_path (and be refused) instead of vanishing
            raw = re.sub(r'\\([\\"])', r'\1', raw[1:-1])
        params[key.lower()] = raw
    if "filename*" in params:  # RFC 5987: charset''percent-encoded
        enc = params.pop("filename*")
        charset, _, rest = enc.partition("''")
        try:
            params["filename"] = urllib.parse.unquote(rest, encoding=charset or "utf-8",
                                                      errors="strict")
        except (LookupError, UnicodeDecodeError):
            raise BadRequest("undecodable filename* parameter") from None
    return params


CHUNK = 64 * 1024
MAX_PART_HEADER = 16 * 1024
MAX_FIELD = 64 * 1024


class MultipartParser:
    """Streams a multipart/form-data body into an Upload (never the whole body in memory)."""

    FILE_FIELDS = ("topology", "extra_files")
    TEXT_FIELDS = ("reuse",)

    def __init__(self, rfile, length: int, boundary: bytes, upload: Upload):
        self.rfile = rfile
        self.left = length
        self.upload = upload
        self.delim = b"--" + boundary
        self.sep = b"\r\n--" + boundary
        self.buf = b""

    def _fill(self) -> bool:
        if self.left <= 0:
            return False
        try:
            data = self.rfile.read(min(CHUNK, self.left))
        except socket.timeout:
            raise BadRequest("upload stalled (socket timeout)") from None
        if not data:
            raise BadRequest("request body ended early (%d bytes missing)" % self.left)
        self.left -= len(data)
        self.buf += data
        return True

    def parse(self) -> None:
        # preamble up to the first delimiter
        while True:
            idx = self.buf.find(self.delim)
            if idx >= 0:
                self.buf = self.buf[idx + len(self.delim):]
                break
            if len(self.buf) > MAX_PART_HEADER:
                self.buf = self.buf[-len(self.delim):]
            if not self._fill():
                raise BadRequest("malformed multipart body: no boundary found")
        while True:
            while len(self.buf) < 2:
                if not self._fill():
                    raise BadRequest("malformed multipart body: truncated after boundary")
            if self.buf.startswith(b"--"):
                self._drain()
                return
            if not self.buf.startswith(b"\r\n"):
                raise BadRequest("malformed multipart body: garbage after boundary")
            self.buf = self.buf[2:]
            headers = self._read_headers()
            self._read_part(headers)

    def _drain(self):
        while self.left > 0:
            self.buf = b""
            self._fill()

    def _read_headers(self) -> Dict[str, str]:
        while True:
            idx = self.buf.find(b"\r\n\r\n")
            if idx >= 0:
                raw, self.buf = self.buf[:idx], self.buf[idx + 4:]
                break
            if len(self.buf) > MAX_PART_HEADER:
                raise BadRequest("malformed multipart body: part headers too long")
            if not self._fill():
                raise BadRequest("malformed multipart body: truncated part headers")
        headers = {}
        for line in raw.decode("utf-8", "replace").split("\r\n"):
            if not line.strip():
                continue
            key, colon, value = line.partition(":")
            if not colon:
                raise BadRequest("malformed multipart body: bad part header %r" % line[:80])
            headers[key.strip().lower()] = value.strip()
        return headers

    def _stream_part(self, sink: Callable[[bytes], None]) -> None:
        keep = len(self.sep) - 1
        while True:
            idx = self.buf.find(self.sep)
            if idx >= 0:
                sink(self.buf[:idx])
                self.buf = self.buf[idx + len(self.sep):]
                return
            if len(self.buf) > keep:
                sink(self.buf[:-keep])
                self.buf = self.buf[-keep:]
            if not self._fill():
                raise BadRequest("malformed multipart body: missing closing boundary")

    def _read_part(self, headers: Dict[str, str]) -> None:
        disposition = headers.get("content-disposition", "")
        if not disposition.lower().startswith("form-data"):
            raise BadRequest("malformed multipart body: part without form-data disposition")
        params = parse_disposition(disposition)
        field = params.get("name")
        if field is None:
            raise BadRequest("malformed multipart body: part without a name")
        if "filename" in params or field in self.FILE_FIELDS:
            self._read_file(field, params.get("filename", ""))
            return
        if field not in self.TEXT_FIELDS:
            raise BadRequest("unexpected form field %r (expected topology, extra_files, reuse)"
                             % field)
        chunks = []

        def sink(data):
            if sum(len(c) for c in chunks) + len(data) > MAX_FIELD:
                raise BadRequest("form field %r is too long" % field)
            chunks.append(data)

        self._stream_part(sink)
        self.upload.fields[field] = b"".join(chunks).decode("utf-8", "replace")

    def _read_file(self, field: str, filename: str) -> None:
        up = self.upload
        if field not in self.FILE_FIELDS:
            raise BadRequest("unexpected file field %r (expected topology or extra_files)" % field)
        if field == "topology":
            if up.topology is not None:
                raise BadRequest("more than one topology file")
            if not filename:
                raise BadRequest("the topology part has no file name")
            name = safe_relative_path(filename).rsplit("/", 1)[-1]
            if not _TOPOLOGY_RE.search(name):
                raise BadRequest("topology %r must be a .yml or .yaml file" % filename)
        else:
            name = safe_relative_path(filename)
        if name in up.files:
            raise BadRequest("file %r uploaded twice" % name)
        target = os.path.join(up.workdir, *name.split("/"))
        parent = os.path.dirname(target)
        # the name is validated, but a regular file may already sit where a dir is wanted
        try:
            os.makedirs(parent, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0),
                         0o644)
        except OSError as e:
            raise BadRequest("cannot store %r: %s" % (name, e.strerror)) from None
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            def sink(data):
                digest.update(data)
                out.write(data)
            self._stream_part(sink)
        up.files[name] = digest.hexdigest()
        if field == "topology":
            up.topology = name


def receive_upload(rfile, headers, labs_dir: str, max_bytes: int) -> Upload:
    ctype = headers.get("Content-Type", "")
    if not ctype.lower().startswith("multipart/form-data"):
        raise BadRequest("POST /lab needs a multipart/form-data body")
    m = re.search(r'boundary="?([^";]+)"?', ctype)
    if not m or len(m.group(1)) > 200:
        raise BadRequest("multipart body without a (valid) boundary")
    length = headers.get("Content-Length")
    if length is None:
        raise BadRequest("Content-Length is required")
    try:
        length = int(length)
        if length < 0:
            raise ValueError
    except ValueError:
        raise BadRequest("invalid Content-Length") from None
    if length > max_bytes:
        raise TooLarge("upload of %d bytes exceeds the limit of %d bytes (--max-upload-mb)"
                       % (length, max_bytes))
    os.makedirs(labs_dir, exist_ok=True)
    workdir = os.path.join(labs_dir, "lab-" + uuid.uuid4().hex[:12])
    os.mkdir(workdir, 0o755)
    upload = Upload(workdir)
    upload.size = length
    try:
        MultipartParser(rfile, length, m.group(1).encode("latin-1"), upload).parse()
        upload.finish()
    except BaseException:
        upload.discard()
        raise
    return upload


def parse_bool(value: str, what: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise BadRequest("%s must be true or false, not %r" % (what, value))


# ============================================================================================
# 6. HTTP: one route table, JSON in/out, errors as {"detail": ...}
# ============================================================================================


class HTTPError(Exception):
    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status = status
        self.detail = detail


_request_context = threading.local()


def log_context(sid: Optional[str], topology: Optional[str]) -> str:
    parts = []
    if sid:
        parts.append("sid=" + sid[:8])
    if topology:
        parts.append("topo=" + topology)
    return " ".join(parts) or "-"


class ContextFilter(logging.Filter):
    """Fills %(ctx)s: the sid/topology of the request being served, or '-'."""

    def filter(self, record):
        if not hasattr(record, "ctx"):
            record.ctx = getattr(_request_context, "ctx", "-")
        return True


MAX_JSON_BODY = 1024 * 1024


class App:
    """The server's state and request logic; the handler only speaks HTTP."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.started = time.time()
        self.started_mono = time.monotonic()
        self.queue = SessionQueue(settings.waiting_timeout, settings.active_timeout,
                                  settings.max_queue)
        self.runner = NetlabRunner(settings.netlab_command(), settings.up_timeout,
                                   settings.netlab_timeout, settings.debug)
        self.lab = Lab(self.runner, settings, self.queue.is_active)
        self.counters = collections.Counter()
        self.stopping = threading.Event()

    # -- session lifecycle --
    def end_session(self, sid: str, why: str) -> None:
        was_active, promoted = self.queue.remove(sid)
        self.counters["sessions_ended"] += 1
        log.info("session ended (%s)%s", why, " [was active]" if was_active else "",
                 extra={"ctx": log_context(sid, None)})
        if was_active:
            self.lab.session_ended(sid)
        if promoted:
            log.info("promoted to active", extra={"ctx": log_context(promoted, None)})

    def housekeeping_once(self) -> None:
        for sid, was_active in self.queue.expire():
            self.counters["sessions_expired"] += 1
            log.warning("session expired (no sign of life)%s", " [was active]" if was_active else "",
                        extra={"ctx": log_context(sid, None)})
            if was_active:
                self.lab.session_ended(sid)
        self.lab.expire_warm()

    def cadence(self) -> float:
        """~5 s busy, ~15 s one active session, ~30 s idle; shorter for short timeouts."""
        n = len(self.queue)
        base = 30.0 if n == 0 else 15.0 if n == 1 else 5.0
        limits = [self.settings.waiting_timeout, self.settings.active_timeout]
        if self.settings.keep_warm > 0:
            limits.append(self.settings.keep_warm)
        return max(0.05, min([base] + [t / 4.0 for t in limits if t > 0]))

    # -- handlers: each returns (status, body) --
    def require_active(self, handler) -> str:
        sid = handler.session_header(required=True)
        try:
            status, _ = self.queue.state(sid)
        except UnknownSession:
            raise HTTPError(404, "unknown session %s" % sid) from None
        if status != "active":
            raise HTTPError(423, "session %s is not active (still waiting in the queue)" % sid)
        return sid

    def get_root(self, h, m):
        return 200, {"service": "remote-lab", "version": __version__,
                     "uptime": round(time.monotonic() - self.started_mono, 3),
                     "queue_length": len(self.queue), "active_session": self.queue.active_id(),
                     "lab": self.lab_summary(), "docs": "see README: REST API"}

    def lab_summary(self):
        s = self.lab.snapshot()
        return {"state": s["state"], "topology": s["topology"], "ref_count": s["ref_count"],
                "devices": [d["name"] for d in s["devices"]]}

    def get_healthz(self, h, m):
        return 204, None

    def get_debug_health(self, h, m):
        return 200, {"status": "ok", "timestamp": time.time(),
                     "uptime": round(time.monotonic() - self.started_mono, 3),
                     "sessions": self.queue.snapshot(), "queue_length": len(self.queue),
                     "lab": self.lab.snapshot(), "version": __version__,
                     "netlab_calls": dict(self.runner.calls),
                     "netlab_failures": dict(self.runner.failures),
                     "counters": dict(self.counters)}

    def post_session(self, h, m):
        try:
            sid, pos = self.queue.create()
        except QueueFull as e:
            raise HTTPError(429, str(e)) from None
        self.counters["sessions_created"] += 1
        log.info("created session (position %d)", pos, extra={"ctx": log_context(sid, None)})
        return 201, {"session_id": sid, "position": pos,
                     "status": "active" if pos == 0 else "waiting"}

    def get_session(self, h, m):
        sid = m.group(1)
        wait = h.query.get("wait")
        try:
            if wait is None:
                status, pos = self.queue.state(sid)
            else:
                try:
                    seconds = float(wait)
                except ValueError:
                    raise HTTPError(400, "wait must be a number of seconds (0-60)") from None
                if not 0 <= seconds <= 60:
                    raise HTTPError(400, "wait must be between 0 and 60 seconds")
                self.queue.pin(sid)
                try:
                    status, pos = self.queue.wait_change(sid, seconds)
                finally:
                    self.queue.unpin(sid)
        except UnknownSession:
            raise HTTPError(404, "unknown session %s" % sid) from None
        return 200, {"session_id": sid, "status": status, "position": pos}

    def delete_session(self, h, m):
        sid = m.group(1)
        try:
            self.end_session(sid, "deleted by client")
        except UnknownSession:
            raise HTTPError(404, "unknown session %s" % sid) from None
        return 204, None

    def post_heartbeat(self, h, m):
        sid = h.session_header(required=True)
        try:
            self.queue.touch(sid)
        except UnknownSession:
            raise HTTPError(404, "unknown session %s" % sid) from None
        return 204, None

    def get_active_session(self, h, m):
        sid = self.queue.active_id()
        if sid is None:
            raise HTTPError(404, "no active session")
        return 200, {"session_id": sid, "status": "active", "position": 0}

    def post_lab(self, h, m):
        sid = self.require_active(h)
        reuse_q = h.query.get("reuse")
        self.queue.pin(sid)  # a long upload or netlab up must not expire the session
        try:
            try:
                upload = receive_upload(h.rfile, h.headers, self.settings.labs_dir,
                                        self.settings.max_upload_bytes)
            except BadRequest as e:
                h.close_connection = True  # the rest of the body is unread
                raise HTTPError(e.status, str(e)) from None
            self.counters["upload_bytes"] += upload.size
            h.set_context(sid, upload.topology)
            try:
                reuse = parse_bool(upload.fields.get("reuse", reuse_q or "true"), "reuse")
                if not self.queue.is_active(sid):
                    raise HTTPError(423, "session %s is no longer active" % sid)
            except BaseException:
                upload.discard()
                raise
            try:
                reused, devices = self.lab.acquire(sid, upload, reuse)
            except BadRequest as e:
                raise HTTPError(400, str(e)) from None
            except LabBusy as e:
                raise HTTPError(423, str(e)) from None
            except NetlabError as e:
                raise HTTPError(504 if e.timed_out else 502, e.detail) from None
            return 200, {"reused": reused, "devices": devices}
        finally:
            self.queue.unpin(sid)

    def get_lab(self, h, m):
        self.require_active(h)
        s = self.lab.snapshot()
        return 200, {"running": s["running"], "topology": s["topology"],
                     "ref_count": s["ref_count"], "devices": s["devices"],
                     "netlab_status": s["state"], "last_error": s["last_error"]}

    def get_lab_devices(self, h, m):
        self.require_active(h)
        try:
            return 200, self.lab.devices()
        except NoLab as e:
            raise HTTPError(404, str(e)) from None

    def post_lab_release(self, h, m):
        sid = self.require_active(h)
        try:
            self.lab.release(sid)
        except NoLab as e:
            raise HTTPError(404, str(e)) from None
        return 204, None

    def delete_lab(self, h, m):
        sid = self.require_active(h)
        force = parse_bool(h.query.get("force", "true"), "force")
        try:
            destroyed = self.lab.destroy(sid, force)
        except LabBusy as e:
            raise HTTPError(409, str(e)) from None
        if not destroyed:
            return 204, None
        return 202, {"detail": "lab teardown started"}

    ROUTES = [
        ("GET", r"/", "get_root"),
        ("GET", r"/healthz", "get_healthz"),
        ("GET", r"/debug/health", "get_debug_health"),
        ("POST", r"/session", "post_session"),
        ("POST", r"/session/heartbeat", "post_heartbeat"),
        ("GET", r"/session/([^/]+)", "get_session"),
        ("DELETE", r"/session/([^/]+)", "delete_session"),
        ("GET", r"/active-session", "get_active_session"),
        ("POST", r"/lab", "post_lab"),
        ("GET", r"/lab", "get_lab"),
        ("DELETE", r"/lab", "delete_lab"),
        ("GET", r"/lab/devices", "get_lab_devices"),
        ("POST", r"/lab/release", "post_lab_release"),
    ]
    COMPILED = [(method, re.compile(pattern + r"/?\Z"), name) for method, pattern, name in ROUTES]

    def route(self, method: str, path: str):
        """(handler method name, match) or raise HTTPError 404/405."""
        allowed = []
        for rmethod, regex, name in self.COMPILED:
            m = regex.match(path)
            if m:
                if rmethod == method:
                    return getattr(self, name), m
                allowed.append(rmethod)
        if allowed:
            raise HTTPError(405, "method %s not allowed on %s (allowed: %s)"
                            % (method, path, ", ".join(sorted(set(allowed)))))
        raise HTTPError(404, "no such endpoint: %s %s" % (method, path))


_HEADER_LINE_RE = re.compile(r"([!-9;-~]+):([^\r\n]*)(?:\r\n|\n|\r)?\Z")
MAX_HEADER_LINE = 65536  # http.client's _MAXLINE
MAX_HEADERS = 100  # http.client's _MAXHEADERS


def read_headers(rfile, message_class=http.client.HTTPMessage):
    """What ``http.client.parse_headers(rfile)`` returns, ~10x faster for plain header lines.

    Same limits and exceptions. Plain ``Name: value`` lines are stored as the email parser
    (compat32 policy) would store them; anything else (folded lines, bad names, a ``From `` line,
    stray CRs) goes through the email parser, exactly as before.
    """
    lines = []
    while True:
        line = rfile.readline(MAX_HEADER_LINE + 1)
        if len(line) > MAX_HEADER_LINE:
            raise http.client.LineTooLong("header line")
        lines.append(line)
        if len(lines) > MAX_HEADERS:
            raise http.client.HTTPException("got more than %d headers" % MAX_HEADERS)
        if line in (b"\r\n", b"\n", b""):
            break
    msg = message_class()
    match = _HEADER_LINE_RE.match
    for line in lines[:-1]:
        m = match(line.decode("iso-8859-1"))
        if m is None:
            return email.parser.Parser(_class=message_class).parsestr(
                b"".join(lines).decode("iso-8859-1"))
        msg.set_raw(m.group(1), m.group(2).lstrip(" \t"))
    msg.set_payload("")
    return msg


class RequestHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "remote-lab/" + __version__
    disable_nagle_algorithm = True  # TCP_NODELAY: small responses go out at once
    app = None  # type: App  # set on the subclass made by make_server

    # -- helpers --
    def session_header(self, required=False) -> Optional[str]:
        sid = self.headers.get("X-Session-ID")
        if sid:
            sid = sid.strip()
        if not sid and required:
            raise HTTPError(400, "missing X-Session-ID header")
        return sid or None

    def set_context(self, sid, topology=None):
        _request_context.ctx = log_context(sid, topology)

    def send_json(self, status: int, body) -> None:
        if status == 204 or body is None:
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        # headers and body in one send: two small writes stall ~40 ms on Nagle + delayed ACK
        self._headers_buffer.append(b"\r\n" + data)
        self.flush_headers()

    def _discard_body(self) -> None:
        length = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            self.close_connection = True
            return
        if not length:
            return
        try:
            n = int(length)
        except ValueError:
            raise HTTPError(400, "invalid Content-Length") from None
        if n > MAX_JSON_BODY:
            self.close_connection = True
            raise HTTPError(413, "request body too large")
        while n > 0:
            chunk = self.rfile.read(min(CHUNK, n))
            if not chunk:
                break
            n -= len(chunk)

    def parse_request(self):
        """BaseHTTPRequestHandler.parse_request (Python 3.11+ rules), with the fast read_headers.

        The email-based header parser of http.server costs more than the rest of a poll.
        """
        self.command = None  # set in case of error on the first line
        self.request_version = version = self.default_request_version
        self.close_connection = True
        requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        self.requestline = requestline
        words = requestline.split()
        if not words:
            return False
        if len(words) >= 3:  # enough to determine the protocol version
            version = words[-1]
            try:
                if not version.startswith("HTTP/"):
                    raise ValueError
                base_version_number = version.split("/", 1)[1]
                version_number = base_version_number.split(".")
                if len(version_number) != 2:
                    raise ValueError
                if any(not c.isdigit() or len(c) > 10 for c in version_number):
                    raise ValueError
                version_number = int(version_number[0]), int(version_number[1])
            except (ValueError, IndexError):
                self.send_error(400, "Bad request version (%r)" % version)
                return False
            if version_number >= (1, 1) and self.protocol_version >= "HTTP/1.1":
                self.close_connection = False
            if version_number >= (2, 0):
                self.send_error(505, "Invalid HTTP version (%s)" % base_version_number)
                return False
            self.request_version = version
        if not 2 <= len(words) <= 3:
            self.send_error(400, "Bad request syntax (%r)" % requestline)
            return False
        command, path = words[:2]
        if len(words) == 2:
            self.close_connection = True
            if command != "GET":
                self.send_error(400, "Bad HTTP/0.9 request type (%r)" % command)
                return False
        self.command, self.path = command, path
        if self.path.startswith("//"):  # gh-87389: no open redirects via //host paths
            self.path = "/" + self.path.lstrip("/")
        try:
            self.headers = read_headers(self.rfile, self.MessageClass)
        except http.client.LineTooLong as err:
            self.send_error(431, "Line too long", str(err))
            return False
        except http.client.HTTPException as err:
            self.send_error(431, "Too many headers", str(err))
            return False
        conntype = self.headers.get("Connection", "").lower()
        if conntype == "close":
            self.close_connection = True
        elif conntype == "keep-alive" and self.protocol_version >= "HTTP/1.1":
            self.close_connection = False
        expect = self.headers.get("Expect", "")
        if (expect.lower() == "100-continue" and self.protocol_version >= "HTTP/1.1"
                and self.request_version >= "HTTP/1.1"):
            if not self.handle_expect_100():
                return False
        return True

    def handle_one_request(self):
        try:
            super().handle_one_request()
        except socket.timeout:
            self.close_connection = True  # a stalled client loses its connection, not a worker

    def dispatch(self):
        app = self.app
        self.set_context(None)
        started = time.monotonic()
        status = 500
        try:
            parsed = urllib.parse.urlsplit(self.path)
            self.query = dict(urllib.parse.parse_qsl(parsed.query, keep_blank_values=True))
            func, m = app.route(self.command, parsed.path)
            sid = self.session_header()
            path_sid = m.group(1) if m.groups() and func.__name__.endswith("_session") else None
            self.set_context(path_sid or sid)
            if func.__name__ != "post_lab":
                self._discard_body()
            # any request naming a session is a sign of life
            for named in {sid, path_sid} - {None}:
                try:
                    app.queue.touch(named)
                except UnknownSession:
                    pass
            status, body = func(self, m)
        except BadRequest as e:  # e.g. parse_bool on ?force= / the reuse field
            status, body = e.status, {"detail": str(e)}
        except HTTPError as e:
            status, body = e.status, {"detail": e.detail}
            if status >= 500:
                log.error("%s %s -> %d: %s", self.command, self.path, status,
                          e.detail.splitlines()[0] if e.detail else "")
        except Exception as e:  # a bug: answer 500 and keep serving
            log.exception("unhandled error in %s %s", self.command, self.path)
            status, body = 500, {"detail": "internal server error: %s" % e}
        app.counters["http %s %d" % (self.command, status)] += 1
        try:
            self.send_json(status, body)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        log.debug("%s %s -> %d (%.1f ms)", self.command, self.path, status,
                  (time.monotonic() - started) * 1000)

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = dispatch

    def log_message(self, fmt, *args):  # http.server's own access/error lines
        log.debug("http: " + fmt, *args)

    def send_error(self, code, message=None, explain=None):
        """Protocol-level errors (bad request line, too-long headers) as JSON too."""
        self.close_connection = True
        try:
            self.send_json(code, {"detail": message or explain or "bad request"})
        except OSError:
            pass


class LabHTTPServer(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512


def bind_server(settings: Settings, app: App) -> LabHTTPServer:
    handler = type("BoundRequestHandler", (RequestHandler,),
                   {"app": app, "timeout": settings.socket_timeout})
    if settings.port_range:
        start, end = settings.port_range
        last_error = None
        for port in range(start, end + 1):
            try:
                return LabHTTPServer((settings.host, port), handler)
            except OSError as e:
                if e.errno not in (errno.EADDRINUSE, errno.EACCES):
                    raise
                last_error = e
        raise OSError(errno.EADDRINUSE, "no free port in %d-%d (%s)" % (start, end, last_error))
    return LabHTTPServer((settings.host, settings.port), handler)


# ============================================================================================
# 7. Housekeeping thread
# ============================================================================================


def housekeeping_loop(app: App) -> None:
    while not app.stopping.is_set():
        try:
            app.housekeeping_once()
        except Exception:
            log.exception("housekeeping failed")
        app.stopping.wait(app.cadence())


# ============================================================================================
# Simulated netlab (--simulate): the same runner code paths, netlab played by this file
# ============================================================================================

SIMULATED_NETLAB_FLAG = "--simulated-netlab"
SIM_SNAPSHOT = "netlab.snapshot.pickle"
SIM_GENERATED = (SIM_SNAPSHOT, "netlab.lock", "clab.yml", "hosts.yml")


def simple_topology_nodes(text: str) -> List[Tuple[str, Optional[str]]]:
    """[(node, device or None)] from a topology's ``nodes`` (list or mapping form).

    A tiny reader for the common YAML shapes, enough for a simulation; not a YAML parser.
    """
    lines = text.splitlines()
    nodes = []  # type: List[Tuple[str, Optional[str]]]
    for i, line in enumerate(lines):
        m = re.match(r"^nodes\s*:\s*(.*?)\s*(#.*)?$", line)
        if not m:
            continue
        inline = m.group(1)
        if inline.startswith("["):
            return [(n.strip().strip("'\""), None) for n in inline.strip("[]").split(",") if n.strip()]
        indent = None
        current = None
        for sub in lines[i + 1:]:
            if not sub.strip() or sub.lstrip().startswith("#"):
                continue
            width = len(sub) - len(sub.lstrip())
            if width == 0:
                break
            if indent is None:
                indent = width
            body = sub.strip()
            if width == indent:
                if body.startswith("- "):
                    item = body[2:].strip()
                    name = item.split(":", 1)[0].strip()
                    if ":" in item and item.startswith("name"):
                        name = item.split(":", 1)[1].strip()
                    nodes.append((name.strip("'\""), None))
                else:
                    current = body.split(":", 1)[0].strip().strip("'\"")
                    nodes.append((current, None))
            elif current is not None:
                dm = re.match(r"device\s*:\s*([\w.-]+)", body)
                if dm:
                    nodes[-1] = (current, dm.group(1))
        return nodes
    return nodes


def _sim_registry_path() -> str:
    home = os.environ.get("REMOTE_LAB_SIM_HOME") or os.path.join(os.path.expanduser("~"), ".netlab-sim")
    os.makedirs(home, exist_ok=True)
    return os.path.join(home, "status.json")


def sim_registry(update: Optional[Callable[[dict], None]] = None) -> dict:
    """netlab's instance registry (like ~/.netlab/status.yaml), under a file lock."""
    import fcntl
    path = _sim_registry_path()
    with open(path + ".lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            data = {}
        if update:
            update(data)
            tmp = "%s.%d.tmp" % (path, os.getpid())
            with open(tmp, "w") as f:
                json.dump(data, f)
            os.replace(tmp, path)
        return data


def simulated_netlab_main(argv: List[str]) -> int:
    """A faithful-enough netlab: up/inspect/down/status/version with the real outputs and traps."""
    if not argv:
        print("usage: netlab <command> ...", file=sys.stderr)
        return 1
    verb, args = argv[0], argv[1:]
    cwd = os.getcwd()
    if verb == "version":
        print("netlab version 26.10 (remote-lab simulation)")
        return 0
    if verb == "up":
        topo = [a for a in args if not a.startswith("-")]
        topo_path = topo[0] if topo else "topology.yml"
        running = sim_registry().get("default")
        if running and running.get("dir") != cwd:
            print("It looks like the lab instance 'default' is already running in directory %s"
                  % running.get("dir"))
            return 1
        try:
            with open(topo_path) as f:
                text = f.read()
        except OSError as e:
            print("Fatal error in netlab: cannot read topology %s: %s" % (topo_path, e),
                  file=sys.stderr)
            return 1
        sim_registry(lambda d: d.__setitem__("default", {"dir": cwd, "status": "started"}))
        nodes = simple_topology_nodes(text)
        if not nodes:
            print("Fatal error in netlab: topology %s has no nodes" % topo_path, file=sys.stderr)
            return 1
        dm = re.search(r"^defaults\.device\s*:\s*([\w.-]+)", text, re.M)
        default_device = dm.group(1) if dm else "frr"
        data = {}
        for idx, (name, device) in enumerate(nodes, start=1):
            device = device or default_device
            addr = "192.168.121.%d" % (100 + idx)
            data[name] = {
                "name": name, "id": idx, "device": device, "box": "simulated/%s" % device,
                "ansible_host": addr, "ansible_network_os": device,
                "ansible_connection": "network_cli",
                "mgmt": {"ifname": "eth0", "ipv4": addr, "mac": "08:4f:a9:00:00:%02x" % idx},
                "interfaces": [],
            }
        with open(os.path.join(cwd, SIM_SNAPSHOT), "w") as f:
            json.dump({"nodes": data}, f)
        for extra in SIM_GENERATED[1:]:
            with open(os.path.join(cwd, extra), "w") as f:
                f.write("# generated by the remote-lab netlab simulation\n")
        sim_registry(lambda d: d.__setitem__("default", {"dir": cwd, "status": "started"}))
        print("[SUCCESS] Lab started (simulated)")
        return 0
    if verb in ("inspect", "down", "status"):
        instance = None
        if "--instance" in args:
            instance = args[args.index("--instance") + 1]
        labdir = cwd
        if instance is not None:
            entry = sim_registry().get(instance)
            if not entry:
                print("FatalError in %s: Unknown instance %s" % (verb, instance), file=sys.stderr)
                return 1
            labdir = entry["dir"]
            if not os.path.isdir(labdir):
                print("FatalError in %s: Cannot change directory to %s" % (verb, labdir),
                      file=sys.stderr)
                return 1
        snap = os.path.join(labdir, SIM_SNAPSHOT)
        if verb == "status":
            reg = sim_registry()
            if not reg:
                print("No netlab-managed labs")
                return 1
            for key, entry in reg.items():
                print("%s  %s  %s" % (key, entry.get("dir"), entry.get("status")))
            return 0
        if verb == "down":
            if not os.path.exists(snap):
                print("FatalError in down: cannot find netlab snapshot in %s" % labdir, file=sys.stderr)
                return 1
            for name in SIM_GENERATED:
                try:
                    os.unlink(os.path.join(labdir, name))
                except OSError:
                    pass
            sim_registry(lambda d: [d.pop(k) for k in [k for k, v in d.items() if v.get("dir") == labdir]])
            print("[SUCCESS] Lab removed (simulated)")
            return 0
        try:
            with open(snap) as f:
                nodes = json.load(f)["nodes"]
        except (OSError, ValueError):
            print("FatalError in inspect: Unknown instance default", file=sys.stderr)
            return 1
        if "--node" in args:
            name = args[args.index("--node") + 1]
            if name not in nodes:
                print("FatalError in inspect: unknown node %s" % name, file=sys.stderr)
                return 1
            print(json.dumps(nodes[name], indent=2))
            return 0
        expr = [a for a in args if not a.startswith("-") and a not in ("json", "yaml")]
        if expr and expr[-1] == "list(nodes.keys())":
            print(repr(list(nodes)))
            print()
            return 0
        print(json.dumps(nodes, indent=2))
        return 0
    print("Fatal error in netlab: unknown command %s" % verb, file=sys.stderr)
    return 1


# ============================================================================================
# 8. main(): CLI, logging, single-instance lock, status file, signals
# ============================================================================================

LOG_FORMAT = "%(asctime)s | %(levelname)s | %(name)s | %(ctx)s | %(message)s"
LOG_DATEFMT = "%Y-%m-%d %H:%M:%S"


def setup_logging(settings: Settings) -> None:
    if settings.log_config:
        try:
            with open(settings.log_config) as f:
                config = json.load(f)
            logging.config.dictConfig(config)
        except (OSError, ValueError, TypeError, AttributeError, ImportError) as e:
            raise SystemExit("remote-lab: bad --log-config %s: %s" % (settings.log_config, e))
        for handler in logging.getLogger().handlers + log.handlers:
            handler.addFilter(ContextFilter())
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(LOG_FORMAT, LOG_DATEFMT))
    handler.addFilter(ContextFilter())
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(settings.log_level)


class InstanceLock:
    """One server per state dir: an flock held for the process lifetime, naming pid and port."""

    def __init__(self, state_dir: str):
        self.path = os.path.join(state_dir, "server.lock")
        self.fd = None

    def acquire(self) -> None:
        import fcntl
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            try:
                info = json.loads(os.read(fd, 4096).decode() or "{}")
            except ValueError:
                info = {}
            os.close(fd)
            raise SystemExit("remote-lab: another server is already running for %s (pid %s, port %s)"
                             % (os.path.dirname(self.path), info.get("pid", "?"),
                                info.get("port", "?")))
        self.fd = fd

    def record(self, **info) -> None:
        data = json.dumps(dict(info, pid=os.getpid())).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, data, 0)


class StatusFile:
    """The remote-http-launcher status-file protocol (see README, "remote host over SSH").

    The launcher writes ``{..., "pid", "status": "starting"}`` after starting us; we bind first,
    then keep every field, add ``port`` and set ``status`` (``running`` or ``failed`` + ``error``),
    always by atomic rename of a uniquely named temp file.
    """

    WAIT_FOR_FILE = 60.0

    def __init__(self, path: Optional[str]):
        self.path = os.path.abspath(os.path.expanduser(path)) if path else None

    def _read(self, wait: bool) -> Optional[dict]:
        deadline = time.monotonic() + (self.WAIT_FOR_FILE if wait else 0)
        while True:
            try:
                with open(self.path) as f:
                    data = json.load(f)
                return data if isinstance(data, dict) else {}
            except FileNotFoundError:
                if time.monotonic() >= deadline:
                    return None
                time.sleep(0.1)
            except (OSError, ValueError):
                # half-written by a launcher that does not rename atomically: retry briefly
                if time.monotonic() >= deadline:
                    return {}
                time.sleep(0.1)

    def _write(self, data: dict) -> None:
        directory = os.path.dirname(self.path) or "."
        tmp = os.path.join(directory, ".%s.%d.%s.tmp" % (os.path.basename(self.path), os.getpid(),
                                                        uuid.uuid4().hex[:8]))
        with open(tmp, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, self.path)

    def update(self, **fields) -> bool:
        """Merge ``fields`` into the file (waiting for it to appear). False if it never did."""
        if not self.path:
            return True
        data = self._read(wait=True)
        found = data is not None
        data = dict(data or {})
        data.update(fields)
        data.setdefault("pid", os.getpid())
        try:
            self._write(data)
        except OSError as e:
            log.error("cannot write status file %s: %s", self.path, e)
            return False
        return found

    def mark_stopped(self) -> None:
        """On exit: ``stopped``, but only if the file still names us (a successor may own it)."""
        if not self.path:
            return
        data = self._read(wait=False)
        if data and data.get("pid") == os.getpid():
            data["status"] = "stopped"
            try:
                self._write(data)
            except OSError:
                pass


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [SIMULATED_NETLAB_FLAG]:
        return simulated_netlab_main(argv[1:])
    settings = settings_from_args(argv)
    setup_logging(settings)
    status_file = StatusFile(settings.status_file)

    def fail(message: str) -> int:
        print(message, file=sys.stderr)
        status_file.update(status="failed", error=message)
        return 1

    if not settings.simulate:
        found = shutil.which(settings.netlab)
        if not found:
            return fail("remote-lab: netlab not found (%r): install it (pip install networklab), "
                        "pass --netlab PATH, or use --simulate to try the server without it"
                        % settings.netlab)
        settings.netlab = os.path.abspath(found)
    lock = InstanceLock(settings.state_dir)
    try:
        lock.acquire()
    except SystemExit as e:
        return fail(str(e))
    if settings.simulate:
        os.environ.setdefault("REMOTE_LAB_SIM_HOME", os.path.join(settings.state_dir, "simulated-netlab"))
    app = App(settings)
    try:
        server = bind_server(settings, app)
    except OSError as e:
        where = ("ports %d-%d" % settings.port_range if settings.port_range
                 else "port %d" % settings.port)
        return fail("remote-lab: cannot listen on %s %s: %s" % (settings.host, where, e))
    host, port = server.server_address[:2]
    lock.record(port=port, host=host)
    if not status_file.update(status="running", port=port, host=host):
        log.warning("status file %s did not appear within %.0f s; wrote it myself",
                    status_file.path, StatusFile.WAIT_FOR_FILE)
    shown_host = "[%s]" % host if ":" in host else host
    log.info("remote-lab %s: Listening on http://%s:%d (netlab: %s)", __version__, shown_host,
             port, "simulated" if settings.simulate else settings.netlab)
    app.lab.startup_cleanup()

    def on_signal(signum, frame):
        if not app.stopping.is_set():
            log.info("received %s: shutting down", signal.Signals(signum).name)
            app.stopping.set()
            threading.Thread(target=server.shutdown, daemon=True).start()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    keeper = threading.Thread(target=housekeeping_loop, args=(app,), name="housekeeping",
                              daemon=True)
    keeper.start()
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
        app.stopping.set()
        log.info("tearing down the lab before exit")
        app.lab.shutdown()
        status_file.mark_stopped()
        log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
