#!/usr/bin/env python3
"""Benchmark of remote_lab.py (figures, not pass/fail). Standard library only.

    python3 tests/bench.py            # full run (~40 s)
    python3 tests/bench.py --quick    # short run (~15 s)

Starts its own server(s) on loopback (port 0, private temp state dir, ``--log-level WARNING``,
simulated netlab by default or the fake netlab of tests/ with ``--fake``) and prints:

  * poll (GET /session/{id}) and heartbeat (POST /session/heartbeat) req/s with 16 keep-alive
    clients (http.client persistent connections, each client in its own process), p50/p99 latency
  * handoff latency with long-poll: A active, B long-polls GET /session/B?wait=30; time from A's
    DELETE returning to B's poll returning (median, p95 over ~50 handoffs)
  * full cycles/s with 4 contending clients (create → wait active → POST /lab → release → DELETE)
    and netlab calls per cycle (from GET /debug/health ``netlab_calls``)
  * start-up time: spawn → first 204 from /healthz (median of several fresh servers)
  * RSS of the server after the load (VmRSS of /proc/PID/status)
  * a 100 MiB upload (streamed, never in memory here): throughput and the server's RSS growth
  * a queue of 10,000 sessions: POST /session (each committed to the state database before its
    201) with an empty queue and with 10,000 queued, and the restart that restores them all
  * a shared host's workload (not with --quick): 12 CI jobs started at once over 3 topologies
    (A B A C A B A C ..., each holding its lab 1 s; netlab ``up`` 3 s, the fake netlab,
    ``--keep-warm 60``): makespan, ``netlab up`` count, median and max wait of a job

Not collected by pytest (no test_ functions; the name does not match test_*.py).
"""

import argparse
import http.client
import json
import multiprocessing
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SERVER = os.path.join(ROOT, "remote_lab.py")
FAKE_NETLAB = os.path.join(ROOT, "tests", "fake_netlab.py")
TOPOLOGY = os.path.join(ROOT, "tests", "topologies", "simple.yml")
HOST = "127.0.0.1"
MIB = 1024 * 1024


# --------------------------------------------------------------------------------------------
# server process
# --------------------------------------------------------------------------------------------


class Server:
    """A remote_lab.py process on 127.0.0.1, port 0; the port is read from its lock file."""

    def __init__(self, root, name, fake=False, extra=(), pyflags=()):
        self.dir = os.path.join(root, name)
        self.state = os.path.join(self.dir, "state")
        os.makedirs(self.dir)
        self.cmd = [sys.executable, *pyflags, SERVER, "--host", HOST, "--port", "0",
                    "--state-dir", self.state, "--log-level", "WARNING"]
        self.cmd += ["--netlab", FAKE_NETLAB] if fake else ["--simulate"]
        self.cmd += list(extra)
        self.env = dict(os.environ, REMOTE_LAB_SIM_HOME=os.path.join(self.dir, "sim-home"),
                        FAKE_NETLAB_DIR=os.path.join(self.dir, "fake-netlab"))
        self.log_path = os.path.join(self.dir, "server.log")
        self.proc = None
        self.port = None

    def start(self, timeout=15.0):
        """Spawn and wait for the first 204 from /healthz; return seconds from spawn to it."""
        lock = os.path.join(self.state, "server.lock")
        with open(self.log_path, "ab") as logf:
            t0 = time.perf_counter()
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT, env=self.env,
                                         start_new_session=True)
        deadline = t0 + timeout
        while time.perf_counter() < deadline:
            if self.port is None:
                try:
                    with open(lock) as f:
                        self.port = json.loads(f.read() or "{}").get("port")
                except (OSError, ValueError):
                    pass
            if self.port is not None:
                try:
                    conn = http.client.HTTPConnection(HOST, self.port, timeout=5)
                    conn.request("GET", "/healthz")
                    status = conn.getresponse().status
                    conn.close()
                    if status == 204:
                        return time.perf_counter() - t0
                except OSError:
                    pass
            if self.proc.poll() is not None:
                raise RuntimeError("server exited rc=%s:\n%s" % (self.proc.returncode, self.log()))
            time.sleep(0.0005)
        raise RuntimeError("server did not answer /healthz in %.0f s:\n%s" % (timeout, self.log()))

    def log(self):
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""

    def rss_kib(self, field="VmRSS"):
        with open("/proc/%d/status" % self.proc.pid) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        return 0

    def cpu_seconds(self):
        """user + system CPU time the server process has used so far."""
        with open("/proc/%d/stat" % self.proc.pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self):
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except OSError:
            pass
        self.proc.wait()


