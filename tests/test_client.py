"""remote_lab_client.RemoteLabClient against real server processes (fake netlab).

Covers the drop-in flow, the queue hand-off, heartbeats, a SIGKILLed client, 423 retries,
a server restart, errors, uploads, .env/env configuration, https and the stdlib-only import.
"""
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from client_support import (MAPPING, SIMPLE, TcpForwarder, active_session, client, client_env,
                            find_python38, free_port, health, make_cert, session_state, sessions,
                            tls_server_context, wait_until)
from client_support import clean_env, servers, srv  # noqa: F401  (fixtures; clean_env autouse)
from helpers import CLIENT, file_size_limit, http, in_thread, kill_if_running
from server_support import seed_fields

import remote_lab_client as rlc  # noqa: E402  (after client_support: repo root on sys.path)


def names(devices):
    return [d.name for d in devices]


def start_waiter(url, **kw):
    """Create a client in a thread (it blocks until active): (thread, result dict with "client"
    and "active_at", or "error")."""
    result = {}

    def become_active():
        result["client"] = client(url, **kw)
        result["active_at"] = time.monotonic()

    return in_thread(become_active, result)


# ------------------------------------------------------------------------------------------
# the drop-in flow
# ------------------------------------------------------------------------------------------


def test_drop_in_flow_acquire_reuse_release_destroy_close(srv, tmp_path):
    topo_dir = tmp_path / "lab"
    (topo_dir / "nodes").mkdir(parents=True)
    topo = topo_dir / "simple.yml"
    topo.write_bytes(SIMPLE.read_bytes())
    (topo_dir / "nodes" / "r1.yml").write_text("hostname: r1\n")
    vars_file = tmp_path / "elsewhere" / "vars.yml"
    vars_file.parent.mkdir()
    vars_file.write_text("x: 1\n")

    with client(srv.url) as c:
        sid = c.session_id
        assert session_state(srv, sid) == (200, {"session_id": sid, "status": "active",
                                                 "position": 0})
        devices = c.acquire(str(topo), reuse=True,
                            extra_files=[topo_dir / "nodes" / "r1.yml", vars_file,
                                         ("group_vars/all.yml", vars_file)])
        assert names(devices) == ["r1", "r2"]
        assert devices.reused is False
        r1 = devices[0]
        assert isinstance(r1, rlc.Device) and r1.raw["ansible_host"]
        assert dict(r1)["name"] == "r1" and r1["ansible_host"] == r1.raw["ansible_host"]
        assert r1.ansible_host == r1.raw["ansible_host"]

        # the upload kept relative paths: the lab dir netlab ran in has them
        up = [call for call in srv.calls() if call["argv"][:1] == ["up"]][-1]
        lab_dir = Path(up["cwd"])
        assert (lab_dir / "nodes" / "r1.yml").read_text() == "hostname: r1\n"
        assert (lab_dir / "vars.yml").read_text() == "x: 1\n"  # outside the topology dir
        assert (lab_dir / "group_vars" / "all.yml").read_text() == "x: 1\n"

        status = c.status()
        assert status["running"] is True and status["ref_count"] == 1
        assert status["topology"] == "simple.yml"

        again = c.acquire(topo, reuse=True, extra_files=[topo_dir / "nodes" / "r1.yml", vars_file,
                                                         ("group_vars/all.yml", vars_file)])
        assert again.reused is True and names(again) == ["r1", "r2"]
        assert c.status()["ref_count"] == 2
        assert names(c.devices()) == ["r1", "r2"]
        c.release()
        c.release()
        assert c.status()["ref_count"] == 0
        assert c.destroy() is True
        wait_until(lambda: health(srv)["lab"]["state"] == "stopped", what="teardown")
        assert c.destroy() is False  # nothing left to destroy
        with pytest.raises(rlc.NoLab):
            c.devices()
    assert c.closed
    assert session_state(srv, sid)[0] == 404  # close() ended the session
    c.close()  # idempotent
    assert srv.netlab_verbs().count("up") == 1 and "down" in srv.netlab_verbs()


def test_destroy_without_force_refuses_a_lab_in_use(srv):
    with client(srv.url) as c:
        assert seed_fields((200, c.session_status())) == (200, {
            "session_id": c.session_id, "status": "active", "position": 0})
        c.acquire(SIMPLE)
        with pytest.raises(rlc.LabInUse) as info:
            c.destroy(force=False)
        assert info.value.status == 409 and "in use" in info.value.detail
        c.release()
        assert c.destroy(force=False) is True


def test_close_releases_what_it_holds_and_ends_the_session(srv):
    c = client(srv.url)
    c.acquire(SIMPLE)
    c.acquire(SIMPLE)
    sid = c.session_id
    c.close()
    assert session_state(srv, sid)[0] == 404
    assert srv.log().count("lab released") == 2
    with pytest.raises(rlc.RemoteLabError, match="closed"):
        c.devices()


