#!/usr/bin/env python3
"""remote-lab server: share one Netlab lab host between many test runs.

A FIFO queue of exclusive sessions (``X-Session-ID``), heartbeats, multipart topology uploads,
ref-counted lab reuse and netlab subprocess control behind a small REST API.

Standard library only, Python >= 3.8, one file: copy it to the lab host and run
``python3 remote_lab.py --port 8000`` (``--simulate`` to try it without netlab).

Sections, top to bottom (banners ``# N. ...``):
  1 Settings (each default once)      2 SessionQueue (pure; injected clock and ids; HoldTimes;
    up to --slots active sessions, the affinity promotion and its fairness bound)
  3 NetlabRunner (the only code that spawns netlab; process records for crash recovery)
  4 Lab: pure planner (state + request -> action), executor (netlab I/O), the Lab applying it
    (one Lab per slot, each slot's lab its own netlab multilab instance with --slots N)
  5 Uploads (streaming multipart, safe paths)   5a Durable state (SQLite: StateStore, journal)
  5b @endpoint declarations -> dispatch + OpenAPI
  6 Ops parts: EventLog, Metrics, status_view(), SystemdReporter
  7 HTTP: RequestGuard (Origin/Host), AuthTable (--auth-file), App (handlers: Request ->
    Response), FastRequestHead, RequestHandler (deadlines, caps), 7.2 TLS, LabHTTPServer
  8 Housekeeping   9 Rendering: metrics text, status page, OpenAPI, /docs
  10 Simulated netlab   11 main(), Reload (SIGHUP: re-exec in place, socket and lock handed over)
"""

import argparse
import bisect
import collections
import dataclasses
import email.parser
import errno
import html
import http.server
import io
import itertools
import json
import logging
import os
import re
import shlex
import shutil
import signal
import socket
import socketserver
import sys
import threading
import time
import urllib.parse
from typing import Callable, Dict, List, Optional, Tuple

# Imported where used, not here: ast, concurrent.futures, hashlib, logging.config, subprocess,
# uuid (with platform) -- they are most of the start-up time and of a simulated netlab call.

__version__ = "0.1.0"

LOGGER_NAME = "remote-lab-server"
log = logging.getLogger(LOGGER_NAME)

# ============================================================================================
# 1. Settings
# ============================================================================================


@dataclasses.dataclass
class Settings:
    host: str = "127.0.0.1"
    allow_hosts: Tuple[str, ...] = ()  # Host names accepted besides loopback (section 7)
    allow_origins: Tuple[str, ...] = ()  # browser origins allowed to POST/DELETE (section 7)
    port: int = 8000
    port_range: Optional[Tuple[int, int]] = None
    netlab: str = "netlab"
    simulate: bool = False
    state_dir: str = os.path.join("~", ".remote-lab")
    waiting_timeout: float = 600.0
    active_timeout: float = 300.0
    max_hold: float = 0.0  # end an active session after holding the lab this long (0: never)
    keep_warm: float = 0.0
    up_timeout: float = 1800.0
    netlab_timeout: float = 300.0  # down / inspect
    max_upload_mb: float = 64.0
    max_queue: int = 1000
    socket_timeout: float = 60.0
    header_timeout: float = 10.0  # request line + headers in total; a body's grace too
    max_connections: int = 500
    log_level: str = "INFO"
    debug: bool = False
    log_config: Optional[str] = None
    status_file: Optional[str] = None
    tls_cert: Optional[str] = None  # --tls-cert / --tls-key: serve HTTPS (section 7.2)
    tls_key: Optional[str] = None
    teardown_on_exit: bool = False  # stop: tear the lab down (default: leave it to be adopted)
    cleanup: bool = False  # --cleanup: tear down what the state dir holds, then exit
    auth_file: Optional[str] = None  # users and tokens; None: the API is open (the seed's)
    slots: int = 1  # labs at once, each a netlab multilab instance when more than one
    multilab_ids: Tuple[int, ...] = ()  # the slots' multilab ids (default 1..N, skipping 121)
    max_overtake: Optional[int] = None  # affinity: times a waiter may be overtaken (2 x slots)

    @property
    def labs_dir(self) -> str:
        return os.path.join(self.state_dir, "labs")

    def slot_labs_dir(self, slot: int) -> str:
        """Slot ``slot``'s lab dirs: the labs dir itself with one slot (as ever), else a
        ``slot-K`` dir in it, so that each slot's start-up clean-up sees its own dirs only."""
        return self.labs_dir if self.slots == 1 else os.path.join(self.labs_dir, "slot-%d" % slot)

    def multilab_id(self, slot: int) -> Optional[int]:
        """netlab's multilab instance id of ``slot``; None with one slot (no plugin at all)."""
        if self.slots == 1:
            return None
        if self.multilab_ids:
            return self.multilab_ids[slot - 1]
        ids = [i for i in range(1, self.slots + 2) if i != MULTILAB_RESERVED_ID]
        return ids[slot - 1]

    @property
    def overtake_limit(self) -> int:
        return 2 * self.slots if self.max_overtake is None else self.max_overtake

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    def netlab_command(self) -> List[str]:
        """The argv prefix that runs netlab (the simulator is this very file)."""
        if self.simulate:
            return [sys.executable, os.path.abspath(__file__), SIMULATED_NETLAB_FLAG]
        return [self.netlab]


MULTILAB_RESERVED_ID = 121  # multilab maps id 121 onto a subnet netlab itself uses


def _positive(kind):
    def convert(text):
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError("must not be negative: %r" % text)
        return value
    return convert


def _host_arg(text):
    value = text.strip().lower()
    if not HOST_HEADER_RE.match(value):
        raise argparse.ArgumentTypeError("not a host name, NAME:PORT or [IPv6]: %r" % text)
    return value


def _origin_arg(text):
    value = normalize_origin(text.strip().lower().rstrip("/"))
    scheme, _, rest = value.partition("://")
    if scheme not in ("http", "https") or not HOST_HEADER_RE.match(rest):
        raise argparse.ArgumentTypeError(
            "not an origin (scheme://host[:port], e.g. http://ui.example:3000): %r" % text)
    return value


def build_arg_parser() -> argparse.ArgumentParser:
    """The command line; every default is the Settings field's (``dest`` = the field name)."""
    d = Settings()
    p = argparse.ArgumentParser(
        prog="remote-lab",
        description="Share one Netlab lab host between many test runs (REST API, FIFO queue).")
    p.add_argument("--host", default=d.host, help="address to listen on (default %s)" % d.host)
    p.add_argument("--allow-host", dest="allow_hosts", action="append",
                   default=list(d.allow_hosts), type=_host_arg, metavar="HOST",
                   help="also answer requests whose Host header is HOST (NAME or NAME:PORT); "
                        "bound to loopback only loopback names are answered (repeatable)")
    p.add_argument("--allow-origin", dest="allow_origins", action="append",
                   default=list(d.allow_origins), type=_origin_arg,
                   metavar="ORIGIN", help="let web pages of ORIGIN (scheme://host[:port]) "
                   "POST/DELETE; other sites' pages are refused (repeatable)")
    p.add_argument("--port", type=int, default=d.port,
                   help="TCP port, 0 = any free port (default %d)" % d.port)
    p.add_argument("--port-range", type=int, nargs=2, metavar=("START", "END"),
                   default=d.port_range,
                   help="listen on the first free port in START..END (overrides --port)")
    p.add_argument("--netlab", default=d.netlab,
                   help="netlab executable (default: %s from PATH)" % d.netlab)
    p.add_argument("--simulate", action="store_true", default=d.simulate,
                   help="use a built-in simulated netlab (no netlab needed; for trying things out)")
    p.add_argument("--state-dir", default=d.state_dir,
                   help="lock, lab work dirs and state (default %s)" % d.state_dir)
    seconds = dict(type=_positive(float), metavar="S")
    p.add_argument("--waiting-timeout", default=d.waiting_timeout, **seconds,
                   help="drop a waiting session after S seconds without a sign of life (%g)"
                        % d.waiting_timeout)
    p.add_argument("--active-timeout", default=d.active_timeout, **seconds,
                   help="end an active session after S seconds without a sign of life (%g)"
                        % d.active_timeout)
    p.add_argument("--max-hold", default=d.max_hold, **seconds,
                   help="end an active session after it held the lab S seconds, as if it had "
                        "expired (%g = never)" % d.max_hold)
    p.add_argument("--keep-warm", default=d.keep_warm, **seconds,
                   help="keep an idle reusable lab up S seconds after its session ends (%g)"
                        % d.keep_warm)
    p.add_argument("--up-timeout", default=d.up_timeout, **seconds,
                   help="kill 'netlab up' after S seconds (%g)" % d.up_timeout)
    p.add_argument("--netlab-timeout", default=d.netlab_timeout, **seconds,
                   help="kill 'netlab down'/'inspect' after S seconds (%g)" % d.netlab_timeout)
    p.add_argument("--max-upload-mb", type=_positive(float), default=d.max_upload_mb,
                   metavar="MB", help="largest accepted upload (%g)" % d.max_upload_mb)
    p.add_argument("--max-queue", type=_positive(int), default=d.max_queue, metavar="N",
                   help="most sessions at once; more get 429 (%d)" % d.max_queue)
    p.add_argument("--socket-timeout", default=d.socket_timeout, **seconds,
                   help="drop a connection that sends nothing for S seconds (%g)"
                        % d.socket_timeout)
    p.add_argument("--header-timeout", default=d.header_timeout, **seconds,
                   help="drop a request whose line and headers take more than S seconds, or "
                        "whose body arrives slower than 16 KiB/s after S seconds (%g; 0 = off)"
                        % d.header_timeout)
    p.add_argument("--max-connections", type=_positive(int), default=d.max_connections,
                   metavar="N", help="most open connections; more get 503, idle ones are closed "
                   "first (%d; lowered to fit the open-files limit; 0 = that limit only)"
                   % d.max_connections)
    p.add_argument("--log-level", default=d.log_level, type=str.upper,
                   choices=["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"])
    p.add_argument("--debug", action="store_true", default=d.debug,
                   help="debug logging, netlab output streamed line by line")
    p.add_argument("--log-config", metavar="FILE", default=d.log_config,
                   help="JSON logging.config.dictConfig file")
    p.add_argument("--status-file", metavar="PATH", default=d.status_file,
                   help="status file of the remote-http-launcher protocol")
    p.add_argument("--tls-cert", metavar="FILE", default=d.tls_cert,
                   help="serve HTTPS (TLS >= 1.2) with this PEM certificate (chain); needs "
                        "--tls-key")
    p.add_argument("--tls-key", metavar="FILE", default=d.tls_key,
                   help="the PEM private key of --tls-cert (not passphrase-protected)")
    p.add_argument("--teardown-on-exit", action="store_true", default=d.teardown_on_exit,
                   help="tear the lab down when the server stops (default: leave it running "
                        "for the next start to adopt; sessions survive either way)")
    p.add_argument("--cleanup", action="store_true", default=d.cleanup,
                   help="tear down everything the state dir holds (lab, lab dirs, netlab "
                        "instances registered there), forget its sessions, and exit")
    p.add_argument("--auth-file", metavar="FILE", default=d.auth_file,
                   help="users and tokens, NAME:TOKEN[:admin] a line (mode 600): every request "
                        "but /healthz then needs its token, and sessions belong to their user")
    p.add_argument("--slots", type=_slot_count, default=d.slots, metavar="N",
                   help="labs at once, one per active session, each its own netlab multilab "
                        "instance (%d: one lab, no multilab plugin)" % d.slots)
    p.add_argument("--multilab-ids", type=_multilab_ids, default=d.multilab_ids, metavar="IDS",
                   help="the slots' netlab multilab ids, comma-separated (default 1..N, "
                        "skipping %d)" % MULTILAB_RESERVED_ID)
    p.add_argument("--max-overtake", type=_positive(int), default=d.max_overtake, metavar="N",
                   help="a waiting session may be overtaken by N sessions that asked for a warm "
                        "lab (default 2 x slots; 0 = strict FIFO)")
    p.add_argument("--version", action="version", version="remote-lab " + __version__)
    return p


def _slot_count(text):
    value = int(text)
    if not 1 <= value <= 199:  # netlab's multilab ids 1..200, but 121
        raise argparse.ArgumentTypeError("must be between 1 and 199: %r" % text)
    return value


def _multilab_ids(text):
    try:
        ids = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("not a comma-separated list of ids: %r" % text) from None
    if len(set(ids)) != len(ids) or not all(1 <= i <= 200 for i in ids):
        raise argparse.ArgumentTypeError("ids must be distinct, 1 to 200: %r" % text)
    return ids


def settings_from_args(argv=None) -> Settings:
    """Settings from the command line: each field from its option, lists made tuples, the
    state dir absolute; --debug implies the DEBUG log level."""
    args = vars(build_arg_parser().parse_args(argv))
    values = {f.name: args[f.name] for f in dataclasses.fields(Settings)}
    for name, value in values.items():
        if isinstance(value, list):  # append / nargs options: Settings holds tuples
            values[name] = tuple(value)
    values["state_dir"] = os.path.abspath(os.path.expanduser(values["state_dir"]))
    if values["debug"]:
        values["log_level"] = "DEBUG"
    if values["multilab_ids"] and values["slots"] == 1:
        build_arg_parser().error("--multilab-ids needs --slots 2 or more (one slot runs netlab "
                                 "without the multilab plugin)")
    if values["multilab_ids"] and len(values["multilab_ids"]) != values["slots"]:
        build_arg_parser().error("--multilab-ids lists %d ids for --slots %d" % (
            len(values["multilab_ids"]), values["slots"]))
    return Settings(**values)


# ============================================================================================
# 2. The session queue: a pure state machine (no I/O, injected clock)
# ============================================================================================


class Clock:
    """Monotonic seconds and timed waits on a condition: all the queue and the lab know of time.

    Calling it returns ``now()``, like the ``time.monotonic`` it stands for. A test clock
    overrides both methods and never sleeps (tests/clock_support.py).
    """

    def __init__(self, now: Callable[[], float] = time.monotonic):
        self._now = now

    def now(self) -> float:
        return self._now()

    def __call__(self) -> float:
        return self.now()

    def wait(self, cond: threading.Condition, timeout: float) -> None:
        """Wait on ``cond`` (held by the caller) until notified or ``timeout`` seconds pass."""
        cond.wait(timeout)


def as_clock(clock) -> Clock:
    """``clock`` if it is a Clock, a Clock around it if it is a function returning seconds,
    the real clock if it is None."""
    if clock is None:
        return Clock()
    return clock if isinstance(clock, Clock) else Clock(clock)


def new_session_id() -> str:
    import uuid
    return str(uuid.uuid4())


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
    meta: Dict[str, str] = dataclasses.field(default_factory=dict)  # owner, note, link, user
    slot: Optional[int] = None  # the lab slot (1..N) it holds while active
    overtaken: int = 0  # times sessions behind it were promoted first (affinity)


HOLD_TIMES_KEPT = 20  # recent hold times the estimated waits are made of
ENDED_REASONS_KEPT = 100  # sessions whose 404 says why the server ended them


class HoldTimes:
    """How long the last ``keep`` active sessions held the lab (ended or expired), and the
    waits estimated from them: the holder's expected rest, then one typical (median) hold per
    session ahead. ``cap`` (--max-hold, 0: none) bounds every hold. Not thread-safe: the
    queue's lock guards it."""

    def __init__(self, keep: int = HOLD_TIMES_KEPT):
        self.times = collections.deque(maxlen=keep)  # type: collections.deque

    def add(self, seconds: float) -> None:
        self.times.append(round(max(0.0, seconds), 1))

    def restore(self, saved) -> None:
        """Hold times saved by a previous server (oldest first); anything else is skipped."""
        for t in saved if isinstance(saved, list) else ():
            if isinstance(t, (int, float)) and not isinstance(t, bool) and t >= 0:
                self.add(float(t))

    def _capped(self, cap: float) -> List[float]:
        return [min(t, cap) if cap > 0 else t for t in self.times]

    def estimate(self, held: float, cap: float = 0.0) -> Optional[Tuple[float, float]]:
        """(the holder's expected rest, a typical hold) behind a holder that has held the lab
        ``held`` seconds; None without history."""
        import statistics
        times = self._capped(cap)
        if not times:
            return None
        typical = statistics.median(times)
        # the holder: how much longer the recent holds that lasted longer than it went on
        longer = [t - held for t in times if t > held]
        rest = statistics.median(longer) if longer else 0.0
        if cap > 0:
            rest = min(rest, max(0.0, cap - held))
        return rest, typical

    def waits(self, held: float, waiting: int, cap: float = 0.0) -> List[Optional[float]]:
        """Estimated seconds until each of ``waiting`` sessions (in queue order) gets the lab,
        behind a holder that has held it ``held`` seconds; None each without history."""
        found = self.estimate(held, cap)
        if found is None:
            return [None] * waiting
        rest, typical = found
        return [round(rest + i * typical, 1) for i in range(waiting)]


