"""In-process doubles for the lab and queue logic: a clock that never sleeps, a netlab runner
that records calls instead of spawning netlab, and uploads made without HTTP."""
import heapq
import itertools
import os
import sys
import threading

from helpers import ROOT

sys.path.insert(0, str(ROOT))
import remote_lab  # noqa: E402


class FakeClock(remote_lab.Clock):
    """Time moves only when told (``advance``) or when someone waits: a timed wait jumps to its
    deadline at once, or to the first callback scheduled (``at``) before it, and runs that
    callback there (with the waiter's lock held, as another thread would take it)."""

    def __init__(self, start=1000.0):
        super().__init__()
        self.t = start
        self._timers = []  # heap of (when, seq, callback)
        self._seq = itertools.count()

    def now(self):
        return self.t

    def at(self, delay, callback):
        heapq.heappush(self._timers, (self.t + delay, next(self._seq), callback))

    def advance(self, seconds):
        """Move time on by ``seconds``, running the callbacks due on the way."""
        self._run_until(self.t + seconds)
        return self.t

    def _run_until(self, until):
        while self._timers and self._timers[0][0] <= until:
            when, _, callback = heapq.heappop(self._timers)
            self.t = max(self.t, when)
            callback()
        self.t = max(self.t, until)

    def wait(self, cond, timeout):
        deadline = self.t + timeout
        if self._timers and self._timers[0][0] <= deadline:
            when, _, callback = heapq.heappop(self._timers)
            self.t = max(self.t, when)
            callback()
        else:
            self.t = deadline


class FakeRunner:
    """The NetlabRunner interface (up, devices, down, records), recording each call.
    ``fail`` holds the verbs that raise NetlabError; ``device_names`` the nodes of every lab."""

    def __init__(self, devices=("r1", "r2")):
        self.calls = []  # (verb, workdir, force)
        self.fail = set()
        self.device_names = list(devices)
        self.records = None
        self.lock = threading.Lock()

    def _call(self, verb, workdir, force=False):
        with self.lock:
            self.calls.append((verb, workdir, force))
        if verb in self.fail:
            raise remote_lab.NetlabError("fake failure of netlab %s" % verb, "last line")

    def up(self, labdir, topology, ctx="-", extra=()):
        assert extra == (), extra  # one slot: no multilab plugin
        self._call("up", labdir)

    def devices(self, labdir, ctx="-"):
        self._call("inspect", labdir)
        return [{"name": n, "raw": {}} for n in self.device_names]

    def down(self, labdir, force=False, ctx="-"):
        self._call("down", labdir, force)

    def verbs(self):
        with self.lock:
            return [c[0] for c in self.calls]


class FakeUpload(remote_lab.Upload):
    """An upload already received: a work dir holding the topology, and its fingerprint."""

    def __init__(self, labs_dir, fingerprint, topology="lab.yml"):
        workdir = os.path.join(str(labs_dir), "lab-%s-%d" % (fingerprint, next(_upload_ids)))
        super().__init__(workdir)
        os.makedirs(workdir)
        with open(os.path.join(workdir, topology), "w") as f:
            f.write("nodes: [r1, r2]\n")
        self.topology = topology
        self.fingerprint = fingerprint


_upload_ids = itertools.count(1)


class LabWorld:
    """A Lab and a SessionQueue sharing one FakeClock and a FakeRunner, wired as App does."""

    def __init__(self, tmp_path, keep_warm=0.0, active_timeout=300.0, waiting_timeout=600.0):
        self.clock = FakeClock()
        ids = itertools.count(1)
        self.queue = remote_lab.SessionQueue(waiting_timeout, active_timeout, 100, self.clock,
                                             new_id=lambda: "s%d" % next(ids))
        self.settings = remote_lab.Settings(state_dir=str(tmp_path / "state"),
                                            keep_warm=keep_warm, active_timeout=active_timeout,
                                            waiting_timeout=waiting_timeout)
        os.makedirs(self.settings.labs_dir, exist_ok=True)
        self.runner = FakeRunner()
        self.lab = remote_lab.Lab(self.runner, self.settings, self.queue.is_active, self.clock)

    def upload(self, fingerprint, topology="lab.yml"):
        return FakeUpload(self.settings.labs_dir, fingerprint, topology)

    def end(self, sid):
        """What App.end_session does to the lab: the queue drops it, its lab is released."""
        was_active, _ = self.queue.remove(sid)
        if was_active:
            self.lab.session_ended(sid)
        self.settle()

    def housekeeping(self):
        """What App.housekeeping_once does to the queue and the lab."""
        for sid, was_active in self.queue.expire():
            if was_active:
                self.lab.session_ended(sid)
        self.lab.expire_warm()
        self.lab.retry_unclean_due()
        self.settle()

    def settle(self, timeout=5.0):
        """Join the background teardowns (instant with the FakeRunner)."""
        for t in list(self.lab.teardowns):
            t.join(timeout)
            assert not t.is_alive(), "a teardown thread hung"

    def state(self):
        return self.lab.snapshot()["state"]