def test_a_second_ctrl_c_while_leaving_the_queue_does_not_orphan_the_session(srv):
    holder = client(srv.url)
    c = client(srv.url, start_session=False)
    real = c._http.request
    interrupts = {"GET": 1, "DELETE": 1}  # Ctrl-C while waiting, again while ending the session

    def request(method, *args, **kw):
        if interrupts.get(method):
            interrupts[method] -= 1
            raise KeyboardInterrupt
        return real(method, *args, **kw)

    c._http.request = request
    with pytest.raises(KeyboardInterrupt):
        c.acquire(SIMPLE)
    assert len(sessions(srv)) == 2 and interrupts == {"GET": 0, "DELETE": 0}
    c.close()  # what the CLI (signals held off) and atexit do next
    assert [s["session_id"] for s in sessions(srv)] == [holder.session_id]
    holder.close()


def test_close_runs_at_interpreter_exit(srv):
    script = ("import remote_lab_client as r\n"
              "c = r.RemoteLabClient(%r, progress=False)\n"
              "c.acquire(%r)\n"
              "print(c.session_id, flush=True)\n" % (srv.url, str(SIMPLE)))
    out = subprocess.run([sys.executable, "-c", script], env=client_env(), timeout=30,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert out.returncode == 0, out.stderr
    sid = out.stdout.strip()
    assert session_state(srv, sid)[0] == 404
    assert sessions(srv) == []
    assert "lab released" in srv.log()


# ------------------------------------------------------------------------------------------
# the queue
# ------------------------------------------------------------------------------------------


def test_second_client_becomes_active_right_after_the_first_closes(srv):
    a = client(srv.url)
    a.acquire(SIMPLE)
    t, result = start_waiter(srv.url)
    wait_until(lambda: len(sessions(srv)) == 2, what="the second session")
    time.sleep(0.3)  # the waiter is now inside a long-poll
    assert "client" not in result and t.is_alive()
    closing_at = time.monotonic()
    a.close()  # releases the lab, then DELETE /session
    closed_at = time.monotonic()
    t.join(10)
    assert "client" in result, result
    b = result["client"]
    try:
        delay = result["active_at"] - closing_at
        print("hand-off: second client active %.1f ms after close() began (close() took %.1f ms)"
              % (delay * 1000, (closed_at - closing_at) * 1000))
        assert delay < 0.1, "hand-off took %.0f ms" % (delay * 1000)
        assert active_session(srv) == b.session_id
        assert names(b.acquire(MAPPING)) == ["spine", "leaf1", "leaf2"]
    finally:
        b.close()


def test_waiting_falls_back_to_polling_when_the_server_ignores_wait(srv):
    # the forwarder renames the query parameter, so the server answers at once
    proxy = TcpForwarder(srv.port, rewrite=(b"?wait=", b"?xxxx="))
    try:
        a = client(srv.url)
        t, result = start_waiter(proxy.url, heartbeat_interval=0)
        wait_until(lambda: len(sessions(srv)) == 2, what="the second session")
        before = proxy.received.count(b"GET /session/")
        time.sleep(2.0)
        polls = proxy.received.count(b"GET /session/") - before
        assert 2 <= polls <= 6, "%d polls in 2 s" % polls  # about every 0.5 s, not a busy loop
        assert b"?xxxx=" in proxy.received
        a.close()
        closed_at = time.monotonic()
        t.join(10)
        assert "client" in result, result
        assert result["active_at"] - closed_at < 1.0
        result["client"].close()
    finally:
        proxy.close()


def test_session_timeout_raises_timeout_error_naming_the_position(srv, monkeypatch):
    a = client(srv.url)
    # the environment overrides the argument
    monkeypatch.setenv("REMOTE_LAB_SESSION_TIMEOUT", "1.5")
    t0 = time.monotonic()
    with pytest.raises(rlc.QueueTimeout) as info:
        client(srv.url, session_timeout=600)
    waited = time.monotonic() - t0
    err = info.value
    assert isinstance(err, TimeoutError)
    assert err.position == 1 and "position 1" in str(err)
    assert 1.4 <= waited < 5, waited
    assert session_state(srv, err.session_id)[0] == 404  # deleted on the way out
    assert [s["session_id"] for s in sessions(srv)] == [a.session_id]
    a.close()


# ------------------------------------------------------------------------------------------
# heartbeats and liveness
# ------------------------------------------------------------------------------------------


def test_a_session_started_after_a_queue_timeout_still_sends_heartbeats(srv):
    a = client(srv.url)
    c = client(srv.url, start_session=False, session_timeout=0.5, heartbeat_interval=0.2)
    with pytest.raises(rlc.QueueTimeout):
        c.acquire(SIMPLE)  # lazily starts a session, which times out in the queue
    a.close()
    c.acquire(SIMPLE)  # a new session, active at once
    time.sleep(1.0)
    (mine,) = sessions(srv)
    assert mine["session_id"] == c.session_id and mine["idle"] < 0.6, mine
    c.close()
    assert not c._heartbeat_thread.is_alive()  # close() stops the heartbeats


@pytest.mark.timeout(60)
def test_heartbeats_keep_an_idle_active_session_alive(servers):
    srv = servers.start("--active-timeout", "2")
    c = client(srv.url, heartbeat_interval=0.5)
    c.acquire(SIMPLE)
    t, result = start_waiter(srv.url, heartbeat_interval=0.5)
    time.sleep(5)  # idle: only the heartbeat thread talks
    assert names(c.devices()) == ["r1", "r2"]
    assert active_session(srv) == c.session_id
    assert "client" not in result  # the waiter did not get the lab
    assert "expired" not in srv.log()
    c.close()
    t.join(10)
    result["client"].close()


@pytest.mark.timeout(60)
def test_without_heartbeats_the_session_expires_and_surfaces_as_session_lost(servers):
    srv = servers.start("--active-timeout", "2")
    c = client(srv.url, heartbeat_interval=0)
    c.acquire(SIMPLE)
    wait_until(lambda: "session expired" in srv.log(), timeout=15, what="expiry")
    with pytest.raises(rlc.SessionLost, match="expired or the server restarted"):
        c.devices()
    c.close()


@pytest.mark.timeout(90)
def test_a_sigkilled_client_loses_the_lab_to_the_next_waiter_after_the_timeout(servers):
    srv = servers.start("--active-timeout", "2")
    script = ("import remote_lab_client as r, time\n"
              "c = r.RemoteLabClient(%r, heartbeat_interval=0.5, progress=False)\n"
              "c.acquire(%r)\n"
              "print('READY', c.session_id, flush=True)\n"
              "time.sleep(600)\n" % (srv.url, str(SIMPLE)))
    victim = subprocess.Popen([sys.executable, "-c", script], env=client_env(),
                              stdout=subprocess.PIPE, text=True)
    try:
        line = victim.stdout.readline().split()
        assert line[:1] == ["READY"], line
        victim_sid = line[1]
        t, result = start_waiter(srv.url, heartbeat_interval=0.5)
        wait_until(lambda: len(sessions(srv)) == 2, what="the waiter")
        time.sleep(3)  # longer than --active-timeout: the victim's heartbeats keep the lab
        assert active_session(srv) == victim_sid and "client" not in result
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        killed_at = time.monotonic()
        t.join(30)
        assert "client" in result, result
        delay = result["active_at"] - killed_at
        print("lab handed over %.2f s after SIGKILL (--active-timeout 2)" % delay)
        assert 1.0 <= delay < 15
        b = result["client"]
        assert names(b.acquire(MAPPING)) == ["spine", "leaf1", "leaf2"]
        assert session_state(srv, victim_sid)[0] == 404
        b.close()
    finally:
        if victim.poll() is None:
            victim.kill()
        victim.wait(10)


@pytest.mark.timeout(60)
def test_server_restart_mid_session_raises_session_lost(servers, caplog):
    caplog.set_level(logging.WARNING, logger="remote_lab_client")
    first = servers.start(name="first")
    port = first.port
    c = client(first.url, heartbeat_interval=0.3)
    c.acquire(SIMPLE)
    first.stop()
    second = servers.start("--port", port, name="second")
    assert second.port == port
    wait_until(lambda: "no longer knows session" in caplog.text, timeout=10,
               what="the heartbeat to notice")
    with pytest.raises(rlc.SessionLost, match="expired or the server restarted"):
        c.release()
    with pytest.raises(rlc.SessionLost):
        c.devices()
    c.close()  # does not raise, nothing left to end
    c.close()


def test_session_lost_is_detected_by_a_call_even_before_a_heartbeat(servers):
    first = servers.start(name="first")
    port = first.port
    c = client(first.url, heartbeat_interval=0)
    c.acquire(SIMPLE)
    first.stop()
    servers.start("--port", port, name="second")
    with pytest.raises(rlc.SessionLost):
        c.devices()
    c.close()


# ------------------------------------------------------------------------------------------
# acquisition errors and retries
# ------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_busy_lab_is_retried_until_the_acquisition_timeout(srv):
    c = client(srv.url, lab_acquisition_timeout=2)
    c.acquire(SIMPLE)
    t0 = time.monotonic()
    with pytest.raises(rlc.AcquireTimeout) as info:
        c.acquire(MAPPING)
    elapsed = time.monotonic() - t0
    assert 1.9 <= elapsed < 6, elapsed
    err = info.value
    assert isinstance(err, rlc.LabBusy) and isinstance(err, TimeoutError)
    assert err.status == 423 and "busy" in err.detail
    assert c.status()["topology"] == "simple.yml" and c.status()["ref_count"] == 1
    c.close()


@pytest.mark.timeout(60)
def test_busy_lab_retry_succeeds_once_the_lab_is_released(srv):
    c = client(srv.url, lab_acquisition_timeout=30)
    c.acquire(SIMPLE)
    timer = threading.Timer(1.0, c.release)
    timer.start()
    t0 = time.monotonic()
    devices = c.acquire(MAPPING)
    elapsed = time.monotonic() - t0
    timer.join()
    assert names(devices) == ["spine", "leaf1", "leaf2"]
    assert elapsed >= 0.9
    assert c.status()["topology"] == "mapping.yml"
    c.close()


def test_netlab_failure_raises_lab_failed_with_netlab_output(srv):
    c = client(srv.url)
    srv.switch("up_fail")
    with pytest.raises(rlc.LabFailed) as info:
        c.acquire(SIMPLE)
    assert info.value.status == 502
    assert "fake failure of 'netlab up'" in info.value.detail
    srv.switch("up_fail", on=False)
    assert names(c.acquire(SIMPLE)) == ["r1", "r2"]
    c.close()


def test_upload_larger_than_the_server_limit_raises_upload_too_large(servers, tmp_path):
    srv = servers.start("--max-upload-mb", "1")
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(3 * 1024 * 1024))
    c = client(srv.url)
    with pytest.raises(rlc.UploadTooLarge) as info:
        c.acquire(SIMPLE, extra_files=[("big.bin", big)])
    assert info.value.status == 413 and "limit" in info.value.detail
    assert names(c.acquire(SIMPLE)) == ["r1", "r2"]  # the client recovers its connection
    c.close()