def _rounded(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else round(seconds, 1)


def hold_left_after(max_hold: float, held: Optional[float]) -> Optional[float]:
    """Seconds until --max-hold (``max_hold``, 0: none) ends a session that has held the lab
    ``held`` seconds (at least 0); None while it waits (``held`` None) or without a limit."""
    return None if held is None or max_hold <= 0 else max(0.0, max_hold - held)


class SessionQueue:
    """FIFO of sessions; up to ``slots`` of them are active, each holding one lab slot.
    Thread-safe; long-poll waits on the condition.

    Positions: 0 = active, 1.. = waiting. The active sessions come first (in the order they
    became active: the oldest is ``active_id()``), then the waiting ones in queue order. Every
    change bumps ``version`` and wakes waiters.

    A free slot goes to the first waiting session, except for affinity: when a free slot's lab
    is warm with the fingerprint F (``set_warm``), the earliest waiting session that declared F
    (``meta["fingerprint"]``) is promoted into it ahead of the others, provided none of those
    it overtakes was overtaken ``max_overtake`` times already or has waited longer than half
    the waiting timeout (``max_overtake`` 0: strict FIFO).
    """

    def __init__(self, waiting_timeout=600.0, active_timeout=300.0, max_length=1000,
                 clock=None, new_id: Callable[[], str] = new_session_id,
                 on_activate: Optional[Callable[["Session"], None]] = None,
                 on_drop: Optional[Callable[["Session"], None]] = None,
                 journal: Optional["QueueJournal"] = None, max_hold: float = 0.0,
                 slots: int = 1, max_overtake: Optional[int] = None,
                 on_overtake: Optional[Callable[["Session", List["Session"], str], None]] = None):
        self.slots = slots
        self.max_overtake = 2 * slots if max_overtake is None else max_overtake
        self.on_overtake = on_overtake  # (promoted, the sessions it overtook, fingerprint)
        self.warm = {}  # type: Dict[int, str]  # slot -> fingerprint of its lab, kept warm at
        #                                         the end of its session (set by the lab)
        self._holders = {}  # type: Dict[int, str]  # slot -> the active session in it
        self.waiting_timeout = waiting_timeout
        self.active_timeout = active_timeout
        self.max_hold = max_hold  # seconds an active session may hold the lab (0: no limit)
        self.holds = HoldTimes()  # how long the recent active sessions held it
        self._ended_why = collections.OrderedDict()  # type: collections.OrderedDict[str, str]
        self.max_length = max_length
        self.clock = as_clock(clock)  # a Clock, or a function returning monotonic seconds
        self.new_id = new_id
        self._long_polls = 0  # wait_change calls blocked on ``changed`` right now
        self.closed = False  # the server is stopping: long-polls answer at once
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self._sessions = collections.OrderedDict()  # type: collections.OrderedDict[str, Session]
        self.version = 0
        self.on_activate = on_activate  # a session became active (lock held)
        self.on_drop = on_drop  # a waiter found dead at its turn, already dropped (lock held)
        self.journal = journal  # writes each change to disk before the call returns (5a)
        self._gone = []  # type: List[str]  # this call's changes, for the journal
        self._promoted = []  # type: List[Session]

    # -- helpers (lock held) --
    def _bump(self):
        self.version += 1
        self.changed.notify_all()

    def _position(self, sid: str) -> int:
        """0 for an active session, else 1 + the number of waiting sessions ahead of it."""
        if self._session(sid).activated is not None:
            return 0
        for i, key in enumerate(self._sessions):
            if key == sid:
                return i - len(self._holders) + 1
        raise UnknownSession(sid)

    def _session(self, sid) -> Session:
        try:
            return self._sessions[sid]
        except KeyError:
            why = self._ended_why.get(sid)  # ended by the server for a reason its client needs
            raise (UnknownSession(sid) if why is None else UnknownSession(sid, why)) from None

    def _held(self, s: Session) -> Optional[float]:
        """Seconds ``s`` has held the lab (lock held); None while it waits."""
        return None if s.activated is None else max(0.0, self.clock.now() - s.activated)

    def _held_until_now(self, s: Session) -> None:
        """``s``, the active session, is leaving: remember how long it held the lab."""
        if s.activated is not None:
            self.holds.add(self._held(s))

    def _waiters(self) -> List[Session]:
        return list(itertools.islice(self._sessions.values(), len(self._holders), None))

    def _activate_head(self, at: Optional[float] = None) -> Optional[str]:
        """Fill the free slots with waiting sessions (``at``: when; default now): the id of
        the first promoted, or None. A waiter already silent past the active timeout is
        dropped instead (it would hold everyone up for that long again)."""
        first = None
        while len(self._holders) < self.slots:
            waiters = self._waiters()
            if not waiters:
                break
            chosen, slot, overtaken = self._next_promotion(waiters)
            if chosen.pins == 0 and self.clock.now() - chosen.last_seen > self.active_timeout:
                del self._sessions[chosen.id]
                self._gone.append(chosen.id)
                if self.on_drop is not None:
                    self.on_drop(chosen)
                continue
            self._activate(chosen, slot, at)
            if overtaken:
                for s in overtaken:
                    s.overtaken += 1
                if self.on_overtake is not None:
                    self.on_overtake(chosen, overtaken, self.warm[slot])
            first = first or chosen.id
        return first

    def _activate(self, s: Session, slot: int, at: Optional[float]) -> None:
        """``s`` holds ``slot`` from now on; it moves up to just after the active sessions."""
        s.activated = self.clock.now() if at is None else at
        s.last_seen = s.activated  # the active timeout counts from promotion
        s.slot = slot
        self._holders[slot] = s.id
        for key in [k for k, v in self._sessions.items() if v.activated is None]:
            self._sessions.move_to_end(key)
        self._promoted.append(s)
        if self.on_activate is not None:
            self.on_activate(s)

    def _next_promotion(self, waiters: List[Session]) -> Tuple[Session, int, List[Session]]:
        """(the session to promote, its slot, the waiting sessions it overtakes)."""
        free = self._free_slots()
        for slot in free:
            fingerprint = self.warm.get(slot)
            if not fingerprint:
                continue
            for i, s in enumerate(waiters):
                if s.meta.get("fingerprint") == fingerprint:
                    if i == 0 or self._may_be_overtaken(waiters[:i]):
                        return s, slot, waiters[:i]
                    break
        return waiters[0], self._slot_for(waiters[0], free), []

    def _free_slots(self) -> List[int]:
        return [k for k in range(1, self.slots + 1) if k not in self._holders]

    def _may_be_overtaken(self, ahead: List[Session]) -> bool:
        """Fairness bound of the affinity: nobody is overtaken more than ``max_overtake``
        times, nor once it has waited half the waiting timeout."""
        now = self.clock.now()
        return self.max_overtake > 0 and all(
            s.overtaken < self.max_overtake and now - s.created <= self.waiting_timeout / 2
            for s in ahead)

    def _slot_for(self, s: Session, free: List[int]) -> int:
        """The free slot for ``s``: one whose warm lab it declared, else one with no warm lab
        (the warm ones stay for those who want them), else the first."""
        wanted = s.meta.get("fingerprint")
        for slot in free:
            if wanted and self.warm.get(slot) == wanted:
                return slot
        return next((slot for slot in free if slot not in self.warm), free[0])

    def _vacate(self, s: Session) -> None:
        """``s`` leaves the queue (lock held): its hold time is kept, its slot freed."""
        if s.activated is not None:
            self._held_until_now(s)
            self._holders.pop(s.slot, None)
        del self._sessions[s.id]
        self._gone.append(s.id)

    def _journal_changes(self) -> None:
        """Hand this call's removals and promotions to the journal, in one write."""
        gone, promoted, self._gone, self._promoted = self._gone, self._promoted, [], []
        if self.journal is not None and (gone or promoted):
            self.journal.changed(gone, promoted)

    # -- API --
    def create(self, meta: Optional[Dict[str, str]] = None) -> Tuple[str, int]:
        """A new session at the end of the queue: (id, position). ``meta``: who and why
        (owner, note, link; user: the authenticated name), kept with it and on disk."""
        with self.lock:
            if len(self._sessions) >= self.max_length:
                raise QueueFull("queue is full (%d sessions)" % self.max_length)
            sid = self.new_id()  # first: it may be slow (the first uuid4 imports uuid)
            now = self.clock.now()
            session = Session(sid, now, now, meta=dict(meta or {}))
            free = self._free_slots()
            # a free slot and nobody waiting: it is active at once, and one write says both
            slot = self._slot_for(session, free) if free and not self._waiters() else None
            if self.journal is not None:
                self.journal.added(session, slot)  # on disk first; if it fails, no change
            self._sessions[sid] = session
            if slot is not None:
                self._activate(session, slot, now)  # (the write took time: not waiting)
                self._promoted.remove(session)
            self._journal_changes()
            self._bump()
            return sid, self._position(sid)

    def restore(self, saved: List[tuple]) -> List[Tuple[str, str]]:
        """Start-up: the sessions a previous server saved, [(id, seconds since created,
        seconds since activated or None[, meta[, slot]])] in creation order. Each gets a full
        timeout from now; an active one keeps its slot (saved without one: only the first,
        in slot 1) if that slot is not taken, else it waits again; free slots are filled then.
        An active session whose slot no longer exists (fewer --slots now) lost its lab with
        it: it is ended, and its 404s say why. Returns [(id, why)] of those."""
        ended = []
        with self.lock:
            now = self.clock.now()
            for i, (sid, created_ago, activated_ago, *rest) in enumerate(saved):
                meta = dict(rest[0]) if rest else {}
                slot = rest[1] if len(rest) > 1 else None
                if slot is None:  # saved by a one-lab server: only its head was active
                    slot = 1 if i == 0 else 0
                if activated_ago is not None and slot > self.slots:
                    why = ("the server restarted with --slots %d: slot %d, which it held, and "
                           "its lab are gone" % (self.slots, slot))
                    self._remember_why(sid, why)
                    self._gone.append(sid)
                    ended.append((sid, why))
                    continue
                s = self._sessions[sid] = Session(sid, now - created_ago, now, meta=meta)
                if activated_ago is not None and 1 <= slot <= self.slots \
                        and slot not in self._holders:
                    s.activated, s.slot = now - activated_ago, slot
                    self._holders[slot] = sid
            for key in [k for k, v in self._sessions.items() if v.activated is None]:
                self._sessions.move_to_end(key)  # the active ones first
            self._activate_head()
            self._journal_changes()
            self._bump()
        return ended

    def state(self, sid: str, touch: bool = True) -> Tuple[str, int]:
        with self.lock:
            s = self._session(sid)
            if touch:
                s.last_seen = self.clock.now()
            pos = self._position(sid)
            return ("active" if pos == 0 else "waiting"), pos

    def slot_of(self, sid: str) -> Optional[int]:
        """The slot the active ``sid`` holds; None while it waits, or if it is unknown."""
        with self.lock:
            s = self._sessions.get(sid)
            return None if s is None else s.slot

    def set_warm(self, slot: int, fingerprint: Optional[str]) -> None:
        """The lab of ``slot`` now runs ``fingerprint`` and would be kept warm when its session
        ends (None: it would not, or no lab runs there): what the affinity promotes for."""
        with self.lock:
            if fingerprint:
                self.warm[slot] = fingerprint
            else:
                self.warm.pop(slot, None)

    def take_warm_slot(self, sid: str, fingerprint: str) -> Optional[int]:
        """The active ``sid`` asks for ``fingerprint``, which its own slot's lab does not run
        but the warm lab of a free slot does: it moves to that slot (returned), else None."""
        with self.lock:
            s = self._session(sid)
            if s.slot is None or self.warm.get(s.slot) == fingerprint:
                return None
            slot = next((k for k in self._free_slots() if self.warm.get(k) == fingerprint), None)
            if slot is not None:
                del self._holders[s.slot]
                s.slot = slot
                self._holders[slot] = sid
                self._promoted.append(s)  # the journal writes its new slot
                self._journal_changes()
                self._bump()
            return slot

    def touch(self, sid: str) -> None:
        with self.lock:
            self._session(sid).last_seen = self.clock.now()

    def pin(self, sid: str) -> None:
        with self.lock:
            s = self._session(sid)
            s.pins += 1
            s.last_seen = self.clock.now()

    def unpin(self, sid: str) -> None:
        with self.lock:
            s = self._sessions.get(sid)
            if s is not None:
                s.pins = max(0, s.pins - 1)
                s.last_seen = self.clock.now()

    def wait_change(self, sid: str, timeout: float,
                    known: Optional[int] = None, touch: bool = True) -> Tuple[str, int]:
        """Block until ``sid``'s status/position changes or ``timeout`` passes; return the state.

        ``known``: the position the caller last saw; if it differs already, return at once
        (the change happened between two long-polls). An active session returns at once too:
        there is nothing left to wait for. Raises UnknownSession if the session is (or becomes)
        unknown. ``touch``: the call is a sign of life of ``sid``.
        """
        with self.lock:
            first = self.state(sid, touch)
            if first[1] == 0 or (known is not None and known != first[1]):
                return first
            deadline = self.clock.now() + timeout
            self._long_polls += 1
            try:
                while True:
                    remaining = deadline - self.clock.now()
                    if remaining <= 0 or self.closed:
                        return self.state(sid, touch)
                    self.clock.wait(self.changed, remaining)
                    now = self.state(sid, touch)
                    if now != first:
                        return now
            finally:
                self._long_polls -= 1

    def close(self) -> None:
        """The server is stopping: every long-poll answers now with its current state."""
        with self.lock:
            self.closed = True
            self.changed.notify_all()

    def reopen(self) -> None:
        """Serving again after all (a reload whose exec failed): long-polls wait again."""
        with self.lock:
            self.closed = False

    def long_polls(self) -> int:
        """How many wait_change calls are blocked now (each is woken by the next change)."""
        with self.lock:
            return self._long_polls

    def remove(self, sid: str) -> Tuple[bool, Optional[str]]:
        """End a session. Returns (was_active, id of a newly promoted head or None); dead
        waiters skipped on the way to that head went to ``on_drop``."""
        with self.lock:
            s = self._session(sid)
            was_active = s.activated is not None
            self._vacate(s)
            promoted = self._activate_head()
            self._journal_changes()
            self._bump()
            return was_active, promoted

    def expire(self) -> List[Tuple[str, bool]]:
        """Drop sessions silent for too long. Returns [(sid, was_active)]."""
        with self.lock:
            now = self.clock.now()
            dead = []
            for s in list(self._sessions.values()):
                limit = self.waiting_timeout if s.activated is None else self.active_timeout
                if s.pins == 0 and now - s.last_seen > limit:
                    dead.append((s.id, s.activated is not None))
                    self._vacate(s)
            if dead:
                self._activate_head()
                self._journal_changes()
                self._bump()
            return dead

    def end_overheld(self) -> Optional[str]:
        """End an active session that has held its lab longer than ``max_hold``: its id, or
        None (call again for the next). A session with a request in flight (a long ``netlab
        up``) ends when that request is over, at a later call; its 404s then say why
        (UnknownSession's second argument)."""
        with self.lock:
            if self.max_hold <= 0:
                return None
            head = next((s for s in self._actives() if s.pins == 0
                         and self._held(s) > self.max_hold), None)
            if head is None:
                return None
            self._remember_why(head.id, "the server ended it: held the lab longer than %s "
                               "(--max-hold)" % fmt_duration(self.max_hold))
            self.remove(head.id)  # (its hold time kept, the next session promoted)
            return head.id

    def _actives(self) -> List[Session]:
        return list(itertools.islice(self._sessions.values(), len(self._holders)))

    def _slot_rests(self) -> Optional[Tuple[List[float], float]]:
        """(each slot's expected time until it frees, soonest first; a typical hold), from
        the hold times (HoldTimes.estimate); None without history."""
        rests = []
        typical = None
        for s in self._actives():
            found = self.holds.estimate(self._held(s) or 0.0, self.max_hold)
            if found is None:
                return None
            rests.append(found[0])
            typical = found[1]
        if typical is None:
            found = self.holds.estimate(0.0, self.max_hold)
            if found is None:
                return None
            typical = found[1]
        return sorted(rests + [0.0] * (self.slots - len(rests))), typical

    def _eta_of_waiter(self, i: int, found: Tuple[List[float], float]) -> float:
        """The ``i``-th waiting session (0: first) gets the ``i % slots``-th slot to free,
        after ``i // slots`` typical holds more (with one slot: rest + i x typical)."""
        rests, typical = found
        return round(rests[i % self.slots] + (i // self.slots) * typical, 1)

    def _remember_why(self, sid: str, why: str) -> None:
        """``sid`` was ended by the server: its 404s say ``why`` (the last few kept)."""
        self._ended_why[sid] = why
        while len(self._ended_why) > ENDED_REASONS_KEPT:
            self._ended_why.popitem(last=False)

    def waits(self, joining: int = 0) -> List[Optional[float]]:
        """Each session's estimated wait in queue order: 0 for the active ones, then estimates
        (None: no history yet); then those of ``joining`` sessions more."""
        with self.lock:
            active = len(self._holders)
            waiting = len(self._sessions) - active + joining
            free = self.slots - active
            if free and waiting:  # a free slot: the next to join gets it at once
                return [0.0] * active + [0.0] * min(free, waiting) + \
                    [None] * (waiting - min(free, waiting))
            found = self._slot_rests()
            return [0.0] * active + [None if found is None else self._eta_of_waiter(i, found)
                                     for i in range(waiting)]

    def eta(self, position: int) -> Optional[float]:
        """The estimated wait of the session at ``position`` (one entry of waits(), without
        the list: a poll must not cost O(queue length) more)."""
        with self.lock:
            if position <= 0 or not self._holders:
                return 0.0
            found = self._slot_rests()
            return None if found is None else self._eta_of_waiter(position - 1, found)

    def hold_left(self, sid: str) -> Optional[float]:
        """Seconds until the active ``sid`` is ended for holding the lab too long (at least 0);
        None while it waits or without --max-hold."""
        return hold_left_after(self.max_hold, self.held(sid))

    def active_id(self) -> Optional[str]:
        """The oldest active session (None: none is active)."""
        with self.lock:
            first = next(iter(self._sessions.values()), None)
            return None if first is None or first.activated is None else first.id

    def active_ids(self) -> Dict[int, str]:
        """slot -> the active session in it."""
        with self.lock:
            return dict(self._holders)

    def meta(self, sid: str) -> Dict[str, str]:
        """Who and why (owner, note, link; user); UnknownSession if unknown."""
        with self.lock:
            return dict(self._session(sid).meta)

    def held(self, sid: str) -> Optional[float]:
        """Seconds since ``sid`` became active; None while it waits."""
        with self.lock:
            return self._held(self._session(sid))

    def is_active(self, sid: str) -> bool:
        return self.slot_of(sid) is not None

    def __len__(self):
        with self.lock:
            return len(self._sessions)

    def snapshot(self) -> List[dict]:
        with self.lock:
            now = self.clock.now()
            active = len(self._holders)
            return [{"session_id": s.id, "position": max(0, i - active + 1),
                     "status": "waiting" if s.activated is None else "active",
                     "age": round(now - s.created, 3), "idle": round(now - s.last_seen, 3),
                     "owner": s.meta.get("owner"), "user": s.meta.get("user"), "slot": s.slot}
                    for i, s in enumerate(self._sessions.values())]



# ============================================================================================
# 3. The netlab runner: the only place that spawns netlab
# ============================================================================================


class NetlabError(Exception):
    """netlab failed (status 502) or timed out (504); ``output`` is the tail of its output."""

    def __init__(self, message: str, output: str = "", timed_out: bool = False,
                 aborted: bool = False):
        super().__init__(message)
        self.output = output
        self.timed_out = timed_out
        self.aborted = aborted  # killed or refused because the server stops: 503, retry later

    @property
    def detail(self) -> str:
        text = str(self)
        if self.output:
            text += "\n--- netlab output (last lines) ---\n" + self.output
        return text


OUTPUT_TAIL_LINES = 30


class Counts(collections.Counter):
    """A Counter for statistics bumped from many threads: ``c[k] += 1`` is not atomic (it loses
    increments under contention on Python < 3.10), ``c.add(k)`` is."""

    def __init__(self):
        super().__init__()
        self._lock = threading.Lock()

    def add(self, key, n=1) -> None:
        with self._lock:
            self[key] += n


def process_stat(pid: int) -> Optional[Tuple[str, int, int]]:
    """(state, process group, start time in clock ticks since boot) of ``pid`` from
    /proc/PID/stat (fields 3, 5 and 22), or None when there is no such process."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the name (field 2) may hold spaces
        return fields[0], int(fields[2]), int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


class NetlabProcessRecords:
    """The running netlab commands (pid, process group, start time) in the state database (5a).

    A server killed with SIGKILL leaves its netlab commands running (each in its own process
    group); the next server kills them before it cleans their lab dirs. The start time tells a
    reused pid from ours.
    """

    def __init__(self, store: Optional["StateStore"] = None):
        self.store = store  # None: not recorded

    def add(self, proc: "subprocess.Popen", verb: str, cwd: str) -> None:
        if self.store is None:
            return
        stat = process_stat(proc.pid)
        self.store.add_proc({"pid": proc.pid, "pgid": proc.pid,  # start_new_session: it leads
                             "start_time": stat[2] if stat else None, "verb": verb, "cwd": cwd})

    def remove(self, pid: int) -> None:
        if self.store is not None:
            self.store.remove_proc(pid)

    @staticmethod
    def _group_members(pgid: int) -> List[int]:
        members = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                stat = process_stat(int(entry))
                if stat and stat[1] == pgid and stat[0] not in ("Z", "X"):
                    members.append(int(entry))
        return members

    def _still_ours(self, record: dict) -> bool:
        """The recorded group is alive and is the one we started (not a reused pid)."""
        leader = process_stat(record["pid"])
        if leader and leader[0] not in ("Z", "X"):
            return leader[1] == record["pgid"] and leader[2] == record.get("start_time")
        # the leader is gone; its children may live on in the group (a pid in use as a group
        # id is never reused), all started after it
        members = self._group_members(record["pgid"])
        started = record.get("start_time") or 0
        return bool(members) and all((process_stat(p) or ("", 0, -1))[2] >= started
                                     for p in members)

    def kill_leftovers(self, records: List[dict], grace: float = 3.0) -> None:
        """Start-up: the records a previous server left (none of ours runs yet). SIGTERM each
        group still alive, SIGKILL after ``grace``; drop the records."""
        for record in records:
            try:
                pid, pgid = int(record["pid"]), int(record["pgid"])
            except (KeyError, TypeError, ValueError):
                continue
            record = dict(record, pid=pid, pgid=pgid)
            if self._still_ours(record):
                log.warning("killing netlab %s left running by a previous server (pid %d, "
                            "process group %d, in %s)", record.get("verb", "?"), pid, pgid,
                            record.get("cwd", "?"), extra={"ctx": "-"})
                self._kill_group(pgid, grace)
            self.remove(pid)

    def _kill_group(self, pgid: int, grace: float) -> None:
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
            try:
                os.killpg(pgid, sig)
            except OSError:
                return
            deadline = time.monotonic() + wait
            while self._group_members(pgid):  # not our children: no wait(), poll /proc
                if time.monotonic() >= deadline:
                    break
                time.sleep(0.05)
            else:
                return  # the whole group is gone
        log.error("netlab process group %d survived SIGKILL", pgid, extra={"ctx": "-"})


class NetlabRunner:
    """Runs netlab commands: stdin closed, own process group, timeouts, output to the log."""

    def __init__(self, command: List[str], up_timeout: float, timeout: float, stream: bool,
                 records: Optional[NetlabProcessRecords] = None,
                 on_start: Optional[Callable[[str], None]] = None,
                 on_done: Optional[Callable[[str, float, Optional[str], str], None]] = None):
        self.command = list(command)
        self.up_timeout = up_timeout
        self.timeout = timeout
        self.stream = stream
        self.on_start = on_start  # (verb): a command is about to run
        self.on_done = on_done  # (verb, seconds, error or None, ctx): it finished or failed
        self.closing = False  # server shutdown: no new `up`
        self._running = {}  # type: Dict[int, Tuple[str, "subprocess.Popen"]]  # pid -> (verb, proc)
        self._running_lock = threading.Lock()
        self.records = records  # running commands on disk, for the next server after a crash
        self.bin_dir = None  # type: Optional[str]  # put first on netlab's PATH (netlab_bin_dir)

    def abort(self) -> None:
        """Server shutdown: refuse new `up`s, kill the `up`/`inspect` runs in flight (whole group)
        so the lab can be torn down now rather than after --up-timeout."""
        with self._running_lock:
            self.closing = True
            procs = [p for verb, p in self._running.values() if verb in ("up", "inspect")]
        for proc in procs:
            log.warning("shutting down: killing netlab (pid %d)", proc.pid)
            kill_process_group(proc)

    def reopen(self) -> None:
        """Serving again after all (a reload whose exec failed): `up` runs again."""
        with self._running_lock:
            self.closing = False

    def run(self, args: List[str], cwd: str, timeout: float, check: bool = True,
            ctx: str = "-", answer: Optional[bytes] = None) -> Tuple[int, str]:
        """Run ``netlab ARGS`` in ``cwd``; return (returncode, stdout). stderr goes to the log.

        stdin is closed, or gives ``answer`` (to a confirmation prompt) and then closes. Raises
        NetlabError on timeout, and on a non-zero exit when ``check`` is set. The hooks hear of
        every command: its start, then its duration and error (a failure too).
        """
        verb = args[0] if args else "?"
        self._report(self.on_start, verb)
        started = time.monotonic()
        try:
            rc, out = self._run(verb, args, cwd, timeout, check, ctx, answer)
        except NetlabError as e:
            self._report(self.on_done, verb, time.monotonic() - started, e.detail, ctx)
            raise
        self._report(self.on_done, verb, time.monotonic() - started,
                     None if rc == 0 else "exit %d" % rc, ctx)
        return rc, out

    @staticmethod
    def _report(hook, *args) -> None:
        if hook is not None:
            try:
                hook(*args)
            except Exception:  # statistics must never fail a netlab command
                log.exception("netlab hook failed")

    def _run(self, verb: str, args: List[str], cwd: str, timeout: float, check: bool,
             ctx: str, answer: Optional[bytes]) -> Tuple[int, str]:
        import subprocess
        argv = self.command + list(args)
        shown = "netlab " + " ".join(shlex.quote(a) for a in args)
        log.info("running %s (in %s)", shown, cwd, extra={"ctx": ctx})
        started = time.monotonic()
        if self.closing and verb == "up":
            raise NetlabError("%s refused: the server is stopping; retry once it is back"
                              % shown, aborted=True)
        try:
            env = None if not self.bin_dir else dict(
                os.environ, PATH=self.bin_dir + os.pathsep + os.environ.get("PATH", os.defpath))
            proc = subprocess.Popen(argv, cwd=cwd, env=env,
                                    stdin=subprocess.DEVNULL if answer is None else subprocess.PIPE,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True)
        except OSError as e:
            raise NetlabError("cannot run %s: %s" % (shown, e)) from None
        if answer is not None:
            try:
                proc.stdin.write(answer)  # a few bytes: the pipe buffer takes them at once
            except OSError:
                pass  # it exited before reading: its output says why
            proc.stdin.close()
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
        if self.records is not None:
            self.records.add(proc, verb, cwd)
        with self._running_lock:
            self._running[proc.pid] = (verb, proc)
            missed = self.closing and verb in ("up", "inspect")  # abort() ran since the check
        try:
            if missed:
                kill_process_group(proc)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            kill_process_group(proc)
        finally:
            with self._running_lock:
                self._running.pop(proc.pid, None)
            if self.records is not None:
                self.records.remove(proc.pid)
        for t in readers:
            t.join(5)
        elapsed = time.monotonic() - started
        with tail_lock:
            output = "\n".join(tail)
        if timed_out:
            log.error("%s timed out after %.0f s; process group killed", shown, timeout,
                      extra={"ctx": ctx})
            raise NetlabError("%s timed out after %.0f s" % (shown, timeout), output, True)
        if self.closing and verb in ("up", "inspect") and proc.returncode != 0:
            raise NetlabError("%s killed: the server is stopping; retry once it is back"
                              % shown, output, aborted=True)
        level = logging.INFO if proc.returncode == 0 else logging.WARNING
        log.log(level, "%s exited %d after %.2f s", shown, proc.returncode, elapsed,
                extra={"ctx": ctx})
        if proc.returncode != 0:
            if not self.stream and output:
                log.warning("netlab output:\n%s", output, extra={"ctx": ctx})
            if check:
                raise NetlabError("%s failed (exit %d)" % (shown, proc.returncode), output)
        return proc.returncode, b"".join(stdout_chunks).decode("utf-8", "replace")

    # -- the commands we use --
    def up(self, labdir: str, topology: str, ctx="-", extra: Tuple[str, ...] = ()) -> None:
        """``netlab up`` (``extra``: options before the topology, e.g. a multilab instance)."""
        # as ./NAME: a bare name starting with '-' (`--set=x.yml`) is an option to netlab
        self.run(["up"] + list(extra) + ["./" + topology], labdir, self.up_timeout, ctx=ctx)

    def node_names(self, labdir: str, ctx="-") -> List[str]:
        _, out = self.run(["inspect", "-q", "--format", "json", "list(nodes.keys())"], labdir,
                          self.timeout, ctx=ctx)
        import ast
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
        from concurrent.futures import ThreadPoolExecutor
        names = self.node_names(labdir, ctx)
        if not names:
            return []
        with ThreadPoolExecutor(max_workers=min(16, len(names))) as pool:
            raws = list(pool.map(lambda n: self.inspect_node(labdir, n, ctx), names))
        return [{"name": n, "raw": raw} for n, raw in zip(names, raws)]

    def check_topology(self, workdir: str, topology: str, ctx="-") -> List[str]:
        """``netlab create`` on the upload in ``workdir``: its node names (NetlabError: invalid).

        ``-o json:nodes=-`` rather than ``-o none``: just as cheap and file-free (measured with
        netlab 26.10: nothing written to the cwd, ~1.5 s), and netlab itself names the nodes
        (includes, groups and plugins applied), which no YAML reading of ours could."""
        _, out = self.run(["create", "-o", "json:nodes=-", "./" + topology], workdir,
                          self.timeout, ctx=ctx)
        try:
            nodes = json.loads(out)
        except ValueError:
            raise NetlabError("cannot parse the node list from netlab create", out[-2000:]) from None
        if not isinstance(nodes, dict):
            raise NetlabError("unexpected node list from netlab create", out[-2000:])
        return [str(name) for name in nodes]

    def down(self, labdir: str, force: bool = False, ctx="-") -> None:
        args = ["down", "--cleanup"] + (["--force"] if force else [])
        self.run(args, labdir, self.timeout, ctx=ctx)

    def registry(self, cwd: str) -> Optional[Dict[str, dict]]:
        """netlab's instances (``status --all --format json``): id -> {"dir", "status", ...};
        {} when none is registered, None when netlab could not say."""
        try:
            rc, out = self.run(["status", "--all", "--format", "json"], cwd,
                               min(self.timeout, 60.0), check=False)
        except NetlabError as e:
            log.error("cannot read netlab's registry: %s", e, extra={"ctx": "-"})
            return None
        try:
            data = json.loads(out)
        except ValueError:
            data = None
        if rc != 0 or not isinstance(data, dict):
            if "No netlab-managed labs" in out:
                return {}
            log.error("cannot read netlab's registry: netlab status exited %d: %s", rc,
                      out.strip()[-300:] or "(no output)", extra={"ctx": "-"})
            return None
        return {str(k): v for k, v in data.items() if isinstance(v, dict)}

    def cleanup_instance(self, instance: str, cwd: str) -> bool:
        """``netlab status -i ID --cleanup``, its confirmation answered: netlab's own way to drop
        an instance from its registry (it runs ``down --cleanup`` in the instance's dir)."""
        try:
            self.run(["status", "-i", instance, "--cleanup"], cwd, self.timeout, answer=b"y\n")
            return True
        except NetlabError as e:
            log.warning("netlab could not clean its instance %s: %s", instance,
                        e.detail.splitlines()[-1] if e.detail else e, extra={"ctx": "-"})
            return False


def netlab_bin_dir(state_dir: str, netlab: str) -> Optional[str]:
    """A dir holding a ``netlab`` that runs ``netlab`` (the one we were given), to put first on
    netlab's PATH: netlab runs its own sub-commands as ``netlab`` from PATH (``status
    --cleanup`` runs ``netlab down``), which a venv's netlab is not on under systemd."""
    bin_dir = os.path.join(state_dir, "bin")
    wrapper = os.path.join(bin_dir, "netlab")
    text = '#!/bin/sh\nexec %s "$@"\n' % shlex.quote(netlab)
    try:
        os.makedirs(bin_dir, exist_ok=True)
        try:
            with open(wrapper) as f:
                current = f.read()
        except OSError:
            current = None
        if current != text:
            with open(wrapper + ".tmp", "w") as f:
                f.write(text)
            os.chmod(wrapper + ".tmp", 0o755)
            os.replace(wrapper + ".tmp", wrapper)
    except OSError as e:
        log.warning("cannot write %s (%s): netlab's own sub-commands use the netlab on PATH",
                    wrapper, e, extra={"ctx": "-"})
        return None
    return bin_dir


def kill_process_group(proc: "subprocess.Popen", grace: float = 3.0) -> None:
    """SIGTERM the child's whole process group, SIGKILL whatever is left after ``grace``."""
    import subprocess
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
# 4. The lab: one running lab per slot, fingerprint, ref count, states
#    (4.1 the pure planner, 4.2 the executor that runs netlab, 4.3 the lab's state and threads)
# ============================================================================================


class LabBusy(Exception):
    pass


class NoLab(Exception):
    pass


STOPPED, STARTING, RUNNING, STOPPING = "stopped", "starting", "running", "stopping"


@dataclasses.dataclass
class LabInfo:
    """Plain data describing the lab (kept serialisable, so that it can be persisted)."""
    state: str = STOPPED
    workdir: Optional[str] = None
    topology: Optional[str] = None
    fingerprint: Optional[str] = None
    ref_count: int = 0
    devices: List[dict] = dataclasses.field(default_factory=list)
    holder: Optional[str] = None  # session that started / last acquired it
    reusable: bool = False  # the last acquire used reuse=true
    warm_until: Optional[float] = None  # keep-warm deadline (the lab's clock)
    last_error: Optional[str] = None
    files: Dict[str, str] = dataclasses.field(default_factory=dict)  # uploaded name -> sha256


def lab_record(info: LabInfo, clock: "Clock") -> dict:
    """``info`` as the state database keeps it: the keep-warm deadline on the wall clock."""
    record = dataclasses.asdict(info)
    if info.warm_until is not None:
        record["warm_until"] = time.time() + (info.warm_until - clock.now())
    return record


def lab_from_record(record: Optional[dict], clock: "Clock") -> Optional[LabInfo]:
    """The LabInfo a ``lab_record`` describes (None: no record, or one that cannot be read)."""
    if not record:
        return None
    names = {f.name for f in dataclasses.fields(LabInfo)}
    try:
        info = LabInfo(**{k: v for k, v in record.items() if k in names})
        if info.warm_until is not None:
            info.warm_until = clock.now() + (float(info.warm_until) - time.time())
        info.ref_count = int(info.ref_count)
        if not (isinstance(info.devices, list) and isinstance(info.files, dict)):
            raise TypeError("devices or files")
    except (TypeError, ValueError) as e:
        log.warning("state database: cannot read the lab's record (%s); ignored", e,
                    extra={"ctx": "-"})
        return None
    return info


# -- 4.1 the planner: what to do, from the lab's state and the request alone (no I/O) ----------

# what an acquire does: the README's acquisition table, plus waiting out a transition and
# refusing a session that ended meanwhile
REUSE, BUSY, REPLACE, START, WAIT, GONE = "reuse", "busy", "replace", "start", "wait", "gone"


@dataclasses.dataclass(frozen=True)
class AcquirePlan:
    action: str  # REUSE, BUSY, REPLACE, START, WAIT or GONE
    reason: str = ""  # the 423 detail (BUSY, GONE) or why the idle lab goes (REPLACE)


def plan_acquire(lab: LabInfo, sid: str, fingerprint: str, reuse: bool,
                 active: bool) -> AcquirePlan:
    """Session ``sid`` (still the active one: ``active``) asks for the lab ``fingerprint``."""
    if lab.state in (STARTING, STOPPING):  # a new up waits for a teardown (or another up)
        return AcquirePlan(WAIT)
    if not active:  # it ended while we waited: no lab for nobody
        return AcquirePlan(GONE, "session %s is no longer active" % sid)
    if lab.state != RUNNING:
        return AcquirePlan(START)
    if lab.fingerprint == fingerprint and reuse:
        return AcquirePlan(REUSE)
    if lab.ref_count > 0:
        return AcquirePlan(BUSY, "Lab currently busy: %s is in use (ref count %d)"
                           % (lab.topology, lab.ref_count))
    return AcquirePlan(REPLACE, "restart requested (reuse=false)" if lab.fingerprint == fingerprint
                       else "another topology requested")


KEEP_WARM, TEAR_DOWN = "keep warm", "tear down"


def plan_session_end(lab: LabInfo, sid: str, keep_warm: float) -> Optional[str]:
    """What the end of session ``sid`` does to the lab: KEEP_WARM, TEAR_DOWN or None."""
    if lab.state != RUNNING or lab.holder != sid:
        return None
    return KEEP_WARM if keep_warm > 0 and lab.reusable else TEAR_DOWN


def warm_lab_expired(lab: LabInfo, now: float, holder_active: bool) -> bool:
    """A lab kept warm past its deadline, which nobody holds or uses: it goes."""
    return (lab.state == RUNNING and lab.warm_until is not None and now >= lab.warm_until
            and lab.ref_count == 0 and not holder_active)


@dataclasses.dataclass
class RestorePlan:
    adopt: Optional[LabInfo]  # the saved lab, which netlab still runs: kept as it is
    lost: Optional[str]  # why the saved running lab is not adopted
    stale_instances: List[str]  # netlab instances registered in our labs dir, their dir gone
    dirs: List[str]  # lab dirs to tear down and remove


def plan_restore(saved: Optional[LabInfo], registry: Optional[Dict[str, dict]], dirs: List[str],
                 labs_dir: str, fingerprint_now: Optional[str],
                 instance: Optional[str] = None) -> RestorePlan:
    """Start-up: what to do with the lab a previous server saved, from what netlab runs
    (``registry``: instance id -> entry, None if netlab could not say), the lab ``dirs`` there
    are and the fingerprint of the saved lab's files as they are now (None: gone, or netlab's
    snapshot is). ``instance``: the netlab instance id the lab's slot runs now (--slots N),
    None: any."""
    adopt = lost = None
    if saved is not None and saved.state == RUNNING:
        started = [iid for iid, e in (registry or {}).items()
                   if same_path(e.get("dir"), saved.workdir) and e.get("status") == "started"]
        if registry is None:
            lost = "netlab could not tell whether it still runs"
        elif not started:
            lost = "netlab no longer runs it"
        elif instance is not None and started[0] != instance:
            lost = ("it runs as netlab instance %s, and its slot's is %s now (--multilab-ids "
                    "or --slots changed)" % (started[0], instance))
        elif fingerprint_now is None:
            lost = "its dir or netlab's snapshot in it is gone"
        elif fingerprint_now != saved.fingerprint:
            lost = "its files changed"
        else:
            adopt = saved
    keep = adopt.workdir if adopt else None
    # an instance whose dir is still there goes with that dir's teardown (`down` in it)
    stale = [iid for iid, entry in sorted((registry or {}).items())
             if is_inside(entry.get("dir"), labs_dir) and not same_path(entry.get("dir"), keep)
             and not any(same_path(entry.get("dir"), d) for d in dirs)]
    return RestorePlan(adopt, lost, stale, [d for d in dirs if not same_path(d, keep)])


def same_path(a: Optional[str], b: Optional[str]) -> bool:
    return bool(a) and bool(b) and os.path.realpath(a) == os.path.realpath(b)


def is_inside(path: Optional[str], directory: str) -> bool:
    return bool(path) and os.path.realpath(path).startswith(os.path.realpath(directory) + os.sep)


# -- 4.2 the executor: netlab up/inspect/down in the lab dirs, and the dirs it could not clean -

NETLAB_SNAPSHOT = "netlab.snapshot.pickle"  # netlab's record of a lab, in the lab's dir
UNCLEAN_RETRY_FIRST = 15.0  # seconds before retrying a failed teardown; doubles each time
UNCLEAN_RETRY_MAX = 600.0


class LabExecutor:
    """Runs what the lab decided through the NetlabRunner; never raises on a teardown.

    Lab dirs whose `netlab down` failed while netlab still knows the lab are kept in
    ``unclean`` (netlab can only clean a lab from its dir) and retried with a backoff.
    """

    def __init__(self, runner: NetlabRunner, clock: Clock, retry_first: float,
                 on_unclean: Optional[Callable[[str, Optional[int]], None]] = None,
                 up_args: Tuple[str, ...] = ()):
        self.runner = runner
        self.up_args = up_args  # the slot's multilab plugin settings (none with one slot)
        self.clock = clock
        self.retry_first = retry_first
        self.lock = threading.Lock()  # guards ``unclean``
        self.unclean = {}  # type: Dict[str, Tuple[int, float]]  # dir -> (attempts, next retry)
        self.on_unclean = on_unclean  # (dir, failed attempts or None once cleaned): to disk

    def start(self, workdir: str, topology: str, ctx: str) -> List[dict]:
        """``netlab up`` then the devices; on any failure the dir is cleaned and the error
        raised."""
        try:
            self.runner.up(workdir, topology, ctx=ctx, extra=self.up_args)
            return self.runner.devices(workdir, ctx=ctx)
        except BaseException as e:
            if isinstance(e, NetlabError):
                log.error("lab start failed: %s", e, extra={"ctx": ctx})
            self.teardown(workdir, ctx, force=True)
            raise

    def teardown(self, workdir: Optional[str], ctx: str, force: bool = False) -> bool:
        """``netlab down --cleanup`` in the lab dir (retry with --force), then remove the dir.

        A failure is logged, never raised: the queue must move on. If netlab still knows the
        lab (its snapshot is in the dir), the dir is kept and the teardown retried later
        (``retry_unclean``): netlab can only clean a lab from its own dir, and a lab it still
        counts as running makes every later ``up`` fail. Returns True when the dir is gone.
        """
        if not workdir:
            return True
        if not os.path.isdir(workdir):
            self._forget_unclean(workdir)
            return True
        if self._down(workdir, ctx, force) or \
                not os.path.exists(os.path.join(workdir, NETLAB_SNAPSHOT)):
            shutil.rmtree(workdir, ignore_errors=True)
            self._forget_unclean(workdir)
            return True
        with self.lock:
            attempts = self.unclean.get(workdir, (0, 0.0))[0] + 1
            delay = min(UNCLEAN_RETRY_MAX, self.retry_first * 2 ** (attempts - 1))
            self.unclean[workdir] = (attempts, self.clock.now() + delay)
        if self.on_unclean is not None:
            self.on_unclean(workdir, attempts)
        log.error("netlab still knows the lab in %s: keeping that dir, `netlab down --cleanup "
                  "--force` will be retried before the next `up` and every %.0f s (attempt %d)",
                  workdir, delay, attempts, extra={"ctx": ctx})
        return False

    def _down(self, workdir: str, ctx: str, force: bool) -> bool:
        """``netlab down --cleanup`` (``--force`` at once, or as the retry): True when it
        worked."""
        try:
            self.runner.down(workdir, force=force, ctx=ctx)
            return True
        except Exception as e:  # NetlabError, or no thread/process could be started for it
            if force:
                # after a failed `up` there may be nothing registered to take down
                log.warning("netlab down --force failed: %s", e, extra={"ctx": ctx})
                return False
            log.warning("netlab down failed (%s); retrying with --force", e, extra={"ctx": ctx})
        try:
            self.runner.down(workdir, force=True, ctx=ctx)
            return True
        except Exception as e2:
            log.error("netlab down --force failed too: %s", e2, extra={"ctx": ctx})
            return False

    def _forget_unclean(self, workdir: str) -> None:
        with self.lock:
            if self.unclean.pop(workdir, None) is None:
                return
        log.info("lab dir %s finally cleaned", workdir, extra={"ctx": "-"})
        if self.on_unclean is not None:
            self.on_unclean(workdir, None)

    def retry_due(self) -> bool:
        """Some kept dir's retry time came."""
        now = self.clock.now()
        with self.lock:
            return any(due <= now for _, due in self.unclean.values())

    def retry_unclean(self, ctx: str = "-", due_only: bool = False) -> None:
        """Retry the teardown of kept dirs (all of them, or those whose retry time came)."""
        now = self.clock.now()
        with self.lock:
            dirs = [d for d, (_, due) in self.unclean.items() if not due_only or due <= now]
        for d in dirs:
            self.teardown(d, ctx, force=True)

    @staticmethod
    def lab_dirs(labs_dir: str) -> List[str]:
        try:
            dirs = [os.path.join(labs_dir, d) for d in sorted(os.listdir(labs_dir))]
        except FileNotFoundError:
            return []
        return [d for d in dirs if os.path.isdir(d)]

    def kill_orphans(self, orphans: List[dict]) -> None:
        """netlab commands a killed predecessor left running die before their dirs are looked at."""
        if orphans and self.runner.records is not None:
            self.runner.records.kill_leftovers(orphans)

    def keep_unclean(self, attempts: Dict[str, int]) -> None:
        """Start-up: the kept dirs' failed attempts so far (their retries go on from there)."""
        with self.lock:
            for d, n in attempts.items():
                if os.path.isdir(d):
                    self.unclean[d] = (n, self.clock.now())

    @staticmethod
    def fingerprint_now(info: Optional[LabInfo]) -> Optional[str]:
        """The saved lab's fingerprint from its files now; None without netlab's snapshot."""
        if info is None or not info.workdir or not info.topology or \
                not os.path.exists(os.path.join(info.workdir, NETLAB_SNAPSHOT)):
            return None
        return fingerprint_on_disk(info.workdir, info.topology, info.files)

    def clean_leftovers(self, plan: RestorePlan, labs_dir: str) -> None:
        """netlab's stale instances (registered in our labs dir, their dir gone) with netlab's
        own cleanup, then each leftover dir as any teardown."""
        self.clean_stale_instances(plan.stale_instances, labs_dir)
        for d in plan.dirs:
            log.warning("cleaning up lab dir left from a previous run: %s", d, extra={"ctx": "-"})
            self.teardown(d, "-", force=True)

    def clean_stale_instances(self, instances: List[str], labs_dir: str) -> None:
        for instance in instances:
            log.warning("netlab still registers instance %s in our labs dir, whose dir is gone: "
                        "netlab status -i %s --cleanup", instance, instance, extra={"ctx": "-"})
            if not self.runner.cleanup_instance(instance, labs_dir):
                log.error("netlab cannot remove its instance %s (its dir is gone), which may make "
                          "every later `netlab up` fail: `netlab status --reset` (as the user "
                          "running the server) clears netlab's registry of ALL instances",
                          instance, extra={"ctx": "-"})


# -- 4.3 the lab: its state under one condition; netlab runs outside it, teardowns in threads --


def all_lab_dirs(labs_dir: str, slots: Callable[[int], bool] = lambda k: True) -> List[str]:
    """The lab dirs in ``labs_dir``, of one slot (slot 0: top level) and of ``slot-K`` dirs
    (slot K), of the slots that ``slots`` accepts."""
    found = []
    for d in LabExecutor.lab_dirs(labs_dir):
        m = re.match(r"slot-([0-9]+)$", os.path.basename(d))
        if m is None:
            found += [d] if slots(0) else []
        elif slots(int(m.group(1))):
            found += LabExecutor.lab_dirs(d)
    return found


def multilab_args(settings: Settings, slot: int) -> Tuple[str, ...]:
    """``netlab up`` options that make slot ``slot``'s lab its own multilab instance; none
    with one slot. The lock file serialises the instances' provider starts and stops."""
    instance = settings.multilab_id(slot)
    if instance is None:
        return ()
    return ("--plugin", "multilab", "-s", "defaults.multilab.id=%d" % instance, "-s",
            "defaults.multilab.lock=" + os.path.join(settings.state_dir, "netlab.lock"))


class Lab:
    """The lab of one slot (with one slot: of this host). Transitions happen under ``cond``;
    netlab runs outside it. ``is_active(sid)``: ``sid`` is active in this slot."""

    def __init__(self, runner: NetlabRunner, settings: Settings,
                 is_active: Callable[[str], bool], clock=None,
                 store: Optional["StateStore"] = None, slot: int = 1,
                 on_warm: Optional[Callable[[int, Optional[str]], None]] = None,
                 startup_cleanups: Optional[List[threading.Thread]] = None):
        self.runner = runner
        # every slot's start-up clean-up (shared by the slots' labs): an `up` waits for them,
        # as a slot's old netlab instance may be the id another slot runs now
        self.startup_cleanups = [] if startup_cleanups is None else startup_cleanups
        self.settings = settings
        self.slot = slot
        self.labs_dir = settings.slot_labs_dir(slot)
        self.on_warm = on_warm  # (slot, fingerprint of the lab it would keep warm, or None)
        self._warm = None  # type: Optional[str]  # what on_warm was told last
        self.is_active = is_active
        self.clock = as_clock(clock)
        self.cond = threading.Condition()
        self.info = LabInfo()
        self.store = store  # every change of ``info`` is written there (5a)
        self._saved = LabInfo()  # what the store holds
        self.teardowns = []  # type: List[threading.Thread]
        # short timeouts (tests) shorten the first retry too, as they do the housekeeping cadence
        retry_first = max(0.05, min(UNCLEAN_RETRY_FIRST, settings.active_timeout / 4.0))
        self.netlab = LabExecutor(runner, self.clock, retry_first,
                                  store.save_unclean if store is not None else None,
                                  multilab_args(settings, slot))

    def _save_locked(self) -> None:
        """Write ``info`` to the store if it changed (``cond`` held: in the order of changes),
        and tell ``on_warm`` what a session that ends now would leave warm."""
        i = self.info
        warm = i.fingerprint if i.state == RUNNING and i.reusable and self.settings.keep_warm > 0 \
            else None
        if warm != self._warm and self.on_warm is not None:
            self._warm = warm
            self.on_warm(self.slot, warm)
        if self.store is None or self.info == self._saved:
            return
        self._saved = dataclasses.replace(self.info)
        self.store.save_lab(lab_record(self.info, self.clock), self.slot)

    @property
    def unclean(self) -> Dict[str, Tuple[int, float]]:
        """Kept lab dirs netlab still knows: dir -> (attempts, next retry time)."""
        return self.netlab.unclean

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
        with self.cond:
            plan = self._plan_locked(sid, upload.fingerprint, reuse)
            if plan.action in (BUSY, GONE):
                upload.discard()
                raise LabBusy(plan.reason)
            if plan.action == REUSE:
                upload.discard()
                devices = self._reuse_locked(sid, ctx)
                self._save_locked()
                return True, devices
            old_workdir = self.info.workdir if plan.action == REPLACE else None
            self.info = LabInfo(state=STOPPING if old_workdir else STARTING)
            self._save_locked()
        if old_workdir:
            log.info("tearing down idle lab: %s", plan.reason, extra={"ctx": ctx})
            self._replace(sid, upload, old_workdir, ctx)
        return False, self._start(sid, upload, reuse, ctx)

    def _plan_locked(self, sid: str, fingerprint: str, reuse: bool) -> AcquirePlan:
        while True:
            plan = plan_acquire(self.info, sid, fingerprint, reuse, self.is_active(sid))
            if plan.action != WAIT:
                return plan
            self.cond.wait()  # the up or teardown under way notifies when it is done

    def _reuse_locked(self, sid: str, ctx: str) -> List[dict]:
        i = self.info
        i.ref_count += 1
        i.holder, i.reusable, i.warm_until = sid, True, None
        log.info("reusing running lab (ref count %d)", i.ref_count, extra={"ctx": ctx})
        return list(i.devices)

    def _replace(self, sid: str, upload: "Upload", old_workdir: str, ctx: str) -> None:
        """Tear the idle lab down for the new one (STOPPING, then STARTING)."""
        self.netlab.teardown(old_workdir, ctx)
        with self.cond:
            gone = not self.is_active(sid)  # it ended during that teardown
            self.info.state = STOPPED if gone else STARTING
            self._save_locked()
            self.cond.notify_all()
        if gone:
            upload.discard()
            raise LabBusy("session %s is no longer active" % sid)

    def _start(self, sid: str, upload: "Upload", reuse: bool, ctx: str) -> List[dict]:
        """``netlab up`` the upload (state STARTING); RUNNING after, STOPPED on failure."""
        for cleanup in list(self.startup_cleanups):
            cleanup.join(self.settings.up_timeout)
        self.netlab.retry_unclean(ctx)  # a lab netlab still knows would make this `up` fail
        try:
            devices = self.netlab.start(upload.workdir, upload.topology, ctx)
        except BaseException as e:
            failed = LabInfo(last_error=e.detail) if isinstance(e, NetlabError) else LabInfo()
            with self.cond:
                self.info = failed
                self._save_locked()
                self.cond.notify_all()
            raise
        with self.cond:
            self.info = LabInfo(state=RUNNING, workdir=upload.workdir, topology=upload.topology,
                                fingerprint=upload.fingerprint, ref_count=1, devices=devices,
                                holder=sid, reusable=reuse, files=dict(upload.files))
            self._save_locked()
            self.cond.notify_all()
            # the session ended while netlab was working: drop its reference before an acquire
            # waiting for this `up` sees the lab (held by nobody, it would still look busy)
            if not self.is_active(sid):
                self.session_ended(sid)
        log.info("lab up with %d devices", len(devices), extra={"ctx": ctx})
        return devices

    def release(self, sid: str) -> int:
        with self.cond:
            if self.info.state != RUNNING:
                raise NoLab("no lab is running")
            self.info.ref_count = max(0, self.info.ref_count - 1)
            self._save_locked()
            log.info("lab released (ref count %d)", self.info.ref_count,
                     extra={"ctx": log_context(sid, self.info.topology)})
            return self.info.ref_count

    def destroy(self, sid: str, force: bool, by: Optional[str] = None) -> bool:
        """Tear the lab down in the background (asked by ``sid``'s client, or ``by`` someone
        else, e.g. an admin). False when there is no lab."""
        with self.cond:
            while self.info.state == STARTING:
                self.cond.wait()
            if self.info.state != RUNNING:
                return False
            if self.info.ref_count > 0 and not force:
                raise LabBusy("lab is in use (ref count %d); use force=true"
                              % self.info.ref_count)
            self._teardown_async_locked(log_context(sid, self.info.topology), "destroy requested"
                                        + (" by " + by if by else ""))
            return True

    def session_ended(self, sid: str) -> None:
        """The active session is gone: its references go, the lab is torn down or kept warm."""
        with self.cond:
            i = self.info
            action = plan_session_end(i, sid, self.settings.keep_warm)
            if action is None:
                return
            i.ref_count = 0
            ctx = log_context(sid, i.topology)
            if action == KEEP_WARM:
                i.warm_until = self.clock.now() + self.settings.keep_warm
                self._save_locked()
                log.info("session ended; keeping the lab warm for %.0f s", self.settings.keep_warm,
                         extra={"ctx": ctx})
                return
            self._teardown_async_locked(ctx, "session ended")

    def expire_warm(self) -> None:
        with self.cond:
            i = self.info
            holder_active = bool(i.holder) and self.is_active(i.holder)
            if warm_lab_expired(i, self.clock.now(), holder_active):
                self._teardown_async_locked(log_context(None, i.topology), "keep-warm expired")

    # -- teardown --
    def _teardown_async_locked(self, ctx: str, reason: str) -> None:
        workdir = self.info.workdir
        log.info("tearing down lab (%s)", reason, extra={"ctx": ctx})
        self.info = LabInfo(state=STOPPING)
        self._save_locked()
        self.cond.notify_all()

        self._stop_in_background("lab-teardown", lambda: self.netlab.teardown(workdir, ctx))

    def _stop_in_background(self, name: str, work: Callable[[], object]) -> threading.Thread:
        """Run ``work`` (netlab down ...) in a thread, then leave STOPPING for STOPPED."""
        def run():
            try:
                work()
            finally:
                with self.cond:
                    if self.info.state == STOPPING:
                        self.info.state = STOPPED
                        self._save_locked()
                    self.cond.notify_all()

        t = threading.Thread(target=run, name=name, daemon=True)
        self.teardowns = [x for x in self.teardowns if x.is_alive()] + [t]
        t.start()
        return t

    def retry_unclean(self, ctx: str = "-", due_only: bool = False) -> None:
        """Retry the teardown of kept dirs (all of them, or those whose retry time came)."""
        self.netlab.retry_unclean(ctx, due_only)

    def retry_unclean_due(self) -> None:
        """Housekeeping: retry due kept dirs in the background while no lab is in use."""
        with self.cond:
            if self.info.state != STOPPED or not self.netlab.retry_due():
                return
            self.info = LabInfo(state=STOPPING)  # a new `up` waits for this, as for any teardown
            self._save_locked()
        self._stop_in_background("lab-retry-teardown",
                                 lambda: self.netlab.retry_unclean(due_only=True))

    def wait_idle(self, timeout: float) -> bool:
        """Wait up to ``timeout`` for no up or teardown to be under way (and their threads)."""
        deadline = self.clock.now() + timeout
        with self.cond:
            while self.info.state in (STARTING, STOPPING):
                left = deadline - self.clock.now()
                if left <= 0:
                    return False
                self.clock.wait(self.cond, left)
        for t in list(self.teardowns):
            t.join(max(0.0, deadline - self.clock.now()))
        return True

    def shutdown(self, teardown: bool) -> None:
        """Server stop, once netlab's `up`s were aborted: wait for what is under way; then, with
        ``teardown``, tear down whatever runs, synchronously. Without, a running lab stays up
        (on disk: the next start adopts it)."""
        self.wait_idle(self.settings.up_timeout)
        if not teardown:
            return
        with self.cond:
            workdir = self.info.workdir if self.info.state == RUNNING else None
            self.info = LabInfo(state=STOPPING if workdir else STOPPED)
            self._save_locked()
        if workdir:
            self.netlab.teardown(workdir, log_context(None, None))
        self.netlab.retry_unclean()  # what still fails stays for the next start's clean-up
        with self.cond:
            self.info = LabInfo()
            self._save_locked()

    def restore(self, saved: Optional[dict], unclean: Dict[str, int],
                orphans: List[dict]) -> RestorePlan:
        """Start-up: the netlab commands a previous server left running are killed; if it left
        a lab or lab dirs, netlab is asked what it runs: the saved lab, still started in its
        dir with the same files, is adopted as it was (devices, ref count, holder); anything
        else in the labs dir is cleaned (netlab's stale instances first), in the background
        unless a lab was adopted."""
        self.netlab.kill_orphans(orphans)
        info = lab_from_record(saved, self.clock)
        labs_dir = self.labs_dir
        dirs = self._restore_dirs()
        if not dirs and (info is None or info.state != RUNNING):
            return RestorePlan(None, None, [], [])
        os.makedirs(labs_dir, exist_ok=True)  # netlab runs there
        registry = self.runner.registry(labs_dir)
        instance = self.settings.multilab_id(self.slot)
        plan = plan_restore(info, registry, dirs, labs_dir, self.netlab.fingerprint_now(info),
                            None if instance is None else str(instance))
        self.netlab.keep_unclean({d: n for d, n in unclean.items()
                                  if any(same_path(d, x) for x in dirs)})
        with self.cond:
            if plan.adopt is not None:
                self.info = plan.adopt
            else:
                self.info = LabInfo(state=STOPPING if (plan.dirs or plan.stale_instances)
                                    else STOPPED, last_error=self._lost_error(info, plan))
            self._save_locked()
        if plan.adopt is not None:
            self.netlab.clean_leftovers(plan, labs_dir)  # rare: a crash in a replace
        elif plan.dirs or plan.stale_instances:
            self.startup_cleanups.append(self._stop_in_background(
                "startup-cleanup", lambda: self.netlab.clean_leftovers(plan, labs_dir)))
        return plan

    def _restore_dirs(self) -> List[str]:
        """The lab dirs a start-up looks at: this slot's; slot 1 also takes those a server
        with another --slots left (the slots' dirs of a --slots N, the top-level ones of one
        slot), so that nothing is left behind when the number of slots changes."""
        slots = self.settings.slots
        if slots == 1:
            return all_lab_dirs(self.labs_dir)
        theirs = all_lab_dirs(self.settings.labs_dir, lambda k: k == 0 or k > slots)
        return self.netlab.lab_dirs(self.labs_dir) + (theirs if self.slot == 1 else [])

    @staticmethod
    def _lost_error(info: Optional[LabInfo], plan: RestorePlan) -> Optional[str]:
        if plan.lost is None:
            return None
        text = "the lab %s was lost in a restart: %s" % (info.topology, plan.lost)
        log.warning("%s; cleaning it up", text, extra={"ctx": log_context(info.holder,
                                                                          info.topology)})
        return text


# ============================================================================================
# 5. Uploads: streaming multipart into a fresh lab work dir, safe relative paths
# ============================================================================================


class BadRequest(Exception):
    status = 400


class TooLarge(BadRequest):
    status = 413


class NoRoom(BadRequest):
    """The lab host's disk (or quota) is full: not the client's fault, but a clear answer
    (503: the project's convention keeps new failure modes to 413/429/502/503/504)."""
    status = 503


_NO_ROOM_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


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


def netlab_topology_name(name: str) -> str:
    """Refuse a topology file name netlab would misread even given as ./NAME; return it.

    netlab reads any file name containing ``package:`` from its own package instead (measured
    with netlab 26.10: ``./package:x.yml`` built ``x.yml``), and globs the name's stem to find
    versioned topologies (``x.1.2.yml``), so glob characters match other files.
    """
    if "package:" in name:
        raise BadRequest("topology %r: netlab reads a name containing 'package:' from its own "
                         "package; rename the file" % name)
    if any(c in name for c in "*?["):
        raise BadRequest("topology %r: netlab treats '*', '?' and '[' in a topology name as a "
                         "file pattern; rename the file" % name)
    return name


def lab_fingerprint(topology: str, files: Dict[str, str]) -> str:
    """SHA-256 hex over the topology's name and content hash, then each extra file's (sorted
    by name); ``files``: relative name -> SHA-256 hex of its content, the topology's included."""
    import hashlib
    h = hashlib.sha256()
    h.update(b"topology\0" + topology.encode() + b"\0" + files[topology].encode())
    for name in sorted(files):
        if name != topology:
            h.update(b"extra\0" + name.encode() + b"\0" + files[name].encode())
    return h.hexdigest()


def fingerprint_on_disk(workdir: str, topology: str, files: Dict[str, str]) -> Optional[str]:
    """The fingerprint of the uploaded ``files`` as they are in ``workdir`` now (None: one is
    missing or unreadable)."""
    import hashlib
    now = {}
    for name in files:
        digest = hashlib.sha256()
        try:
            with open(os.path.join(workdir, *name.split("/")), "rb") as f:
                for chunk in iter(lambda: f.read(CHUNK), b""):
                    digest.update(chunk)
        except OSError:
            return None
        now[name] = digest.hexdigest()
    return lab_fingerprint(topology, now) if topology in now else None


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
        self.fingerprint = lab_fingerprint(self.topology, self.files)

    def discard(self):
        shutil.rmtree(self.workdir, ignore_errors=True)

    def move_to(self, labs_dir: str) -> None:
        """The work dir moves into ``labs_dir`` (the lab slot the session moved to)."""
        os.makedirs(labs_dir, exist_ok=True)
        target = os.path.join(labs_dir, os.path.basename(self.workdir))
        os.rename(self.workdir, target)
        self.workdir = target


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
        except socket.timeout as e:
            raise BadRequest(str(e) if isinstance(e, DeadlineExceeded)
                             else "upload stalled (socket timeout)") from None
        except ConnectionError as e:  # the client went away: no answer will reach it
            raise BadRequest("upload broken off by the client (%s)" % e) from None
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
            netlab_topology_name(name)
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
            if e.errno in _NO_ROOM_ERRNOS:
                raise
            raise BadRequest("cannot store %r: %s" % (name, e.strerror)) from None
        import hashlib
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
    import uuid
    os.makedirs(labs_dir, exist_ok=True)
    workdir = os.path.join(labs_dir, "lab-" + uuid.uuid4().hex[:12])
    os.mkdir(workdir, 0o755)
    upload = Upload(workdir)
    upload.size = length
    try:
        MultipartParser(rfile, length, m.group(1).encode("latin-1"), upload).parse()
        upload.finish()
    except BaseException as e:
        upload.discard()
        if isinstance(e, OSError) and e.errno in _NO_ROOM_ERRNOS:
            raise NoRoom("no room to store the upload in %s: %s" % (labs_dir, e.strerror)) from None
        raise
    return upload


def parse_bool(value: str, what: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise BadRequest("%s must be true or false, not %r" % (what, value))


# who and why, as POST /session may say it: field -> longest accepted length
SESSION_META_FIELDS = {"owner": 64, "note": 200, "link": 500}
# ... and the lab it will ask for (affinity): the fingerprint of its upload, SHA-256 hex
SESSION_FINGERPRINT = "fingerprint"
SESSION_BODY_FIELDS = tuple(SESSION_META_FIELDS) + (SESSION_FINGERPRINT,)
_FINGERPRINT = re.compile(r"[0-9a-fA-F]{64}")
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def parse_session_body(body: bytes) -> Dict[str, str]:
    """The optional JSON body of POST /session: {"owner", "note", "link"}, short strings
    without control characters, ``link`` an http(s) URL, and ``fingerprint`` (the lab it will
    ask for, kept lowercase). Empty body: {} (as in the seed)."""
    if not body.strip():
        return {}
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise BadRequest("the body must be a JSON object: %s" % e) from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object like {\"owner\": \"me\", \"note\": "
                         "\"why\", \"link\": \"https://...\"}")
    unknown = sorted(set(data) - set(SESSION_BODY_FIELDS))
    if unknown:
        raise BadRequest("unknown field(s) %s (known: %s)" % (
            ", ".join(map(repr, unknown)), ", ".join(SESSION_BODY_FIELDS)))
    meta = {}
    if data.get(SESSION_FINGERPRINT) is not None:
        meta[SESSION_FINGERPRINT] = parse_fingerprint(data[SESSION_FINGERPRINT])
    for field, limit in SESSION_META_FIELDS.items():
        value = data.get(field)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise BadRequest("%s must be a string" % field)
        if len(value) > limit:
            raise BadRequest("%s is too long (%d characters, at most %d)" % (field, len(value),
                                                                             limit))
        if _CONTROL_CHARS.search(value):
            raise BadRequest("%s must not contain control characters" % field)
        meta[field] = value.strip()
    link = meta.get("link")
    if link is not None and not re.match(r"https?://[^\s/]+", link, re.IGNORECASE):
        raise BadRequest("link must be an http:// or https:// URL, not %r" % link[:80])
    return meta


def parse_fingerprint(value) -> str:
    """A declared lab fingerprint: 64 hex characters (any case), answered in lowercase."""
    if not isinstance(value, str) or not _FINGERPRINT.fullmatch(value):
        raise BadRequest("fingerprint must be 64 hex characters (the SHA-256 of the lab's "
                         "files, as the client's lab_fingerprint() computes it), not %s"
                         % json.dumps(value)[:80])
    return value.lower()


def saved_session_meta(meta: dict) -> Dict[str, str]:
    """A session's meta as read back from disk: the known string fields only."""
    return {k: v for k, v in meta.items()
            if (k in SESSION_BODY_FIELDS or k == "user") and isinstance(v, str)}


# ============================================================================================
# 5a. Durable state: one SQLite database (WAL) in the state dir, written change by change
# ============================================================================================

STATE_DB_NAME = "state.db"
STATE_SCHEMA_VERSION = 1
STATE_EVENTS_KEPT = 200  # the recent event log kept on disk (as in memory: EVENT_LIMIT)
HOLD_TIMES_KEY = "hold_times"  # meta key: the recent hold times, a JSON list (HoldTimes)
STATE_TABLES = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,  -- the queue order
    id TEXT NOT NULL UNIQUE,
    created REAL NOT NULL,                  -- wall clock (Unix seconds)
    activated REAL,                         -- wall clock; NULL while waiting
    meta TEXT NOT NULL DEFAULT '{}',        -- JSON: who and why, as sessions carry it
    slot INTEGER);                          -- the lab slot of an active session
CREATE TABLE IF NOT EXISTS lab (slot INTEGER PRIMARY KEY, info TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS unclean_dirs (dir TEXT PRIMARY KEY, attempts INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS netlab_procs (pid INTEGER PRIMARY KEY, record TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS events (seq INTEGER PRIMARY KEY, time REAL NOT NULL,
    kind TEXT NOT NULL, text TEXT NOT NULL, detail TEXT);
"""


class StateWriteError(Exception):
    """A change that must be on disk before it is answered could not be written (503)."""


class UnusableState(Exception):
    """The database is there but cannot serve as our state (corrupt, newer schema, ...)."""


@dataclasses.dataclass
class SavedState:
    """What a previous server left in the database."""
    sessions: List[Tuple[str, float, Optional[float], dict, Optional[int]]]  # (id, created,
    #                             activated, meta, slot), in creation order, wall clock
    lab: Optional[dict]  # slot 1's LabInfo fields as saved (Lab.restore reads them)
    unclean: Dict[str, int]  # kept lab dir -> failed teardowns so far
    procs: List[dict]  # records of netlab commands that were running
    events: List[dict]  # the recent event log, oldest first
    counters: Dict[str, int]  # restarts_after_crash, sessions_restored, labs_adopted, ...
    previous_exit: Optional[str] = None  # "stop", "reload"; "running": it never stopped cleanly
    hold_times: List[float] = dataclasses.field(default_factory=list)  # oldest first
    labs: Dict[int, dict] = dataclasses.field(default_factory=dict)  # slot -> LabInfo fields

    @property
    def empty(self) -> bool:
        return not (self.sessions or self.lab or self.unclean or self.procs)


class StateStore:
    """The server's state on disk: ``<state-dir>/state.db`` (SQLite, WAL).

    One row per session, per lab, per kept lab dir, per running netlab command, per recent
    event: a change writes its rows and nothing else, so its cost does not grow with the queue.
    Sessions, the lab and netlab's processes are committed with a full sync before the answer
    that reports them; events without one (a crash may lose the last few). Heartbeat times are
    never written: a restored session gets a full timeout from the start-up anyway.

    A write that fails (full disk, ...) is logged once per streak and counted; only
    ``add_session`` raises (StateWriteError: the client gets 503, nothing is queued).
    """

    def __init__(self, path: Optional[str]):
        import sqlite3
        self.sqlite3 = sqlite3
        self.path = path  # None: in memory (the state dir is unusable)
        self.lock = threading.Lock()
        self.write_errors = 0
        self._failing = False
        self._durable = None  # type: Optional[bool]  # the synchronous mode set now
        if path and not os.path.exists(path):  # session ids are secrets: owner only
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
        self.db = sqlite3.connect(path or ":memory:", timeout=10, isolation_level=None,
                                  check_same_thread=False)
        try:
            self._prepare()
        except BaseException:
            self.db.close()
            raise

    def _prepare(self) -> None:
        db = self.db
        if db.execute("PRAGMA quick_check").fetchone()[0] != "ok":
            raise UnusableState("integrity check failed")
        if self.path and db.execute("PRAGMA journal_mode=WAL").fetchone()[0].lower() != "wal":
            log.warning("state database %s: WAL mode unavailable here", self.path)
        db.executescript(STATE_TABLES)
        columns = [row[1] for row in db.execute("PRAGMA table_info(sessions)")]
        if "slot" not in columns:  # a database of a server without --slots
            db.execute("ALTER TABLE sessions ADD COLUMN slot INTEGER")
        row = db.execute("SELECT value FROM meta WHERE key = 'schema'").fetchone()
        if row is None:
            db.execute("INSERT INTO meta VALUES ('schema', ?)", (str(STATE_SCHEMA_VERSION),))
        elif int(row[0]) > STATE_SCHEMA_VERSION:
            raise UnusableState("written by a newer remote-lab (schema %s, this one reads %d)"
                                % (row[0], STATE_SCHEMA_VERSION))

    @classmethod
    def open(cls, state_dir: str) -> Tuple["StateStore", bool]:
        """(the store, whether a database was there). One that cannot be used is moved aside
        (``state.db.corrupt-<time>``) with an ERROR and a clean one started; if even that
        fails the state is kept in memory only. Never raises: a server never refuses to start
        because of its own state."""
        import sqlite3
        path = os.path.join(state_dir, STATE_DB_NAME)
        existed = os.path.exists(path)
        try:
            return cls(path), existed
        except (sqlite3.Error, UnusableState, OSError, ValueError) as e:
            problem = e
        moved = move_aside(path) if existed else None
        if moved:
            log.error("state database %s is unusable (%s): moved aside to %s; starting with a "
                      "clean state", path, problem, moved, extra={"ctx": "-"})
        try:
            return cls(path), False
        except (sqlite3.Error, UnusableState, OSError) as e:
            log.error("cannot use a state database in %s (%s; first problem: %s): the state "
                      "is kept in memory only and will not survive a restart", state_dir, e,
                      problem, extra={"ctx": "-"})
            return cls(None), False

    # -- writing --
    def _write(self, statements, durable: bool = True, must: bool = False) -> bool:
        """Run ``statements`` [(sql, args)] in one transaction; False (or StateWriteError with
        ``must``) when it failed."""
        sqlite3 = self.sqlite3
        with self.lock:
            try:
                if durable is not self._durable:  # events need no sync of their own
                    self.db.execute("PRAGMA synchronous=%s" % ("FULL" if durable else "NORMAL"))
                    self._durable = durable
                if len(statements) == 1:
                    self.db.execute(*statements[0])
                else:
                    self.db.execute("BEGIN IMMEDIATE")
                    for sql, args in statements:
                        self.db.execute(sql, args)
                    self.db.execute("COMMIT")
                if self._failing:
                    log.info("state database written again", extra={"ctx": "-"})
                self._failing = False
                return True
            except sqlite3.Error as e:
                if self.db.in_transaction:
                    try:
                        self.db.execute("ROLLBACK")
                    except sqlite3.Error:
                        pass
                self.write_errors += 1
                if not self._failing:
                    log.error("cannot write the state database %s: %s", self.path, e,
                              extra={"ctx": "-"})
                self._failing = True
                if must:
                    raise StateWriteError("cannot save the state (%s): %s" % (self.path, e))
                return False

    def add_session(self, sid: str, created: float, activated: Optional[float] = None,
                    meta: Optional[dict] = None, slot: Optional[int] = None) -> None:
        self._write([("INSERT INTO sessions (id, created, activated, meta, slot) "
                      "VALUES (?, ?, ?, ?, ?)",
                      (sid, created, activated, json.dumps(meta or {}), slot))], must=True)

    def update_sessions(self, removed=(), activated=()) -> None:
        """One queue operation: sessions ``removed`` [id], ``activated`` [(id, wall time,
        slot)]."""
        statements = [("DELETE FROM sessions WHERE id = ?", (sid,)) for sid in removed]
        statements += [("UPDATE sessions SET activated = ?, slot = ? WHERE id = ?",
                        (when, slot, sid)) for sid, when, slot in activated]
        if statements:
            self._write(statements)

    def clear_sessions(self) -> None:
        self._write([("DELETE FROM sessions", ())])

    def save_lab(self, info: Optional[dict], slot: int = 1) -> None:
        if info is None:
            self._write([("DELETE FROM lab WHERE slot = ?", (slot,))])
        else:
            self._write([("INSERT OR REPLACE INTO lab VALUES (?, ?)", (slot, json.dumps(info)))])

    def save_unclean(self, workdir: str, attempts: Optional[int]) -> None:
        """A lab dir kept for a retried teardown (``attempts`` so far), or gone (None)."""
        if attempts is None:
            self._write([("DELETE FROM unclean_dirs WHERE dir = ?", (workdir,))])
        else:
            self._write([("INSERT OR REPLACE INTO unclean_dirs VALUES (?, ?)",
                          (workdir, attempts))])

    def add_proc(self, record: dict) -> None:
        self._write([("INSERT OR REPLACE INTO netlab_procs VALUES (?, ?)",
                      (record["pid"], json.dumps(record)))])

    def remove_proc(self, pid: int) -> None:
        self._write([("DELETE FROM netlab_procs WHERE pid = ?", (pid,))])

    def add_event(self, event: dict) -> None:
        self._write([("INSERT OR REPLACE INTO events VALUES (?, ?, ?, ?, ?)",
                      (event["seq"], event["time"], event["kind"], event["text"],
                       event["detail"])),
                     ("DELETE FROM events WHERE seq <= ?", (event["seq"] - STATE_EVENTS_KEPT,))],
                    durable=False)

    def set_meta(self, key: str, value: str) -> None:
        self._write([("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, value))])

    def counters(self) -> Dict[str, int]:
        """The counters kept over the state dir's life (restarts, labs adopted, ...)."""
        with self.lock:
            rows = self.db.execute("SELECT key, value FROM meta").fetchall()
        return _counters(rows)

    def bump(self, key: str, n: int = 1) -> None:
        """Add ``n`` to the counter ``key`` (restarts, labs_adopted, ...)."""
        self._write([("INSERT OR IGNORE INTO meta VALUES (?, '0')", (key,)),
                     ("UPDATE meta SET value = CAST(value AS INTEGER) + ? WHERE key = ?",
                      (n, key))])

    # -- reading --
    def load(self) -> SavedState:
        """Everything saved; rows that cannot be read are skipped with a WARNING."""
        with self.lock:
            rows = {name: self.db.execute(sql).fetchall() for name, sql in (
                ("sessions", "SELECT id, created, activated, meta, slot FROM sessions "
                             "ORDER BY seq"),
                ("lab", "SELECT slot, info FROM lab ORDER BY slot"),
                ("unclean", "SELECT dir, attempts FROM unclean_dirs"),
                ("procs", "SELECT record FROM netlab_procs ORDER BY pid"),
                ("events", "SELECT seq, time, kind, text, detail FROM events ORDER BY seq"),
                ("meta", "SELECT key, value FROM meta"))}
        sessions = [(sid, float(created), None if activated is None else float(activated),
                     _json_object(meta, "session %s" % sid),
                     slot if isinstance(slot, int) else None)
                    for sid, created, activated, meta, slot in rows["sessions"]]
        labs = {slot: _json_object(info, "the lab of slot %s" % slot)
                for slot, info in rows["lab"] if isinstance(slot, int)}
        return SavedState(
            sessions=sessions, lab=labs.get(1) or None, labs={k: v for k, v in labs.items() if v},
            unclean={d: int(n) for d, n in rows["unclean"]},
            procs=[r for r in (_json_object(rec, "a netlab process") for (rec,) in rows["procs"])
                   if r],
            events=[{"seq": seq, "time": t, "kind": kind, "text": text, "detail": detail}
                    for seq, t, kind, text, detail in rows["events"]],
            counters=_counters(rows["meta"]), previous_exit=dict(rows["meta"]).get("exit"),
            hold_times=_json_list(dict(rows["meta"]).get(HOLD_TIMES_KEY)))

    def close(self) -> None:
        with self.lock:
            try:
                self.db.close()  # the last connection: the WAL is checkpointed and removed
            except self.sqlite3.Error as e:
                log.warning("closing the state database: %s", e, extra={"ctx": "-"})


def _counters(meta_rows) -> Dict[str, int]:
    counters = {}
    for key, value in meta_rows:
        if key not in ("schema", "exit", HOLD_TIMES_KEY):
            try:
                counters[key] = int(value)
            except ValueError:
                pass
    return counters


def _json_list(text: Optional[str]) -> list:
    """A JSON list saved in the meta table ([] when missing or unreadable)."""
    try:
        value = json.loads(text) if text else []
    except ValueError:
        return []
    return value if isinstance(value, list) else []


def _json_object(text: str, what: str) -> dict:
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        value = None
    if not isinstance(value, dict):
        log.warning("state database: cannot read the record of %s; ignored", what,
                    extra={"ctx": "-"})
        return {}
    return value


def move_aside(path: str) -> Optional[str]:
    """Rename ``path`` (and its -wal file) to ``<path>.corrupt-<time>``; the new name, or None."""
    target = "%s.corrupt-%s" % (path, time.strftime("%Y%m%d-%H%M%S"))
    try:
        os.replace(path, target)
    except OSError as e:
        log.error("cannot move %s aside: %s", path, e, extra={"ctx": "-"})
        return None
    for suffix in ("-wal", "-shm"):
        try:
            if suffix == "-wal":
                os.replace(path + suffix, target + suffix)
            else:
                os.unlink(path + suffix)
        except OSError:
            pass
    return target


class QueueJournal:
    """Writes what the SessionQueue changes to the store, in the queue's call (lock held), with
    the queue's clock turned into the wall clock."""

    def __init__(self, store: StateStore, clock: "Clock"):
        self.store = store
        self.clock = clock

    def _wall(self, t: float) -> float:
        return time.time() - (self.clock.now() - t)

    def added(self, session: "Session", slot: Optional[int]) -> None:
        """A new session, active at once in ``slot`` (None: it waits)."""
        created = self._wall(session.created)
        self.store.add_session(session.id, created, None if slot is None else created,
                               session.meta, slot)  # may raise

    def changed(self, removed: List[str], activated: List["Session"]) -> None:
        self.store.update_sessions(removed, [(s.id, self._wall(s.activated), s.slot)
                                             for s in activated if s.id not in removed])


# ============================================================================================
# 5b. Endpoint declarations: one @endpoint per handler; the dispatch table and /openapi.json
#     are both built from them (App.endpoints)
# ============================================================================================

# the session a request must name (X-Session-ID): none, any queued one, the active one
NO_SESSION, ANY_SESSION, ACTIVE_SESSION = "none", "any", "active"
# its body: none (one up to MAX_JSON_BODY is read and dropped), multipart streamed to the handler,
# JSON (up to MAX_JSON_BODY, read into Request.body as bytes)
NO_BODY, MULTIPART_BODY, JSON_BODY = "none", "multipart", "json"
_PATH_PARAM_RE = re.compile(r"\{(\w+)\}")


def _ref(name: str) -> dict:
    return {"$ref": "#/components/schemas/" + name}


def _json_response(description: str, schema: dict, example=None) -> dict:
    media = {"schema": schema}
    if example is not None:
        media["example"] = example
    return {"description": description, "content": {"application/json": media}}


def _error(description: str, example: str) -> dict:
    return _json_response(description, _ref("Error"), {"detail": example})


_NO_CONTENT = {"description": "No content (empty body)."}
_SID_ERRORS = {
    "400": _error("The `X-Session-ID` header is missing.", "missing X-Session-ID header"),
    "404": _error("Unknown session.", "unknown session 3f2b9c4e-..."),
    "423": _error("The session is not the active one (still waiting in the queue).",
                  "session 3f2b9c4e-... is not active (still waiting in the queue)"),
}
_ORIGIN_ERROR = {"403": _error(
    "A browser request from another site's page: the `Origin` header is neither the server's "
    "own origin nor one given with `--allow-origin` (`null` included).",
    "cross-origin request refused: Origin 'http://evil.example' is not this server's own "
    "origin (a page of another site; allow it with --allow-origin)")}
_AUTH_ERROR = {"401": _error(
    "Only with `--auth-file`: no `Authorization` header, or a wrong token (Bearer TOKEN, or "
    "HTTP Basic with the user's name and token). Comes with `WWW-Authenticate`.",
    "invalid token")}
_OWNER_DETAIL = "session 3f2b9c4e belongs to alice: only its owner may use it"
_OWNER_ERROR = _error("Only with `--auth-file`: the session belongs to another user (admins "
                      "may end any session and tear down the lab).", _OWNER_DETAIL)
# POST /lab and POST /lab/check take the same upload
_TOPOLOGY_PART = {"type": "string", "contentMediaType": "application/octet-stream",
                  "description": "The topology file (.yml/.yaml)."}
_FILE_PART = {"type": "string", "contentMediaType": "application/octet-stream"}
_UPLOAD_TOO_LARGE = _error("The body exceeds `--max-upload-mb`.",
                           "upload of 99999999 bytes exceeds the limit of 67108864 bytes "
                           "(--max-upload-mb)")
_SID_HEADER = {"$ref": "#/components/parameters/SessionHeader"}
_SID_PATH = {"$ref": "#/components/parameters/SessionPath"}
_SESSION_EXAMPLE = "3f2b9c4e-7a8d-4b1e-9c0f-2d6e5a7b8c9d"
_FINGERPRINT_EXAMPLE = "50d858e0985ecc7f60418aaf0cc5ab587f42c2570a884095a9e8ccacd0f6545c"
_DEVICE_EXAMPLE = {"name": "r1", "raw": {"name": "r1", "device": "frr", "ansible_host": "192.168.121.101",
                                         "mgmt": {"ifname": "eth0", "ipv4": "192.168.121.101"}}}


class Endpoint:
    """One endpoint as declared next to its handler: routing, session and body handling, and
    its OpenAPI operation."""
    __slots__ = ("method", "path", "name", "session", "body", "sign_of_life", "openapi",
                 "regex", "public")

    def __init__(self, method: str, path: str, name: str, session: str, body: str,
                 sign_of_life: bool, openapi: dict, public: bool = False):
        self.method, self.path, self.name = method, path, name
        self.session, self.body, self.sign_of_life = session, body, sign_of_life
        self.public = public  # answered without credentials, also with --auth-file
        self.openapi = openapi
        parts = _PATH_PARAM_RE.split(path)  # literal, name, literal, ...
        self.regex = re.compile("".join(re.escape(part) if i % 2 == 0 else "(?P<%s>[^/]+)" % part
                                        for i, part in enumerate(parts)) + r"/?\Z")

    def operation(self) -> dict:
        """The OpenAPI operation: the declared one, plus what the session and the method imply
        (the X-Session-ID parameter, its 400/404/423, 403 for a foreign page's POST/DELETE)."""
        op = dict(self.openapi, operationId=self.name)
        responses = {}
        if self.session != NO_SESSION:
            op["parameters"] = [_SID_HEADER] + list(op.get("parameters", ()))
            responses.update(_SID_ERRORS)
            if self.session != ACTIVE_SESSION:
                del responses["423"]
        if self.method not in RequestGuard.SAFE_METHODS:
            responses.update(_ORIGIN_ERROR)
        if not self.public:
            responses.update(_AUTH_ERROR)
        if self.session != NO_SESSION or (self.method == "DELETE" and "{" in self.path):
            responses["403"] = _OWNER_ERROR if "403" not in responses else _error(
                _OWNER_ERROR["description"] + " Or: " + _ORIGIN_ERROR["403"]["description"],
                _OWNER_DETAIL)
        responses.update(op["responses"])
        responses.setdefault("default", {"$ref": "#/components/responses/GenericError"})
        op["responses"] = dict(sorted(responses.items()))  # 2xx first, "default" last
        return op


def endpoint(method: str, path: str, session: str = NO_SESSION, body: str = NO_BODY,
             sign_of_life: bool = False, openapi: Optional[dict] = None, public: bool = False):
    """Declare the decorated App handler ``handler(self, request) -> Response`` as the endpoint
    ``method path`` (``{name}`` in the path: a path parameter). ``sign_of_life``: a request
    naming a session (header or path) keeps that session alive. ``public``: no credentials
    needed with --auth-file."""
    def declare(handler):
        handler.endpoint = Endpoint(method, path, handler.__name__, session, body, sign_of_life,
                                    openapi or {}, public)
        return handler
    return declare


class EndpointTable:
    """The endpoints of a class (its own first, then its bases'), matched by method and path."""

    def __init__(self, cls):
        self.endpoints = []  # type: List[Endpoint]
        seen = set()
        for klass in cls.__mro__:
            for name, value in vars(klass).items():
                declared = getattr(value, "endpoint", None)
                if isinstance(declared, Endpoint) and name not in seen:
                    seen.add(name)
                    self.endpoints.append(declared)

    def match(self, method: str, path: str) -> Tuple[Endpoint, Dict[str, str]]:
        """(endpoint, path parameters), or HTTPError 404 / 405 (with Allow)."""
        allowed = []
        for e in self.endpoints:
            m = e.regex.match(path)
            if m:
                if e.method == method:
                    return e, m.groupdict()
                allowed.append(e.method)
        if allowed:
            methods = ", ".join(sorted(set(allowed)))
            raise HTTPError(405, "method %s not allowed on %s (allowed: %s)"
                            % (method, path, methods), headers=[("Allow", methods)])
        raise HTTPError(404, "no such endpoint: %s %s" % (method, path))

    def openapi_paths(self) -> Dict[str, dict]:
        paths = collections.OrderedDict()  # type: Dict[str, dict]
        for e in self.endpoints:
            paths.setdefault(e.path, {})[e.method.lower()] = e.operation()
        return paths


# ============================================================================================
# 6. Operations state: the event log, the metrics, the status view-model, systemd reporting
#    (rendering, the OpenAPI document and the systemd notifier live in section 9)
# ============================================================================================

EVENT_LIMIT = 200  # events kept in memory for the status page
PAGE_EVENTS = 30  # events shown on it
SHORT_ID = 8  # other people's session ids are shortened to this on the page




def _peer_closed(conn) -> bool:
    """True when the client of ``conn`` has closed its side (EOF readable, nothing pipelined)."""
    if conn is None:
        return False
    import select
    try:
        if is_tls(conn) and conn.pending():  # decrypted bytes waiting: not closed
            return False
        poller = select.poll()  # not select(): no limit on the fd number
        poller.register(conn, select.POLLIN)
        if not poller.poll(0):
            return False
        return raw_peek(conn) == b""  # (TLS: a close_notify alert before the EOF cannot tell)
    except ConnectionError:  # reset by the peer
        return True
    except (OSError, ValueError):
        return False  # cannot tell: keep waiting until the deadline


class EventLog:
    """What happened recently, in words, for the status page: newest last, at most ``limit``.

    A promotion (or a waiter dropped when its turn came) happens inside the queue call that ended
    or expired a session, before the caller records that end: such events are ``defer``red and
    listed right after the next event recorded with ``cause=True``; /status shows them meanwhile.
    """

    def __init__(self, limit: int = EVENT_LIMIT, store: Optional["StateStore"] = None):
        self.events = collections.deque(maxlen=limit)  # type: collections.deque
        self.lock = threading.Lock()
        self.total = 0  # events recorded so far (the newest one's ``seq``)
        self._pending = []  # type: List[dict]
        self.store = store  # each event is written there too (5a)

    def restore(self, saved: List[dict]) -> None:
        """Start-up: the recent events a previous server saved (oldest first)."""
        with self.lock:
            for event in saved:
                self.events.append(event)
                self.total = max(self.total, event["seq"])

    def record(self, kind: str, text: str, detail: Optional[str] = None,
               cause: bool = False) -> None:
        """Add an event; ``cause``: it caused the deferred events, which follow it."""
        with self.lock:
            if not cause:
                self._flush_locked()
            self._append({"time": time.time(), "kind": kind, "text": text, "detail": detail})
            self._flush_locked()

    def defer(self, kind: str, text: str) -> None:
        with self.lock:
            self._pending.append({"time": time.time(), "kind": kind, "text": text,
                                  "detail": None})

    def _append(self, event: dict) -> None:
        self.total += 1
        event["seq"] = self.total
        self.events.append(event)
        if self.store is not None:
            self.store.add_event(event)

    def _flush_locked(self) -> None:
        while self._pending:
            self._append(self._pending.pop(0))

    def version(self) -> str:
        """Changes with every event, deferred ones included."""
        return "%d.%d" % (self.total, len(self._pending))

    def recent(self, n: int) -> Tuple[List[dict], int]:
        """(the last ``n`` events, deferred ones included, newest last; events recorded)."""
        with self.lock:
            return (list(self.events) + self._pending)[-n:], self.total

    # -- the events the server records --
    def session_active(self, sid: str, waited: float, slot: Optional[int] = None) -> None:
        where = "" if slot is None else " in slot %d" % slot
        if waited < 0.001:  # created into an empty queue: nothing caused it
            self.record("active", "session %s is active at once%s (nobody was before it)"
                        % (sid[:SHORT_ID], where))
        else:
            self.defer("active", "session %s got the lab%s after waiting %s"
                       % (sid[:SHORT_ID], where, fmt_duration(waited)))

    def session_moved(self, sid: str, slot: int, lab: str) -> None:
        self.record("active", "session %s moved to slot %d, whose warm lab %s it asked for"
                    % (sid[:SHORT_ID], slot, lab))

    def session_overtook(self, sid: str, overtaken: int, lab: str) -> None:
        self.defer("active", "session %s promoted ahead of %d session%s for the warm lab %s"
                   % (sid[:SHORT_ID], overtaken, "" if overtaken == 1 else "s", lab))

    def session_gone(self, sid: str, was_active: bool, why: str, expired: bool) -> None:
        kind = "expired" if expired else "ended"
        self.record(kind, "%s session %s %s (%s)" % ("active" if was_active else "waiting",
                                                     sid[:SHORT_ID], kind, why), cause=True)

    def session_overheld(self, sid: str, max_hold: float) -> None:
        self.record("expired", "active session %s ended: held longer than %s (--max-hold)"
                    % (sid[:SHORT_ID], fmt_duration(max_hold)), cause=True)

    def waiter_dropped(self, sid: str, why: str) -> None:
        self.defer("expired", "waiting session %s expired (%s)" % (sid[:SHORT_ID], why))

    def restarted(self, sessions: int, plans: List["RestorePlan"], was: str) -> None:
        """The start-up found a previous server's state (``was``: how that one ended;
        ``plans``: what became of each slot's lab)."""
        labs = ["%s %s adopted" % ("the lab" if len(plans) == 1 else "slot %d's lab" % k,
                                   p.adopt.topology) if p.adopt is not None
                else "%s lost (%s)" % ("the lab" if len(plans) == 1 else "slot %d's lab" % k,
                                       p.lost) if p.lost else None
                for k, p in enumerate(plans, 1)]
        self.record("restart", "restarted after %s; %d session%s restored, %s"
                    % (was, sessions, "" if sessions == 1 else "s",
                       ", ".join(t for t in labs if t) or "no lab"))

    def netlab_done(self, verb: str, seconds: float, error: Optional[str], ctx: str) -> None:
        where = "" if ctx in ("-", "", None) else " [%s]" % ctx
        if verb == "create":  # a topology check: a rejected topology is its sender's, not ours
            return
        if error:
            first = error.splitlines()[0]
            self.record("failure", "netlab %s failed after %s: %s%s"
                        % (verb, fmt_duration(seconds), first, where), error)
        elif verb in ("up", "down"):
            self.record("netlab", "netlab %s OK in %.1f s%s" % (verb, seconds, where))


class Metrics:
    """The server's counters and histograms, bumped from any thread; /metrics shows them."""

    def __init__(self, store: Optional["StateStore"] = None):
        self.store = store  # the counters kept over restarts (restarts, labs adopted, ...)
        self.counters = Counts()  # sessions_created, sessions_ended, sessions_expired, upload_bytes
        self.netlab_calls = Counts()  # verb -> commands run
        self.netlab_failures = Counts()  # verb -> commands that failed or timed out
        self.http_requests = Counts()  # (route name, status) -> requests
        self.netlab_seconds = {"up": Histogram(NETLAB_BUCKETS), "down": Histogram(NETLAB_BUCKETS)}
        self.queue_wait_seconds = Histogram(QUEUE_WAIT_BUCKETS)
        self.status_watchers = 0  # GET /status?wait= requests waiting right now
        self._watchers_lock = threading.Lock()

    def count(self, name: str, n: int = 1) -> None:
        self.counters.add(name, n)

    def http_request(self, route: str, status: int) -> None:
        self.http_requests.add((route, status))  # no formatting here: /metrics labels it

    def netlab_started(self, verb: str) -> None:
        self.netlab_calls.add(verb)

    def netlab_done(self, verb: str, seconds: float, error: Optional[str]) -> None:
        if error is not None:
            self.netlab_failures.add(verb)
        if verb in self.netlab_seconds:  # failed runs too: a slow failure is worth seeing
            self.netlab_seconds[verb].observe(seconds)

    def queue_wait(self, seconds: float) -> None:
        self.queue_wait_seconds.observe(seconds)

    def watchers(self, delta: int) -> None:
        with self._watchers_lock:
            self.status_watchers += delta


@dataclasses.dataclass
class OpsSnapshot:
    """The server's state at one moment, as the status page, /status, /metrics and systemd's
    STATUS= show it."""
    token: str  # changes whenever what the status page shows (besides clocks) changes
    now: float  # wall clock
    mono: float  # the queue's clock at the same moment
    sessions: List[Tuple[str, float, float, Optional[float], dict]]  # (id, created, last_seen,
    #                                  activated, meta) on the queue's clock, active first
    lab: dict  # Lab.snapshot()
    events: List[dict]  # the last PAGE_EVENTS events, newest last
    events_total: int
    started: float  # wall clock
    uptime: float
    timeouts: Dict[str, float]  # waiting, active
    waits: List[Optional[float]] = dataclasses.field(default_factory=list)  # per session,
    #                                  and one joining now: SessionQueue.waits(joining=1)
    max_hold: float = 0.0  # --max-hold (0: none)
    slots: int = 1  # --slots
    labs: List[dict] = dataclasses.field(default_factory=list)  # per slot: Lab.snapshot()
    #                                  with "slot" and "warm_until" (the queue's clock); [] = [lab]
    holders: Dict[int, str] = dataclasses.field(default_factory=dict)  # slot -> active session


def sees_session(user: Optional["User"], meta: dict) -> bool:
    """May ``user`` see the full id of a session with ``meta`` (and act on it as its owner)?
    Without --auth-file (``user`` None) everyone may, as in the seed's API."""
    return user is None or user.admin or meta.get("user") == user.name


def status_view(snap: OpsSnapshot, viewer: Optional[str] = None,
                user: Optional["User"] = None) -> dict:
    """What /status answers (and the page shows): session ids shortened but the viewer's own
    (and, with --auth-file, those ``user`` owns; all for an admin), the queue's times on the
    wall clock, who and why, the devices reduced to name, type and address. ``holder`` and
    ``lab`` are the oldest active session and slot 1's lab (a one-slot server's only ones);
    ``labs`` has every slot's lab and holder."""
    def wall(t):
        return round(snap.now - (snap.mono - t), 3)

    def shown(sid, meta):
        full = sid == viewer or (user is not None and sees_session(user, meta))
        return sid if full else sid[:SHORT_ID]

    def who(meta):
        return {"owner": meta.get("owner"), "note": meta.get("note"), "link": meta.get("link")}

    def you(sid, meta):  # the viewer's own session (by id, or with --auth-file by its user)
        return sid == viewer or (user is not None and meta.get("user") == user.name)

    def holder_of(entry, lab):  # an active session, and the topology it uploaded to ``lab``
        sid, created, last_seen, activated, meta = entry
        since = activated if activated is not None else created
        held = max(0.0, snap.mono - since)
        return dict({"session": shown(sid, meta), "you": you(sid, meta), "since": wall(since),
                     "last_seen": wall(last_seen),
                     "topology": lab["topology"] if lab["holder"] == sid else None},
                    held_s=round(held, 1), **who(meta),
                    hold_left_s=_rounded(hold_left_after(snap.max_hold, held)))

    labs = snap.labs or [dict(snap.lab, slot=1, warm_until=None)]
    in_slot = _sessions_in_slots(snap)
    active = len(in_slot)  # the active sessions come first
    holder = None
    if snap.sessions:
        first = snap.sessions[0]
        slot = next((k for k, e in in_slot.items() if e is first), None)
        holder = holder_of(first, snap.lab if slot is None else labs[slot - 1])
    queue = [dict({"position": i - active + 1, "session": shown(sid, meta), "you": you(sid, meta),
                   "joined": wall(created), "last_seen": wall(last_seen)}, **who(meta),
                  eta_s=snap.waits[i] if i < len(snap.waits) else None)
             for i, (sid, created, last_seen, _, meta) in enumerate(snap.sessions) if i >= active]
    return {
        "service": "remote-lab", "version": __version__, "token": snap.token,
        "server_time": round(snap.now, 3), "started": round(snap.started, 3),
        "uptime": round(snap.uptime, 3), "timeouts": dict(snap.timeouts),
        "max_hold": snap.max_hold, "holder": holder, "queue": queue,
        "join_eta_s": snap.waits[len(snap.sessions)] if len(snap.waits) > len(snap.sessions)
        else None,
        "lab": _lab_view(snap.lab),
        "events": [{"time": round(e["time"], 3), "kind": e["kind"], "text": e["text"],
                    "detail": e["detail"]} for e in reversed(snap.events)],
        "slots": snap.slots,
        "labs": [{"slot": lab["slot"],
                  "lab": dict(_lab_view(lab), warm_until=None if lab.get("warm_until") is None
                              else wall(lab["warm_until"])),
                  "holder": holder_of(in_slot[lab["slot"]], lab) if lab["slot"] in in_slot
                  else None} for lab in labs],
    }


def _sessions_in_slots(snap: OpsSnapshot) -> Dict[int, tuple]:
    """slot -> the snapshot's entry of the active session in it (one slot: the first)."""
    if snap.slots == 1:
        return {1: snap.sessions[0]} if snap.sessions else {}
    entries = {entry[0]: entry for entry in snap.sessions}
    return {slot: entries[sid] for slot, sid in sorted(snap.holders.items()) if sid in entries}


def _lab_view(lab: dict) -> dict:
    return {"state": lab["state"], "running": lab["running"], "topology": lab["topology"],
            "ref_count": lab["ref_count"],
            "holder": lab["holder"][:SHORT_ID] if lab["holder"] else None,
            "devices": [_device_view(d) for d in lab["devices"]],
            "last_error": lab["last_error"]}


def _device_view(device: dict) -> dict:
    raw = device.get("raw") if isinstance(device.get("raw"), dict) else {}
    mgmt = raw.get("mgmt") if isinstance(raw.get("mgmt"), dict) else {}
    return {"name": device.get("name"), "device": raw.get("device"),
            "mgmt": mgmt.get("ipv4") or raw.get("ansible_host")}


def systemd_status_line(snap: OpsSnapshot) -> str:
    """The one-line STATUS= for systemd, e.g. "lab r1,r2 held by sid=1a2b3c4d, 3 waiting"."""
    if snap.slots > 1:
        return _slots_status_line(snap)
    active = snap.sessions[0][0] if snap.sessions else None
    waiting = max(0, len(snap.sessions) - 1)
    s = snap.lab
    names = [d.get("name", "?") for d in s["devices"]]
    shown = ",".join(names[:8]) + (",+%d" % (len(names) - 8) if len(names) > 8 else "")
    if s["state"] == RUNNING:
        lab = "lab %s (%s)" % (shown or "-", s["topology"])
    elif s["state"] in (STARTING, STOPPING):
        lab = "lab %s" % s["state"]
    else:
        lab = None
    if active is None:
        text = "idle" if lab is None else "idle, %s with ref count %d" % (lab, s["ref_count"])
    elif lab is None:
        text = "sid=%s active, no lab" % active[:SHORT_ID]
    else:
        text = "%s held by sid=%s" % (lab, active[:SHORT_ID])
    if waiting:
        text += ", %d waiting" % waiting
    return text


def _slots_status_line(snap: OpsSnapshot) -> str:
    """STATUS= with --slots N, e.g. "2/3 slots busy, 3 labs up (a.yml,b.yml,c.yml), 4 waiting"."""
    busy = len(_sessions_in_slots(snap))
    up = [lab["topology"] or "-" for lab in snap.labs if lab["state"] == RUNNING]
    text = "%d/%d slots busy" % (busy, snap.slots)
    if up:
        text += ", %d lab%s up (%s)" % (len(up), "" if len(up) == 1 else "s", ",".join(up))
    waiting = max(0, len(snap.sessions) - busy)
    if waiting:
        text += ", %d waiting" % waiting
    return text


class SystemdReporter:
    """Tells systemd how we are: READY=1, STATUS= on every change (from a small thread),
    WATCHDOG=1 from the housekeeping thread, STOPPING=1. A no-op with a disabled notifier."""

    def __init__(self, notifier: "SystemdNotifier", snapshot: Callable[[], OpsSnapshot],
                 changed: threading.Condition, stopping: threading.Event):
        self.notifier = notifier
        self.snapshot = snapshot
        self.changed = changed  # notified on every queue change
        self.stopping_event = stopping

    def ready(self) -> None:
        """The server listens: READY=1, then STATUS= on every change."""
        if not self.notifier.enabled:
            return
        self.notifier.ready(systemd_status_line(self.snapshot()))
        threading.Thread(target=self._status_loop, name="sd-status", daemon=True).start()

    def _status_loop(self) -> None:
        last = None
        while not self.stopping_event.is_set():
            snap = self.snapshot()
            if snap.token != last:
                last = snap.token
                self.notifier.status(systemd_status_line(snap))
            with self.changed:  # queue changes wake us at once, lab changes within 1 s
                self.changed.wait(1.0)

    def stopping(self, teardown: bool = False) -> None:
        self.notifier.stopping("stopping: tearing down the lab" if teardown
                               else "stopping: saving the state (the lab stays up)")

    def watchdog(self) -> None:
        """From the housekeeping thread: a wedged thread stops the pings and systemd restarts us."""
        if self.notifier.watchdog_interval and not self.stopping_event.is_set():
            self.notifier.watchdog()

    def cadence(self, housekeeping: float) -> float:
        """The housekeeping pause: at most half the watchdog interval."""
        interval = self.notifier.watchdog_interval
        return min(housekeeping, interval) if interval else housekeeping


# ============================================================================================
# 7. HTTP: the request guard, App (handlers), request parsing and the server
# ============================================================================================


class HTTPError(Exception):
    def __init__(self, status: int, detail: str, headers=(), close: bool = False):
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = tuple(headers)  # extra response headers, e.g. Allow on 405
        self.close = close  # the connection cannot go on (e.g. a request body left unread)


def header_value(headers, name: str, default=None):
    """``headers.get(name, default)``: a dict lookup when FastRequestHead indexed them
    (email's Message.get() lower-cases every header name on every call)."""
    index = getattr(headers, "fast_index", None)
    if index is None:
        return headers.get(name, default)
    return index.get(name.lower(), default)


class Request:
    """What a handler gets: the request, its path parameters, the session its endpoint needs
    (resolved by App.resolve_session) and, for a multipart endpoint, the body stream."""
    __slots__ = ("method", "path", "query", "headers", "params", "named_session", "session",
                 "body", "connection", "user")

    def __init__(self, method: str, path: str, query: Dict[str, str], headers,
                 params: Optional[Dict[str, str]] = None, body=None, connection=None):
        self.method, self.path, self.query, self.headers = method, path, query, headers
        self.params = params or {}
        sid = header_value(headers, "X-Session-ID")
        self.named_session = (sid.strip() or None) if sid else None  # X-Session-ID
        self.session = None  # type: Optional[str]
        self.body = body  # the body stream (a multipart endpoint's only)
        self.connection = connection  # the socket: a long-poll stops when its client is gone
        self.user = None  # type: Optional[User]  # with --auth-file: who sent it

    def header(self, name: str, default=None):
        return header_value(self.headers, name, default)


class Response:
    """What a handler returns. ``body``: JSON data, or bytes of ``content_type``; ``close``:
    close the connection after it."""
    __slots__ = ("status", "body", "content_type", "headers", "close")

    def __init__(self, status: int, body=None, content_type: Optional[str] = None, headers=(),
                 close: bool = False):
        self.status, self.body, self.content_type = status, body, content_type
        self.headers, self.close = headers, close


def error_response(error: Exception, method: str, path: str) -> Response:
    """The one translation of an exception into an error answer {"detail": ...}."""
    close = False
    if isinstance(error, HTTPError):
        status, detail, headers, close = error.status, error.detail, error.headers, error.close
    elif isinstance(error, BadRequest):  # e.g. parse_bool on ?force= / the reuse field
        status, detail, headers = error.status, str(error), ()
    elif isinstance(error, UnknownSession):
        status, detail, headers = 404, "unknown session %s" % error.args[0], ()
        if len(error.args) > 1:  # why the server ended it (--max-hold)
            detail += ": %s" % error.args[1]
    elif isinstance(error, NoLab):
        status, detail, headers = 404, str(error), ()
    elif isinstance(error, QueueFull):
        status, detail, headers = 429, str(error), ()
    elif isinstance(error, StateWriteError):  # e.g. a full disk: nothing was queued
        status, detail, headers = 503, str(error), ()
    elif isinstance(error, NetlabError) and error.aborted:  # the server stops: not a failure
        status, detail, headers = 503, error.detail, (("Retry-After", RETRY_AFTER_RESTART),)
    elif isinstance(error, NetlabError):
        status, detail, headers = 504 if error.timed_out else 502, error.detail, ()
    else:  # a bug: answer 500 and keep serving
        log.exception("unhandled error in %s %s", method, path, exc_info=error)
        return Response(500, {"detail": "internal server error: %s" % error})
    if status >= 500:
        log.error("%s %s -> %d: %s", method, path, status, detail.splitlines()[0] if detail else "")
    if headers:
        return Response(status, json.dumps({"detail": detail}).encode(), "application/json",
                        headers, close)
    return Response(status, {"detail": detail}, close=close)


def split_target(target: str) -> Tuple[str, Dict[str, str]]:
    """(path, query parameters) of a request target."""
    if target[:1] == "/" and target[:2] != "//" and "?" not in target and "#" not in target:
        return target, {}  # what urlsplit() + parse_qsl() make of a plain path
    parsed = urllib.parse.urlsplit(target)
    return parsed.path, dict(urllib.parse.parse_qsl(parsed.query, keep_blank_values=True))


def wait_seconds(value: str) -> float:
    """The ``wait`` query parameter of the long-polls: seconds, 0-60 (HTTPError 400 if not)."""
    try:
        seconds = float(value)
    except ValueError:
        raise HTTPError(400, "wait must be a number of seconds (0-60)") from None
    if not 0 <= seconds <= 60:
        raise HTTPError(400, "wait must be between 0 and 60 seconds")
    return seconds


_request_context = threading.local()


def log_context(sid: Optional[str], topology: Optional[str]) -> str:
    parts = []
    if sid:
        parts.append("sid=" + sid[:8])
    if topology:
        parts.append("topo=" + topology)
    return " ".join(parts) or "-"


def set_log_context(sid: Optional[str], topology: Optional[str] = None) -> None:
    """What the log lines of the request being served name (%(ctx)s)."""
    _request_context.ctx = log_context(sid, topology)


class ContextFilter(logging.Filter):
    """Fills %(ctx)s: the sid/topology of the request being served, or '-'."""

    def filter(self, record):
        if not hasattr(record, "ctx"):
            record.ctx = getattr(_request_context, "ctx", "-")
        return True


MAX_JSON_BODY = 1024 * 1024
MAX_CHECKS = 2  # topology checks (netlab create) at once: they must not starve the host
RETRY_AFTER_RESTART = "2"  # seconds, on work cut short by a stop or reload (503)

# -- 7.1 what a web page may make a browser send: Host (DNS rebinding) and Origin checks --------

HOST_HEADER_RE = re.compile(r"(\[[0-9a-f:.]+\]|[a-z0-9_-]+(?:\.[a-z0-9_-]+)*)(?::([0-9]{1,5}))?\Z")
_LOOPBACK_V4_RE = re.compile(r"127(?:\.(?:25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])){3}\Z")
_DEFAULT_PORTS = (("http://", ":80"), ("https://", ":443"))


def normalize_origin(origin: str) -> str:
    """``origin`` (lower case) without its scheme's default port, as browsers send it."""
    for scheme, port in _DEFAULT_PORTS:
        if origin.startswith(scheme) and origin.endswith(port):
            return origin[:-len(port)]
    return origin


def is_loopback_name(name: str) -> bool:
    """localhost, 127.x.y.z or [::1] (lower case, IPv6 in brackets, no port)."""
    return name in ("localhost", "[::1]") or bool(_LOOPBACK_V4_RE.match(name))


def is_ip_literal(name: str) -> bool:
    """An address, not a name: DNS cannot rebind it to another host."""
    family, text = (socket.AF_INET6, name[1:-1]) if name[:1] == "[" else (socket.AF_INET, name)
    try:
        socket.inet_pton(family, text)
    except (OSError, ValueError):
        return False
    return True


class User:
    """Who sent a request (with --auth-file): a name from the auth file, maybe an admin."""
    __slots__ = ("name", "admin")

    def __init__(self, name: str, admin: bool = False):
        self.name, self.admin = name, admin

    def __repr__(self):
        return "User(%r%s)" % (self.name, ", admin" if self.admin else "")


class AuthFileError(Exception):
    """The auth file cannot be used: the server refuses to start, saying why."""


AUTH_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}\Z")
MIN_TOKEN_LENGTH = 16
AUTH_CHALLENGE = (("WWW-Authenticate", 'Basic realm="remote-lab", charset="UTF-8"'),
                  ("WWW-Authenticate", 'Bearer realm="remote-lab"'))


class AuthTable:
    """The users of ``--auth-file``: one a line, ``NAME:TOKEN`` or ``NAME:TOKEN:admin``, ``#``
    comments. A request names its user with ``Authorization: Bearer TOKEN`` or HTTP Basic
    (the name, and the token as password: what a browser asks for)."""

    def __init__(self, users: List[Tuple[str, str, bool]]):
        self._tokens = [(token.encode(), User(name, admin)) for name, token, admin in users]

    @classmethod
    def load(cls, path: str) -> "AuthTable":
        try:
            with open(path, "rb") as f:
                mode = os.fstat(f.fileno()).st_mode
                text = f.read().decode("utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise AuthFileError("remote-lab: cannot read the auth file %s: %s" % (path, e))
        if mode & 0o077:
            raise AuthFileError("remote-lab: the auth file %s is readable by group or others "
                                "(mode %03o): its tokens are passwords; chmod 600 %s"
                                % (path, mode & 0o777, shlex.quote(path)))
        users = [cls._parse_line(path, n, line) for n, line in enumerate(text.splitlines(), 1)
                 if line.strip() and not line.strip().startswith("#")]
        if not users:
            raise AuthFileError("remote-lab: the auth file %s names no user (NAME:TOKEN a line)"
                                % path)
        for i, what in ((0, "name"), (1, "token")):
            seen = [u[i] for u in users]
            if len(set(seen)) < len(seen):
                raise AuthFileError("remote-lab: the auth file %s gives a %s twice" % (path, what))
        return cls(users)

    @staticmethod
    def _parse_line(path: str, n: int, line: str) -> Tuple[str, str, bool]:
        fields = line.strip().split(":")
        where = "remote-lab: %s line %d:" % (path, n)
        if len(fields) not in (2, 3) or (len(fields) == 3 and fields[2] != "admin"):
            raise AuthFileError("%s expected NAME:TOKEN or NAME:TOKEN:admin" % where)
        name, token = fields[0], fields[1]
        if not AUTH_NAME_RE.match(name):
            raise AuthFileError("%s the name %r is not 1-64 letters, digits or ._@+- " % (where, name))
        if len(token) < MIN_TOKEN_LENGTH or not token.isprintable() or " " in token:
            raise AuthFileError("%s the token of %s is shorter than %d characters (make one with "
                                "python3 -c \"import secrets; print(secrets.token_urlsafe(24))\")"
                                % (where, name, MIN_TOKEN_LENGTH))
        return name, token, len(fields) == 3

    def user_for(self, authorization: Optional[str]) -> User:
        """The user an Authorization header names, or HTTPError 401 (with the challenges).
        Every token is compared, in constant time: the answer's timing tells nothing."""
        import base64
        import hmac
        scheme, _, credentials = (authorization or "").strip().partition(" ")
        name = None
        if scheme.lower() == "bearer":
            token = credentials.strip()
        elif scheme.lower() == "basic":
            try:
                name, _, token = base64.b64decode(credentials.strip(), validate=True).decode(
                    "utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                raise self._refused("malformed Basic credentials") from None
        elif not authorization:
            raise self._refused("authentication required: send Authorization: Bearer TOKEN "
                                "(or HTTP Basic with your name and token)")
        else:
            raise self._refused("unsupported Authorization scheme %r (use Bearer or Basic)"
                                % scheme[:20])
        given, found = token.encode(), None
        for known, user in self._tokens:
            if hmac.compare_digest(known, given):
                found = user
        if found is None or (name is not None and name != found.name):
            raise self._refused("invalid token" if name is None else "invalid name or token")
        return found

    @staticmethod
    def _refused(detail: str) -> "HTTPError":
        return HTTPError(401, detail, headers=AUTH_CHALLENGE)


class RequestGuard:
    """Refuses what another site's web page can make a browser send (403 JSON).

    * Bound to loopback: only loopback Host names (and ``--allow-host``) are answered, so a
      DNS-rebound name (evil.example -> 127.0.0.1) reads and changes nothing.
    * POST/DELETE (any method but GET/HEAD) with an ``Origin`` header: only the server's own
      origin (the one the Host header names, if that name is one we trust) and
      ``--allow-origin``. Browsers send Origin on every non-GET request, even ``no-cors`` fetches
      and form posts; curl and remote_lab_client.py send none and are not affected.
    Cheap on the hot path: a dict lookup of the Host value, Origin looked at only for non-GETs.
    """
    SAFE_METHODS = frozenset(("GET", "HEAD"))
    CACHE_LIMIT = 256  # Host values seen to pass (attackers' values are never cached)

    def __init__(self, allow_hosts=(), allow_origins=()):
        self.allow_names = {h for h in allow_hosts if not HOST_HEADER_RE.match(h).group(2)}
        self.allow_host_ports = set(allow_hosts) - self.allow_names
        self.allow_origins = frozenset(allow_origins)
        # names of this machine a browser may use on a non-loopback address (no DNS lookup)
        hostname = socket.gethostname().lower()
        self.own_names = {hostname, hostname.split(".")[0]}
        self.loopback = None  # type: Optional[bool]  # decided at the first request
        self._good_hosts = {}  # type: Dict[str, bool]

    @staticmethod
    def bound_to_loopback(address) -> bool:
        host = address[0] if isinstance(address, tuple) else ""
        return host == "::1" or bool(_LOOPBACK_V4_RE.match(host))

    def check(self, handler) -> None:
        """Raise HTTPError(403) for a request a foreign web page may have sent."""
        host = handler.header("Host")
        if self.loopback is None:  # the real socket's address (socket activation, --port-range)
            self.loopback = self.bound_to_loopback(handler.server.server_address)
        if self.loopback and host and host not in self._good_hosts:
            if not self.known_host(host.lower()):
                raise HTTPError(403, "Host %r refused: this server listens on a loopback address "
                                "and answers only localhost, 127.x.y.z and [::1] (or a name "
                                "given with --allow-host)" % host)
            if len(self._good_hosts) < self.CACHE_LIMIT:
                self._good_hosts[host] = True
        if handler.command not in self.SAFE_METHODS:
            origin = handler.header("Origin")
            if origin is not None and not self.origin_allowed(origin, host):
                raise HTTPError(403, "cross-origin request refused: Origin %r is not this "
                                "server's own origin (a page of another site; allow it with "
                                "--allow-origin)" % origin)

    def known_host(self, host: str) -> bool:
        """``host`` (a lower-case Host value) names this server: loopback or --allow-host."""
        m = HOST_HEADER_RE.match(host)
        return bool(m) and (is_loopback_name(m.group(1)) or m.group(1) in self.allow_names
                            or host in self.allow_host_ports)

    def origin_allowed(self, origin: str, host: Optional[str]) -> bool:
        origin = normalize_origin(origin.strip().lower())  # "null" stays foreign
        if origin in self.allow_origins:
            return True
        host = (host or "").lower()
        m = HOST_HEADER_RE.match(host)
        # the page's own origin is the one its Host names; https too (a TLS-terminating proxy)
        if not m or origin not in (normalize_origin("http://" + host),
                                   normalize_origin("https://" + host)):
            return False
        # ... and that name must be ours. Bound to loopback the Host check above passed; on
        # other addresses any Host reads, but a name we do not know may be a rebound one (the
        # attacker's page is then "same-origin"): only --allow-host, loopback names, IP
        # literals and this machine's own name may change things
        name = m.group(1)
        return (self.loopback or self.known_host(host) or is_ip_literal(name)
                or name in self.own_names)


class App:
    """The server's state and request logic; the handler only speaks HTTP."""

    def __init__(self, settings: Settings, notifier: Optional["SystemdNotifier"] = None,
                 store: Optional[StateStore] = None, auth: Optional[AuthTable] = None):
        self.settings = settings
        self.request_guard = RequestGuard(settings.allow_hosts, settings.allow_origins)
        if auth is None and settings.auth_file:
            auth = AuthTable.load(settings.auth_file)  # AuthFileError: main refuses to start
        self.auth = auth  # None: the API is open (the seed's)
        self.checks = threading.BoundedSemaphore(MAX_CHECKS)  # POST /lab/check runs at once
        self.started = time.time()
        self.started_mono = time.monotonic()
        self.store = store if store is not None else StateStore(None)  # 5a (None: in memory)
        self.metrics = Metrics(self.store)  # section 6
        self.events = EventLog(store=self.store)
        clock = Clock()
        self.queue = SessionQueue(settings.waiting_timeout, settings.active_timeout,
                                  settings.max_queue, clock, on_activate=self._session_activated,
                                  on_drop=self._waiter_dropped,
                                  journal=QueueJournal(self.store, clock),
                                  max_hold=settings.max_hold, slots=settings.slots,
                                  max_overtake=settings.overtake_limit,
                                  on_overtake=self._session_overtook)
        self.runner = NetlabRunner(
            settings.netlab_command(), settings.up_timeout, settings.netlab_timeout,
            settings.debug, NetlabProcessRecords(self.store),
            on_start=self.metrics.netlab_started, on_done=self._netlab_done)
        if not settings.simulate and store is not None and store.path:  # a real server
            self.runner.bin_dir = netlab_bin_dir(settings.state_dir, settings.netlab)
        startup_cleanups = []  # type: List[threading.Thread]
        self.labs = [Lab(self.runner, settings, self._active_in(slot), clock, self.store,
                         slot=slot, on_warm=self.queue.set_warm,
                         startup_cleanups=startup_cleanups)
                     for slot in range(1, settings.slots + 1)]
        self.lab = self.labs[0]  # the one lab of a one-slot server (the seed's views show it)
        self.stopping = threading.Event()
        self.systemd = SystemdReporter(notifier or SystemdNotifier(), self.ops_snapshot,
                                       self.queue.changed, self.stopping)

    def _active_in(self, slot: int) -> Callable[[str], bool]:
        return lambda sid: self.queue.slot_of(sid) == slot

    def lab_of(self, sid: str) -> "Lab":
        """The lab of the slot the active ``sid`` holds (423 if it no longer is active)."""
        slot = self.queue.slot_of(sid)
        if slot is None:
            raise HTTPError(423, "session %s is no longer active" % sid)
        return self.labs[slot - 1]

    # -- start and stop --
    def restore(self, existed: bool) -> None:
        """Start-up: the state a previous server saved, reconciled with what netlab runs.
        Sessions keep their ids and order, each with a full timeout from now."""
        saved = self.store.load()
        shutil.rmtree(self.checks_dir(), ignore_errors=True)  # a check a crash cut short
        self.events.restore(saved.events)
        with self.queue.lock:
            self.queue.holds.restore(saved.hold_times)
        now = time.time()
        ended = self.queue.restore([(sid, max(0.0, now - created),
                                     None if activated is None else max(0.0, now - activated),
                                     saved_session_meta(meta), slot)
                                    for sid, created, activated, meta, slot in saved.sessions])
        for sid, why in ended:
            log.warning("session ended: %s", why, extra={"ctx": log_context(sid, None)})
            self._session_gone(sid, True, why)
        plans = [self._restore_lab(lab, saved) for lab in self.labs]
        if existed:
            was = {"stop": "a stop", "reload": "a reload"}.get(saved.previous_exit or "stop",
                                                                "a crash (no clean stop)")
            self.store.bump("restarts_after_" + {"a stop": "stop", "a reload": "reload"}.get(
                was, "crash"))
            self.store.bump("sessions_restored", len(saved.sessions))
            for p in plans:
                if p.adopt is not None or p.lost:
                    self.store.bump("labs_adopted" if p.adopt is not None else "labs_lost")
            self.events.restarted(len(saved.sessions), plans, was)
            adopted, lost = (sum(bool(getattr(p, k)) for p in plans) for k in ("adopt", "lost"))
            log.info("restored the state of %s: %d session(s), %s", was, len(saved.sessions),
                     "%d lab(s) adopted, %d lost" % (adopted, lost) if len(plans) > 1 else
                     "lab adopted" if adopted else "lab lost" if lost else "no lab")
        self.store.set_meta("exit", "running")  # until a clean stop says otherwise

    def _restore_lab(self, lab: "Lab", saved: SavedState) -> RestorePlan:
        """One slot's lab at start-up (Lab.restore); adopted for a session that ended just
        before a crash, it is released as at that end."""
        plan = lab.restore(saved.labs.get(lab.slot), saved.unclean,
                           saved.procs if lab.slot == 1 else [])
        holder = lab.info.holder
        if plan.adopt is not None and holder and plan.adopt.warm_until is None \
                and self.queue.slot_of(holder) != lab.slot:  # it ended just before a crash
            lab.session_ended(holder)
        return plan

    def stop(self, teardown: bool, how: str = "stop") -> None:
        """Stop serving state changes (the listener has stopped accepting): `up`s in flight are
        killed (their acquires answer 503), long-polls answer now, what is under way finishes;
        with ``teardown`` the lab goes, else it stays for the next start to adopt. ``how``
        ("stop", "reload") is saved for the next start's restart event."""
        self.stopping.set()
        self.runner.abort()  # a hung `up` must not hold the exit for --up-timeout
        self.queue.close()  # long-polls answer now (their current state)
        for lab in self.labs:
            lab.shutdown(teardown)
        self.store.set_meta("exit", how)

    # -- session lifecycle --
    def end_session(self, sid: str, why: str) -> None:
        was_active, promoted = self.queue.remove(sid)
        self._session_gone(sid, was_active, why)
        if promoted:
            log.info("promoted to active", extra={"ctx": log_context(promoted, None)})

    def _session_gone(self, sid: str, was_active: bool, why: str, expired: bool = False) -> None:
        """After the queue dropped ``sid`` (ended or expired): count, record and log it; an
        active session's lab is released (torn down or kept warm)."""
        kind = "expired" if expired else "ended"
        self.metrics.count("sessions_" + kind)
        self.events.session_gone(sid, was_active, why, expired)
        log.log(logging.WARNING if expired else logging.INFO, "session %s (%s)%s", kind, why,
                " [was active]" if was_active else "", extra={"ctx": log_context(sid, None)})
        if was_active:
            self._save_hold_times()
            self._release_labs(sid)

    def _release_labs(self, sid: str) -> None:
        """The active ``sid`` ended: each lab it holds is released (Lab.session_ended; a
        session that moved to a warm slot may have held another slot's lab before)."""
        for lab in self.labs:
            lab.session_ended(sid)

    def _save_hold_times(self) -> None:
        """The recent hold times to disk (the estimated waits survive a restart)."""
        with self.queue.lock:
            times = list(self.queue.holds.times)
        self.store.set_meta(HOLD_TIMES_KEY, json.dumps(times))

    def _end_overheld(self) -> None:
        """Housekeeping: the active session held the lab longer than --max-hold: ended as if
        it had expired (counted, logged and listed so; its lab handled as on any end)."""
        for sid in iter(self.queue.end_overheld, None):
            limit = self.settings.max_hold
            self.metrics.count("sessions_expired")
            self.events.session_overheld(sid, limit)
            log.warning("session ended: held the lab longer than %s (--max-hold)",
                        fmt_duration(limit), extra={"ctx": log_context(sid, None)})
            self._save_hold_times()
            self._release_labs(sid)

    def _waiter_dropped(self, session) -> None:
        """SessionQueue hook (queue lock held): a waiter was silent past the active timeout when
        its turn came, and was dropped. Counted, logged and listed as an expiry; the event waits
        with the promotions so that the end/expiry that caused it is listed first."""
        why = "no sign of life for %s when its turn came" % fmt_duration(
            self.queue.clock() - session.last_seen)
        self.metrics.count("sessions_expired")
        log.warning("session expired (%s)", why, extra={"ctx": log_context(session.id, None)})
        self.events.waiter_dropped(session.id, why)

    def _session_activated(self, session) -> None:
        """SessionQueue hook (queue lock held): a session became the active one."""
        waited = max(0.0, (session.activated or session.created) - session.created)
        self.metrics.queue_wait(waited)
        self.events.session_active(session.id, waited,
                                   session.slot if self.settings.slots > 1 else None)

    def _session_overtook(self, session, overtaken, fingerprint: str) -> None:
        """SessionQueue hook (queue lock held): affinity promoted ``session`` ahead of
        ``overtaken`` for the warm lab ``fingerprint`` (its topology name, if known)."""
        lab = self.labs[session.slot - 1].info
        name = lab.topology if lab.fingerprint == fingerprint and lab.topology \
            else fingerprint[:SHORT_ID]
        self.metrics.count("sessions_overtaking")
        log.info("promoted ahead of %d session(s) for the warm lab %s", len(overtaken), name,
                 extra={"ctx": log_context(session.id, None)})
        self.events.session_overtook(session.id, len(overtaken), name)

    def _netlab_done(self, verb: str, seconds: float, error: Optional[str], ctx: str) -> None:
        """NetlabRunner hook: a netlab command finished or failed."""
        self.metrics.netlab_done(verb, seconds, error)
        self.events.netlab_done(verb, seconds, error, ctx)

    def housekeeping_once(self) -> None:
        for sid, was_active in self.queue.expire():
            self._session_gone(sid, was_active, "no sign of life", expired=True)
        self._end_overheld()
        for lab in self.labs:
            lab.expire_warm()
            lab.retry_unclean_due()

    def resume(self) -> None:
        """Undo stop(teardown=False): a reload that could not exec serves on. The threads that
        ended with the stop (housekeeping, sd-status) have ended before ``stopping`` is cleared;
        the caller starts them again."""
        for thread in threading.enumerate():
            if thread.name in ("housekeeping", "sd-status"):
                thread.join(5)
        self.stopping.clear()
        self.queue.reopen()
        self.runner.reopen()
        self.store.set_meta("exit", "running")

    def cadence(self) -> float:
        """~5 s busy, ~15 s one active session, ~30 s idle; shorter for short timeouts."""
        n = len(self.queue)
        base = 30.0 if n == 0 else 15.0 if n == 1 else 5.0
        limits = [self.settings.waiting_timeout, self.settings.active_timeout,
                  self.settings.max_hold]
        if self.settings.keep_warm > 0:
            limits.append(self.settings.keep_warm)
        return max(0.05, min([base] + [t / 4.0 for t in limits if t > 0]))

    # -- handlers: each takes a Request and returns a Response --
    def respond(self, endpoint: "Endpoint", request: "Request") -> "Response":
        """The answer to ``request`` (routed to ``endpoint``): its session checked as declared,
        then its handler; an exception becomes an error answer here."""
        try:
            request.session = self.resolve_session(endpoint, request)
            return getattr(self, endpoint.name)(request)
        except Exception as e:
            return error_response(e, request.method, request.path)

    def authenticate(self, endpoint: "Endpoint", request: "Request") -> Optional[User]:
        """The request's user with --auth-file (401 without valid credentials), else None."""
        if self.auth is None or endpoint.public:
            return None
        return self.auth.user_for(request.header("Authorization"))  # (counted as 401s)

    def owns(self, user: Optional[User], sid: str) -> bool:
        """``user`` created ``sid`` (always true without --auth-file). UnknownSession: 404."""
        return user is None or self.queue.meta(sid).get("user") == user.name

    def check_owner(self, request: "Request", sid: str, admin_too: bool = False) -> None:
        """403 unless the request's user owns ``sid`` (or, ``admin_too``, is an admin)."""
        user = request.user
        if self.owns(user, sid) or (admin_too and user.admin):
            return
        owner = self.queue.meta(sid).get("user")
        raise HTTPError(403, "session %s belongs to %s: only its owner%s may use it" % (
            sid[:SHORT_ID], owner or "nobody (it was created without a token)",
            " or an admin" if admin_too else ""))

    def resolve_session(self, endpoint: "Endpoint", request: "Request") -> Optional[str]:
        """The session ``endpoint`` needs (400 none named, 404 unknown, 403 another user's,
        423 not active), or None.

        On an endpoint whose requests are signs of life each session named (header or path) is
        touched, once, if the caller owns it; a monitor or a status page sending the header
        along keeps nobody alive.
        """
        named = request.named_session
        if endpoint.session == NO_SESSION:
            if endpoint.sign_of_life:
                for sid in {named, request.params.get("session_id")} - {None}:
                    try:
                        if self.owns(request.user, sid):
                            self.queue.touch(sid)
                    except UnknownSession:
                        pass  # its handler answers 404 where that matters
            return None
        if not named:
            raise HTTPError(400, "missing X-Session-ID header")
        self.check_owner(request, named, admin_too=endpoint.name == "delete_lab")
        status, _ = self.queue.state(named, touch=endpoint.sign_of_life
                                     and self.owns(request.user, named))  # not an admin's
        if endpoint.session == ACTIVE_SESSION and status != "active":
            raise HTTPError(423, "session %s is not active (still waiting in the queue)" % named)
        return named

    @endpoint("GET", "/", openapi={
        "tags": ["server"], "summary": "Service summary (JSON), or the status page for browsers",
        "description": "With `Accept: text/html` (a browser) the self-contained status page: lab "
                       "holder, queue, lab devices, recent events; it refreshes itself through "
                       "`GET /status?wait=`. Any other client gets the JSON summary.",
        "parameters": [{"name": "Accept", "in": "header", "required": False,
                        "schema": {"type": "string"},
                        "description": "`text/html` selects the status page."}],
        "responses": {"200": {"description": "Summary, or the status page.", "content": {
            "application/json": {"schema": _ref("Summary"), "example": {
                "service": "remote-lab", "version": __version__, "uptime": 12.5,
                "queue_length": 1, "active_session": _SESSION_EXAMPLE,
                "lab": {"state": "running", "topology": "topology.yml", "ref_count": 1,
                        "devices": ["r1", "r2"]}, "docs": "/docs", "pid": 4242,
                "simulated": False, "netlab": "/usr/local/bin/netlab"}},
            "text/html": {"schema": {"type": "string"}}}}}})
    def get_root(self, request):
        if "text/html" in (request.header("Accept") or ""):  # a browser: the status page
            return self.get_status_page(request)
        summary = {"service": "remote-lab", "version": __version__,
                   "uptime": round(time.monotonic() - self.started_mono, 3),
                   "queue_length": len(self.queue),
                   "active_session": self.shown_id(request, self.queue.active_id()),
                   "lab": self.lab_summary(), "docs": "/docs",
                   # which server this is: clients show it, and local mode compares it
                   "pid": os.getpid(), "simulated": self.settings.simulate,
                   "netlab": "simulated (built into remote_lab.py)"
                   if self.settings.simulate else self.settings.netlab}
        if self.settings.slots > 1:  # additive: a one-slot server answers as before
            holders = self.queue.active_ids()
            summary["slots"] = self.settings.slots
            summary["labs"] = [dict(self.lab_summary(lab), slot=lab.slot,
                                    session=self.shown_id(request, holders.get(lab.slot)))
                               for lab in self.labs]
        return Response(200, summary)

    def shown_id(self, request: "Request", sid: Optional[str]) -> Optional[str]:
        """``sid`` in full for whoever may see it (without --auth-file: everyone), else its
        first SHORT_ID characters."""
        if sid is None or request.user is None:
            return sid
        try:
            meta = self.queue.meta(sid)
        except UnknownSession:  # it ended meanwhile
            meta = {}
        return sid if sees_session(request.user, meta) else sid[:SHORT_ID]

    def lab_summary(self, lab: Optional["Lab"] = None):
        s = (lab or self.lab).snapshot()
        return {"state": s["state"], "topology": s["topology"], "ref_count": s["ref_count"],
                "devices": [d["name"] for d in s["devices"]]}

    @endpoint("GET", "/healthz", public=True, openapi={
        "tags": ["server"], "summary": "Liveness probe", "responses": {"204": _NO_CONTENT}})
    def get_healthz(self, request):
        return Response(204)

    @endpoint("GET", "/debug/health", openapi={
        "tags": ["server"], "summary": "Detailed health: sessions, lab, netlab call counts",
        "description": "`sessions` is the number of sessions in the queue (an integer, as the "
                       "seed's server answers it); `session_list` lists them in queue order. "
                       "Never counts as a session's sign of life.",
        "responses": {"200": _json_response("Server state.", _ref("DebugHealth"))}})
    def get_debug_health(self, request):
        sessions = self.queue.snapshot()
        labs = [lab.snapshot() for lab in self.labs]
        if request.user is not None:  # others' sessions by short id only
            for s in sessions:
                if not sees_session(request.user, s):
                    s["session_id"] = s["session_id"][:SHORT_ID]
            for lab in labs:
                lab["holder"] = self.shown_id(request, lab["holder"])
        # "sessions" is a count, as the seed's server answers (monitoring reads it); the list
        # goes under its own key
        health = {"status": "ok", "timestamp": time.time(),
                  "uptime": round(time.monotonic() - self.started_mono, 3),
                  "sessions": len(sessions), "session_list": sessions,
                  "queue_length": len(sessions),
                  "lab": labs[0], "version": __version__,
                  "netlab_calls": dict(self.metrics.netlab_calls),
                  "netlab_failures": dict(self.metrics.netlab_failures),
                  "counters": dict(self.metrics.counters)}
        if self.settings.slots > 1:  # additive: a one-slot server answers as before
            health["slots"] = self.settings.slots
            health["labs"] = [dict(lab, slot=k) for k, lab in enumerate(labs, 1)]
        return Response(200, health)

    @endpoint("POST", "/session", body=JSON_BODY, openapi={
        "tags": ["sessions"], "summary": "Join the queue",
        "description": "Creates a session at the end of the queue; the head of the queue is "
                       "active at once. The optional JSON body says who and why (shown on the "
                       "status page, in `/status` and `GET /session/{session_id}`); with "
                       "`--auth-file` the owner is always the authenticated user. It may also "
                       "declare the lab the session will ask for: `fingerprint`, the SHA-256 "
                       "hex of its upload (the recipe of `POST /lab`'s reuse), kept in "
                       "lowercase and shown by `GET /session/{session_id}`.",
        "requestBody": {"required": False, "content": {"application/json": {
            "schema": _ref("SessionRequest"),
            "example": {"owner": "alice@laptop", "note": "CI: core-routing #812",
                        "link": "https://ci.example.com/jobs/812",
                        "fingerprint": _FINGERPRINT_EXAMPLE}}}},
        "responses": {
            "201": _json_response("Session created.", _ref("SessionCreated"),
                                  {"session_id": _SESSION_EXAMPLE, "position": 0,
                                   "status": "active"}),
            "400": _error("The body is not a JSON object of short strings (owner up to 64 "
                          "characters, note 200, link 500 and an http(s) URL, fingerprint "
                          "64 hex characters).",
                          "link must be an http:// or https:// URL, not 'javascript:1'"),
            "429": _error("The queue is full (`--max-queue`).", "queue is full (1000 sessions)")}})
    def post_session(self, request):
        meta = parse_session_body(request.body or b"")  # BadRequest: 400
        if request.user is not None:  # with tokens the owner is who authenticated
            meta["owner"] = meta["user"] = request.user.name
        sid, pos = self.queue.create(meta)  # QueueFull: 429
        self.metrics.count("sessions_created")
        log.info("created session (position %d)%s", pos,
                 " for %s" % meta["owner"] if meta.get("owner") else "",
                 extra={"ctx": log_context(sid, None)})
        return Response(201, {"session_id": sid, "position": pos,
                              "status": "active" if pos == 0 else "waiting"})

    @endpoint("GET", "/session/{session_id}", sign_of_life=True, openapi={
        "tags": ["sessions"], "summary": "Status and position (long-poll with `wait`)",
        "description": "Counts as a sign of life. The answer says who and why, the lab "
                       "fingerprint the session declared (`fingerprint`, null if none) and "
                       "its times. With `wait` the answer is held until the "
                       "status or position changes or `wait` seconds pass; it comes at once "
                       "when the session is active, or when `position` (the position the "
                       "caller last saw) differs from the current one.",
        "parameters": [_SID_PATH, {"name": "wait", "in": "query", "required": False,
                                   "schema": {"type": "number", "minimum": 0, "maximum": 60},
                                   "description": "Seconds to wait for a change (0-60)."},
                       {"name": "position", "in": "query", "required": False,
                        "schema": {"type": "integer"},
                        "description": "With `wait`: the position the caller last saw."}],
        "responses": {
            "200": _json_response("Session state.", _ref("SessionState"),
                                  {"session_id": _SESSION_EXAMPLE, "status": "waiting",
                                   "position": 2}),
            "400": _error("`wait` is not a number between 0 and 60, or `position` is not "
                          "an integer.", "wait must be a number of seconds (0-60)"),
            "404": _SID_ERRORS["404"]}})
    def get_session(self, request):
        sid = request.params["session_id"]
        wait = request.query.get("wait")
        if wait is None:
            status, pos = self.queue.state(sid, touch=False)  # touched by resolve_session
        else:
            seconds = wait_seconds(wait)
            known = request.query.get("position")
            try:
                known = None if known is None else int(known)
            except ValueError:
                raise HTTPError(400, "position must be an integer") from None
            own = self.owns(request.user, sid)  # another user's long-poll keeps nobody alive
            if own:
                self.queue.pin(sid)
            try:
                status, pos = self.queue.wait_change(sid, seconds, known, touch=own)
            finally:
                if own:
                    self.queue.unpin(sid)
        return Response(200, self.session_fields(request, sid, status, pos))

    def session_fields(self, request: "Request", sid: str, status: str, pos: int) -> dict:
        """GET /session/{id}'s answer: the seed's three fields, then who and why, the lab it
        declared and for how long (additive)."""
        meta, held = self.queue.meta(sid), self.queue.held(sid)
        eta = self.queue.eta(pos) if status == "waiting" else None
        return {"session_id": sid if sees_session(request.user, meta) else sid[:SHORT_ID],
                "status": status, "position": pos, "owner": meta.get("owner"),
                "note": meta.get("note"), "link": meta.get("link"),
                "fingerprint": meta.get(SESSION_FINGERPRINT),
                "held_s": None if held is None else round(held, 1),
                "eta_s": 0 if status == "active" else eta,
                "hold_left_s": _rounded(hold_left_after(self.settings.max_hold, held)),
                "slot": self.queue.slot_of(sid)}

    @endpoint("DELETE", "/session/{session_id}", sign_of_life=True, openapi={
        "tags": ["sessions"], "summary": "Leave the queue",
        "description": "If the session was active its lab is torn down (or kept warm) and the "
                       "next session promoted.",
        "parameters": [_SID_PATH],
        "responses": {"204": _NO_CONTENT, "404": _SID_ERRORS["404"]}})
    def delete_session(self, request):
        sid = request.params["session_id"]
        self.check_owner(request, sid, admin_too=True)  # 404 unknown, 403 another's
        if self.owns(request.user, sid):
            self.end_session(sid, "deleted by client")
        else:  # an admin's kick: the lab is handled as on any session end
            log.warning("session %s kicked by admin %s", sid[:SHORT_ID], request.user.name,
                        extra={"ctx": log_context(sid, None)})
            self.end_session(sid, "kicked by admin %s" % request.user.name)
        return Response(204)

    @endpoint("GET", "/sessions", openapi={
        "tags": ["sessions"], "summary": "Every session: status, position, slot, owner",
        "description": "Never counts as a session's sign of life.",
        "responses": {"200": _json_response("The sessions.", _ref("SessionList"), {
            "slots": 2, "sessions": [
                {"session_id": _SESSION_EXAMPLE, "status": "active", "position": 0, "slot": 1,
                 "owner": "alice@laptop"},
                {"session_id": "9c1d44e0", "status": "waiting", "position": 1, "slot": None,
                 "owner": "bob@ci"}]})}})
    def get_sessions(self, request):
        listed = []
        for s in self.queue.snapshot():
            shown = request.user is None or sees_session(request.user, s)
            listed.append({"session_id": s["session_id"] if shown else s["session_id"][:SHORT_ID],
                           "status": s["status"], "position": s["position"], "slot": s["slot"],
                           "owner": s["owner"]})
        return Response(200, {"slots": self.settings.slots, "sessions": listed})

    @endpoint("POST", "/session/heartbeat", session=ANY_SESSION, sign_of_life=True, openapi={
        "tags": ["sessions"], "summary": "Sign of life (waiting sessions too)",
        "responses": {"204": _NO_CONTENT}})
    def post_heartbeat(self, request):
        return Response(204)  # resolve_session touched it

    @endpoint("GET", "/active-session", openapi={
        "tags": ["sessions"], "summary": "The active session",
        "responses": {
            "200": _json_response("The head of the queue.", _ref("SessionState"),
                                  {"session_id": _SESSION_EXAMPLE, "status": "active",
                                   "position": 0}),
            "404": _error("The queue is empty.", "no active session")}})
    def get_active_session(self, request):
        sid = self.queue.active_id()
        if sid is None:
            raise HTTPError(404, "no active session")
        return Response(200, {"session_id": self.shown_id(request, sid), "status": "active",
                              "position": 0})

    @endpoint("POST", "/lab", session=ACTIVE_SESSION, body=MULTIPART_BODY, sign_of_life=True,
              openapi={
        "tags": ["lab"], "summary": "Upload a topology and acquire the lab",
        "description": "Acquisition rules: no lab → `netlab up`; same fingerprint and "
                       "`reuse=true` → ref count + 1; same fingerprint, `reuse=false`, ref count 0 → "
                       "restart; other topology, ref count 0 → tear down and start it; otherwise "
                       "423. The fingerprint is a SHA-256 over the topology and the extra files.",
        "parameters": [{"name": "reuse", "in": "query", "required": False,
                        "schema": {"type": "string", "enum": ["true", "false"]},
                        "description": "Used when the form has no `reuse` field."}],
        "requestBody": {"required": True, "content": {"multipart/form-data": {
            "schema": {"type": "object", "required": ["topology"], "properties": {
                "topology": _TOPOLOGY_PART,
                "reuse": {"type": "string", "enum": ["true", "false"], "default": "true",
                          "description": "Reuse a running lab with the same fingerprint."},
                "extra_files": {"type": "array", "items": _FILE_PART,
                    "description": "Files next to the topology; their file names keep relative "
                                   "directories (no absolute paths, no '..')."}}},
            "encoding": {"topology": {"contentType": "application/octet-stream"},
                         "extra_files": {"contentType": "application/octet-stream"}}}}},
        "responses": {
            "200": _json_response("The lab is up (started or reused).", _ref("LabAcquired"),
                                  {"reused": False, "devices": [_DEVICE_EXAMPLE]}),
            "400": _error("Missing `X-Session-ID`, or a bad upload: not multipart, no boundary, "
                          "no Content-Length, malformed body, unexpected field, unsafe or "
                          "duplicate file name, topology not .yml/.yaml or named so that netlab "
                          "would misread it (`package:`, `*`, `?`, `[`), bad `reuse` value.",
                          "topology 'lab.txt' must be a .yml or .yaml file"),
            "413": _UPLOAD_TOO_LARGE,
            "423": _error("The session is not active (or no longer), or the lab is busy with "
                          "another topology.", "Lab currently busy: a.yml is in use (ref count 1)"),
            "502": _error("netlab failed; the detail carries the tail of its output.",
                          "netlab up ./topology.yml failed (exit 1)\n--- netlab output (last "
                          "lines) ---\n..."),
            "503": _error("The lab host has no room left to store the upload (disk or quota "
                          "full).", "no room to store the upload in /var/lib/remote-lab/labs: "
                          "No space left on device"),
            "504": _error("netlab timed out (`--up-timeout`, `--netlab-timeout`).",
                          "netlab up ./topology.yml timed out after 1800 s")}})
    def post_lab(self, request):
        sid = request.session
        self.queue.pin(sid)  # a long upload or netlab up must not expire the session (it may
        try:                 # have ended right after resolve_session: UnknownSession, 404)
            try:
                upload = receive_upload(request.body, request.headers, self.lab_of(sid).labs_dir,
                                        self.settings.max_upload_bytes)
            except BadRequest as e:  # the rest of the body is unread
                raise HTTPError(e.status, str(e), close=True) from None
            self.metrics.count("upload_bytes", upload.size)
            set_log_context(sid, upload.topology)
            try:
                reuse = parse_bool(upload.fields.get("reuse", request.query.get("reuse") or "true"),
                                   "reuse")
                lab = self._lab_for_upload(sid, upload, reuse)
            except BaseException:
                upload.discard()
                raise
            try:
                reused, devices = lab.acquire(sid, upload, reuse)
            except BadRequest as e:
                raise HTTPError(400, str(e)) from None
            except LabBusy as e:
                raise HTTPError(423, str(e)) from None
            return Response(200, {"reused": reused, "devices": devices})
        finally:
            self.queue.unpin(sid)

    def _lab_for_upload(self, sid: str, upload: Upload, reuse: bool) -> "Lab":
        """The lab ``sid`` acquires: its slot's; with several slots, a free slot's warm lab
        that runs what it uploaded instead, unless it holds its own slot's lab already."""
        lab = self.lab_of(sid)  # 423 once it is no longer active
        if self.settings.slots == 1 or not reuse:
            return lab
        mine = lab.snapshot()
        if (mine["holder"] == sid and mine["ref_count"] > 0) or \
                (mine["running"] and mine["fingerprint"] == upload.fingerprint):
            return lab
        slot = self.queue.take_warm_slot(sid, upload.fingerprint)
        if slot is None:
            return lab
        lab = self.labs[slot - 1]
        log.info("taking over the warm lab of slot %d", slot, extra={"ctx": log_context(sid, None)})
        self.events.session_moved(sid, slot, upload.topology)
        upload.move_to(lab.labs_dir)
        return lab

    @endpoint("POST", "/lab/check", body=MULTIPART_BODY, openapi={
        "tags": ["lab"], "summary": "Check a topology with netlab, without acquiring the lab",
        "description": "The same multipart body as `POST /lab` (a `reuse` field is ignored). "
                       "The upload goes to a scratch dir under the state dir (removed afterwards) "
                       "where `netlab create -o json:nodes=-` validates it, writing no files. "
                       "Needs no session: `X-Session-ID` is not looked at, so a waiting session "
                       "(or a client before queueing) checks its topology early. At most %d "
                       "checks run at once." % MAX_CHECKS,
        "requestBody": {"required": True, "content": {"multipart/form-data": {
            "schema": {"type": "object", "required": ["topology"], "properties": {
                "topology": _TOPOLOGY_PART,
                "extra_files": {"type": "array", "items": _FILE_PART,
                    "description": "Files next to the topology, as for `POST /lab`."}}}}}},
        "responses": {
            "200": _json_response("netlab accepts the topology.", _ref("TopologyCheck"),
                                  {"ok": True, "nodes": ["r1", "r2"]}),
            "400": _error("A bad upload (as for `POST /lab`).",
                          "topology 'lab.txt' must be a .yml or .yaml file"),
            "413": _UPLOAD_TOO_LARGE,
            "422": _error("netlab rejects the topology; the detail carries its error tail.",
                          "netlab rejects topology.yml:\nIncorrectValue in links: Link string "
                          "r1-r3 in links[1] refers to an unknown node r3\n..."),
            "429": _error("%d checks are running already; retry in a moment." % MAX_CHECKS,
                          "too many topology checks at once (2); retry in a moment"),
            "503": _error("No room to store the upload, or the server is stopping.",
                          "no room to store the upload in ..."),
            "504": _error("netlab timed out (`--netlab-timeout`).",
                          "netlab create ... timed out after 300 s")}})
    def post_lab_check(self, request):
        if not self.checks.acquire(blocking=False):  # the body is unread: close after answering
            raise HTTPError(429, "too many topology checks at once (%d); retry in a moment"
                            % MAX_CHECKS, headers=[("Retry-After", "1")], close=True)
        try:
            try:
                upload = receive_upload(request.body, request.headers, self.checks_dir(),
                                        self.settings.max_upload_bytes)
            except BadRequest as e:
                raise HTTPError(e.status, str(e), close=True) from None
            try:
                nodes = self.runner.check_topology(upload.workdir, upload.topology,
                                                   ctx="check " + upload.topology)
            except NetlabError as e:
                if e.timed_out or e.aborted:
                    raise
                raise HTTPError(422, "netlab rejects %s:\n%s" % (
                    upload.topology, e.output.strip() or str(e))) from None
            finally:
                upload.discard()
            return Response(200, {"ok": True, "nodes": nodes})
        finally:
            self.checks.release()

    def checks_dir(self) -> str:
        return os.path.join(self.settings.state_dir, "checks")

    @endpoint("GET", "/lab", session=ACTIVE_SESSION, sign_of_life=True, openapi={
        "tags": ["lab"], "summary": "The lab's state",
        "responses": {"200": _json_response("Lab state.", _ref("LabState"))}})
    def get_lab(self, request):
        s = self.lab_of(request.session).snapshot()
        return Response(200, {"running": s["running"], "topology": s["topology"],
                              "ref_count": s["ref_count"], "devices": s["devices"],
                              "netlab_status": s["state"], "last_error": s["last_error"],
                              "fingerprint": s["fingerprint"] if s["running"] else None})

    @endpoint("GET", "/lab/devices", session=ACTIVE_SESSION, sign_of_life=True, openapi={
        "tags": ["lab"], "summary": "Devices of the running lab",
        "responses": {
            "200": _json_response("Devices with netlab's raw node data.",
                                  {"type": "array", "items": _ref("Device")}, [_DEVICE_EXAMPLE]),
            "404": _error("Unknown session, or no lab is running.", "no lab is running")}})
    def get_lab_devices(self, request):
        return Response(200, self.lab_of(request.session).devices())  # NoLab: 404

    @endpoint("POST", "/lab/release", session=ACTIVE_SESSION, sign_of_life=True, openapi={
        "tags": ["lab"], "summary": "Drop one reference (the lab stays up, idle at 0)",
        "responses": {
            "204": _NO_CONTENT,
            "404": _error("Unknown session, or no lab is running.", "no lab is running")}})
    def post_lab_release(self, request):
        self.lab_of(request.session).release(request.session)  # NoLab: 404
        return Response(204)

    @endpoint("DELETE", "/lab", session=ACTIVE_SESSION, sign_of_life=True, openapi={
        "tags": ["lab"], "summary": "Tear the lab down (in the background)",
        "parameters": [{"name": "force", "in": "query", "required": False,
                        "schema": {"type": "string", "enum": ["true", "false"],
                                   "default": "true"},
                        "description": "Also when the ref count is above 0."}],
        "responses": {
            "202": _json_response("Teardown started.", _ref("Message"),
                                  {"detail": "lab teardown started"}),
            "204": {"description": "There was no lab."},
            "400": _error("Missing `X-Session-ID`, or `force` is not true/false.",
                          "force must be true or false, not 'maybe'"),
            "409": _error("`force=false` while the ref count is above 0.",
                          "lab is in use (ref count 1); use force=true")}})
    def delete_lab(self, request):
        force = parse_bool(request.query.get("force", "true"), "force")
        sid = request.session
        by = None if self.owns(request.user, sid) else "admin %s" % request.user.name
        if by:  # resolve_session let an admin name another's session
            log.warning("lab destroy requested by %s", by, extra={"ctx": log_context(sid, None)})
        try:
            destroyed = self.lab_of(sid).destroy(sid, force, by)
        except LabBusy as e:
            raise HTTPError(409, str(e)) from None
        if not destroyed:
            return Response(204)
        return Response(202, {"detail": "lab teardown started"})

    # -- operations: the status page and /status, API docs, metrics (parts in section 6) --
    def ops_token(self) -> str:
        """Changes whenever what the status page shows (besides clocks) changes."""
        labs = ".".join("%s.%d.%d" % (lab.info.state, lab.info.ref_count, len(lab.info.devices))
                        for lab in self.labs)
        return "%d.%s.%s" % (self.queue.version, self.events.version(), labs)

    def ops_snapshot(self) -> OpsSnapshot:
        q = self.queue
        with q.lock:
            mono = q.clock()
            sessions = [(s.id, s.created, s.last_seen, s.activated, s.meta)
                        for s in q._sessions.values()]
            waits = q.waits(joining=1)  # and that of a session joining now
            holders = q.active_ids()
        token = self.ops_token()
        now = time.time()
        labs = [self.slot_snapshot(lab) for lab in self.labs]
        events, total = self.events.recent(PAGE_EVENTS)
        return OpsSnapshot(token=token, now=now, mono=mono, sessions=sessions, lab=labs[0],
                           events=events, events_total=total, started=self.started,
                           uptime=time.monotonic() - self.started_mono,
                           timeouts={"waiting": self.settings.waiting_timeout,
                                     "active": self.settings.active_timeout},
                           waits=waits, max_hold=self.settings.max_hold,
                           slots=self.settings.slots, labs=labs, holders=holders)

    @staticmethod
    def slot_snapshot(lab: "Lab") -> dict:
        """Lab.snapshot() with its slot and keep-warm deadline (the queue's clock, or None)."""
        with lab.cond:  # one moment for all
            snap = lab.snapshot()
            warm_until = lab.info.warm_until if lab.info.state == RUNNING else None
        return dict(snap, slot=lab.slot, warm_until=warm_until)

    @endpoint("GET", "/status", openapi={
        "tags": ["operations"], "summary": "Status page data (long-poll)",
        "description": "What the status page shows, with session ids shortened to 8 characters "
                       "(except the viewer's own, given as `sid`). With `wait` and `since` the "
                       "answer is held until the state token differs from `since` or `wait` "
                       "seconds pass. Never counts as a session's sign of life. `labs` has "
                       "every slot's lab and holder (`--slots N`); `holder` and `lab` are the "
                       "oldest active session and slot 1's lab, `queue` the waiting sessions.",
        "parameters": [
            {"name": "wait", "in": "query", "required": False,
             "schema": {"type": "number", "minimum": 0, "maximum": 60},
             "description": "Seconds to wait for a change of `token` (needs `since`)."},
            {"name": "since", "in": "query", "required": False, "schema": {"type": "string"},
             "description": "The `token` of the last answer."},
            {"name": "sid", "in": "query", "required": False, "schema": {"type": "string"},
             "description": "The viewer's own session id: shown in full and marked as 'you'."}],
        "responses": {
            "200": _json_response("Status snapshot.", _ref("Status")),
            "400": _error("`wait` is not a number between 0 and 60.",
                          "wait must be between 0 and 60 seconds")}})
    def get_status(self, request):
        since = request.query.get("since")
        wait = request.query.get("wait")
        if wait is not None:
            seconds = wait_seconds(wait)
            if since is not None and seconds > 0:
                self.wait_status_change(since, seconds, request.connection)
        view = status_view(self.ops_snapshot(), request.query.get("sid"), request.user)
        view["html"] = render_status_sections(view)  # the page swaps these in (section 9)
        return Response(200, view)

    def wait_status_change(self, since: str, seconds: float, conn=None) -> None:
        """Until the token differs from ``since``, ``seconds`` pass or the client of ``conn``
        goes away (a closed page stops watching at once)."""
        self.metrics.watchers(+1)
        try:
            deadline = time.monotonic() + seconds
            while not self.stopping.is_set() and self.ops_token() == since:
                left = deadline - time.monotonic()
                if left <= 0 or _peer_closed(conn):
                    break
                with self.queue.changed:  # queue changes wake us at once, the rest within 0.5 s
                    self.queue.changed.wait(min(left, 0.5))
        finally:
            self.metrics.watchers(-1)

    def get_status_page(self, request):  # GET / with Accept: text/html
        view = status_view(self.ops_snapshot(), request.query.get("sid"), request.user)
        return Response(200, render_status_page(view), "text/html; charset=utf-8", PAGE_HEADERS)

    @endpoint("GET", "/openapi.json", openapi={
        "tags": ["operations"], "summary": "This OpenAPI 3.1 document",
        "responses": {"200": _json_response("The document.", {"type": "object"})}})
    def get_openapi(self, request):
        return Response(200, openapi_document())

    @endpoint("GET", "/docs", openapi={
        "tags": ["operations"], "summary": "API documentation page with 'try it' forms",
        "responses": {"200": {"description": "A self-contained HTML page.",
                              "content": {"text/html": {"schema": {"type": "string"}}}}}})
    def get_docs(self, request):
        return Response(200, render_docs_page(openapi_document()), "text/html; charset=utf-8",
                        PAGE_HEADERS)

    @endpoint("GET", "/metrics", openapi={
        "tags": ["operations"], "summary": "Prometheus metrics (text exposition format 0.0.4)",
        "responses": {"200": {"description": "Metrics.", "content": {
            "text/plain; version=0.0.4": {"schema": {"type": "string"}, "example":
                "# HELP remote_lab_queue_length Sessions in the queue (active and waiting).\n"
                "# TYPE remote_lab_queue_length gauge\nremote_lab_queue_length 2\n"}}}}})
    def get_metrics(self, request):
        return Response(200, render_metrics(self.metrics, self.ops_snapshot()).encode(),
                        "text/plain; version=0.0.4; charset=utf-8",
                        (("Cache-Control", "no-store"),))


App.endpoints = EndpointTable(App)

MAX_HEADER_LINE = 65536  # http.client's _MAXLINE
MAX_HEADERS = 100  # http.client's _MAXHEADERS
MAX_HEADER_BYTES = 64 * 1024  # all header lines of one request together


class HeadRefused(Exception):
    """A request head refused while it is read, the rest of the request unread:
    handle_one_request() answers ``status`` with this detail, lingers briefly and closes.
    Not an HTTPException (parse_request() answers those itself)."""
    status = 400


class MalformedHeaders(HeadRefused):
    """A header line that is no ``Name: value`` (e.g. a space before the colon): never a head
    read up to that line only (request smuggling, RFC 9112 5.1)."""


class HeadersTooLarge(HeadRefused):
    """More than MAX_HEADER_BYTES of headers."""
    status = 431


_DIGITS = re.compile(r"[0-9]+\Z").match


def body_framing_problem(headers) -> Optional[str]:
    """Why the length of this request's body is ambiguous (RFC 9112 6.1-6.3), or None.

    A proxy in front of us may read such a head differently, and the rest of the body would
    then be taken for the next request (request smuggling).
    """
    index = getattr(headers, "fast_index", None)
    # the usual case, cheaply: no header name given twice (the index has one entry per name)
    if index is not None and len(index) == len(headers) and "transfer-encoding" not in index:
        length = index.get("content-length")
        if length is None or _DIGITS(length.strip(" \t")):
            return None
        return "invalid Content-Length %r: digits only" % length
    lengths = headers.get_all("Content-Length") or []
    codings = headers.get_all("Transfer-Encoding") or []
    if lengths and codings:
        return "Content-Length and Transfer-Encoding together are not allowed"
    if len(lengths) > 1:
        return "more than one Content-Length header"
    if lengths and not _DIGITS(lengths[0].strip(" \t")):
        return "invalid Content-Length %r: digits only" % lengths[0]
    if codings and ",".join(codings).rsplit(",", 1)[-1].strip(" \t").lower() != "chunked":
        return "unsupported Transfer-Encoding %r" % ", ".join(codings)
    return None


class ContinueBeforeBody:
    """The handler's rfile while a ``100 Continue`` is owed: sent just before the body is first
    read, so a request refused before that (unknown session, too large, ...) never gets one."""

    def __init__(self, raw, handler):
        self.raw = raw
        self.handler = handler

    def disarm(self):
        """The plain rfile back (the answer is decided: no 100 Continue any more)."""
        self.handler = None
        return self.raw

    def _continue(self):
        handler = self.handler
        if handler.rfile is self:
            handler.rfile = self.raw
        self.handler = None
        handler.handle_expect_100()

    def read(self, *args):
        if self.handler is not None:
            self._continue()
        return self.raw.read(*args)

    def readline(self, *args):
        if self.handler is not None:
            self._continue()
        return self.raw.readline(*args)

    def readinto(self, buffer):
        if self.handler is not None:
            self._continue()
        return self.raw.readinto(buffer)

    def __getattr__(self, name):  # anything else (peek, read1, closed, ...) as the raw file
        if self.handler is not None and name in ("peek", "read1", "readinto1", "readlines"):
            self._continue()
        return getattr(self.raw, name)


MIN_BODY_RATE = 16 * 1024  # bytes/s a request body must keep up, after a --header-timeout grace


class DeadlineExceeded(socket.timeout):
    """A request's line and headers, or its body, did not arrive in time (DeadlineSocketIO)."""


class DeadlineSocketIO(socket.SocketIO):
    """The raw reader under a handler's rfile: the reads of one request share a deadline.

    ``--socket-timeout`` bounds each read only, so a byte every few seconds kept a worker
    forever. Here a read is also bounded by ``deadline`` (the socket timeout is shortened to
    what is left), and with a ``rate`` each byte read moves the deadline on by 1/rate s (a
    body's minimum rate). A ``pending`` (seconds, message, rate) deadline starts at the first
    read that has to wait for data: a request that arrived in one piece costs no syscall and
    not even a clock reading. A shortened timeout is restored by the first read without a
    deadline (or restore()).
    """

    def __init__(self, sock, idle_timeout: Optional[float]):
        super().__init__(sock, "rb")
        self.idle_timeout = idle_timeout  # the socket's own timeout (--socket-timeout)
        self.shortened = False  # the socket timeout is a deadline's remaining time
        self.deadline = None  # type: Optional[float]  # time.monotonic() value
        self.pending = None  # type: Optional[Tuple[float, str, float]]
        self.rate = 0.0
        self.late = ""  # what DeadlineExceeded says

    def start(self, seconds: float, late: str, rate: float = 0.0) -> None:
        self.deadline = time.monotonic() + seconds if seconds else None
        self.late, self.rate, self.pending = late, rate, None

    def restore(self) -> None:
        self._sock.settimeout(self.idle_timeout)
        self.shortened = False

    def readinto(self, b):
        deadline = self.deadline
        if deadline is None:
            if self.pending is None:  # most reads: SocketIO.readinto inline, not one more call
                if self.shortened:
                    self.restore()
                try:
                    return self._sock.recv_into(b)
                except BlockingIOError:  # a non-blocking socket (--socket-timeout 0)
                    return None
            self.start(*self.pending)
            deadline = self.deadline
            if deadline is None:
                return socket.SocketIO.readinto(self, b)
        left = deadline - time.monotonic()
        if left <= 0:
            raise DeadlineExceeded(self.late)
        if self.idle_timeout is None or left < self.idle_timeout:
            self._sock.settimeout(left)
            self.shortened = True
        elif self.shortened:
            self.restore()
        try:
            n = socket.SocketIO.readinto(self, b)
        except socket.timeout:
            if self.shortened:
                raise DeadlineExceeded(self.late) from None
            raise
        if n and self.rate:
            self.deadline = deadline + n / self.rate
        return n


class FastRequestHead:
    """The request head parsed in place of ``BaseHTTPRequestHandler.parse_request`` and
    ``http.client.parse_headers`` (a mixin of RequestHandler).

    Why it exists: the standard library parses every header block with the email package's
    FeedParser, which costs more than the rest of a poll (one keep-alive client polling: ~105 us
    of server CPU per request with this class, ~165 us with the standard library's parser).
    The request line follows Python 3.11's rules; added are the caps the standard library
    lacks: HTTP/0.9 refused at once, MAX_HEADER_BYTES counted while reading (HeadersTooLarge),
    an ambiguous body length refused (request smuggling), ``100 Continue`` only once the body
    is read (ContinueBeforeBody). Plain ``Name: value`` lines are stored as the email parser
    (compat32 policy) would store them, and indexed by lower-case name (``fast_index``, see
    header_value()); anything else (folded lines, bad names, a ``From `` line, stray CRs) goes
    through the email parser, exactly as before.
    """

    HEADER_LINE = re.compile(r"([!-9;-~]+):([^\r\n]*)(?:\r\n|\n|\r)?\Z")

    @staticmethod
    def read_headers(rfile, message_class=http.client.HTTPMessage):
        """What ``http.client.parse_headers(rfile)`` returns: same limits and exceptions."""
        lines = []
        budget = MAX_HEADER_BYTES
        while True:
            # up to budget + 2 (the final blank line) + 1 (to notice a longer line)
            line = rfile.readline(MAX_HEADER_LINE + 1 if budget >= MAX_HEADER_LINE else budget + 3)
            size = len(line)
            if size > MAX_HEADER_LINE:
                raise http.client.LineTooLong("header line")
            lines.append(line)
            if len(lines) > MAX_HEADERS:
                raise http.client.HTTPException("got more than %d headers" % MAX_HEADERS)
            if line in (b"\r\n", b"\n", b""):
                break
            budget -= size
            if budget < 0:
                raise HeadersTooLarge("request headers too large: more than %d bytes"
                                      % MAX_HEADER_BYTES)
        msg = message_class()
        index = {}
        match = FastRequestHead.HEADER_LINE.match
        for line in lines[:-1]:
            m = match(line.decode("iso-8859-1"))
            if m is None:
                msg = email.parser.Parser(_class=message_class).parsestr(
                    b"".join(lines).decode("iso-8859-1"))
                if msg.defects or msg.get_payload():  # the email parser stopped at a bad line:
                    raise MalformedHeaders(  # what follows it would be silently dropped
                        "malformed header line %r" % line[:100].decode("iso-8859-1"))
                return msg
            name, value = m.group(1), m.group(2).lstrip(" \t")
            msg.set_raw(name, value)
            index.setdefault(name.lower(), value)
        msg.set_payload("")
        msg.fast_index = index  # {lower-case name: what msg.get(name) answers}, see header()
        return msg

    def _request_version(self, version: str) -> bool:
        """Check and take the request line's ``HTTP/x.y`` (400 / 505 answered here if bad)."""
        try:
            if not version.startswith("HTTP/"):
                raise ValueError
            number = version.split("/", 1)[1]
            parts = number.split(".")
            if len(parts) != 2 or any(not c.isdigit() or len(c) > 10 for c in parts):
                raise ValueError
            major_minor = int(parts[0]), int(parts[1])
        except (ValueError, IndexError):
            self.send_error(400, "Bad request version (%r)" % version)
            return False
        if major_minor >= (1, 1) and self.protocol_version >= "HTTP/1.1":
            self.close_connection = False
        if major_minor >= (2, 0):
            self.send_error(505, "Invalid HTTP version (%s)" % number)
            return False
        self.request_version = version
        return True

    def parse_request(self):
        """BaseHTTPRequestHandler.parse_request's contract: True when the head is good (command,
        path, request_version, headers, close_connection set), else False (answered)."""
        self.command = None  # set in case of error on the first line
        self.request_version = self.default_request_version
        self.close_connection = True
        requestline = str(self.raw_requestline, "iso-8859-1").rstrip("\r\n")
        self.requestline = requestline
        words = requestline.split()
        if not words:
            return False
        if len(words) >= 3 and not self._request_version(words[-1]):
            return False
        if not 2 <= len(words) <= 3:
            self.send_error(400, "Bad request syntax (%r)" % requestline)
            return False
        command, path = words[:2]
        if len(words) == 2:  # HTTP/0.9: refused at once (not after waiting for headers)
            self.request_version = "HTTP/1.0"  # a status line and headers on the answer
            self.send_error(400, "HTTP/0.9 requests are not supported (%r): send '%s %s HTTP/1.1'"
                            % (requestline, command, path))
            return False
        self.command, self.path = command, path
        if self.path.startswith("//"):  # gh-87389: no open redirects via //host paths
            self.path = "/" + self.path.lstrip("/")
        try:
            self.headers = self.read_headers(self.rfile, self.MessageClass)
        except http.client.LineTooLong as err:
            self.send_error(431, "Line too long", str(err))
            return False
        except http.client.HTTPException as err:
            self.send_error(431, "Too many headers", str(err))
            return False
        index = getattr(self.headers, "fast_index", None)
        if index is None or "content-length" in index or "transfer-encoding" in index:
            problem = body_framing_problem(self.headers)
            if problem:  # request smuggling: refuse, and never read on after this head
                raise HeadRefused(problem)
        conntype = self.header("Connection", "").lower()
        if conntype == "close":
            self.close_connection = True
        elif conntype == "keep-alive" and self.protocol_version >= "HTTP/1.1":
            self.close_connection = False
        expect = self.header("Expect", "")
        if (expect.lower() == "100-continue" and self.protocol_version >= "HTTP/1.1"
                and self.request_version >= "HTTP/1.1"):
            # not now: only once the handler reads the body, so a refused request gets its
            # final status alone (RFC 9110 10.1.1)
            self.rfile = ContinueBeforeBody(self.rfile, self)
        return True


class RequestHandler(FastRequestHead, http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "remote-lab/" + __version__
    disable_nagle_algorithm = True  # TCP_NODELAY: small responses go out at once
    app = None  # type: App  # set on the subclass made by make_server
    kept_alive = False  # answered a request already (a new connection gets its first answer)

    # -- helpers --
    def header(self, name: str, default=None):
        return header_value(self.headers, name, default)

    _date_cache = (0, "")  # (whole second, Date header)

    def date_time_string(self, timestamp=None):
        """The Date header, formatted once a second (email.utils.formatdate is slow)."""
        if timestamp is not None:
            return super().date_time_string(timestamp)
        now = int(time.time())
        cached = RequestHandler._date_cache
        if cached[0] != now:
            cached = RequestHandler._date_cache = (now, super().date_time_string(now))
        return cached[1]

    def send(self, response: Response) -> None:
        """Headers and body in one write: two small writes stall ~40 ms on Nagle + delayed ACK.

        JSON and empty answers: the bytes of send_response() + send_header()s + end_headers(),
        built in one go (those helpers cost more than the rest of a poll).
        """
        status, body = response.status, response.body
        if response.close or self.server.draining:  # a reload closes every connection
            self.close_connection = True
        if response.content_type is not None and status != 204:  # HTML, metrics, extra headers
            data = body
            self.send_response(status)
            self.send_header("Content-Type", response.content_type)
            for key, value in response.headers:
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            if self.close_connection:
                self.send_header("Connection", "close")
        else:
            if status == 204 or body is None:
                data, head = b"", "Content-Length: 0\r\n"
            else:
                data = json.dumps(body).encode()
                head = "Content-Type: application/json\r\nContent-Length: %d\r\n%s" % (
                    len(data), "Connection: close\r\n" if self.close_connection else "")
            if log.isEnabledFor(logging.DEBUG):
                self.log_request(status)  # as send_response() does
            if self.request_version != "HTTP/0.9":
                message = self.responses[status][0] if status in self.responses else ""
                if not hasattr(self, "_headers_buffer"):
                    self._headers_buffer = []
                self._headers_buffer.append(("%s %d %s\r\nServer: %s\r\nDate: %s\r\n%s" % (
                    self.protocol_version, status, message, self.version_string(),
                    self.date_time_string(), head)).encode("latin-1", "strict"))
        if self.request_version != "HTTP/0.9":  # end_headers() and the body: one send
            self._headers_buffer.append(b"\r\n" + data)
            self.flush_headers()
        elif data:  # HTTP/0.9 (and a bad request line): no status line, no headers
            self.wfile.write(data)

    def _discard_body(self) -> None:
        self._read_body(keep=False)

    def _read_body(self, keep: bool = True) -> bytes:
        """A small body (up to MAX_JSON_BODY): read, and returned if ``keep``."""
        length = self.header("Content-Length")
        if self.header("Transfer-Encoding") is not None:  # chunked (see body_framing_problem)
            self.close_connection = True
            if keep:
                raise HTTPError(400, "a chunked body is not supported here: send Content-Length")
            return b""
        if not length:
            return b""
        try:
            n = int(length)
        except ValueError:
            raise HTTPError(400, "invalid Content-Length") from None
        if n > MAX_JSON_BODY:
            self.close_connection = True
            raise HTTPError(413, "request body too large")
        chunks = []
        while n > 0:
            try:
                chunk = self.rfile.read(min(CHUNK, n))
            except socket.timeout as e:  # not a bug (500): a client too slow or stalled
                self.close_connection = True
                raise HTTPError(400, str(e) if isinstance(e, DeadlineExceeded)
                                else "request body stalled (socket timeout)") from None
            if not chunk:
                break
            n -= len(chunk)
            if keep:
                chunks.append(chunk)
        return b"".join(chunks)

    def setup(self):
        super().setup()
        self.rfile.close()  # makefile()'s reader: replaced by one with deadlines
        self.reader = DeadlineSocketIO(self.connection, self.timeout)
        self.rfile = io.BufferedReader(self.reader, io.DEFAULT_BUFFER_SIZE)
        seconds = self.app.settings.header_timeout
        self.header_deadline = (seconds, "request line and headers not received within %g s "
                                "(--header-timeout)" % seconds, 0.0)
        self.body_deadline = (seconds, "request body too slow: less than %d bytes/s after %g s "
                              "(--header-timeout)" % (MIN_BODY_RATE, seconds), MIN_BODY_RATE)
        self.overflow = self.request in self.server.overflowing  # beyond --max-connections

    def handle(self):
        self.close_connection = True
        reader = self.reader
        reader.start(*self.header_deadline)  # a new connection has no reason to wait
        if is_tls(self.connection) and not self._tls_handshake():
            return
        self.handle_one_request()
        self.kept_alive = True  # from now on it waits between two requests (a reload closes it)
        while not self.close_connection:
            reader.deadline = reader.pending = None  # between requests: --socket-timeout only
            self.handle_one_request()

    def _tls_handshake(self) -> bool:
        """The TLS handshake, here in the connection's thread (one that says nothing holds up
        no other), within --header-timeout. A plain HTTP request gets a plain 400 telling so.
        False: the connection is to be closed (why is logged at debug)."""
        sock, deadline = self.connection, self.reader.deadline  # the header deadline

        def time_left():  # (ssl: a handshake's timeout bounds it as a whole)
            left = None if deadline is None else max(0.001, deadline - time.monotonic())
            return min(left, self.timeout) if left and self.timeout else left or self.timeout
        try:
            sock.settimeout(time_left())
            first = raw_peek(sock)
            if first[:1].isalpha():  # "GET /...": a TLS handshake starts with byte 0x16
                self._plain_http_refused()
                return False
            if first:
                sock.settimeout(time_left())
                sock.do_handshake()
            return bool(first)
        except (OSError, ValueError) as e:  # ssl.SSLError, timeout, reset
            log.debug("TLS handshake with %s failed: %s", self.client_address[0],
                      e if str(e) else type(e).__name__)
            return False
        finally:
            try:
                sock.settimeout(self.timeout)
            except OSError:
                pass

    def _plain_http_refused(self) -> None:
        log.debug("plain HTTP request from %s on the HTTPS port: answered 400",
                  self.client_address[0])
        body = json.dumps({"detail": "this server speaks HTTPS (TLS): use https:// in the "
                           "URL"}).encode()
        head = ("HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\n"
                "Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)).encode()
        try:
            socket.socket.sendall(self.connection, head + body)  # not encrypted, as asked
            raw_shutdown(self.connection, socket.SHUT_WR)
            self.connection.settimeout(0.5)  # the unread request: a reset could eat the answer
            socket.socket.recv(self.connection, CHUNK)
        except OSError:
            pass

    def handle_one_request(self):
        """BaseHTTPRequestHandler.handle_one_request, with the deadlines of DeadlineSocketIO:
        the request line and headers within --header-timeout from their first byte, the body at
        MIN_BODY_RATE after that grace. Past a deadline the connection is dropped."""
        reader = self.reader
        idle = self.server.idle_connections
        try:
            # wait for the request's first byte (peek: the read readline() would do), idle:
            # the server may close this connection to make room (LabHTTPServer.make_room)
            idle[self] = self.connection
            try:  # draining (a reload): kept alive, close unless a request is already there
                ready = (b"" if self.server.draining and self.kept_alive
                         and not request_waiting(self.connection) else self.rfile.peek(1))
            finally:
                mine = idle.pop(self, None) is not None  # atomic: the server may pop it first
            if not (ready and mine):
                self.close_connection = True
                return
            if reader.deadline is None:  # from the request's first byte
                reader.pending = self.header_deadline
            self.raw_requestline = self.rfile.readline(65537)
            if len(self.raw_requestline) > 65536:
                self.requestline = self.request_version = self.command = ""
                self.send_error(http.HTTPStatus.REQUEST_URI_TOO_LONG)
                return
            if not self.raw_requestline:
                self.close_connection = True
                return
            try:
                parsed = self.parse_request()
            except HeadRefused as e:  # the rest of the request is unread
                self.send_error(e.status, str(e))
                self._linger()
                return
            if not parsed:
                return
            if reader.shortened:  # the answer is written with the usual timeout
                reader.restore()
            reader.deadline = None
            reader.pending = self.body_deadline
            if self.overflow and not self._serve_overflow():
                return
            method = getattr(self, "do_" + self.command, None)
            if method is None:
                self.send_error(http.HTTPStatus.NOT_IMPLEMENTED,
                                "Unsupported method (%r)" % self.command)
                return
            method()
            self.wfile.flush()
        except socket.timeout as e:  # a stalled or slow client loses its connection, not a worker
            log.debug("dropping the connection from %s: %s", self.client_address[0],
                      e if isinstance(e, DeadlineExceeded)
                      else "socket timeout (%g s, --socket-timeout)" % self.timeout)
            self.close_connection = True
        except ConnectionError as e:  # reset or broken by the client: nothing to answer
            log.debug("connection from %s lost: %s", self.client_address[0], e)
            self.close_connection = True
        except OSError as e:
            if not is_tls(self.connection):
                raise
            log.debug("TLS connection from %s failed: %s", self.client_address[0], e)
            self.close_connection = True

    def _serve_overflow(self) -> bool:
        """A connection beyond --max-connections: /healthz is answered, anything else gets 503."""
        self.close_connection = True
        if self.command == "GET" and self.path == "/healthz":
            return True
        detail = json.dumps({"detail": "too many connections (--max-connections %d): try again "
                             "later" % self.server.connection_cap}).encode()
        self.send(Response(503, detail, "application/json", [("Retry-After", "1")]))
        if self._has_body():
            self._linger()
        return False

    def _has_body(self) -> bool:
        """The request announces a body (which may be left unread by an early answer)."""
        return bool(self.header("Transfer-Encoding")
                    or self.header("Content-Length", "0").strip() not in ("", "0"))

    def dispatch(self):
        app = self.app
        set_log_context(None)
        started = time.monotonic()
        endpoint = None
        try:
            path, query = split_target(self.path)
            endpoint, params = app.endpoints.match(self.command, path)  # 404, 405
            response = app.respond(endpoint, self._request(endpoint, path, query, params))
        except Exception as e:  # routing, the request checks of _request()
            response = error_response(e, self.command, self.path)
        if type(self.rfile) is ContinueBeforeBody:  # body never read: no 100 Continue
            self.rfile = self.rfile.disarm()
        # no formatting here: /metrics labels it; 404/405 are "unmatched" (section 6)
        app.metrics.http_request(endpoint.name if endpoint else "unmatched", response.status)
        if response.status >= 400 and self._has_body():
            # an error may leave the body unread (POST /lab refused before its upload, 404/405):
            # close rather than parse the rest of it as the next request on this connection
            response.close = unread_body = True
        else:
            unread_body = False
        try:
            if self.reader.shortened:  # the answer gets --socket-timeout, not what was left
                self.reader.restore()  # of the body's deadline
            self.send(response)
            if unread_body:
                self._linger()
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        log.debug("%s %s -> %d (%.1f ms)", self.command, self.path, response.status,
                  (time.monotonic() - started) * 1000)

    def _request(self, endpoint: Endpoint, path: str, query: Dict[str, str],
                 params: Dict[str, str]) -> Request:
        """The Request for ``endpoint``, after the checks every request gets: a foreign web
        page's (403), a body where none is expected (read and dropped: 400 / 413)."""
        self.app.request_guard.check(self)  # section 7.1
        request = Request(self.command, path, query, self.headers, params,
                          self.rfile if endpoint.body == MULTIPART_BODY else None, self.connection)
        set_log_context(params.get("session_id") or request.named_session)
        request.user = self.app.authenticate(endpoint, request)  # 401 before any body is read
        if endpoint.body == NO_BODY:
            self._discard_body()
        elif endpoint.body == JSON_BODY:
            request.body = self._read_body()
        return request

    do_GET = do_POST = do_DELETE = do_PUT = do_PATCH = dispatch

    def _linger(self, seconds: float = 2.0, limit: int = 16 * 1024 * 1024) -> None:
        """Half-close, then drain a little of the unread body before closing.

        Closing a socket with unread bytes makes the kernel answer with a reset, which can
        destroy our error answer (e.g. an early 413) before the client reads it.
        """
        try:
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(0.25)
            deadline = time.monotonic() + seconds
            drained = 0
            while drained < limit and time.monotonic() < deadline:
                try:
                    data = self.connection.recv(CHUNK)
                except socket.timeout:
                    continue
                if not data:
                    break
                drained += len(data)
        except OSError:
            pass

    def log_message(self, fmt, *args):  # http.server's own access/error lines
        log.debug("http: " + fmt, *args)

    def handle_expect_100(self):
        """``100 Continue``, sent by ContinueBeforeBody when the handler starts on the body."""
        self.wfile.write(self.protocol_version.encode("latin-1") + b" 100 Continue\r\n\r\n")
        return True

    def send_error(self, code, message=None, explain=None):
        """Protocol-level errors (bad request line, too-long headers) as JSON too."""
        self.close_connection = True
        if type(self.rfile) is ContinueBeforeBody:  # e.g. 501: no 100 Continue after it
            self.rfile = self.rfile.disarm()
        try:
            self.send(Response(code, {"detail": message or explain or "bad request"}))
        except OSError:
            pass


# -- 7.2 TLS (--tls-cert / --tls-key): the ssl module; handshakes in the connections' threads --


class TLSSetupError(Exception):
    """The certificate or key cannot be used: one line for the log and the status file."""


class _Passphrase(Exception):
    """The key asked for a passphrase (load_cert_chain would otherwise prompt on the tty)."""


def _refuse_passphrase():
    raise _Passphrase()


def _tls_file(flag: str, path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(1 << 20)
    except OSError as e:
        raise TLSSetupError("remote-lab: cannot read %s %s: %s" % (flag, path, e.strerror or e)
                            ) from None


def tls_context(settings: Settings):
    """The server's ssl.SSLContext (TLS >= 1.2) or None without --tls-cert/--tls-key; raises
    TLSSetupError. Run at every start, so a reload (SIGHUP) takes a renewed certificate."""
    cert, key = settings.tls_cert, settings.tls_key
    if not cert and not key:
        return None
    if not cert or not key:
        raise TLSSetupError("remote-lab: --tls-cert and --tls-key go together (only %s given)"
                            % ("--tls-cert" if cert else "--tls-key"))
    import ssl
    if b"-----BEGIN CERTIFICATE-----" not in _tls_file("--tls-cert", cert):
        raise TLSSetupError("remote-lab: --tls-cert %s is not a PEM certificate (no BEGIN "
                            "CERTIFICATE line)" % cert)
    if b"PRIVATE KEY-----" not in _tls_file("--tls-key", key):
        raise TLSSetupError("remote-lab: --tls-key %s is not a PEM private key (no BEGIN ... "
                            "PRIVATE KEY line)" % key)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key, password=_refuse_passphrase)
    except _Passphrase:
        raise TLSSetupError("remote-lab: --tls-key %s is protected by a passphrase: decrypt it "
                            "(openssl pkey -in KEY -out KEY.plain) and keep it mode 0600" % key
                            ) from None
    except (ssl.SSLError, OSError) as e:
        why = ("the key does not belong to the certificate" if "MISMATCH" in str(e)
               else "unusable certificate or key: %s" % (getattr(e, "reason", None) or e))
        raise TLSSetupError("remote-lab: --tls-cert %s / --tls-key %s: %s" % (cert, key, why)
                            ) from None
    return context


def is_tls(sock) -> bool:
    """An ssl.SSLSocket (without importing ssl on plain HTTP servers)."""
    return hasattr(sock, "pending")


def raw_shutdown(sock, how: int) -> None:
    """sock.shutdown() on the TCP socket itself: SSLSocket.shutdown() also drops its TLS state,
    which a handler thread reading it at that moment would trip over (make_room, draining)."""
    socket.socket.shutdown(sock, how)


def raw_peek(sock, n: int = 1) -> bytes:
    """The next bytes on the wire, left there (SSLSocket.recv refuses MSG_PEEK): TLS records
    on a TLS socket, b"" at EOF."""
    return socket.socket.recv(sock, n, socket.MSG_PEEK)


FD_RESERVE = 64  # open files kept free of connections: lab files, netlab pipes, logs
OVERFLOW_CONNECTIONS = 16  # beyond the cap, each read for a 503 (or /healthz) answer
_ACCEPT_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
BURST_QUIET = 10.0  # s without the condition before its next WARNING


def raise_open_files_limit() -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (a launched server inherits 1024 or less);
    returns the soft limit now (0 when unknown)."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):
        return 0
    if hard != resource.RLIM_INFINITY and soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as e:
            log.warning("cannot raise the open files limit from %d to %d: %s", soft, hard, e)
    return 0 if soft == resource.RLIM_INFINITY else soft


def request_waiting(sock) -> bool:
    """Bytes (or EOF) are ready to read on ``sock`` now (TLS: decrypted ones, or on the wire)."""
    import select
    if is_tls(sock) and sock.pending():
        return True
    try:
        poller = select.poll()  # not select(): no limit on the fd number
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return False


class LabHTTPServer(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer that counts its connections: beyond the cap the oldest idle one is
    closed to make room, else the new one gets 503 (/healthz still answers); EMFILE on accept
    backs off instead of spinning."""

    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 512
    connection_cap = 0  # 0: no cap (limit_connections() sets it)
    draining = False  # a reload: every connection closes once its current answer is written
    tls_context = None  # --tls-cert: accepted sockets are wrapped (ssl.SSLSocket)

    def __init__(self, *args, **kwargs):
        self.connections_lock = threading.Lock()
        self.open_connections = 0
        self.idle_connections = {}  # handler -> its socket while it waits for a request, oldest first
        self.overflowing = set()  # sockets accepted beyond the cap
        self.accept_failures = 0  # EMFILE & co in a row
        self.last_accept_failure = self.last_over_cap = -BURST_QUIET
        self._wake_r, self._wake_w = os.pipe()  # shutdown() wakes serve_forever() through it
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stop_requested = False
        self._serving_done = threading.Event()
        super().__init__(*args, **kwargs)

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        """socketserver's loop, but woken at once by shutdown() (a pipe) rather than noticing
        it within ``poll_interval``: a stop or a reload takes effect now."""
        import selectors
        self._serving_done.clear()
        try:
            with selectors.PollSelector() as selector:  # not select(): no fd number limit
                selector.register(self, selectors.EVENT_READ)
                selector.register(self._wake_r, selectors.EVENT_READ)
                while not self._stop_requested:
                    ready = selector.select(poll_interval)
                    if self._stop_requested:
                        break
                    if any(key.fileobj is self for key, _ in ready):
                        self._handle_request_noblock()
                    self.service_actions()
        finally:
            self._stop_requested = False
            try:
                while os.read(self._wake_r, 512):
                    pass
            except OSError:  # empty (EAGAIN)
                pass
            self._serving_done.set()

    def shutdown(self) -> None:
        """Stop serve_forever() (from another thread) and wait until it has returned."""
        self._stop_requested = True
        try:
            os.write(self._wake_w, b"x")
        except OSError:  # the pipe is full: a wake-up is pending anyway
            pass
        self._serving_done.wait()

    def server_close(self) -> None:
        super().server_close()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass

    def limit_connections(self, max_connections: int, open_files: int) -> None:
        """The cap: --max-connections, lowered to what the open-files limit leaves."""
        cap = max_connections
        if open_files:
            fit = max(1, open_files - FD_RESERVE - OVERFLOW_CONNECTIONS)
            if cap > fit:
                log.warning("the open files limit (%d, raise it with ulimit -n or LimitNOFILE=) "
                            "leaves room for %d connections: --max-connections %d lowered to %d",
                            open_files, fit, cap, fit)
            cap = min(cap, fit) if cap else fit
        self.connection_cap = cap

    def get_request(self):
        try:
            request = self.socket.accept()
        except OSError as e:
            if e.errno in _ACCEPT_ERRNOS:
                self._accept_failed(e)
            raise  # _handle_request_noblock() ignores it
        self.accept_failures = 0
        if self.tls_context is not None:  # the handshake is the handler's (it may wait)
            sock, address = request
            try:
                request = (self.tls_context.wrap_socket(
                    sock, server_side=True, do_handshake_on_connect=False), address)
            except OSError:
                sock.close()
                raise
        return request

    def _accept_failed(self, error: OSError) -> None:
        """Out of file descriptors: the connection waits in the backlog and the listening socket
        stays readable. Make room, back off, one WARNING per burst."""
        now = time.monotonic()
        if now - self.last_accept_failure > BURST_QUIET:
            log.warning("cannot accept connections: %s (%d open); closing idle ones and backing "
                        "off", error.strerror or error, self.open_connections)
        self.last_accept_failure = now
        self.accept_failures += 1
        if self.make_room():
            time.sleep(0.005)  # time for that handler to close its socket
        else:
            time.sleep(min(0.5, 0.01 * 2 ** min(self.accept_failures, 6)))

    def process_request(self, request, client_address):
        with self.connections_lock:
            self.open_connections += 1
            over = self.open_connections - self.connection_cap if self.connection_cap else 0
        if over > 0:
            now = time.monotonic()
            if now - self.last_over_cap > BURST_QUIET:
                log.warning("connection limit reached (%d, --max-connections): closing idle "
                            "connections first, then answering 503", self.connection_cap)
            self.last_over_cap = now
            if not self.make_room():
                if over > OVERFLOW_CONNECTIONS:  # no thread for it either
                    self._refuse_at_once(request)
                    return
                self.overflowing.add(request)
        super().process_request(request, client_address)

    def make_room(self) -> bool:
        """Close the connection that has waited longest for its next request (if any)."""
        idle = self.idle_connections
        with self.connections_lock:  # its handler cannot close the socket meanwhile
            while True:
                try:
                    handler = next(iter(idle))
                except StopIteration:
                    return False
                except RuntimeError:  # changed meanwhile: handlers come and go without the lock
                    continue
                sock = idle.pop(handler, None)
                if sock is not None:
                    break
            try:
                raw_shutdown(sock, socket.SHUT_RDWR)  # wakes its handler's read with EOF
            except OSError:
                pass
        return True

    def _refuse_at_once(self, request) -> None:
        if not is_tls(request):  # TLS: no handshake here (it may wait), so closed unanswered
            try:
                request.setblocking(False)
                request.send(b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json"
                             b"\r\nContent-Length: 34\r\nRetry-After: 1\r\nConnection: close"
                             b'\r\n\r\n{"detail": "too many connections"}')
            except OSError:
                pass
        self.shutdown_request(request)

    def start_draining(self) -> None:
        """A reload: from now on every answer says ``Connection: close``; kept-alive connections
        waiting for their next request are closed at once (their handler's read ends), unless
        that request is already there. A new connection still gets its first request answered.
        serve_forever() has returned: no connection is added."""
        self.draining = True
        idle = self.idle_connections
        while True:
            try:
                waiting = list(idle.items())
                break
            except RuntimeError:  # changed meanwhile: handlers come and go without the lock
                continue
        with self.connections_lock:  # its handler cannot close the socket meanwhile
            for handler, sock in waiting:
                if handler.kept_alive and not request_waiting(sock) and \
                        idle.pop(handler, None) is not None:
                    try:
                        raw_shutdown(sock, socket.SHUT_RDWR)
                    except OSError:
                        pass

    def wait_for_answers(self, timeout: float, closed: bool = False) -> bool:
        """At exit: until every connection is idle (its answer written) -- or, ``closed``,
        closed -- or ``timeout`` passes; worker threads are daemons and would otherwise die
        with an answer unsent."""
        deadline = time.monotonic() + timeout
        while self.open_connections > (0 if closed else len(self.idle_connections)):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True

    def shutdown_request(self, request):
        with self.connections_lock:  # not while make_room() shuts it down
            super().shutdown_request(request)
            self.open_connections -= 1
            self.overflowing.discard(request)

    def server_bind(self):
        """HTTPServer.server_bind without socket.getfqdn(): a reverse DNS lookup (plus the idna
        codec import) at every start, slow or stuck with a poor resolver, only to fill
        server_name, which nothing here uses (socket activation sets the address too)."""
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class LabHTTPServer6(LabHTTPServer):
    """LabHTTPServer on an IPv6 address; on ``::`` it takes IPv4 too (mapped addresses)."""
    address_family = socket.AF_INET6

    def server_bind(self):
        try:  # dual-stack whatever net.ipv6.bindv6only says; some systems refuse it
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        except (AttributeError, OSError) as e:
            log.info("IPv6 socket without IPv4 (IPV6_V6ONLY cannot be cleared: %s)", e)
        super().server_bind()


def address_family(host: str) -> int:
    """AF_INET6 for an IPv6 address, or a name with IPv6 addresses only; AF_INET otherwise
    (as before: a name with both, like localhost, still listens on IPv4)."""
    if ":" in host:
        return socket.AF_INET6
    if not host:
        return socket.AF_INET
    for family in (socket.AF_INET, socket.AF_INET6):
        try:
            socket.getaddrinfo(host, None, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
            return family
        except (socket.gaierror, UnicodeError):
            pass
    return socket.AF_INET  # let bind() report the name


def bind_server(settings: Settings, app: App, listen_socket: Optional[socket.socket] = None,
                handed_over: bool = False) -> LabHTTPServer:
    handler = type("BoundRequestHandler", (RequestHandler,),
                   {"app": app, "timeout": settings.socket_timeout})
    if listen_socket is not None:  # socket activation, or a reload's (section 9)
        return server_from_socket(listen_socket, handler, handed_over)
    server_class = (LabHTTPServer6 if address_family(settings.host) == socket.AF_INET6
                    else LabHTTPServer)
    if settings.port_range:
        start, end = settings.port_range
        last_error = None
        for port in range(start, end + 1):
            try:
                return server_class((settings.host, port), handler)
            except OSError as e:
                if e.errno not in (errno.EADDRINUSE, errno.EACCES):
                    raise
                last_error = e
        raise OSError(errno.EADDRINUSE, "no free port in %d-%d (%s)" % (start, end, last_error))
    return server_class((settings.host, settings.port), handler)


# ============================================================================================
# 8. Housekeeping thread
# ============================================================================================


def housekeeping_loop(app: App) -> None:
    while not app.stopping.is_set():
        try:
            app.housekeeping_once()
        except Exception:
            log.exception("housekeeping failed")
        app.systemd.watchdog()  # WATCHDOG=1 (section 6)
        app.stopping.wait(app.systemd.cadence(app.cadence()))


def start_housekeeping(app: App) -> threading.Thread:
    keeper = threading.Thread(target=housekeeping_loop, args=(app,), name="housekeeping",
                              daemon=True)
    keeper.start()
    return keeper


# ============================================================================================
# 9. Operations: systemd integration, metrics, status page, OpenAPI document, API docs
#    (the state they show is in section 6; nothing here runs on the request hot path)
# ============================================================================================

# -- 9.1 systemd: sd_notify(3) and socket activation, with the stdlib socket module ------------

SD_LISTEN_FDS_START = 3


class SystemdNotifier:
    """sd_notify over ``$NOTIFY_SOCKET``: one datagram per message, a no-op when it is unset.

    Filesystem and abstract (``@name``) sockets. Errors are logged, never raised: a service
    manager that went away must not take the server with it.
    """

    def __init__(self, address: Optional[str] = None, watchdog_usec: int = 0):
        if address and address.startswith("@"):
            address = "\0" + address[1:]
        self.address = os.fsencode(address) if address and address[0] in "/\0" else None
        self.watchdog_usec = watchdog_usec if self.address else 0
        self.lock = threading.RLock()  # a stop signal may arrive while its own thread notifies
        self.sock = None  # type: Optional[socket.socket]
        self.last_status = None  # type: Optional[str]
        self.stopping_sent = False
        self.environ = {}  # type: Dict[str, str]  # the variables from_environ() removed

    @classmethod
    def from_environ(cls, environ=None, unset: bool = True) -> "SystemdNotifier":
        """Read NOTIFY_SOCKET / WATCHDOG_USEC / WATCHDOG_PID, then (``unset``) remove them so
        netlab and its children never talk to our service manager."""
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET")
        usec = 0
        try:
            wd_pid = env.get("WATCHDOG_PID")
            if not wd_pid or int(wd_pid) == os.getpid():
                usec = max(0, int(env.get("WATCHDOG_USEC") or 0))
        except ValueError:
            usec = 0
        keys = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")
        found = {key: env[key] for key in keys if key in env}
        if unset:
            for key in keys:
                env.pop(key, None)
        notifier = cls(address, usec)
        notifier.environ = found  # a reload hands them to the re-executed server
        return notifier

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> Optional[float]:
        """Seconds between two WATCHDOG=1 (half of WATCHDOG_USEC), None without a watchdog."""
        return self.watchdog_usec / 2e6 if self.watchdog_usec > 0 else None

    def notify(self, *fields: str) -> bool:
        if self.address is None:
            return False
        data = "\n".join(fields).encode("utf-8", "replace")
        with self.lock:
            try:
                if self.sock is None:
                    self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)  # close-on-exec
                self.sock.sendto(data, self.address)
                return True
            except OSError as e:
                log.debug("sd_notify %s failed: %s", fields[0] if fields else "", e)
                return False

    @staticmethod
    def _status_field(text: str) -> str:
        return "STATUS=" + " ".join(text.split())[:400]

    def ready(self, status: Optional[str] = None) -> bool:
        fields = ["READY=1"]
        if status:
            fields.append(self._status_field(status))
            self.last_status = status
        return self.notify(*fields)

    def status(self, text: str) -> bool:
        """STATUS=text, only when it differs from the last one sent."""
        if text == self.last_status:
            return False
        self.last_status = text
        return self.notify(self._status_field(text))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def reloading(self, status: str = "reloading") -> bool:
        """RELOADING=1 with the CLOCK_MONOTONIC time (systemd >= 253 wants it); READY=1 from
        the re-executed server ends the reload."""
        usec = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1e6)
        self.last_status = status
        return self.notify("RELOADING=1", "MONOTONIC_USEC=%d" % usec, self._status_field(status))

    def stopping(self, status: str = "stopping") -> bool:
        """STOPPING=1 (once)."""
        if self.stopping_sent:
            return False
        self.stopping_sent = True
        self.last_status = status
        return self.notify("STOPPING=1", self._status_field(status))


def sd_listen_fds(environ=None, unset: bool = True) -> List[int]:
    """sd_listen_fds(3): the fds passed by socket activation (3, 4, ...) when LISTEN_PID is us.

    The variables are removed (``unset``) so children do not mistake the fds for theirs; the fds
    are made close-on-exec so netlab never inherits the listening socket.
    """
    env = os.environ if environ is None else environ
    pid, count = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    if unset:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(key, None)
    try:
        if not pid or not count or int(pid) != os.getpid():
            return []
        n = int(count)
    except ValueError:
        return []
    fds = list(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + max(0, n)))
    for fd in fds:
        try:
            os.set_inheritable(fd, False)
        except OSError:
            pass
    return fds


def sd_listen_socket(environ=None) -> Optional[socket.socket]:
    """The first socket-activated listening socket (a TCP stream socket), or None.

    Raises OSError when the passed fd is not a listening TCP socket.
    """
    fds = sd_listen_fds(environ)
    if not fds:
        return None
    if len(fds) > 1:
        log.warning("socket activation passed %d sockets; using the first (fd %d)",
                    len(fds), fds[0])
    sock = socket.socket(fileno=fds[0])
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        raise OSError(errno.EINVAL, "socket-activated fd %d is not a TCP stream socket (%s)"
                      % (fds[0], sock))
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise OSError(errno.EINVAL, "socket-activated fd %d is not listening" % fds[0])
    return sock


def server_from_socket(sock: socket.socket, handler,
                       handed_over: bool = False) -> "LabHTTPServer":
    """A LabHTTPServer on an already bound and listening socket (socket activation, or the
    socket a reload handed over: ``handed_over``)."""
    server = LabHTTPServer(sock.getsockname()[:2], handler, bind_and_activate=False)
    server.socket.close()
    server.socket = sock
    server.address_family = sock.family
    server.server_address = sock.getsockname()
    server.server_name, server.server_port = server.server_address[:2]
    if handed_over:
        log.info("reload: serving the listening socket handed over (fd %d)", sock.fileno())
    else:
        log.info("socket activation: serving the listening socket passed by systemd (fd %d); "
                 "--host/--port are ignored", sock.fileno())
    return server


# -- 9.2 metrics: histograms and the Prometheus text exposition format (0.0.4) ------------------

NETLAB_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 1800)
QUEUE_WAIT_BUCKETS = (0.1, 1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)


class Histogram:
    """A Prometheus histogram: fixed upper bounds, cumulative counts when rendered."""

    def __init__(self, buckets):
        self.buckets = tuple(sorted(float(b) for b in buckets))
        self.counts = [0] * (len(self.buckets) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0
        self.lock = threading.Lock()

    def observe(self, value: float) -> None:
        i = bisect.bisect_left(self.buckets, value)  # first bound >= value ("le")
        with self.lock:
            self.counts[i] += 1
            self.sum += value
            self.count += 1

    def snapshot(self) -> Tuple[List[Tuple[float, int]], float, int]:
        """([(upper bound, cumulative count)...] ending with +Inf, sum, count)."""
        with self.lock:
            counts, total, n = list(self.counts), self.sum, self.count
        out, running = [], 0
        for bound, c in zip(self.buckets + (float("inf"),), counts):
            running += c
            out.append((bound, running))
        return out, total, n


def _prom_value(v) -> str:
    if isinstance(v, bool):
        return "1" if v else "0"
    if isinstance(v, int):
        return str(v)
    v = float(v)
    if v != v:
        return "NaN"
    if v in (float("inf"), float("-inf")):
        return "+Inf" if v > 0 else "-Inf"
    return repr(round(v, 6))


def _prom_labels(labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join('%s="%s"' % (k, str(v).replace("\\", "\\\\").replace("\n", "\\n")
                                       .replace('"', '\\"')) for k, v in labels) + "}"


class MetricsText:
    """Builds the exposition text: each family has # HELP, # TYPE, then its samples."""

    def __init__(self):
        self.lines = []  # type: List[str]

    def _head(self, name, kind, help_text):
        self.lines.append("# HELP %s %s" % (name, help_text.replace("\\", "\\\\").replace("\n", " ")))
        self.lines.append("# TYPE %s %s" % (name, kind))

    def simple(self, kind: str, name: str, help_text: str, samples) -> None:
        """samples: a number, or [(labels as [(key, value)], number)]."""
        self._head(name, kind, help_text)
        if not isinstance(samples, list):
            samples = [((), samples)]
        for labels, value in samples:
            self.lines.append("%s%s %s" % (name, _prom_labels(labels), _prom_value(value)))

    def histogram(self, name: str, help_text: str, series) -> None:
        """series: [(labels, Histogram)]."""
        self._head(name, "histogram", help_text)
        for labels, hist in series:
            labels = list(labels)
            buckets, total, n = hist.snapshot()
            for bound, cumulative in buckets:
                le = "+Inf" if bound == float("inf") else _prom_value(bound)
                self.lines.append("%s_bucket%s %d" % (name, _prom_labels(labels + [("le", le)]),
                                                      cumulative))
            self.lines.append("%s_sum%s %s" % (name, _prom_labels(labels), _prom_value(total)))
            self.lines.append("%s_count%s %d" % (name, _prom_labels(labels), n))

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def render_metrics(metrics: "Metrics", snap: "OpsSnapshot") -> str:
    """GET /metrics: the counters and histograms of ``metrics``, the gauges of ``snap``."""
    sessions = len(snap.sessions)
    active = len(_sessions_in_slots(snap))
    counters = dict(metrics.counters)
    calls, failures = dict(metrics.netlab_calls), dict(metrics.netlab_failures)
    verbs = sorted(set(("up", "down", "inspect")) | set(calls) | set(failures))
    m = MetricsText()
    m.simple("gauge", "remote_lab_info", "Server version (the value is always 1).",
             [((("version", __version__),), 1)])
    m.simple("gauge", "remote_lab_start_time_seconds", "Unix time the server started.",
             snap.started)
    m.simple("gauge", "remote_lab_uptime_seconds", "Seconds since the server started.",
             snap.uptime)
    m.simple("gauge", "remote_lab_queue_length", "Sessions in the queue (active and waiting).",
             sessions)
    m.simple("gauge", "remote_lab_sessions", "Sessions by status.",
             [((("status", "active"),), active),
              ((("status", "waiting"),), sessions - active)])
    _lab_metrics(m, snap)
    m.simple("gauge", "remote_lab_status_page_watchers",
             "Status pages waiting for a change right now (GET /status?wait=).",
             metrics.status_watchers)
    m.simple("counter", "remote_lab_sessions_created_total", "Sessions created.",
             counters.get("sessions_created", 0))
    m.simple("counter", "remote_lab_sessions_ended_total", "Sessions ended by their client.",
             counters.get("sessions_ended", 0))
    m.simple("counter", "remote_lab_sessions_expired_total",
             "Sessions dropped for lack of a sign of life.", counters.get("sessions_expired", 0))
    m.simple("counter", "remote_lab_sessions_overtaking_total",
             "Sessions promoted ahead of others for a warm lab they declared (affinity).",
             counters.get("sessions_overtaking", 0))
    m.simple("counter", "remote_lab_netlab_commands_total", "netlab commands run, by verb.",
             [((("command", v),), calls.get(v, 0)) for v in verbs])
    m.simple("counter", "remote_lab_netlab_failures_total",
             "netlab commands that failed or timed out, by verb.",
             [((("command", v),), failures.get(v, 0)) for v in verbs])
    m.histogram("remote_lab_netlab_duration_seconds", "Wall time of netlab up and down.",
                [((("command", v),), metrics.netlab_seconds[v])
                 for v in sorted(metrics.netlab_seconds)])
    m.histogram("remote_lab_queue_wait_seconds", "Time from session creation to becoming active.",
                [((), metrics.queue_wait_seconds)])
    m.simple("counter", "remote_lab_upload_bytes_total", "Bytes of accepted POST /lab bodies.",
             counters.get("upload_bytes", 0))
    m.simple("counter", "remote_lab_events_total", "Events recorded for the status page.",
             snap.events_total)
    _state_metrics(m, metrics.store)
    m.simple("counter", "remote_lab_http_requests_total",
             "HTTP requests by route (handler name, 'unmatched' for 404/405) and status.",
             [((("route", r), ("status", s)), n)
              for (r, s), n in sorted(dict(metrics.http_requests).items())])
    return m.text()

def _lab_metrics(m: "MetricsText", snap: "OpsSnapshot") -> None:
    """The lab gauges: one series (the seed's) with one slot, else one per slot (``slot``)."""
    if snap.slots == 1:
        labs = [((), snap.lab)]
    else:
        m.simple("gauge", "remote_lab_slots", "Labs that may run at once (--slots).", snap.slots)
        labs = [((("slot", lab["slot"]),), lab) for lab in snap.labs]
    m.simple("gauge", "remote_lab_lab_running", "1 when the lab is up.",
             [(slot, 1 if lab["running"] else 0) for slot, lab in labs])
    m.simple("gauge", "remote_lab_lab_state", "1 for the current lab state, 0 for the others.",
             [(slot + (("state", s),), 1 if lab["state"] == s else 0)
              for slot, lab in labs for s in (STOPPED, STARTING, RUNNING, STOPPING)])
    m.simple("gauge", "remote_lab_lab_ref_count", "References held on the running lab.",
             [(slot, lab["ref_count"]) for slot, lab in labs])
    m.simple("gauge", "remote_lab_lab_devices", "Devices of the running lab.",
             [(slot, len(lab["devices"])) for slot, lab in labs])


def _state_metrics(m: "MetricsText", store: Optional["StateStore"]) -> None:
    """The figures the state database keeps over restarts (and its write errors)."""
    kept = store.counters() if store is not None else {}
    m.simple("counter", "remote_lab_restarts_total",
             "Starts on an existing state (over the state dir's life), by how the previous "
             "server ended: stop, reload, or crash (no clean stop: killed, power loss).",
             [((("after", k),), kept.get("restarts_after_" + k, 0))
              for k in ("stop", "reload", "crash")])
    m.simple("counter", "remote_lab_sessions_restored_total",
             "Sessions restored at start-up (over the state dir's life).",
             kept.get("sessions_restored", 0))
    m.simple("counter", "remote_lab_labs_adopted_total",
             "Running labs adopted at start-up, no netlab up (over the state dir's life).",
             kept.get("labs_adopted", 0))
    m.simple("counter", "remote_lab_labs_lost_total",
             "Saved running labs netlab no longer ran at start-up (over the state dir's life).",
             kept.get("labs_lost", 0))
    m.simple("counter", "remote_lab_state_write_errors_total",
             "Failed writes to the state database since this server started.",
             store.write_errors if store is not None else 0)


# -- 9.3 the status page: server-rendered snapshot + a small inline script (no external asset) --

# Everything inline; the policy makes the browser refuse anything from elsewhere.
PAGE_HEADERS = (
    ("Cache-Control", "no-store"),
    ("Content-Security-Policy", "default-src 'none'; script-src 'unsafe-inline'; "
     "style-src 'unsafe-inline'; connect-src 'self'; img-src data:; base-uri 'none'; "
     "form-action 'none'; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
)

PAGE_CSS = """
:root{--fg:#1d2330;--muted:#667085;--bg:#f6f7f9;--card:#fff;--line:#e3e6ea;--accent:#2457c5;
--ok:#1a7f37;--warn:#9a6700;--bad:#c4302b}
*{box-sizing:border-box}
body{margin:0;font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);
background:var(--bg)}
header,main,footer{max-width:980px;margin:0 auto;padding:0 12px}
header{display:flex;flex-wrap:wrap;align-items:baseline;gap:4px 16px;padding-top:14px}
h1{font-size:1.35em;margin:0}
h2{font-size:1.05em;margin:0 0 8px}
.card{background:var(--card);border:1px solid var(--line);border-radius:8px;padding:12px 14px;
margin:12px 0}
.muted{color:var(--muted)}
.big{font-size:1.2em;margin-bottom:6px}
code{font:0.92em ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#eef1f5;
padding:1px 4px;border-radius:4px;word-break:break-all}
dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 12px;margin:0}
dt{color:var(--muted)}dd{margin:0}
table{border-collapse:collapse;width:100%}
th,td{text-align:left;padding:4px 8px 4px 0;border-bottom:1px solid var(--line);vertical-align:top}
th{color:var(--muted);font-weight:600;font-size:.9em}
.scroll{overflow-x:auto}
.badge{display:inline-block;padding:0 8px;border-radius:10px;font-size:.85em;font-weight:600;
background:#eef1f5}
.s-running,.k-active,.k-netlab{background:#dafbe1;color:var(--ok)}
.s-starting,.s-stopping,.k-ended{background:#fff8c5;color:var(--warn)}
.k-expired,.k-failure,.s-failed{background:#ffebe9;color:var(--bad)}
.you{font-weight:700;color:var(--accent)}
ul.events{list-style:none;margin:0;padding:0}
ul.events li{padding:4px 0;border-bottom:1px solid var(--line)}
pre{white-space:pre-wrap;word-break:break-word;background:#f3f4f6;padding:8px;border-radius:6px;
max-height:18em;overflow:auto;font-size:.85em;margin:4px 0}
footer{font-size:.85em;padding-bottom:20px}
#live.on{color:var(--ok)}#live.off{color:var(--bad)}
a{color:var(--accent)}
.why{font-size:.9em}.why a,dd a{word-break:break-all}
@media (max-width:560px){body{font-size:14px}.hide-narrow{display:none}}
"""

STATUS_JS = r"""
(function () {
  "use strict";
  // the server renders every section (GET /status has them in "html"); this script swaps them
  // in as they change and keeps the clocks going
  var root = document.getElementById("status");
  var st = JSON.parse(document.getElementById("status-data").textContent);
  var skew = st.server_time - Date.now() / 1000;
  var sid = new URLSearchParams(location.search).get("sid");
  var SECTIONS = ["holder", "queue", "lab", "events"];
  function now() { return Date.now() / 1000 + skew; }
  function dur(s) {  // as fmt_duration() on the server
    s = Math.max(0, Math.floor(s));
    if (s < 60) return s + " s";
    function two(a, ua, b, ub) { return a + " " + ua + (b ? " " + b + " " + ub : ""); }
    if (s < 3600) return two(Math.floor(s / 60), "min", s % 60, "s");
    if (s < 86400) return two(Math.floor(s / 3600), "h", Math.floor(s % 3600 / 60), "min");
    return two(Math.floor(s / 86400), "d", Math.floor(s % 86400 / 3600), "h");
  }
  function stamps(selector, text) {
    var els = document.querySelectorAll(selector), i;
    for (i = 0; i < els.length; i++) els[i].textContent = text(parseFloat(els[i].getAttribute("data-t")));
  }
  function tick() { var t = now(); stamps(".ago[data-t]", function (x) { return dur(t - x); }); }
  function localTimes() {  // the server wrote UTC clock times; show them in the viewer's zone
    stamps("time[data-t]", function (x) { return new Date(x * 1000).toLocaleTimeString(); });
  }
  function render(d) {
    SECTIONS.forEach(function (name) { document.getElementById(name + "-body").innerHTML = d.html[name]; });
    document.getElementById("uptime").innerHTML = d.html["uptime"];
    document.getElementById("queue-count").textContent = d.queue.length;
    root.setAttribute("data-token", d.token);
    root.setAttribute("data-holder", d.holder ? d.holder.session : "");
    root.setAttribute("data-waiting", String(d.queue.length));
    root.setAttribute("data-lab-state", d.lab.state);
    document.title = (d.holder ? "busy" : "idle") + " - remote-lab";
    localTimes();
  }
  function live(on, text) {
    var el = document.getElementById("live");
    el.className = on ? "on" : "off";
    el.textContent = text;
  }
  function poll() {
    // absolute, from location (which has no user:token@): fetch() refuses a URL with
    // credentials, and a relative one resolves against the address the page was opened with
    var url = location.origin + location.pathname.replace(/[^\/]*$/, "") + "status?wait=25&since=" +
      encodeURIComponent(st.token) + (sid ? "&sid=" + encodeURIComponent(sid) : "");
    fetch(url, {cache: "no-store"}).then(function (r) {
      if (!r.ok) throw new Error("HTTP " + r.status);
      return r.json();
    }).then(function (d) {
      st = d;
      skew = d.server_time - Date.now() / 1000;
      render(d);
      live(true, "live, updated " + new Date().toLocaleTimeString());
      setTimeout(poll, 1000);
    }).catch(function (e) {
      live(false, "server unreachable (" + e.message + "), retrying");
      setTimeout(poll, 3000);
    });
  }
  localTimes();
  live(true, "live");
  setInterval(tick, 1000);
  poll();
})();
"""


def _h(value) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def fmt_duration(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return "%d s" % s
    if s < 3600:
        return "%d min" % (s // 60) + (" %d s" % (s % 60) if s % 60 else "")
    if s < 86400:
        return "%d h" % (s // 3600) + (" %d min" % (s % 3600 // 60) if s % 3600 // 60 else "")
    return "%d d" % (s // 86400) + (" %d h" % (s % 86400 // 3600) if s % 86400 // 3600 else "")


def _eta_html(eta_s: Optional[float]) -> str:
    """An estimated wait (eta_s): "about 3 min"; unknown until sessions have held the lab."""
    if eta_s is None:
        return '<span class="muted" title="no hold times yet to estimate from">unknown</span>'
    if eta_s < 1:
        return "any moment now"
    return "about " + fmt_duration(eta_s if eta_s < 60 else round(eta_s / 60.0) * 60)


def _ago_html(t: float, now: float) -> str:
    return '<span class="ago" data-t="%.3f">%s</span>' % (t, fmt_duration(now - t))


def _clock_html(t: float) -> str:
    return '<time data-t="%.3f">%s UTC</time>' % (t, time.strftime("%H:%M:%S", time.gmtime(t)))


def _who_html(session: str, you: bool) -> str:
    if you:
        return '<code class="you">%s</code> <span class="you">(you)</span>' % _h(session)
    return "<code>%s</code>" % _h(session)


def _owner_html(entry: dict) -> str:
    """Who (the session's owner), put before its id; "" when it did not say."""
    return '<b class="owner">%s</b> ' % _h(entry["owner"]) if entry.get("owner") else ""


def _link_html(link: Optional[str]) -> str:
    """A session's link: clickable only when it is http(s) (never javascript: and the like),
    opened without handing the page to it."""
    if not link:
        return ""
    if not re.match(r"https?://", link, re.IGNORECASE):
        return _h(link)
    return '<a href="%s" rel="noopener noreferrer" target="_blank">%s</a>' % (_h(link), _h(link))


def _why_html(entry: dict) -> str:
    """A waiting session's note and link, under its id; "" when it gave neither."""
    parts = ['<span class="note">%s</span>' % _h(entry["note"])] if entry.get("note") else []
    parts += [_link_html(entry.get("link"))] if entry.get("link") else []
    return '<div class="why muted">%s</div>' % " ".join(parts) if parts else ""


def render_status_sections(st: dict) -> Dict[str, str]:
    """The page's sections for a status_view(): the page shows them, /status carries them
    (``html``) for the page's script to swap in."""
    now = st["server_time"]
    h = st["holder"]
    if h is None:
        holder = '<div class="big muted">Nobody holds the lab: a new session gets it at once.</div>'
    else:
        topo = ("<code>%s</code>" % _h(h["topology"]) if h["topology"]
                else '<span class="muted">none uploaded yet</span>')
        held = now - h["held_s"] if h.get("held_s") is not None else h["since"]
        why = "".join("<dt>%s</dt><dd>%s</dd>" % (name, text) for name, text in (
            ("note", '<span class="note">%s</span>' % _h(h.get("note"))),
            ("link", _link_html(h.get("link")))) if h.get(name))
        if h.get("hold_left_s") is not None:  # --max-hold
            why += ('<dt>max hold</dt><dd class="hold-left">ends in %s (--max-hold %s)</dd>'
                    % (fmt_duration(h["hold_left_s"]), fmt_duration(st.get("max_hold") or 0)))
        holder = ('<div class="big">%s%s holds the lab <span class="muted">for %s</span></div>'
                  "<dl>%s<dt>topology</dt><dd>%s</dd><dt>since</dt><dd>%s (%s ago)</dd>"
                  "<dt>last sign of life</dt><dd>%s ago</dd></dl>"
                  % (_owner_html(h), _who_html(h["session"], h["you"]), _ago_html(held, now),
                     why, topo, _clock_html(h["since"]), _ago_html(h["since"], now),
                     _ago_html(h["last_seen"], now)))
    if not st["queue"]:
        queue = '<p class="muted">Nobody is waiting.</p>'
    else:
        rows = "".join('<tr><td>%d</td><td>%s</td><td>%s</td><td class="eta">%s</td>'
                       '<td class="hide-narrow">%s ago</td></tr>'
                       % (q["position"], _owner_html(q) + _who_html(q["session"], q["you"])
                          + _why_html(q), _ago_html(q["joined"], now), _eta_html(q.get("eta_s")),
                          _ago_html(q["last_seen"], now))
                       for q in st["queue"])
        queue = ('<div class="scroll"><table><thead><tr><th>#</th><th>session</th><th>waiting for'
                 '</th><th>estimated wait</th><th class="hide-narrow">last sign of life</th></tr>'
                 "</thead><tbody>%s</tbody></table></div>" % rows)
    lab = _lab_html(st["lab"])
    if st.get("slots", 1) > 1:  # every slot's holder and lab (one slot: the seed's sections)
        holder, lab = _slot_holders_html(st), _slot_labs_html(st)
    if not st["events"]:
        events = '<p class="muted">Nothing happened yet.</p>'
    else:
        events = '<ul class="events">%s</ul>' % "".join(
            '<li>%s <span class="badge k-%s">%s</span> %s%s</li>'
            % (_clock_html(e["time"]), _h(e["kind"]), _h(e["kind"]), _h(e["text"]),
               "<details><summary>detail</summary><pre>%s</pre></details>" % _h(e["detail"])
               if e["detail"] else "")
            for e in st["events"])
    return {"holder": holder, "queue": queue, "lab": lab, "events": events,
            "uptime": _ago_html(st["started"], now)}


def _lab_html(lab_: dict, warm: str = "") -> str:
    """A lab: state, topology, ref count (and ``warm``: more of the list), devices, failure."""
    lab = ('<dl><dt>state</dt><dd><span class="badge s-%s">%s</span></dd><dt>topology</dt><dd>%s'
           "</dd><dt>ref count</dt><dd>%d</dd>%s</dl>"
           % (_h(lab_["state"]), _h(lab_["state"]),
              "<code>%s</code>" % _h(lab_["topology"]) if lab_["topology"]
              else '<span class="muted">-</span>', lab_["ref_count"], warm))
    if lab_["devices"]:
        lab += ('<div class="scroll"><table><thead><tr><th>device</th><th>type</th><th>management '
                "address</th></tr></thead><tbody>%s</tbody></table></div>"
                % "".join("<tr><td>%s</td><td>%s</td><td>%s</td></tr>"
                          % (_h(d["name"]), _h(d["device"] or ""),
                             "<code>%s</code>" % _h(d["mgmt"]) if d["mgmt"] else "-")
                          for d in lab_["devices"]))
    if lab_["last_error"]:
        lab += ("<details><summary>last netlab failure</summary><pre>%s</pre></details>"
                % _h(lab_["last_error"]))
    return lab


def _slot_holders_html(st: dict) -> str:
    """With --slots N: who holds each slot, for how long, why, and the topology it uploaded."""
    now = st["server_time"]
    busy = sum(1 for entry in st["labs"] if entry["holder"])
    rows = []
    for entry in st["labs"]:
        h = entry["holder"]
        if h is None:
            rows.append('<tr class="slot-free"><td>%d</td><td colspan="4" class="muted">free'
                        "</td></tr>" % entry["slot"])
            continue
        held = now - h["held_s"] if h.get("held_s") is not None else h["since"]
        left = ('<div class="hold-left muted">ends in %s (--max-hold)</div>'
                % fmt_duration(h["hold_left_s"]) if h.get("hold_left_s") is not None else "")
        rows.append('<tr class="slot-busy"><td>%d</td><td>%s</td><td>%s</td><td>%s%s</td>'
                    '<td class="hide-narrow">%s ago</td></tr>'
                    % (entry["slot"], _owner_html(h) + _who_html(h["session"], h["you"])
                       + _why_html(h), "<code>%s</code>" % _h(h["topology"]) if h["topology"]
                       else '<span class="muted">none yet</span>', _ago_html(held, now), left,
                       _ago_html(h["last_seen"], now)))
    return ('<div class="big">%d of %d slots busy</div><div class="scroll"><table><thead><tr>'
            "<th>slot</th><th>session</th><th>topology</th><th>held for</th>"
            '<th class="hide-narrow">last sign of life</th></tr></thead><tbody>%s</tbody>'
            "</table></div>" % (busy, st["slots"], "".join(rows)))


def _slot_labs_html(st: dict) -> str:
    """With --slots N: each slot's lab, and until when an idle one is kept warm."""
    now = st["server_time"]
    parts = []
    for entry in st["labs"]:
        lab_ = entry["lab"]
        warm = ("<dt>kept warm</dt><dd>until %s (%s left)</dd>"
                % (_clock_html(lab_["warm_until"]), fmt_duration(lab_["warm_until"] - now))
                if lab_.get("warm_until") is not None else "")
        parts.append('<div class="slot" data-slot="%d"><h3>slot %d</h3>%s</div>'
                     % (entry["slot"], entry["slot"], _lab_html(lab_, warm)))
    return "".join(parts)


def _json_for_script(data) -> str:
    """JSON safe inside <script>: no '</' and no HTML comment openers."""
    return json.dumps(data).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def render_status_page(st: dict) -> bytes:
    parts = render_status_sections(st)
    page = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>%(title)s - remote-lab</title>
<noscript><meta http-equiv="refresh" content="15"></noscript>
<style>%(css)s</style></head>
<body>
<header><h1>remote-lab</h1><span class="muted">version %(version)s, up <span id="uptime">%(uptime)s</span></span></header>
<main id="status" data-token="%(token)s" data-holder="%(holder_id)s" data-waiting="%(waiting)d" data-lab-state="%(lab_state)s">
<section class="card" id="holder"><h2>Lab holder%(plural)s</h2><div id="holder-body">%(holder)s</div></section>
<section class="card" id="queue"><h2>Queue (<span id="queue-count">%(waiting)d</span> waiting)</h2><div id="queue-body">%(queue)s</div></section>
<section class="card" id="lab"><h2>Lab%(plural)s</h2><div id="lab-body">%(lab)s</div></section>
<section class="card" id="events"><h2>Recent events</h2><div id="events-body">%(events)s</div></section>
</main>
<footer class="muted"><span id="live">static snapshot taken at %(taken)s (reload for fresh data)</span> &middot;
timeouts: waiting %(wait_to)s, active %(active_to)s &middot;
<a href="docs">API docs</a> &middot; <a href="openapi.json">openapi.json</a> &middot;
<a href="metrics">metrics</a> &middot; <a href="status">status JSON</a></footer>
<script type="application/json" id="status-data">%(data)s</script>
<script>%(js)s</script>
</body></html>
""" % {
        "title": "busy" if st["holder"] else "idle", "css": PAGE_CSS, "version": _h(st["version"]),
        "token": _h(st["token"]),
        "holder_id": _h(st["holder"]["session"] if st["holder"] else ""),
        "waiting": len(st["queue"]), "lab_state": _h(st["lab"]["state"]),
        "taken": _clock_html(st["server_time"]), "wait_to": fmt_duration(st["timeouts"]["waiting"]),
        "active_to": fmt_duration(st["timeouts"]["active"]), "data": _json_for_script(st),
        "js": STATUS_JS, "plural": "s" if st.get("slots", 1) > 1 else "", **parts}
    return page.encode("utf-8")

# -- 9.4 the OpenAPI 3.1 document (every endpoint of App.endpoints, errors as implemented) --

_NULLABLE_STR = {"type": ["string", "null"]}
OPENAPI_SCHEMAS = {
    "Error": {"type": "object", "required": ["detail"],
              "properties": {"detail": {"type": "string", "description": "Human readable."}}},
    "Message": {"type": "object", "required": ["detail"],
                "properties": {"detail": {"type": "string"}}},
    "SessionCreated": {"type": "object", "required": ["session_id", "position"], "properties": {
        "session_id": {"type": "string"}, "position": {"type": "integer", "minimum": 0},
        "status": {"type": "string", "enum": ["active", "waiting"]}}},
    "SessionRequest": {"type": "object", "additionalProperties": False, "properties": {
        "owner": {"type": "string", "maxLength": 64,
                  "description": "Who (the client sends user@host); with `--auth-file` the "
                                 "authenticated name replaces it."},
        "note": {"type": "string", "maxLength": 200, "description": "Why, e.g. the CI job."},
        "link": {"type": "string", "maxLength": 500, "format": "uri",
                 "description": "An http(s) URL, e.g. the CI run."},
        "fingerprint": {"type": "string", "pattern": "^[0-9a-fA-F]{64}$",
                        "description": "The lab it will ask for: the SHA-256 hex the server "
                                       "computes over the topology and extra files of "
                                       "`POST /lab` (the client's `lab_fingerprint()`)."}}},
    "SessionState": {"type": "object", "required": ["session_id", "status", "position"],
                     "properties": {
        "session_id": {"type": "string", "description": "With `--auth-file`, another user's "
                       "session shows its first 8 characters only."},
        "status": {"type": "string", "enum": ["active", "waiting"]},
        "position": {"type": "integer", "minimum": 0},
        "owner": _NULLABLE_STR, "note": _NULLABLE_STR, "link": _NULLABLE_STR,
        "fingerprint": {"type": ["string", "null"], "description": "The lab fingerprint it "
                        "declared (lowercase SHA-256 hex), null if none."},
        "held_s": {"type": ["number", "null"], "description": "Active: seconds it has held "
                   "the lab."},
        "eta_s": {"type": ["number", "null"], "description": "Waiting: estimated seconds until "
                  "it is active (null: unknown, no history yet); active: 0."},
        "hold_left_s": {"type": ["number", "null"], "description": "Active, with "
                        "`--max-hold`: seconds until it is ended; else null."},
        "slot": {"type": ["integer", "null"], "minimum": 1, "description": "Active: the lab "
                 "slot it holds (1 on a one-slot server, 1..N with `--slots N`); waiting: "
                 "null."}}},
    "SessionList": {"type": "object", "required": ["slots", "sessions"], "properties": {
        "slots": {"type": "integer", "minimum": 1, "description": "`--slots`: labs at once."},
        "sessions": {"type": "array", "description": "Active sessions first (oldest first), "
                     "then the waiting ones in queue order.", "items": {
            "type": "object", "required": ["session_id", "status", "position", "slot"],
            "properties": {
                "session_id": {"type": "string", "description": "Another user's session "
                               "shows its first 8 characters only (with `--auth-file`)."},
                "status": {"type": "string", "enum": ["active", "waiting"]},
                "position": {"type": "integer", "minimum": 0},
                "slot": {"type": ["integer", "null"]}, "owner": _NULLABLE_STR}}}}},
    "Device": {"type": "object", "required": ["name", "raw"], "properties": {
        "name": {"type": "string"},
        "raw": {"type": "object", "description": "`netlab inspect --node NAME` output "
                                                 "(mgmt.ipv4, ansible_host, device, ...)."}}},
    "TopologyCheck": {"type": "object", "required": ["ok", "nodes"], "properties": {
        "ok": {"type": "boolean", "enum": [True]},
        "nodes": {"type": "array", "items": {"type": "string"},
                  "description": "The topology's node names, as netlab sees them."}}},
    "LabAcquired": {"type": "object", "required": ["reused", "devices"], "properties": {
        "reused": {"type": "boolean"}, "devices": {"type": "array", "items": _ref("Device")}}},
    "LabState": {"type": "object", "required": ["running", "topology", "ref_count", "devices",
                                                "netlab_status"], "properties": {
        "running": {"type": "boolean"}, "topology": _NULLABLE_STR,
        "ref_count": {"type": "integer", "minimum": 0},
        "devices": {"type": "array", "items": _ref("Device")},
        "netlab_status": {"type": "string", "enum": [STOPPED, STARTING, RUNNING, STOPPING]},
        "last_error": _NULLABLE_STR,
        "fingerprint": {"type": ["string", "null"], "description": "The running lab's "
                        "fingerprint (SHA-256 hex over the topology and extra files); a pool "
                        "client prefers a host whose lab is warm with the one it declared."}}},
    "LabSummary": {"type": "object", "properties": {
        "state": {"type": "string", "enum": [STOPPED, STARTING, RUNNING, STOPPING]},
        "topology": _NULLABLE_STR, "ref_count": {"type": "integer"},
        "devices": {"type": "array", "items": {"type": "string"}}}},
    "Summary": {"type": "object", "properties": {
        "service": {"type": "string", "const": "remote-lab"}, "version": {"type": "string"},
        "uptime": {"type": "number"}, "queue_length": {"type": "integer"},
        "active_session": _NULLABLE_STR, "lab": _ref("LabSummary"), "docs": {"type": "string"},
        "pid": {"type": "integer"}, "simulated": {"type": "boolean"},
        "netlab": {"type": "string", "description": "the netlab command (absolute path), or "
                                                   "the built-in simulator's name"},
        "slots": {"type": "integer", "minimum": 2, "description": "Only with `--slots N` (N > "
                  "1): labs at once; `lab` and `active_session` are then slot 1's lab and the "
                  "oldest active session."},
        "labs": {"type": "array", "description": "Only with `--slots N` (N > 1): each slot's "
                 "lab (as `lab`) and its active session.", "items": {
                     "type": "object", "properties": {
                         "slot": {"type": "integer", "minimum": 1},
                         "session": _NULLABLE_STR,
                         "state": {"type": "string",
                                   "enum": [STOPPED, STARTING, RUNNING, STOPPING]},
                         "topology": _NULLABLE_STR, "ref_count": {"type": "integer"},
                         "devices": {"type": "array", "items": {"type": "string"}}}}}}},
    "DebugHealth": {"type": "object", "required": ["status", "timestamp", "uptime", "sessions",
                                                   "queue_length"], "properties": {
        "status": {"type": "string", "const": "ok"}, "timestamp": {"type": "number"},
        "uptime": {"type": "number"}, "queue_length": {"type": "integer"},
        "sessions": {"type": "integer", "minimum": 0,
                     "description": "How many sessions are queued (active and waiting), as the "
                                    "seed's server answers; the sessions are in `session_list`."},
        "session_list": {"type": "array", "items": {"type": "object", "properties": {
            "session_id": {"type": "string"}, "position": {"type": "integer"},
            "status": {"type": "string", "enum": ["active", "waiting"]},
            "age": {"type": "number"}, "idle": {"type": "number"},
            "owner": _NULLABLE_STR, "user": _NULLABLE_STR}}},
        "lab": {"type": "object", "description": "Slot 1's lab."}, "version": {"type": "string"},
        "netlab_calls": {"type": "object", "additionalProperties": {"type": "integer"}},
        "netlab_failures": {"type": "object", "additionalProperties": {"type": "integer"}},
        "counters": {"type": "object", "additionalProperties": {"type": "integer"}},
        "slots": {"type": "integer", "minimum": 2,
                  "description": "Only with `--slots N` (N > 1): labs at once."},
        "labs": {"type": "array", "description": "Only with `--slots N` (N > 1): each slot's "
                 "lab, as `lab`, with its `slot`.", "items": {"type": "object", "properties": {
                     "slot": {"type": "integer", "minimum": 1}}}}}},
    "StatusHolder": {"type": "object", "properties": {
        "session": {"type": "string"}, "you": {"type": "boolean"},
        "since": {"type": "number"}, "last_seen": {"type": "number"},
        "topology": _NULLABLE_STR, "held_s": {"type": "number"}, "owner": _NULLABLE_STR,
        "note": _NULLABLE_STR, "link": _NULLABLE_STR,
        "hold_left_s": {"type": ["number", "null"], "description": "With `--max-hold`: "
                        "seconds until it is ended; else null."}}},
    "StatusLab": {"type": "object", "properties": {
        "state": {"type": "string"}, "running": {"type": "boolean"},
        "topology": _NULLABLE_STR, "ref_count": {"type": "integer"},
        "holder": {"type": ["string", "null"], "description": "The session that started or "
                   "last acquired it (8 characters)."},
        "devices": {"type": "array", "items": {"type": "object", "properties": {
            "name": {"type": "string"}, "device": _NULLABLE_STR, "mgmt": _NULLABLE_STR}}},
        "last_error": _NULLABLE_STR,
        "warm_until": {"type": ["number", "null"], "description": "In `labs` only: Unix time "
                       "until which the idle lab is kept warm (`--keep-warm`), else null."}}},
    "Status": {"type": "object", "required": ["token", "server_time", "holder", "queue", "lab",
                                              "events"], "properties": {
        "service": {"type": "string"}, "version": {"type": "string"},
        "token": {"type": "string", "description": "Changes whenever the state does."},
        "server_time": {"type": "number"}, "started": {"type": "number"},
        "uptime": {"type": "number"},
        "timeouts": {"type": "object", "properties": {"waiting": {"type": "number"},
                                                      "active": {"type": "number"}}},
        "holder": {"oneOf": [{"type": "null"}, _ref("StatusHolder")]},
        "queue": {"type": "array", "items": {"type": "object", "properties": {
            "position": {"type": "integer"}, "session": {"type": "string"},
            "you": {"type": "boolean"}, "joined": {"type": "number"},
            "last_seen": {"type": "number"}, "owner": _NULLABLE_STR, "note": _NULLABLE_STR,
            "link": _NULLABLE_STR,
            "eta_s": {"type": ["number", "null"], "description": "Estimated seconds until it "
                      "is active (null: unknown, no history yet)."}}}},
        "max_hold": {"type": "number", "description": "`--max-hold` in seconds (0: none)."},
        "join_eta_s": {"type": ["number", "null"], "description": "The estimated wait of a "
                       "session joining now (0: the lab is free; null: unknown)."},
        "lab": _ref("StatusLab"),
        "slots": {"type": "integer", "minimum": 1, "description": "`--slots`: labs at once. "
                  "`holder` is the oldest active session, `lab` slot 1's lab; `labs` has every "
                  "slot's."},
        "labs": {"type": "array", "items": {"type": "object", "required": ["slot", "lab",
                                                                           "holder"],
                                            "properties": {
            "slot": {"type": "integer", "minimum": 1},
            "lab": _ref("StatusLab"),
            "holder": {"oneOf": [{"type": "null"}, _ref("StatusHolder")],
                       "description": "The active session in the slot, as `holder`."}}}},
        "events": {"type": "array", "items": {"type": "object", "properties": {
            "time": {"type": "number"}, "kind": {"type": "string"}, "text": {"type": "string"},
            "detail": _NULLABLE_STR}}},
        "html": {"type": "object", "description": "The status page's sections, rendered: the "
                 "page's script swaps them in.", "properties": {
                     name: {"type": "string"} for name in ("holder", "queue", "lab", "events",
                                                           "uptime")}}}},
}

_openapi_cache = []  # type: List[dict]


def openapi_document() -> dict:
    """The OpenAPI 3.1 document (built once)."""
    if _openapi_cache:
        return _openapi_cache[0]
    paths = App.endpoints.openapi_paths()
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "remote-lab", "version": __version__,
                 "summary": "Share one netlab lab host between many test runs.",
                 "description": "A FIFO queue of exclusive sessions named by `X-Session-ID`; the "
                                "head of the queue is active and alone may use `/lab*`. Errors "
                                "are JSON `{\"detail\": ...}`. Any request naming a session "
                                "(header or path) counts as its sign of life.",
                 "license": {"name": "MIT", "identifier": "MIT"}},
        "servers": [{"url": "/"}],
        "tags": [{"name": "sessions"}, {"name": "lab"}, {"name": "server"},
                 {"name": "operations"}],
        "paths": paths,
        "components": {
            "schemas": OPENAPI_SCHEMAS,
            "securitySchemes": {  # used only with --auth-file (see the 401 answers)
                "bearer": {"type": "http", "scheme": "bearer",
                           "description": "A token of the server's `--auth-file`."},
                "basic": {"type": "http", "scheme": "basic",
                          "description": "The user's name, and the token as password."}},
            "parameters": {
                "SessionHeader": {"name": "X-Session-ID", "in": "header", "required": True,
                                  "schema": {"type": "string"},
                                  "description": "The caller's session id."},
                "SessionPath": {"name": "session_id", "in": "path", "required": True,
                                "schema": {"type": "string"}, "description": "A session id."}},
            "responses": {"GenericError": _error(
                "Errors of any endpoint: 404 unknown path, 405 method not allowed on the path, "
                "400 invalid Content-Length, 413 a body over 1 MiB (except POST /lab), 403 a "
                "Host header that is not a loopback name while the server listens on loopback "
                "(DNS rebinding; see `--allow-host`), 500 internal error.",
                "no such endpoint: GET /nope")}},
    }
    _openapi_cache.append(doc)
    return doc


# -- 9.5 the API docs page (rendered from the document; "try it" forms need JavaScript) --------

DOCS_JS = r"""
(function () {
  "use strict";
  function pretty(t) { try { return JSON.stringify(JSON.parse(t), null, 2); } catch (e) { return t; } }
  function fill(sid) {
    var els = document.querySelectorAll('input[name="X-Session-ID"], input[name="session_id"]'), i;
    for (i = 0; i < els.length; i++) if (!els[i].value) els[i].value = sid;
  }
  var forms = document.querySelectorAll("form.try"), k;
  for (k = 0; k < forms.length; k++) forms[k].addEventListener("submit", function (ev) {
    ev.preventDefault();
    var f = ev.target, path = f.getAttribute("data-path"), q = [], headers = {}, body = null;
    var out = f.querySelector("pre.out"), inputs = f.querySelectorAll("[data-in]"), i, j;
    var kind = f.getAttribute("data-body"), json = {}, filled = false;
    if (kind === "multipart") body = new FormData();
    for (i = 0; i < inputs.length; i++) {
      var el = inputs[i], where = el.getAttribute("data-in"), name = el.name, v = el.value;
      if (where === "path") path = path.replace("{" + name + "}", encodeURIComponent(v));
      else if (where === "query" && v !== "") q.push(encodeURIComponent(name) + "=" + encodeURIComponent(v));
      else if (where === "header" && v !== "") headers[name] = v;
      else if (where === "form" && el.type === "file") { for (j = 0; j < el.files.length; j++) body.append(name, el.files[j], el.files[j].name); }
      else if (where === "form" && v !== "") body.append(name, v);
      else if (where === "json" && v !== "") { json[name] = v; filled = true; }
    }
    if (kind === "json" && filled) { body = JSON.stringify(json); headers["Content-Type"] = "application/json"; }
    var url = path.replace(/^\//, "") + (q.length ? "?" + q.join("&") : "");
    out.textContent = f.getAttribute("data-method") + " " + path + " ...";
    fetch(url || ".", {method: f.getAttribute("data-method"), headers: headers, body: body}).then(function (r) {
      return r.text().then(function (t) {
        out.textContent = r.status + " " + r.statusText + "\n" + pretty(t);
        try { var d = JSON.parse(t); if (d && d.session_id) fill(d.session_id); } catch (e) {}
      });
    }).catch(function (e) { out.textContent = "request failed: " + e.message; });
  });
})();
"""

DOCS_CSS = PAGE_CSS + """
.op h2{font-size:1.05em;display:flex;flex-wrap:wrap;gap:8px;align-items:center}
.m{font:700 .8em ui-monospace,monospace;padding:2px 8px;border-radius:4px;color:#fff}
.m-get{background:#2457c5}.m-post{background:#1a7f37}.m-delete{background:#c4302b}
nav ul{columns:2 240px;padding-left:18px;margin:4px 0}
form.try{border-top:1px dashed var(--line);margin-top:8px;padding-top:8px;display:flex;
flex-wrap:wrap;gap:6px 10px;align-items:end}
form.try label{display:flex;flex-direction:column;font-size:.85em;color:var(--muted)}
form.try input,form.try select{font:inherit;padding:3px 6px;min-width:12em}
form.try pre{flex-basis:100%}
button{font:inherit;padding:4px 14px;cursor:pointer}
td.status,td.status code{white-space:nowrap;word-break:normal}
"""


def _resolve(doc: dict, obj: dict) -> dict:
    while isinstance(obj, dict) and "$ref" in obj:
        node = doc
        for part in obj["$ref"].lstrip("#/").split("/"):
            node = node[part]
        obj = node
    return obj


def schema_text(doc: dict, schema: dict, depth: int = 0) -> str:
    """A one-line, human readable rendering of a JSON schema."""
    name = schema.get("$ref", "").rsplit("/", 1)[-1] if "$ref" in schema else None
    schema = _resolve(doc, schema)
    if depth > 2 and name:
        return name
    if "oneOf" in schema:
        return " | ".join(schema_text(doc, s, depth + 1) for s in schema["oneOf"])
    if "const" in schema:
        return json.dumps(schema["const"])
    if "enum" in schema:
        return " | ".join(json.dumps(v) for v in schema["enum"])
    kind = schema.get("type", "any")
    if isinstance(kind, list):
        return " | ".join(kind)
    if kind == "array":
        return "[" + schema_text(doc, schema.get("items", {}), depth + 1) + ", ...]"
    if kind == "object" and schema.get("properties"):
        required = set(schema.get("required", ()))
        return "{" + ", ".join("%s%s: %s" % (k, "" if k in required else "?",
                                             schema_text(doc, v, depth + 1))
                               for k, v in schema["properties"].items()) + "}"
    if kind == "string" and schema.get("contentMediaType"):
        return "file"
    return kind


def _md(text: str) -> str:
    """Escaped HTML of a description, its Markdown inline code (`...`) as <code>."""
    parts = re.split(r"`([^`\n]+)`", text)
    return "".join("<code>%s</code>" % _h(part) if i % 2 else _h(part)
                   for i, part in enumerate(parts))


def _docs_operation(doc: dict, method: str, path: str, op: dict) -> str:
    params = [_resolve(doc, p) for p in op.get("parameters", ())]
    out = ['<section class="card op" id="op-%s"><h2><span class="m m-%s">%s</span><code>%s</code>'
           '<span>%s</span></h2>' % (_h(op["operationId"]), method, method.upper(), _h(path),
                                     _md(op.get("summary", "")))]
    if op.get("description"):
        out.append("<p>%s</p>" % _md(op["description"]))
    if params:
        out.append('<div class="scroll"><table><thead><tr><th>parameter</th><th>in</th><th>type'
                   "</th><th>description</th></tr></thead><tbody>")
        for p in params:
            out.append("<tr><td><code>%s</code>%s</td><td>%s</td><td>%s</td><td>%s</td></tr>"
                       % (_h(p["name"]), " (required)" if p.get("required") else "", _h(p["in"]),
                          _h(schema_text(doc, p.get("schema", {}))), _md(p.get("description", ""))))
        out.append("</tbody></table></div>")
    body = op.get("requestBody")
    fields, body_kind = {}, None
    if body:
        for ctype, media in body["content"].items():
            schema = _resolve(doc, media["schema"])
            fields = schema.get("properties", {})
            body_kind = "multipart" if ctype == "multipart/form-data" else "json"
            out.append("<p>Request body <code>%s</code>:</p><ul>" % _h(ctype))
            for k, v in fields.items():
                out.append("<li><code>%s</code>%s: %s. %s</li>"
                           % (_h(k), " (required)" if k in schema.get("required", ()) else "",
                              _h(schema_text(doc, v)), _md(v.get("description", ""))))
            out.append("</ul>")
    out.append('<div class="scroll"><table><thead><tr><th>status</th><th>meaning</th><th>body'
               "</th></tr></thead><tbody>")
    for code, resp in op["responses"].items():
        resp = _resolve(doc, resp)
        bodies = []
        for ctype, media in resp.get("content", {}).items():
            text = "%s: %s" % (ctype, schema_text(doc, media.get("schema", {})))
            if "example" in media:
                example = media["example"]
                text += "\nexample: " + (example if isinstance(example, str)
                                         else json.dumps(example, indent=1))
            bodies.append(text)
        out.append('<tr><td class="status"><code>%s</code></td><td>%s</td><td>%s</td></tr>'
                   % (_h(code), _md(resp.get("description", "")),
                      "<pre>%s</pre>" % _h("\n".join(bodies)) if bodies else "-"))
    out.append("</tbody></table></div>")
    # the "try it" form
    out.append('<form class="try" data-method="%s" data-path="%s"%s>'
               % (method.upper(), _h(path), ' data-body="%s"' % body_kind if fields else ""))
    for p in params:
        if p["in"] == "header" and p["name"] == "Accept":
            continue
        out.append('<label>%s <input name="%s" data-in="%s"%s></label>'
                   % (_h(p["name"]), _h(p["name"]), _h(p["in"]),
                      " required" if p.get("required") else ""))
    for k, v in fields.items():
        if body_kind == "json":  # a JSON object of strings: one text field each
            out.append('<label>%s <input name="%s" data-in="json"></label>' % (_h(k), _h(k)))
        elif v.get("type") == "array" or v.get("contentMediaType"):
            out.append('<label>%s <input type="file" name="%s" data-in="form"%s></label>'
                       % (_h(k), _h(k), " multiple" if v.get("type") == "array" else ""))
        else:
            out.append('<label>%s <select name="%s" data-in="form"><option value="">(default)'
                       "</option>%s</select></label>"
                       % (_h(k), _h(k), "".join("<option>%s</option>" % _h(e)
                                                for e in v.get("enum", ()))))
    out.append('<button type="submit">Try it</button><pre class="out" aria-live="polite">'
               "</pre></form></section>")
    return "".join(out)


def render_docs_page(doc: dict) -> bytes:
    ops = []
    for path, item in doc["paths"].items():
        for method, op in item.items():
            ops.append((method, path, op))
    nav = "".join('<li><a href="#op-%s"><code>%s %s</code></a> %s</li>'
                  % (_h(op["operationId"]), method.upper(), _h(path), _md(op.get("summary", "")))
                  for method, path, op in ops)
    info = doc["info"]
    page = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width,initial-scale=1">
<title>remote-lab API</title><style>%(css)s</style></head>
<body><header><h1>remote-lab API</h1><span class="muted">version %(version)s, OpenAPI %(oas)s:
<a href="openapi.json">openapi.json</a> &middot; <a href=".">status page</a></span></header>
<main><section class="card"><p>%(description)s</p><nav><ul>%(nav)s</ul></nav></section>
%(ops)s</main>
<footer class="muted">The "try it" forms send real requests to this server (JavaScript needed).
A session id returned by <code>POST /session</code> fills the empty session fields.</footer>
<script>%(js)s</script></body></html>
""" % {"css": DOCS_CSS, "version": _h(info["version"]), "oas": _h(doc["openapi"]),
       "description": _md(info["description"]), "nav": nav,
       "ops": "\n".join(_docs_operation(doc, m, p, o) for m, p, o in ops), "js": DOCS_JS}
    return page.encode("utf-8")


# ============================================================================================
# 10. Simulated netlab (--simulate): the same runner code paths, netlab played by this file
# ============================================================================================

SIMULATED_NETLAB_FLAG = "--simulated-netlab"
SIM_SNAPSHOT = NETLAB_SNAPSHOT
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


def simple_topology_link_strings(text: str) -> List[str]:
    """The ``links`` given as strings (``r1-r2``), in the inline or the block list form."""
    m = re.search(r"^links\s*:\s*(.*?)\s*(#.*)?$", text, re.M)
    if not m:
        return []
    if m.group(1).startswith("["):
        return [x.strip().strip("'\"") for x in m.group(1).strip("[]").split(",") if x.strip()]
    links = []
    for sub in text[m.end():].splitlines()[1:]:
        if sub.strip() and not sub[0].isspace() and not sub.startswith("-"):
            break  # the next top-level key
        item = re.match(r"^\s*-\s+([^:#]+?)\s*(#.*)?$", sub)
        if item and not sub.startswith("    "):
            links.append(item.group(1).strip("'\""))
    return links


def simulated_create(args: List[str]) -> int:
    """``create -o none|json:nodes=- TOPOLOGY``: validate (nodes, string links) and write no
    file; with ``json:nodes=-`` the nodes as JSON on stdout (netlab's own errors and exit 1)."""
    path = simulated_netlab_args(args)[0]
    try:
        with open(path) as f:
            text = f.read()
    except OSError as e:
        print("Fatal error in netlab: cannot read topology %s: %s" % (path, e), file=sys.stderr)
        return 1
    nodes = [name for name, _ in simple_topology_nodes(text)]
    errors = [] if nodes else ["MissingValue in topology: topology does not have any nodes"]
    for i, link in enumerate(simple_topology_link_strings(text), start=1):
        errors += ["IncorrectValue in links: Link string %s in links[%d] refers to an unknown "
                   "node %s" % (link, i, n) for n in link.split("-") if n not in nodes]
    if errors:
        print("Errors encountered while processing %s" % os.path.basename(path), file=sys.stderr)
        print("\n".join(errors), file=sys.stderr)
        print("Fatal error in netlab: Cannot proceed beyond this point due to errors, exiting",
              file=sys.stderr)
        return 1
    if "json:nodes=-" in args:
        print(json.dumps({n: {"name": n} for n in nodes}, indent=2))
    return 0


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


def simulated_down(labdir: str) -> int:
    if not os.path.exists(os.path.join(labdir, SIM_SNAPSHOT)):
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


def simulated_status(args: List[str]) -> int:
    """``status [--all] [--format json]`` and ``status -i ID --cleanup``, as netlab 26.10 answers
    them (the cleanup asks for confirmation on stdin, then runs ``down --cleanup`` in the dir)."""
    reg = sim_registry()
    as_json = "json" in args
    if not reg:
        print(json.dumps({"warning": "No netlab-managed labs"}) if as_json
              else "No netlab-managed labs")
        return 1
    if "--cleanup" in args:
        instance = args[args.index("-i") + 1] if "-i" in args else "default"
        if instance not in reg:
            print("FatalError in status: Unknown instance %s" % instance, file=sys.stderr)
            return 1
        labdir = reg[instance].get("dir")
        print('Cleanup will remove lab instance "%s" in %s. Are you sure? [y/n]: ' % (
            instance, labdir), end="", flush=True)
        answer = sys.stdin.readline()
        if not answer:
            print("EOFError: EOF when reading a line", file=sys.stderr)
            return 1
        if answer.strip().lower() not in ("y", "yes"):
            return 0
        print("Shutting down lab %s in %s" % (instance, labdir))
        if not os.path.isdir(labdir):
            print("FatalError in status: Cannot change directory to %s" % labdir, file=sys.stderr)
            return 1
        return simulated_down(labdir)
    if as_json:
        print(json.dumps(reg, indent=2))
        return 0
    for key, entry in reg.items():
        print("%s  %s  %s" % (key, entry.get("dir"), entry.get("status")))
    return 0


def simulated_netlab_args(args: List[str]) -> Tuple[str, Optional[int]]:
    """(topology, multilab instance id or None) from ``up``'s or ``create``'s arguments: the
    id comes only from ``-s defaults.multilab.id=K`` with ``--plugin multilab``, as in netlab
    26.10."""
    topology, multilab, plugins, i = None, None, [], 0
    while i < len(args):
        arg = args[i]
        if arg in ("-s", "--set", "--plugin", "-o", "--output") and i + 1 < len(args):
            value, i = args[i + 1], i + 2
            if arg == "--plugin":
                plugins.append(value)
            elif value.startswith("defaults.multilab.id="):
                multilab = int(value.split("=", 1)[1])  # (not an int: netlab fails too)
            continue
        if not arg.startswith("-") and topology is None:
            topology = arg
        i += 1
    return topology or "topology.yml", multilab if "multilab" in plugins else None


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
        topo_path, multilab = simulated_netlab_args(args)
        instance = "default" if multilab is None else str(multilab)
        running = sim_registry().get(instance)
        if running and running.get("dir") != cwd:
            print("It looks like the lab instance '%s' is already running in directory %s"
                  % (instance, running.get("dir")))
            return 1
        try:
            with open(topo_path) as f:
                text = f.read()
        except OSError as e:
            print("Fatal error in netlab: cannot read topology %s: %s" % (topo_path, e),
                  file=sys.stderr)
            return 1
        # like real netlab: a topology error fails in the transformation, before the instance
        # is registered (registering here left a stale `default` no `down` could clean)
        nodes = simple_topology_nodes(text)
        if not nodes:
            print("Fatal error in netlab: topology %s has no nodes" % topo_path, file=sys.stderr)
            return 1
        dm = re.search(r"^defaults\.device\s*:\s*([\w.-]+)", text, re.M)
        default_device = dm.group(1) if dm else "frr"
        data = {}
        subnet = 121 if multilab is None else multilab  # the plugin's 192.168.K.0/24
        for idx, (name, device) in enumerate(nodes, start=1):
            device = device or default_device
            addr = "192.168.%d.%d" % (subnet, 100 + idx)
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
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime())
        sim_registry(lambda d: d.__setitem__(instance, {
            "dir": cwd, "status": "started",
            "name": os.path.basename(cwd) if multilab is None else "ml-%d" % multilab,
            "providers": ["simulated"], "log": [stamp + ": started"], "timestamp": stamp}))
        print("[SUCCESS] Lab started (simulated)")
        return 0
    if verb == "create":
        return simulated_create(args)
    if verb == "status":
        return simulated_status(args)
    if verb in ("inspect", "down"):
        instance = None
        for flag in ("--instance", "-i"):
            if flag in args:
                instance = args[args.index(flag) + 1]
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
        if verb == "down":
            return simulated_down(labdir)
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
# 11. main(): CLI, logging, single-instance lock, status file, signals, reload (SIGHUP re-exec)
# ============================================================================================

LOG_FORMAT = "%(asctime)s | %(levelname)s | %(name)s | %(ctx)s | %(message)s"
LOG_DATEFMT = "%Y-%m-%d %H:%M:%S"


def setup_logging(settings: Settings) -> None:
    if settings.log_config:
        try:
            from logging import config as logging_config  # not `import logging.config`: local name
            with open(settings.log_config) as f:
                config = json.load(f)
            logging_config.dictConfig(config)
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

    def acquire(self, handed_over: Optional[int] = None) -> None:
        """Lock the file, or adopt the lock a reload handed over (fd ``handed_over``)."""
        import fcntl
        if handed_over is not None and self._adopt(handed_over):
            return
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

    def _adopt(self, fd: int) -> bool:
        """The lock fd a reload handed over, still locked all along (no second server could
        start in between): kept if it is this very file."""
        import fcntl
        try:
            have, want = os.fstat(fd), os.stat(self.path)
            if (have.st_dev, have.st_ino) != (want.st_dev, want.st_ino):
                log.warning("reload: fd %d handed over is not %s; locking it again", fd, self.path)
                return False
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours already: a no-op that proves it
            os.set_inheritable(fd, False)
        except OSError as e:
            log.warning("reload: the lock handed over (fd %d) is unusable (%s); locking %s again",
                        fd, e, self.path)
            return False
        self.fd = fd
        return True

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
        import uuid
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


SCRIPT = os.path.abspath(__file__)  # what a reload re-executes (the upgraded file, if any)
RELOAD_PID_ENV = "REMOTE_LAB_RELOAD_PID"  # to the re-executed server: you are a reload of pid N
LOCK_FD_ENV = "REMOTE_LAB_LOCK_FD"  # ... and this fd is your instance lock, still locked
PREFLIGHT_TIMEOUT = 30.0  # s for `remote_lab.py --version` before a reload
RELOAD_DRAIN_TIMEOUT = 30.0  # s for the answers in flight before the exec


class Reload:
    """SIGHUP: re-execute this server in place (same pid, for systemd's Type=notify), with the
    same arguments, once the new file passed a preflight and what was in flight is answered.

    The listening socket (never closed) goes to the new program on fd 3 with LISTEN_FDS and
    LISTEN_PID, as socket activation passes it; the instance lock's fd goes along too (named by
    REMOTE_LAB_LOCK_FD). A new file that does not run, or an exec that fails, leaves this server
    serving as before.
    """

    def __init__(self, argv: List[str], app: App, server: "LabHTTPServer", lock: InstanceLock,
                 stop_signal: threading.Event):
        self.argv = list(argv)
        self.app, self.server, self.lock = app, server, lock
        self.stop_signal = stop_signal  # SIGTERM/SIGINT came: no exec, main() stops
        self.requested = False  # the preflight passed: serve_forever() returns for run()
        self.busy = False  # a reload is under way: another SIGHUP meanwhile is ignored

    @staticmethod
    def handed_over(environ=None) -> Optional[int]:
        """In the re-executed server: the lock fd its predecessor handed over; None on an
        ordinary start. The variables go (netlab must not see them)."""
        env = os.environ if environ is None else environ
        pid, fd = env.pop(RELOAD_PID_ENV, None), env.pop(LOCK_FD_ENV, None)
        try:
            return int(fd) if pid and int(pid) == os.getpid() and fd else None
        except ValueError:
            return None

    def request(self) -> None:
        """From the SIGHUP handler: the preflight in a thread; serving goes on meanwhile."""
        if self.busy or self.stop_signal.is_set():
            log.info("received SIGHUP: a reload or stop is already under way")
            return
        self.busy = True
        log.info("received SIGHUP: reloading (checking %s first)", SCRIPT)
        threading.Thread(target=self._check_then_stop_serving, name="reload", daemon=True).start()

    def _check_then_stop_serving(self) -> None:
        problem = self.preflight() or self.auth_file_problem() or self.tls_problem()
        if problem:
            log.error("reload refused, still serving the running version: %s", problem)
            self.busy = False
        elif not self.stop_signal.is_set():
            self.requested = True
            self.server.shutdown()  # serve_forever() returns: main() calls run()

    @staticmethod
    def preflight() -> Optional[str]:
        """What is wrong with the file to re-execute (it must at least run ``--version``)."""
        import subprocess
        try:
            p = subprocess.run([sys.executable, SCRIPT, "--version"], stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               timeout=PREFLIGHT_TIMEOUT)
        except subprocess.TimeoutExpired:
            return "%s --version did not answer within %.0f s" % (SCRIPT, PREFLIGHT_TIMEOUT)
        except OSError as e:
            return "cannot run %s: %s" % (sys.executable, e)
        if p.returncode != 0:
            tail = p.stderr.decode("utf-8", "replace").strip().splitlines()[-4:]
            return "%s --version failed (exit %d): %s" % (
                SCRIPT, p.returncode, " / ".join(x.strip() for x in tail) or "no output")
        log.info("reload: %s runs (%s)", SCRIPT, p.stdout.decode("utf-8", "replace").strip())
        return None

    def auth_file_problem(self) -> Optional[str]:
        """The new server reads --auth-file again: a file it would refuse keeps this one on."""
        if self.app.settings.auth_file:
            try:
                AuthTable.load(self.app.settings.auth_file)
            except AuthFileError as e:
                return str(e)
        return None

    def tls_problem(self) -> Optional[str]:
        """What the re-executed server would refuse to start with in --tls-cert/--tls-key
        (a renewed certificate that does not load): refused now, while this one serves."""
        try:
            tls_context(self.app.settings)
        except TLSSetupError as e:
            return str(e)
        return None

    def run(self) -> None:
        """serve_forever() returned for the reload: drain, save, exec. Returns only when the
        exec failed (serving again) or a stop signal came meanwhile."""
        self.requested = False
        app, server = self.app, self.server
        app.systemd.notifier.reloading()
        log.info("reload: answering what is in flight, closing connections")
        server.start_draining()
        app.stop(teardown=False, how="reload")  # the lab stays; the state is on disk
        if not server.wait_for_answers(RELOAD_DRAIN_TIMEOUT, closed=True):
            log.warning("reload: %d connections still open after %.0f s; re-executing anyway",
                        server.open_connections, RELOAD_DRAIN_TIMEOUT)
        if self.stop_signal.is_set():
            return
        try:
            self.exec()
        except OSError as e:
            log.error("reload: cannot exec %s %s: %s; serving on with the running version",
                      sys.executable, SCRIPT, e)
        app.resume()
        server.draining = False
        self.busy = False
        start_housekeeping(app)
        app.systemd.ready()  # READY=1: the reload is over

    def exec(self) -> None:
        """execve() this program with the fds and variables handed over; raises OSError."""
        argv = [sys.executable, SCRIPT] + self.argv
        log.info("reload: re-executing %s (pid %d)", " ".join(shlex.quote(a) for a in argv),
                 os.getpid())
        for handler in log.handlers + logging.getLogger().handlers:
            handler.flush()
        lock_fd, undo = self._hand_over_fds()  # no logging from here: fd 3 changed
        env = dict(os.environ, **self.app.systemd.notifier.environ)
        env.pop("LISTEN_FDNAMES", None)
        env.update({"LISTEN_FDS": "1", "LISTEN_PID": str(os.getpid()),
                    RELOAD_PID_ENV: str(os.getpid()), LOCK_FD_ENV: str(lock_fd)})
        previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the new server's handler
        try:
            os.execve(sys.executable, argv, env)
        except OSError:
            signal.signal(signal.SIGHUP, previous)
            undo()
            raise

    def _hand_over_fds(self) -> Tuple[int, Callable[[], None]]:
        """The listening socket on fd 3 (where sd_listen_fds() looks), the lock on another fd,
        both inheritable. Returns the lock's fd and what undoes it all."""
        import fcntl
        listen_fd, lock_fd, target = self.server.socket.fileno(), self.lock.fd, SD_LISTEN_FDS_START
        saved = None  # what fd 3 was, moved aside (the lock, a log file...)
        if listen_fd != target:
            try:
                saved = fcntl.fcntl(target, fcntl.F_DUPFD_CLOEXEC, target + 1)
                saved_inheritable = os.get_inheritable(target)
            except OSError:  # fd 3 is free
                pass
            if lock_fd == target:
                lock_fd = saved
            os.dup2(listen_fd, target)
        os.set_inheritable(target, True)
        os.set_inheritable(lock_fd, True)

        def undo():
            os.set_inheritable(lock_fd, False)
            if listen_fd == target:
                os.set_inheritable(target, False)
            elif saved is None:
                os.close(target)
            else:
                os.dup2(saved, target, inheritable=saved_inheritable)
                os.close(saved)
        return lock_fd, undo


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == [SIMULATED_NETLAB_FLAG]:
        return simulated_netlab_main(argv[1:])
    settings = settings_from_args(argv)
    setup_logging(settings)
    open_files = raise_open_files_limit()  # idle connections must not starve accept() of fds
    status_file = StatusFile(settings.status_file)

    def fail(message: str) -> int:
        print(message, file=sys.stderr)
        status_file.update(status="failed", error=message)
        return 1

    problem = check_requirements(settings)
    if problem:
        return fail(problem)
    try:
        auth = AuthTable.load(settings.auth_file) if settings.auth_file else None
    except AuthFileError as e:
        return fail(str(e))
    try:
        tls = tls_context(settings)  # before the lock: a bad certificate changes nothing
    except TLSSetupError as e:
        return fail(str(e))
    handed_over = Reload.handed_over()  # the lock fd, when this start is a reload
    lock = InstanceLock(settings.state_dir)
    try:
        lock.acquire(handed_over)
    except SystemExit as e:
        return fail(str(e))
    if settings.simulate:
        os.environ.setdefault("REMOTE_LAB_SIM_HOME", os.path.join(settings.state_dir, "simulated-netlab"))
    store, existed = StateStore.open(settings.state_dir)  # never fails (section 5a)
    if settings.cleanup:
        return cleanup_state_dir(App(settings, store=store))
    app = App(settings, SystemdNotifier.from_environ(), store, auth)  # no-op without systemd
    try:
        server = bind_server(settings, app, sd_listen_socket(), handed_over is not None)
        server.tls_context = tls
    except OSError as e:
        where = ("ports %d-%d" % settings.port_range if settings.port_range
                 else "port %d" % settings.port)
        return fail("remote-lab: cannot listen on %s %s: %s" % (settings.host, where, e))
    server.limit_connections(settings.max_connections, open_files)
    host, port = server.server_address[:2]
    scheme = "https" if tls else "http"
    lock.record(port=port, host=host, scheme=scheme)
    stop_signal = threading.Event()
    reload = Reload(argv, app, server, lock, stop_signal)
    # before anything reports us as running: a launcher may signal us as soon as it reads that
    install_signal_handlers(app, server, reload, stop_signal)
    announce(settings, status_file, host, port, scheme)
    if auth is None and not RequestGuard.bound_to_loopback(server.server_address):
        log.warning("listening on %s without --auth-file: anyone who can reach this port may "
                    "end others' sessions and run netlab on this host (README: Security)", host)
    app.restore(existed)
    app.systemd.ready()  # READY=1, then STATUS= on changes (section 6)
    start_housekeeping(app)
    try:
        while True:
            server.serve_forever(poll_interval=0.5)
            if stop_signal.is_set() or not reload.requested:
                break
            reload.run()  # re-executes this server; returns when that failed: serve on
    finally:
        stop_serving(app, server, status_file)
    return 0


def check_requirements(settings: Settings) -> Optional[str]:
    """What keeps the server from starting (netlab missing, no sqlite3), or None. Makes
    ``settings.netlab`` absolute."""
    if not settings.simulate:
        found = shutil.which(settings.netlab)
        if not found:
            return ("remote-lab: netlab not found (%r): install it (pip install networklab), "
                    "pass --netlab PATH, or use --simulate to try the server without it"
                    % settings.netlab)
        settings.netlab = os.path.abspath(found)
    try:
        import sqlite3  # noqa: F401  (part of every Debian/Ubuntu/RHEL python3)
    except ImportError:
        return ("remote-lab: this Python (%s) has no sqlite3 module, which keeps the server's "
                "state: use the system's python3, or rebuild it with SQLite" % sys.executable)
    return None


def install_signal_handlers(app: App, server: "LabHTTPServer", reload: "Reload",
                            stop_signal: threading.Event) -> None:
    """SIGTERM/SIGINT stop the server (serve_forever returns), SIGHUP reloads it."""
    def on_signal(signum, frame):
        if signum == signal.SIGHUP:
            reload.request()
        elif not stop_signal.is_set():
            log.info("received %s: shutting down", signal.Signals(signum).name)
            stop_signal.set()
            app.stopping.set()
            app.systemd.stopping(app.settings.teardown_on_exit)
            threading.Thread(target=server.shutdown, daemon=True).start()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)


def announce(settings: Settings, status_file: StatusFile, host: str, port: int,
             scheme: str = "http") -> None:
    """The status file says running (and ``scheme``: the launcher's client needs it); the log
    says where we listen."""
    if not status_file.update(status="running", port=port, host=host, scheme=scheme):
        log.warning("status file %s did not appear within %.0f s; wrote it myself",
                    status_file.path, StatusFile.WAIT_FOR_FILE)
    shown_host = "[%s]" % host if ":" in host else host
    # where we listen is worth a line even at --log-level WARNING (with --port 0 it is news)
    log.log(logging.INFO if log.isEnabledFor(logging.INFO) else logging.WARNING,
            "remote-lab %s: Listening on %s://%s:%d (netlab: %s)", __version__, scheme,
            shown_host, port, "simulated" if settings.simulate else settings.netlab)


def stop_serving(app: App, server: "LabHTTPServer", status_file: StatusFile) -> None:
    """The end: stop (the lab stays up, or goes with --teardown-on-exit), answer what is in
    flight, close the state database."""
    teardown = app.settings.teardown_on_exit
    server.server_close()
    app.stopping.set()
    app.systemd.stopping(teardown)  # STOPPING=1 (once)
    if teardown:
        log.info("tearing down the lab before exit (--teardown-on-exit)")
    app.stop(teardown=teardown)
    if not server.wait_for_answers(2.0):
        log.warning("exiting with requests still unanswered")
    app.store.close()
    status_file.mark_stopped()
    running = 0 if teardown else sum(lab.info.state == RUNNING for lab in app.labs)
    log.info("stopped; the state is saved in %s%s", app.store.path or "memory (not saved)",
             "" if not running else ", the lab left running for the next start"
             if len(app.labs) == 1 else ", %d lab%s left running for the next start"
             % (running, "" if running == 1 else "s"))


def cleanup_state_dir(app: App) -> int:
    """--cleanup: what a state dir holds is torn down for good -- netlab commands still running,
    the saved lab (``netlab down --cleanup``), kept and leftover lab dirs, netlab instances
    registered in the labs dir -- and its sessions forgotten. 0 when nothing is left."""
    saved = app.store.load()
    labs_dir = app.settings.labs_dir
    executor = app.lab.netlab
    executor.kill_orphans(saved.procs)
    dirs = all_lab_dirs(labs_dir)
    registry = app.runner.registry(labs_dir) if dirs or saved.labs else {}
    plan = plan_restore(None, registry or {}, dirs, labs_dir, None)
    executor.keep_unclean(saved.unclean)
    for d in dirs:
        print("remote-lab: tearing down %s" % d)
        executor.teardown(d, "-", force=False)  # `down --cleanup`, then --force if it fails
    executor.clean_stale_instances(plan.stale_instances, labs_dir)
    app.store.clear_sessions()
    for slot in set(saved.labs) | {1}:
        app.store.save_lab(None, slot)
    left = all_lab_dirs(labs_dir)
    app.store.close()
    print("remote-lab: %d session(s) forgotten, %d lab dir(s) torn down%s" % (
        len(saved.sessions), len(dirs) - len(left),
        "; NOT cleaned (see the log): %s" % ", ".join(left) if left else ""))
    return 1 if left or registry is None else 0


if __name__ == "__main__":
    sys.exit(main())