# --------------------------------------------------------------------------------------------
# tiny client helpers
# --------------------------------------------------------------------------------------------


def request(conn, method, path, body=None, headers=None):
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    return resp.status, (json.loads(data) if data else None)


def new_session(conn, fingerprint=None):
    """POST /session (declaring the lab ``fingerprint`` it will ask for, if given)."""
    body = None if fingerprint is None else json.dumps({"fingerprint": fingerprint}).encode()
    status, body = request(conn, "POST", "/session", body,
                           None if body is None else {"Content-Type": "application/json"})
    assert status == 201, (status, body)
    return body["session_id"], body["status"]


def percentile(values, p):
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * p / 100.0
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# --------------------------------------------------------------------------------------------
# load clients (each in its own process)
# --------------------------------------------------------------------------------------------


def load_client(port, kind, sid, start_at, duration, out):
    """Hammer one endpoint on one persistent connection from start_at for duration seconds."""
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    if kind == "poll":
        method, path, body, headers = "GET", "/session/" + sid, None, {}
    else:
        method, path, body, headers = "POST", "/session/heartbeat", b"", {"X-Session-ID": sid}
    expect = 200 if kind == "poll" else 204
    request(conn, "GET", "/healthz")  # connection up before the clock starts
    lat = []
    errors = 0
    clock = time.perf_counter
    wall_to_perf = clock() - time.time()
    start, end = start_at + wall_to_perf, start_at + wall_to_perf + duration
    while clock() < start:
        time.sleep(0.001)
    while True:
        t = clock()
        if t >= end:
            break
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        resp.read()
        if resp.status != expect:
            errors += 1
        lat.append(clock() - t)
    conn.close()
    out.put((len(lat), errors, lat))


def run_load(server, kind, sids, duration):
    port = server.port
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    start_at = time.time() + 0.5  # all clients connected and ready
    procs = [ctx.Process(target=load_client, args=(port, kind, sid, start_at, duration, out))
             for sid in sids]
    for p in procs:
        p.start()
    cpu0 = server.cpu_seconds()
    results = [out.get(timeout=duration + 30) for _ in procs]
    cpu = server.cpu_seconds() - cpu0  # includes the (idle) connect/finish moments: negligible
    for p in procs:
        p.join(10)
    total = sum(r[0] for r in results)
    errors = sum(r[1] for r in results)
    lat = [x for r in results for x in r[2]]
    return {"rps": total / duration, "requests": total, "errors": errors,
            "server_cpu_us": cpu / total * 1e6 if total else float("nan"),
            "p50_ms": percentile(lat, 50) * 1000, "p99_ms": percentile(lat, 99) * 1000}


# --------------------------------------------------------------------------------------------
# handoff latency with long-poll
# --------------------------------------------------------------------------------------------


def handoff(port, rounds):
    main = http.client.HTTPConnection(HOST, port, timeout=30)
    poller = http.client.HTTPConnection(HOST, port, timeout=60)
    after_return, after_send, bad = [], [], 0
    for _ in range(rounds):
        a, status_a = new_session(main)
        b, _ = new_session(main)
        assert status_a == "active", "queue not empty before the handoff test"
        got = {}

        def poll():
            poller.request("GET", "/session/%s?wait=30" % b)
            got["sent"] = True
            resp = poller.getresponse()
            data = resp.read()
            got["t"] = time.perf_counter()
            got["body"] = json.loads(data)

        t = threading.Thread(target=poll)
        t.start()
        time.sleep(0.015)  # B's long-poll is parked in the server
        t_send = time.perf_counter()
        status, _ = request(main, "DELETE", "/session/" + a)
        t_ret = time.perf_counter()
        t.join(35)
        if status != 204 or got.get("body", {}).get("status") != "active":
            bad += 1
        else:
            after_return.append(got["t"] - t_ret)
            after_send.append(got["t"] - t_send)
        request(main, "DELETE", "/session/" + b)
    main.close()
    poller.close()
    ms = lambda v: v * 1000  # noqa: E731
    return {"median_ms": ms(statistics.median(after_return)), "p95_ms": ms(percentile(after_return, 95)),
            "send_median_ms": ms(statistics.median(after_send)),
            "send_p95_ms": ms(percentile(after_send, 95)), "rounds": len(after_return), "bad": bad}