def test_full_disk_on_the_lab_host_is_a_server_error_not_a_netlab_failure(servers, tmp_path):
    with file_size_limit(128 * 1024):  # the server's files cannot grow past 128 KiB
        srv = servers.start()
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(256 * 1024))
    c = client(srv.url)
    with pytest.raises(rlc.ServerError) as info:
        c.acquire(SIMPLE, extra_files=[("big.bin", big)])
    assert not isinstance(info.value, rlc.LabFailed)
    assert info.value.status == 503 and "no room to store the upload" in info.value.detail
    assert names(c.acquire(SIMPLE)) == ["r1", "r2"]  # what fits is still accepted
    c.close()


def test_large_extra_file_is_streamed_intact(srv, tmp_path):
    big = tmp_path / "image.bin"
    data = os.urandom(5 * 1024 * 1024 + 123)
    big.write_bytes(data)
    with client(srv.url) as c:
        c.acquire(SIMPLE, extra_files=[("files/image.bin", big)])
        up = [call for call in srv.calls() if call["argv"][:1] == ["up"]][-1]
        stored = Path(up["cwd"]) / "files" / "image.bin"
        assert hashlib.sha256(stored.read_bytes()).digest() == hashlib.sha256(data).digest()


def test_multipart_body_streams_in_chunks_with_the_length_known_upfront(tmp_path):
    big = tmp_path / "big.bin"
    data = os.urandom(1024 * 1024 + 7)
    big.write_bytes(data)
    topo = tmp_path / "t.yml"
    topo.write_text("nodes: [a]\n")
    body = rlc.MultipartBody([("reuse", "true")], [("topology", "t.yml", str(topo)),
                                                   ("extra_files", 'd/"q".bin', str(big))])
    chunks = list(body)
    assert max(len(c) for c in chunks) <= rlc.UPLOAD_CHUNK + 512
    joined = b"".join(chunks)
    assert len(joined) == body.length
    assert data in joined and b'filename="d/\\"q\\".bin"' in joined
    assert b"".join(body) == joined  # iterable again (a retry re-reads the files)


def test_collect_upload_names_and_errors(tmp_path, monkeypatch):
    lab = tmp_path / "lab"
    (lab / "nodes").mkdir(parents=True)
    (lab / "topo.yml").write_text("nodes: [a]\n")
    (lab / "nodes" / "a.yml").write_text("a")
    (lab / "nodes" / "b.yml").write_text("b")
    (tmp_path / "other.yml").write_text("o")
    monkeypatch.chdir(tmp_path)
    files = rlc.collect_upload(lab / "topo.yml", ["lab/nodes/a.yml", "nodes/b.yml",
                                                  tmp_path / "other.yml"])
    assert [(f, n) for f, n, _ in files] == [("topology", "topo.yml"),
                                             ("extra_files", "nodes/a.yml"),
                                             ("extra_files", "nodes/b.yml"),
                                             ("extra_files", "other.yml")]
    files = rlc.collect_upload(lab / "topo.yml", [("conf", lab / "nodes")])
    assert [n for _, n, _ in files[1:]] == ["conf/a.yml", "conf/b.yml"]
    with pytest.raises(ValueError, match="two files"):
        rlc.collect_upload(lab / "topo.yml", ["nodes/a.yml", ("nodes/a.yml", "other.yml")])
    with pytest.raises(ValueError, match="invalid upload name"):
        rlc.collect_upload(lab / "topo.yml", [("../x.yml", "other.yml")])
    with pytest.raises(FileNotFoundError, match="missing.yml"):
        rlc.collect_upload(lab / "topo.yml", ["missing.yml"])
    with pytest.raises(FileNotFoundError, match="topology file not found"):
        rlc.collect_upload(tmp_path / "nope.yml")