# --------------------------------------------------------------------------------------------
# full cycles with contending clients
# --------------------------------------------------------------------------------------------


def multipart_parts(topology_name, topology_bytes, extra=None, boundary="benchboundary7d1e"):
    """(content length, list of byte chunks or (chunk, count) repeats) of a multipart body.

    extra: (filename, size, block) streamed as ``size // len(block)`` repeats of ``block``.
    """
    parts = []
    head = ("--%s\r\nContent-Disposition: form-data; name=\"topology\"; filename=\"%s\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n" % (boundary, topology_name)).encode()
    parts += [head, topology_bytes, b"\r\n"]
    if extra:
        name, size, block = extra
        assert size % len(block) == 0
        parts.append(("--%s\r\nContent-Disposition: form-data; name=\"extra_files\"; "
                      "filename=\"%s\"\r\nContent-Type: application/octet-stream\r\n\r\n"
                      % (boundary, name)).encode())
        parts.append((block, size // len(block)))
        parts.append(b"\r\n")
    parts.append(("--%s--\r\n" % boundary).encode())
    length = sum(len(p) if isinstance(p, bytes) else len(p[0]) * p[1] for p in parts)
    return length, parts, "multipart/form-data; boundary=%s" % boundary


def body_stream(parts, progress=None):
    for p in parts:
        if isinstance(p, bytes):
            yield p
        else:
            block, count = p
            for _ in range(count):
                yield block
                if progress is not None:
                    progress[0] += len(block)
    if progress is not None:
        progress[1] = time.perf_counter()


def cycle_client(port, start_at, duration, out):
    with open(TOPOLOGY, "rb") as f:
        topo = f.read()
    length, parts, ctype = multipart_parts("simple.yml", topo)
    body = b"".join(parts)
    conn = http.client.HTTPConnection(HOST, port, timeout=120)
    request(conn, "GET", "/healthz")
    wall_to_perf = time.perf_counter() - time.time()
    start, end = start_at + wall_to_perf, start_at + wall_to_perf + duration
    while time.perf_counter() < start:
        time.sleep(0.001)
    cycles, errors, times = 0, [], []
    while time.perf_counter() < end:
        t = time.perf_counter()
        sid, status = new_session(conn)
        while status != "active":
            st, b = request(conn, "GET", "/session/%s?wait=30" % sid)
            if st != 200:
                errors.append("poll %d" % st)
                break
            status = b["status"]
        hdr = {"X-Session-ID": sid}
        st, b = request(conn, "POST", "/lab", body,
                        dict(hdr, **{"Content-Type": ctype, "Content-Length": str(length)}))
        if st != 200:
            errors.append("POST /lab %d %s" % (st, (b or {}).get("detail", "")[:200]))
        else:
            st, _ = request(conn, "POST", "/lab/release", b"", hdr)
            if st != 204:
                errors.append("release %d" % st)
        st, _ = request(conn, "DELETE", "/session/" + sid)
        if st != 204:
            errors.append("delete %d" % st)
        cycles += 1
        times.append(time.perf_counter() - t)
    out.put((cycles, errors, time.perf_counter() - start, times))


def health(port):
    conn = http.client.HTTPConnection(HOST, port, timeout=30)
    status, body = request(conn, "GET", "/debug/health")
    conn.close()
    return body


def wait_lab_idle(port, timeout=30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = health(port)
        if h["lab"]["state"] == "stopped" and not h["sessions"]:
            return h
        time.sleep(0.02)
    return health(port)


def run_cycles(port, clients, duration):
    before = wait_lab_idle(port)
    ctx = multiprocessing.get_context("fork")
    out = ctx.Queue()
    start_at = time.time() + 0.3
    procs = [ctx.Process(target=cycle_client, args=(port, start_at, duration, out))
             for _ in range(clients)]
    for p in procs:
        p.start()
    results = [out.get(timeout=duration + 90) for _ in procs]
    for p in procs:
        p.join(10)
    after = wait_lab_idle(port)
    cycles = sum(r[0] for r in results)
    elapsed = max(r[2] for r in results)
    errors = [e for r in results for e in r[1]]
    calls = {k: after["netlab_calls"].get(k, 0) - before["netlab_calls"].get(k, 0)
             for k in after["netlab_calls"]}
    per_cycle = {k: v / cycles for k, v in sorted(calls.items()) if v} if cycles else {}
    times = [x for r in results for x in r[3]]
    return {"cycles_per_s": cycles / elapsed, "cycles": cycles, "errors": errors,
            "netlab_calls_per_cycle": sum(calls.values()) / cycles if cycles else float("nan"),
            "netlab_verbs_per_cycle": per_cycle,
            "cycle_median_ms": statistics.median(times) * 1000 if times else float("nan")}


# --------------------------------------------------------------------------------------------
# 100 MiB upload
# --------------------------------------------------------------------------------------------


def upload(server, size_mib):
    port = server.port
    conn = http.client.HTTPConnection(HOST, port, timeout=300)
    wait_lab_idle(port)
    sid, status = new_session(conn)
    assert status == "active", "queue not empty before the upload test"
    with open(TOPOLOGY, "rb") as f:
        topo = f.read()
    block = (bytes(range(256)) * 4096)  # 1 MiB, reused: nothing big in the client's memory
    length, parts, ctype = multipart_parts("simple.yml", topo, ("data/big.bin", size_mib * MIB, block))
    rss_before = server.rss_kib()
    peak = [rss_before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            try:
                peak[0] = max(peak[0], server.rss_kib())
            except OSError:
                break
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    progress = [0, None]
    t0 = time.perf_counter()
    conn.request("POST", "/lab", body=body_stream(parts, progress),
                 headers={"X-Session-ID": sid, "Content-Type": ctype, "Content-Length": str(length)})
    resp = conn.getresponse()
    data = resp.read()
    t_end = time.perf_counter()
    done.set()
    sampler.join()
    if resp.status != 200:
        raise RuntimeError("upload failed: %d %s" % (resp.status, data[:300]))
    request(conn, "POST", "/lab/release", b"", {"X-Session-ID": sid})
    request(conn, "DELETE", "/session/" + sid)
    conn.close()
    sent = (progress[1] or t_end) - t0
    return {"mib_per_s": length / MIB / sent, "end_to_end_s": t_end - t0, "send_s": sent,
            "rss_before_mib": rss_before / 1024, "rss_growth_mib": (peak[0] - rss_before) / 1024}


# --------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------


# -- the shared-host workload (issue 13): 12 jobs over 3 topologies, netlab up 3 s, hold 1 s --

WORKLOAD = "ABACABACABAC"  # arrival order: A x6, B x3, C x3
WORKLOAD_TOPOLOGIES = {k: ("provider: external\ndefaults.device: frr\nnodes: [%s1, %s2]\n"
                           % (k.lower(), k.lower())).encode() for k in "ABC"}


def workload_fingerprint(name):
    """The fingerprint the server computes for topology ``name`` (the README's recipe)."""
    import hashlib
    file = name + ".yml"
    digest = hashlib.sha256(WORKLOAD_TOPOLOGIES[name]).hexdigest()
    return hashlib.sha256(b"topology\0" + file.encode() + b"\0" + digest.encode()).hexdigest()


def workload_job(port, name, start_at, hold, out, declare):
    """One CI job: join the queue at ``start_at`` (declaring its lab's fingerprint if
    ``declare``), wait for the turn, acquire the lab of topology ``name`` (reuse), hold it
    ``hold`` s, release, leave. Puts (name, wait s, end)."""
    conn = http.client.HTTPConnection(HOST, port, timeout=300)
    length, parts, ctype = multipart_parts(name + ".yml", WORKLOAD_TOPOLOGIES[name])
    while time.time() < start_at:
        time.sleep(0.001)
    t0 = time.time()
    sid, status = new_session(conn, workload_fingerprint(name) if declare else None)
    while status != "active":
        st, b = request(conn, "GET", "/session/%s?wait=30" % sid)
        assert st == 200, (st, b)
        status = b["status"]
    waited = time.time() - t0
    hdr = {"X-Session-ID": sid}
    st, b = request(conn, "POST", "/lab", b"".join(parts),
                    dict(hdr, **{"Content-Type": ctype, "Content-Length": str(length)}))
    assert st == 200, (st, b)
    time.sleep(hold)
    request(conn, "POST", "/lab/release", b"", hdr)
    request(conn, "DELETE", "/session/" + sid)
    out.put((name, waited, time.time()))


def shared_host_workload(root, label, extra, up_s=3.0, hold=1.0, declare=False):
    """The 12 jobs against a fresh server (fake netlab, ``up`` taking ``up_s``) started with
    ``extra`` flags, the jobs declaring their fingerprints if ``declare``: makespan, netlab up
    count, median and max wait."""
    server = Server(root, "workload-" + label, fake=True, extra=["--keep-warm", "60"] + extra)
    os.makedirs(server.env["FAKE_NETLAB_DIR"], exist_ok=True)
    with open(os.path.join(server.env["FAKE_NETLAB_DIR"], "up_delay"), "w") as f:
        f.write(str(up_s))
    server.start()
    try:
        out = multiprocessing.Queue()
        start = time.time() + 0.5
        jobs = [multiprocessing.Process(target=workload_job,
                                        args=(server.port, name, start + 0.05 * i, hold, out,
                                              declare))
                for i, name in enumerate(WORKLOAD)]
        for j in jobs:
            j.start()
        results = [out.get(timeout=600) for _ in jobs]
        for j in jobs:
            j.join(10)
        waits = [w for _, w, _ in results]
        return {"makespan_s": max(end for _, _, end in results) - start,
                "ups": health(server.port)["netlab_calls"].get("up", 0),
                "wait_median_s": statistics.median(waits), "wait_max_s": max(waits)}
    finally:
        server.stop()


def startup(root, runs, fake):
    times, nosite = [], []
    for i in range(runs):
        for flags, out in (((), times), (("-S",), nosite)):
            s = Server(root, "startup-%d%s" % (i, "".join(flags)), fake=fake, pyflags=flags)
            try:
                out.append(s.start())
            finally:
                s.stop()
    # the interpreter's own floor on this machine, with and without site (.pth hooks)
    probe = "print([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmRSS')][0])"
    floor = {}
    for flags in ((), ("-S",)):
        spent, rss = [], 0
        for _ in range(5):
            t = time.perf_counter()
            out = subprocess.run([sys.executable, *flags, "-c", probe], check=True,
                                 capture_output=True, text=True).stdout
            spent.append(time.perf_counter() - t)
            rss = int(out) / 1024
        floor[flags] = (statistics.median(spent) * 1000, rss)
    return {"median_ms": statistics.median(times) * 1000, "min_ms": min(times) * 1000,
            "nosite_median_ms": statistics.median(nosite) * 1000,
            "python_floor_ms": floor[()][0], "python_rss_mib": floor[()][1],
            "python_nosite_ms": floor[("-S",)][0], "python_nosite_rss_mib": floor[("-S",)][1]}


def big_queue(root, fake, n):
    """POST /session latency with an empty queue and with ``n`` queued (each one on disk before
    its 201), then the restart with ``n`` sessions to restore: start-up to the first /healthz."""
    server = Server(root, "queue-%d" % n, fake=fake, extra=["--max-queue", str(n + 1000)])
    server.start()
    conn = http.client.HTTPConnection(HOST, server.port, timeout=30)

    def timed_creates(count):
        spent = []
        for _ in range(count):
            t = time.perf_counter()
            sid = new_session(conn)[0]
            spent.append(time.perf_counter() - t)
            request(conn, "DELETE", "/session/" + sid)
        return spent

    try:
        empty = timed_creates(200)
        t = time.perf_counter()
        for _ in range(n):
            new_session(conn)
        fill_s = time.perf_counter() - t
        full = timed_creates(200)
        conn.close()
    finally:
        server.stop()
    restarted = Server.__new__(Server)
    restarted.__dict__.update(server.__dict__, proc=None, port=None)
    os.unlink(os.path.join(server.state, "server.lock"))  # it names the old port until replaced
    try:
        restart_s = restarted.start(timeout=120)
        conn = http.client.HTTPConnection(HOST, restarted.port, timeout=30)
        queued = health_conn(conn)["queue_length"]
        conn.close()
    finally:
        restarted.stop()
    return {"n": n, "empty_median_ms": statistics.median(empty) * 1000,
            "empty_p99_ms": percentile(empty, 99) * 1000,
            "full_median_ms": statistics.median(full) * 1000,
            "full_p99_ms": percentile(full, 99) * 1000, "fill_per_s": n / fill_s,
            "restart_ms": restart_s * 1000, "restored": queued}


def health_conn(conn):
    conn.request("GET", "/debug/health")
    resp = conn.getresponse()
    return json.loads(resp.read())


def fmt(v, unit=""):
    if isinstance(v, float):
        if v != v:
            return "n/a"
        text = "%.0f" % v if abs(v) >= 100 else "%.2f" % v if abs(v) < 10 else "%.1f" % v
    else:
        text = str(v)
    return text + (" " + unit if unit else "")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short run (~15 s)")
    ap.add_argument("--fake", action="store_true", help="use tests/fake_netlab.py instead of --simulate")
    ap.add_argument("--duration", type=float, help="seconds per req/s measurement (3; quick 1.5)")
    ap.add_argument("--clients", type=int, default=16, help="keep-alive load clients (16)")
    ap.add_argument("--upload-mib", type=int, default=100, help="size of the big upload (100)")
    ap.add_argument("--json", metavar="FILE", help="also write the raw figures as JSON")
    ap.add_argument("--queue", type=int, default=10000, help="sessions in the big queue (10000)")
    ap.add_argument("--only", help="comma list of: startup,poll,heartbeat,handoff,cycles,rss,"
                                   "upload,queue,workload (workload: not in --quick)")
    a = ap.parse_args(argv)
    duration = a.duration or (1.5 if a.quick else 3.0)
    only = set(a.only.split(",")) if a.only else None
    want = lambda name: only is None or name in only  # noqa: E731
    root = tempfile.mkdtemp(prefix="remote-lab-bench-")
    res = {}
    t_all = time.perf_counter()
    server = None
    try:
        if want("startup"):
            res["startup"] = startup(root, 3 if a.quick else 7, a.fake)
        server = Server(root, "main", fake=a.fake, extra=["--max-upload-mb", "200"])
        server.start()
        res["rss_idle_mib"] = server.rss_kib() / 1024
        port = server.port
        conn = http.client.HTTPConnection(HOST, port, timeout=30)
        if want("poll") or want("heartbeat") or want("rss"):
            sids = [new_session(conn)[0] for _ in range(a.clients)]
            if want("poll") or want("rss"):
                res["poll"] = run_load(server, "poll", sids, duration)
            if want("heartbeat") or want("rss"):
                res["heartbeat"] = run_load(server, "heartbeat", sids, duration)
            for sid in sids:
                request(conn, "DELETE", "/session/" + sid)
        if want("handoff"):
            res["handoff"] = handoff(port, 20 if a.quick else 50)
        if want("cycles"):
            res["cycles"] = run_cycles(port, 4, 2.0 if a.quick else 5.0)
        res["rss_after_load_mib"] = server.rss_kib() / 1024
        res["rss_hwm_mib"] = server.rss_kib("VmHWM") / 1024
        if want("upload"):
            res["upload"] = upload(server, a.upload_mib)
        conn.close()
        if want("queue"):
            res["queue"] = big_queue(root, a.fake, 2000 if a.quick else a.queue)
        if want("workload") and not (a.quick and only is None):
            res["workload"] = {}
            for slots in (1, 3):
                for affinity in (False, True):
                    label = "--slots %d, %s" % (slots, "affinity" if affinity else
                                                "FIFO (--max-overtake 0)")
                    res["workload"][label] = shared_host_workload(
                        root, "%d%s" % (slots, "a" if affinity else ""),
                        ["--slots", str(slots)] + ([] if affinity else ["--max-overtake", "0"]),
                        declare=affinity)
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(root, ignore_errors=True)
    res["total_s"] = time.perf_counter() - t_all

    rows = []  # (label, value, target text, ok or None)

    def row(label, value, target="", ok=None):
        rows.append((label, value, target, ok))

    for kind in ("poll", "heartbeat"):
        if kind in res:
            r = res[kind]
            row("%s req/s (%d keep-alive clients)" % (kind, a.clients), fmt(r["rps"]),
                "≥ 6000" if kind == "poll" else "", r["rps"] >= 6000 if kind == "poll" else None)
            row("  %s latency p50 / p99" % kind, "%s / %s" % (fmt(r["p50_ms"]), fmt(r["p99_ms"], "ms")))
            row("  %s server CPU per request" % kind, fmt(r["server_cpu_us"], "µs"))
            if r["errors"]:
                row("  %s errors" % kind, str(r["errors"]), "0", False)
    if "handoff" in res:
        r = res["handoff"]
        row("handoff median (DELETE A returned → B's poll)", fmt(r["median_ms"], "ms"), "≤ 10 ms",
            r["median_ms"] <= 10)
        row("  handoff p95", fmt(r["p95_ms"], "ms"))
        row("  from DELETE sent: median / p95", "%s / %s" % (fmt(r["send_median_ms"]),
                                                            fmt(r["send_p95_ms"], "ms")))
        if r["bad"]:
            row("  handoff failures", str(r["bad"]), "0", False)
    if "cycles" in res:
        r = res["cycles"]
        row("full cycles/s (4 contending clients)", fmt(r["cycles_per_s"]), "")
        row("  cycle median (one client)", fmt(r["cycle_median_ms"], "ms"))
        row("  netlab calls per cycle", fmt(r["netlab_calls_per_cycle"]), "",)
        row("    by verb", " ".join("%s=%.2f" % kv for kv in r["netlab_verbs_per_cycle"].items()))
        if r["errors"]:
            row("  cycle errors", "%d (%s)" % (len(r["errors"]), r["errors"][0][:60]), "0", False)
    if "startup" in res:
        r = res["startup"]
        row("start-up to first /healthz (median)", fmt(r["median_ms"], "ms"), "≤ 100 ms",
            r["median_ms"] <= 100)
        row("  min", fmt(r["min_ms"], "ms"))
        row("  bare `python3 -c pass`: time, RSS", "%s / %s" % (fmt(r["python_floor_ms"], "ms"),
                                                              fmt(r["python_rss_mib"], "MiB")))
        row("  same with -S (no site, no .pth hooks)", "%s / %s" % (
            fmt(r["python_nosite_ms"], "ms"), fmt(r["python_nosite_rss_mib"], "MiB")))
        row("  server start-up under python3 -S (median)", fmt(r["nosite_median_ms"], "ms"))
    row("RSS idle (after start)", fmt(res["rss_idle_mib"], "MiB"))
    row("RSS after load", fmt(res["rss_after_load_mib"], "MiB"), "≤ 20 MiB", res["rss_after_load_mib"] <= 20)
    row("  peak RSS (VmHWM) before upload", fmt(res["rss_hwm_mib"], "MiB"))
    if "upload" in res:
        r = res["upload"]
        row("%d MiB upload throughput" % a.upload_mib, fmt(r["mib_per_s"], "MiB/s"))
        row("  upload end-to-end incl. netlab up", fmt(r["end_to_end_s"], "s"))
        row("  server RSS growth during upload", fmt(r["rss_growth_mib"], "MiB"), "< 10 MiB",
            r["rss_growth_mib"] < 10)
    if "queue" in res:
        r = res["queue"]
        row("POST /session, empty queue: p50 / p99", "%s / %s" % (
            fmt(r["empty_median_ms"]), fmt(r["empty_p99_ms"], "ms")))
        row("POST /session, %d queued: p50 / p99" % r["n"], "%s / %s" % (
            fmt(r["full_median_ms"]), fmt(r["full_p99_ms"], "ms")), "a few ms",
            r["full_p99_ms"] <= 5)
        row("  sessions created/s (one client, each on disk)", fmt(r["fill_per_s"]))
        row("  restart restoring %d sessions, to /healthz" % r["restored"],
            fmt(r["restart_ms"], "ms"))
    for label, r in res.get("workload", {}).items():
        row("12 jobs, 3 topologies, up 3 s, hold 1 s (%s): makespan" % label,
            fmt(r["makespan_s"], "s"))
        row("  netlab up count; job wait median / max", "%d; %s / %s" % (
            r["ups"], fmt(r["wait_median_s"]), fmt(r["wait_max_s"], "s")))
    w1 = max(len(r[0]) for r in rows)
    w2 = max(len(r[1]) for r in rows)
    w3 = max(len(r[2]) for r in rows)
    print("remote-lab benchmark: %s netlab, --log-level WARNING, %d CPUs, Python %s%s"
          % ("fake" if a.fake else "simulated", os.cpu_count() or 0, sys.version.split()[0],
             ", quick" if a.quick else ""))
    print("%-*s  %*s  %-*s  %s" % (w1, "figure", w2, "value", w3, "target", ""))
    print("-" * (w1 + w2 + w3 + 10))
    for label, value, target, ok in rows:
        mark = "" if ok is None else ("ok" if ok else "MISS")
        print("%-*s  %*s  %-*s  %s" % (w1, label, w2, value, w3, target, mark))
    print("(whole run %.1f s)" % res["total_s"])
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