# ------------------------------------------------------------------------------------------
# configuration: URL, .env, environment overrides
# ------------------------------------------------------------------------------------------


def test_parse_dotenv():
    text = "\n".join([
        "# comment",
        "PLAIN=value",
        "export EXPORTED=yes",
        "SPACED = spaced value  ",
        'DOUBLE="a \\"quoted\\" #not-a-comment\\nline2"',
        "SINGLE='raw \\n $x'",
        "INLINE=value # comment",
        "EMPTY=",
        "URL=http://h:8000/path?x=1#frag",
        "not a line",
        "1BAD=x",
        'UNTERMINATED="abc',
    ])
    assert rlc.parse_dotenv(text) == {
        "PLAIN": "value", "EXPORTED": "yes", "SPACED": "spaced value",
        "DOUBLE": 'a "quoted" #not-a-comment\nline2', "SINGLE": "raw \\n $x",
        "INLINE": "value", "EMPTY": "", "URL": "http://h:8000/path?x=1#frag",
        "UNTERMINATED": "abc",
    }


def test_dotenv_in_the_working_directory_is_loaded_and_the_real_environment_wins(
        srv, tmp_path, monkeypatch):
    (tmp_path / ".env").write_text("export REMOTE_LAB_URL='%s'\nREMOTE_LAB_REQUEST_TIMEOUT=7\n"
                                   "REMOTE_LAB_SESSION_TIMEOUT=9 # from .env\n" % srv.url)
    monkeypatch.setenv("REMOTE_LAB_SESSION_TIMEOUT", "11")
    with rlc.RemoteLabClient(progress=False) as c:
        assert c.base_url == srv.url
        assert c.request_timeout == 7 and c.session_timeout == 11
        assert active_session(srv) == c.session_id


def test_environment_overrides_the_timeouts(monkeypatch):
    monkeypatch.setenv("REMOTE_LAB_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("REMOTE_LAB_REQUEST_TIMEOUT", "3")
    monkeypatch.setenv("REMOTE_LAB_SESSION_TIMEOUT", "4.5")
    monkeypatch.setenv("REMOTE_LAB_ACQUISITION_TIMEOUT", "6")
    monkeypatch.setenv("REMOTE_LAB_HEARTBEAT_INTERVAL", "2")
    c = rlc.RemoteLabClient(start_session=False)
    assert (c.request_timeout, c.session_timeout, c.lab_acquisition_timeout,
            c.heartbeat_interval) == (3, 4.5, 6, 2)
    monkeypatch.setenv("REMOTE_LAB_REQUEST_TIMEOUT", "soon")
    with pytest.raises(rlc.ConfigError, match="REMOTE_LAB_REQUEST_TIMEOUT"):
        rlc.RemoteLabClient(start_session=False)


def test_settings_resolve_explicit_over_environment_over_dotenv():
    environ = {"REMOTE_LAB_URL": "http://env:1", "REMOTE_LAB_HEARTBEAT_INTERVAL": "4",
               "REMOTE_LAB_TOKEN": "", "REMOTE_LAB_SESSION_TIMEOUT": " "}
    dotenv = {"REMOTE_LAB_URL": "http://dotenv:2", "REMOTE_LAB_TOKEN": "from-dotenv",
              "REMOTE_LAB_RECONNECT_TIMEOUT": "9", "REMOTE_LAB_SSH_ARGS": "-i 'my key'"}
    config = rlc.ClientConfig.resolve(environ=environ, dotenv=dotenv, heartbeat_interval=2,
                                      defaults={"session_timeout": 5})
    assert (config.url, config.heartbeat_interval, config.reconnect_timeout) == (
        "http://env:1", 2, 9)
    assert config.token is None  # set (empty) in the environment: .env does not fill it in
    assert config.session_timeout == 5 and config.request_timeout == 30  # blank: the default
    assert [config.source(n) for n in ("url", "heartbeat_interval", "reconnect_timeout",
                                       "session_timeout", "lab_acquisition_timeout")] == [
        "REMOTE_LAB_URL", "explicit", ".env", "default", "default"]
    assert config.launch_options() == {"server_args": [], "ssh_args": ["-i", "my key"]}
    assert config.command_environment({"PATH": "/bin"}, REMOTE_LAB_DEVICES="d.json") == {
        "PATH": "/bin", "REMOTE_LAB_URL": "http://dotenv:2", "REMOTE_LAB_TOKEN": "from-dotenv",
        "REMOTE_LAB_RECONNECT_TIMEOUT": "9", "REMOTE_LAB_SSH_ARGS": "-i 'my key'",
        "REMOTE_LAB_DEVICES": "d.json"}
    with pytest.raises(rlc.ConfigError, match="REMOTE_LAB_RECONNECT_TIMEOUT must not be neg"):
        rlc.ClientConfig.resolve(environ={}, dotenv={"REMOTE_LAB_RECONNECT_TIMEOUT": "-1"})


def test_a_client_reads_dotenv_without_changing_the_environment(srv, tmp_path):
    (tmp_path / ".env").write_text("REMOTE_LAB_URL=%s\nREMOTE_LAB_HEARTBEAT_INTERVAL=7\n"
                                   % srv.url)
    before = dict(os.environ)
    with rlc.RemoteLabClient(progress=False) as c:
        assert c.base_url == srv.url and c.heartbeat_interval == 7
    assert dict(os.environ) == before
    assert c.config.source("url") == ".env"


def test_statuses_map_to_exceptions_by_request():
    def error(status, request=None):
        resp = rlc.Response(status, "", {}, json.dumps({"detail": "why"}).encode())
        return rlc._error_for(resp, "doing it", request, subject="topo.yml")

    assert type(error(404)) is rlc.NotFound and type(error(404, "lab")) is rlc.NoLab
    assert type(error(503)) is rlc.ServerError and type(error(503, "join")) is rlc.QueueFull
    assert type(error(502, "upload")) is rlc.LabFailed
    assert str(error(502, "upload")) == "netlab failed to start topo.yml: why (HTTP 502)"
    assert type(error(503, "upload")) is rlc.ServerError
    assert type(error(500, "upload")) is rlc.ServerError
    assert type(error(423)) is rlc.NotActive and type(error(418)) is rlc.RemoteLabError
    assert str(error(409)) == "doing it: why (HTTP 409)" and error(409).detail == "why"


def test_a_lost_session_is_reported_in_the_same_words_by_every_call(srv):
    c = client(srv.url, heartbeat_interval=0)
    c.acquire(SIMPLE)
    assert http("DELETE", srv.url + "/session/" + c.session_id)[0] == 204
    words = ("the remote lab server no longer knows session %s (it expired or the server "
             "restarted)" % c.session_id)
    with pytest.raises(rlc.SessionLost) as first:
        c.session_status()
    assert words in str(first.value) and c.lost.startswith(words)
    with pytest.raises(rlc.SessionLost) as later:
        c.devices()
    assert str(later.value) == c.lost
    c.close()


def test_missing_url_is_a_clear_config_error(tmp_path):
    # a vendored copy with no remote_lab.py beside it or on PATH cannot fall back to local mode
    vendored = tmp_path / "vendored"
    vendored.mkdir()
    shutil.copy(str(CLIENT), str(vendored / "remote_lab_client.py"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("REMOTE_LAB_")}
    env["PATH"] = "/usr/bin:/bin"
    code = ("import remote_lab_client as r\n"
            "try:\n    r.RemoteLabClient()\n"
            "except r.ConfigError as e:\n    print('CONFIG:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=str(vendored), env=env,
                         capture_output=True, text=True, timeout=30)
    assert "CONFIG:" in out.stdout and "set REMOTE_LAB_URL=http://HOST:PORT" in out.stdout, out
    with pytest.raises(rlc.ConfigError, match=r"use http\(s\)://HOST:PORT or ssh://"):
        rlc.RemoteLabClient("ftp://lab-host")


def test_unreachable_server_is_a_connection_error():
    t0 = time.monotonic()
    with pytest.raises(rlc.ConnectionFailed, match="cannot connect"):
        rlc.RemoteLabClient("http://127.0.0.1:9", retries=2)
    assert time.monotonic() - t0 < 5


def test_queue_position_changes_are_logged(srv, caplog):
    caplog.set_level(logging.INFO, logger="remote_lab_client")
    a = client(srv.url)
    b_thread, b = start_waiter(srv.url)
    wait_until(lambda: len(sessions(srv)) == 2, what="the second session")
    c_thread, c = start_waiter(srv.url, progress=None)  # not a TTY here: log lines
    wait_until(lambda: "queue position 2" in caplog.text, what="the first position")
    a.close()
    b_thread.join(10)
    wait_until(lambda: "queue position 1" in caplog.text, what="the position change")
    b["client"].close()
    c_thread.join(10)
    c["client"].close()
    lines = [r.getMessage() for r in caplog.records if "queue position" in r.getMessage()]
    assert [line.split(", ")[0] for line in lines] == [
        "waiting for the remote lab: queue position 2",
        "waiting for the remote lab: queue position 1"]
    assert all(re.match(r"[^,]*, %s \(" % ETA_WORDS, line) for line in lines), lines


ETA_WORDS = r"(wait unknown|any moment now|about \d+ (s|min|h))"  # eta_text's words


WAITER_SCRIPT = """
import logging, sys
import remote_lab_client as r
if sys.argv[2] == "logging":
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="LOG %(message)s")
c = r.RemoteLabClient(sys.argv[1], heartbeat_interval=0)
print("ACTIVE", c.session_id, flush=True)
c.close()
"""


def waiting_script(srv, tmp_path, mode):
    """A script behind two sessions, stderr a pipe (not a TTY): (its stdout, stderr lines)."""
    a = client(srv.url)
    b_thread, b = start_waiter(srv.url)
    wait_until(lambda: len(sessions(srv)) == 2, what="the second session")
    err_path = tmp_path / ("stderr-%s.txt" % mode)
    with open(err_path, "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", WAITER_SCRIPT, srv.url, mode],
                                stdout=subprocess.PIPE, stderr=err, text=True,
                                env=client_env())
        try:
            wait_until(lambda: "position 2" in err_path.read_text(), timeout=20,
                       what="the first progress line")
            a.close()
            b_thread.join(10)
            wait_until(lambda: "position 1" in err_path.read_text(), timeout=20,
                       what="the position change")
            b["client"].close()
            out, _ = proc.communicate(timeout=30)
        finally:
            kill_if_running(proc)
    assert proc.returncode == 0, err_path.read_text()
    return out, err_path.read_text().splitlines()


def test_progress_goes_to_stderr_when_nobody_configured_logging(srv, tmp_path):
    out, lines = waiting_script(srv, tmp_path, "plain")
    sid = out.split()[1]
    page = "%s/?sid=%s" % (srv.url, sid)
    # each line ends naming who holds the lab: a, then b (this process's clients: user@host)
    held = r"; lab held by %s for \d+ s" % re.escape(rlc._local_owner(os.environ))
    expected = [r"remote lab: waiting in the queue at position 2, %s \(waited 0 s\), status page %s"
                % (ETA_WORDS, re.escape(page)) + held,
                r"remote lab: waiting in the queue at position 1, %s \(waited \d+ s\), status "
                r"page %s" % (ETA_WORDS, re.escape(page)) + held]
    assert len(lines) == 2 and all(re.fullmatch(e, line) for e, line in zip(expected, lines)), \
        lines
    assert http("GET", page, headers={"Accept": "text/html"})[0] == 200


def test_progress_uses_logging_when_it_is_configured(srv, tmp_path):
    out, lines = waiting_script(srv, tmp_path, "logging")
    progress = [line for line in lines if "position" in line]
    assert len(progress) == 2 and all(line.startswith("LOG waiting for the remote lab: queue "
                                                      "position ") for line in progress), lines
    assert "/?sid=%s" % out.split()[1] in progress[0]


# ------------------------------------------------------------------------------------------
# HTTP details: keep-alive, retries, token, https
# ------------------------------------------------------------------------------------------


@pytest.mark.timeout(60)
def test_connection_errors_are_retried_while_the_server_starts(servers):
    port = free_port()
    t, result = start_waiter("http://127.0.0.1:%d" % port, retries=6)
    time.sleep(0.5)
    assert t.is_alive()  # still retrying POST /session: nothing was sent, so that is safe
    srv = servers.start("--port", port)
    t.join(20)
    assert "client" in result, result
    assert active_session(srv) == result["client"].session_id
    result["client"].close()


def test_503_is_retried_for_idempotent_requests_only(srv):
    proxy = TcpForwarder(srv.port)
    try:
        c = client(proxy.url, heartbeat_interval=0)
        c.acquire(SIMPLE)
        proxy.fail_next = 2
        c._http.close()  # the next request opens a new connection, which gets the 503s
        assert names(c.devices()) == ["r1", "r2"]  # GET: retried after two 503s
        assert proxy.injected == 2
        proxy.fail_next = 1
        c._http.close()
        with pytest.raises(rlc.ServerError) as info:
            c.release()  # POST: not retried
        assert info.value.status == 503 and "warming up" in info.value.detail
        assert proxy.injected == 3
        assert c.status()["ref_count"] == 1  # the failed release never reached the server
        c.close()
    finally:
        proxy.close()



# ------------------------------------------------------------------------------------------


def test_one_keep_alive_connection_and_bearer_token(srv, monkeypatch):
    monkeypatch.setenv("REMOTE_LAB_TOKEN", "s3cret")
    proxy = TcpForwarder(srv.port)
    try:
        with client(proxy.url, heartbeat_interval=0) as c:
            c.acquire(SIMPLE)
            c.devices()
            c.status()
            c.release()
        requests = proxy.received.count(b" HTTP/1.1\r\n")
        assert requests >= 6
        assert proxy.received.count(b"Authorization: Bearer s3cret\r\n") == requests
        assert proxy.connections == 1
    finally:
        proxy.close()


def test_heartbeats_do_not_wait_for_a_long_request(servers):
    # while POST /lab waits for a slow netlab up, heartbeats use their own connection
    srv = servers.start("--active-timeout", "2")
    srv.switch("up_delay", value="3")
    proxy = TcpForwarder(srv.port)
    try:
        with client(proxy.url, heartbeat_interval=0.3) as c:
            c.acquire(SIMPLE)
            assert proxy.received.count(b"POST /session/heartbeat") >= 3
            assert proxy.connections >= 2
    finally:
        proxy.close()


@pytest.mark.timeout(60)
def test_https_with_a_self_signed_certificate(srv, tmp_path, monkeypatch):
    cert, key = make_cert(tmp_path)
    proxy = TcpForwarder(srv.port, tls=tls_server_context(cert, key))
    try:
        assert proxy.url.startswith("https://")
        t0 = time.monotonic()
        with pytest.raises(rlc.ConnectionFailed, match="REMOTE_LAB_CA_FILE"):
            client(proxy.url)
        assert time.monotonic() - t0 < 3  # a certificate error is not retried

        monkeypatch.setenv("REMOTE_LAB_CA_FILE", str(cert))
        with client(proxy.url) as c:
            assert names(c.acquire(SIMPLE)) == ["r1", "r2"]
            assert c.status()["ref_count"] == 1

        monkeypatch.delenv("REMOTE_LAB_CA_FILE")
        monkeypatch.setenv("REMOTE_LAB_INSECURE", "1")
        with client(proxy.url) as c:
            assert names(c.acquire(SIMPLE)) == ["r1", "r2"]
    finally:
        proxy.close()


# ------------------------------------------------------------------------------------------
# the file itself
# ------------------------------------------------------------------------------------------


IMPORT_CHECK = ("import sys, threading, remote_lab_client as m\n"
                "assert m.__file__.startswith(sys.argv[1]), m.__file__\n"
                "assert 'pytest' not in sys.modules and '_pytest' not in sys.modules\n"
                "assert threading.active_count() == 1\n"
                "assert not m.logging.getLogger('remote_lab_client').handlers\n"
                "print('ok', m.__version__)\n")


def _copy_client(tmp_path):
    target = tmp_path / "vendored"
    target.mkdir()
    (target / "remote_lab_client.py").write_bytes(CLIENT.read_bytes())
    return target


def _bare_env():
    return {k: v for k, v in os.environ.items()
            if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}


def test_imports_with_only_the_file_and_no_site_packages(tmp_path):
    target = _copy_client(tmp_path)
    out = subprocess.run([sys.executable, "-S", "-c", IMPORT_CHECK, str(target)], cwd=str(target),
                         env=_bare_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok ")


def test_runs_on_python_3_8(srv, tmp_path):
    py38 = find_python38()
    if py38 is None:
        pytest.skip("no Python 3.8 interpreter on this machine")
    target = _copy_client(tmp_path)
    out = subprocess.run([py38, "-S", "-c", IMPORT_CHECK, str(target)], cwd=str(target),
                         env=_bare_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    script = ("import remote_lab_client as r, sys\n"
              "with r.RemoteLabClient(sys.argv[1], progress=False) as c:\n"
              "    print(' '.join(d.name for d in c.acquire(sys.argv[2])))\n")
    out = subprocess.run([py38, "-S", "-c", script, srv.url, str(SIMPLE)], cwd=str(target),
                         env=_bare_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["r1", "r2"]
    out = subprocess.run([py38, "-S", str(target / "remote_lab_client.py"), "--url", srv.url,
                          "status", "--json"], env=_bare_env(), stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["url"] == srv.url


def test_file_parses_as_python_3_8():
    import ast
    tree = ast.parse(CLIENT.read_text(), feature_version=(3, 8))
    assert ast.get_docstring(tree)
