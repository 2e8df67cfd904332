#!/usr/bin/env python3
"""remote_lab_client: the client of the remote-lab server (one file, standard library only).

Copy this file into a test suite (air-gapped CI, no pip needed) or install the project.
Python >= 3.8. Importing it has no side effects; pytest is imported only by the plugin part.

Three ways to use it::

    # Python
    from remote_lab_client import RemoteLabClient
    with RemoteLabClient("http://lab-host:8000") as lab:      # waits for its turn in the queue
        for device in lab.acquire("topology.yml"):           # uploads, starts or reuses the lab
            print(device.name, device["ansible_host"])

    # pytest (conftest.py); installed, the plugin loads by itself (entry point pytest11)
    pytest_plugins = ["remote_lab_client"]
    from remote_lab_client import remote_lab_fixture
    lab = remote_lab_fixture("topologies/simple.yml")         # tests take `lab`: the devices

    # shell
    python3 remote_lab_client.py --url http://lab-host:8000 run topology.yml -- pytest tests/

The server's URL comes from ``base_url`` / ``--url`` or ``REMOTE_LAB_URL`` (environment or a
``.env`` file in the working directory; the real environment wins).

Sections, top to bottom (banners ``# N. ...``): 1 errors; 2 configuration (ClientConfig,
resolved once: arguments > environment > ``.env``; ``os.environ`` is never written); 3 HTTP
(one keep-alive connection, whole-call deadlines, one status -> exception table); 4
RemoteLabClient; 5 connect / launch (5a: the program that runs on the lab host, shipped as
this file's own text; 5b: the client side of it); 6 pytest plugin (pytest imported lazily);
7 command line.

PYTEST_DONT_REWRITE (nothing here needs assertion rewriting; a conftest may import this file
before pytest loads it as a plugin).
"""

import argparse
import atexit
import base64
import hashlib
import http.client
import io
import json
import logging
import os
import random
import re
import select
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
import uuid
from collections.abc import Mapping
from dataclasses import asdict as dataclasses_asdict, dataclass, field, replace as dataclasses_replace
from typing import Optional, Tuple

__version__ = "0.1.0"

__all__ = [
    "RemoteLabClient", "ClientConfig", "Device", "DeviceList", "remote_lab_fixture",
    "load_dotenv", "read_dotenv", "parse_dotenv", "main",
    "RemoteLabError", "ConfigError", "ConnectionFailed", "RequestTimeout", "BadRequest",
    "AuthFailed", "Forbidden", "NotFound", "SessionLost", "NoLab", "NotActive", "LabBusy",
    "AcquireTimeout", "LabInUse",
    "UploadTooLarge", "QueueFull", "QueueTimeout", "ServerError", "LabFailed", "ProtocolError",
    "launch", "Launcher", "Launched", "LaunchError", "running_servers", "resolve_base_url",
    "lab_fingerprint",
]

_log = logging.getLogger("remote_lab_client")

DEFAULT_HEARTBEAT_INTERVAL = 30.0  # the server's default active timeout is 300 s
LONG_POLL_SECONDS = 20.0  # per GET /session/{id}?wait=S (the server allows S <= 60)
FALLBACK_POLL_SECONDS = 0.5  # polling cadence against a server that ignores ?wait=
HOLD_WARNING_SECONDS = 60.0  # warn this long before the server's --max-hold ends the session
RETRY_AFTER_CAP = 5.0  # s: the longest wait a 503's Retry-After gets (then ask again)
DEFAULT_RECONNECT_TIMEOUT = 60.0  # riding through a server restart (systemd: RestartSec=5s)
MAX_RESPONSE_BYTES = 64 * 1024 * 1024  # an answer above this is refused unread
EXIT_LAB_LOST = 75  # `run` / `acquire`: the session ended under us (EX_TEMPFAIL: try again)
STOP_GRACE_SECONDS = 5.0  # `run`: SIGTERM, then SIGKILL after this, when the lab is lost
UPLOAD_CHUNK = 64 * 1024
NO_URL_MESSAGE = ("no remote lab server configured: set REMOTE_LAB_URL=http://HOST:PORT or "
                  "ssh://[USER@]HOST (in the environment or a .env file in the working "
                  "directory), or put remote_lab.py next to remote_lab_client.py or on PATH for "
                  "a local server")


# ============================================================================================
# 1. Errors
# ============================================================================================


class RemoteLabError(Exception):
    """Base of every error of this client.

    ``status`` is the HTTP status code (None for errors that happened before/without a
    response) and ``detail`` the server's ``{"detail": ...}`` text (or the message).
    """

    def __init__(self, message, status=None, detail=None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.detail = message if detail is None else detail

    def __str__(self):
        return self.message


class ConfigError(RemoteLabError):
    """Bad or missing configuration (URL, environment variable, file)."""


class ConnectionFailed(RemoteLabError, ConnectionError):
    """The server could not be reached (after retries), or TLS failed."""


class RequestTimeout(RemoteLabError, TimeoutError):
    """The server did not answer within the request timeout."""


class BadRequest(RemoteLabError):
    """400: the server rejected the request (bad upload, bad file name, ...)."""


class AuthFailed(RemoteLabError):
    """401: the server wants a token (``REMOTE_LAB_TOKEN``), or refused the one given."""


class Forbidden(RemoteLabError):
    """403: not allowed, e.g. another user's session (a server with ``--auth-file``)."""


class TopologyInvalid(BadRequest):
    """422 from POST /lab/check: netlab rejects the topology; ``detail`` has its error tail."""


class NotFound(RemoteLabError):
    """404."""


class SessionLost(NotFound):
    """The server no longer knows our session: it expired (no heartbeat) or the server restarted."""


class NoLab(NotFound):
    """404 from a /lab endpoint: no lab is running."""


class NotActive(RemoteLabError):
    """423: the session is not the active one."""


class LabBusy(RemoteLabError):
    """423 on acquire: the lab is in use with another topology (retried until the timeout)."""


class AcquireTimeout(LabBusy, TimeoutError):
    """The lab stayed busy for ``lab_acquisition_timeout`` seconds."""


class LabInUse(RemoteLabError):
    """409: ``destroy(force=False)`` while the lab's reference count is above zero."""


class UploadTooLarge(RemoteLabError):
    """413: the upload exceeds the server's --max-upload-mb."""


class QueueFull(RemoteLabError):
    """429 (or 503) on session creation: the server's queue is full."""


class QueueTimeout(RemoteLabError, TimeoutError):
    """Our turn did not come within ``session_timeout``; the session was deleted.

    ``position`` is the queue position reached, ``waited`` the seconds waited.
    """

    def __init__(self, message, position=None, waited=None, session_id=None):
        super().__init__(message)
        self.position = position
        self.waited = waited
        self.session_id = session_id


class ServerError(RemoteLabError):
    """5xx."""


class ProtocolError(RemoteLabError):
    """The server's answer breaks the protocol: too large, or a value of the wrong type."""


class LabFailed(ServerError):
    """5xx from POST /lab: netlab failed (502) or timed out (504); ``detail`` has its output."""


# The response policy: (request, status) -> (exception, message or None: the caller's words).
# Request None is any request, status "5xx" any 5xx not named; the requests with statuses of
# their own: "join" (POST /session), "lab" (the /lab endpoints) and "upload" (POST /lab).
# A 404 of a request that needs our session is first checked for a lost session
# (RemoteLabClient._raise_for).
_STATUS_ERRORS = {
    (None, 400): (BadRequest, None),
    (None, 401): (AuthFailed, None),
    (None, 403): (Forbidden, None),
    (None, 404): (NotFound, None),
    (None, 409): (LabInUse, None),
    (None, 413): (UploadTooLarge, None),
    (None, 423): (NotActive, None),
    (None, 429): (QueueFull, None),
    (None, "5xx"): (ServerError, None),
    ("join", 429): (QueueFull, "cannot join the remote lab queue"),
    ("join", 503): (QueueFull, "cannot join the remote lab queue"),
    ("lab", 404): (NoLab, None),
    ("upload", 404): (NoLab, None),
    ("upload", 503): (ServerError, "the lab host refused the upload of %(subject)s"),  # disk full
    ("upload", 502): (LabFailed, "netlab failed to start %(subject)s"),
    ("upload", 504): (LabFailed, "netlab failed to start %(subject)s"),  # (it timed out)
}


def _error_for(resp, what, request=None, subject=None):
    """The exception for the unexpected response ``resp`` to ``request`` (see _STATUS_ERRORS);
    ``what`` says what failed, ``subject`` is named by the table's own messages."""
    stranger = _not_remote_lab(resp)
    if stranger:
        return ConfigError(stranger, resp.status, resp.detail)
    band = "5xx" if resp.status >= 500 else resp.status
    for key in ((request, resp.status), (request, band), (None, resp.status), (None, band)):
        if key in _STATUS_ERRORS:
            cls, message = _STATUS_ERRORS[key]
            break
    else:
        cls, message = RemoteLabError, None
    if message:
        what = message % {"subject": subject}
    hint = "; the token comes from REMOTE_LAB_TOKEN" if resp.status == 401 else ""
    return cls("%s: %s (HTTP %d%s)" % (what, resp.detail, resp.status, hint), resp.status,
               resp.detail)


def _netlab_complaint(detail):
    """netlab's error lines of a 422 detail, in one line (its banner lines left out)."""
    lines = [line.strip() for line in (detail or "").splitlines()[1:] if line.strip()
             and not line.startswith(("Errors encountered while processing",
                                      "Fatal error in netlab: Cannot proceed"))]
    return "; ".join(lines[-5:]) or (detail or "").strip()


def _not_remote_lab(resp):
    """The message when ``resp`` cannot come from remote-lab (which answers JSON, errors with a
    ``detail``), else None; a proxy's 413 or 5xx page is named as such."""
    if resp.request is None or (isinstance(resp.data, dict)
                                and (resp.status < 400 or "detail" in resp.data)):
        return None
    method, base_url, path = resp.request
    answered = "%s %s answered %d %s" % (method, path, resp.status, (
        resp.headers.get("Content-Type") or "without a content type").split(";")[0].strip())
    if resp.status in (413, 502, 503, 504):  # what a proxy answers for the server behind it
        return "%s: %s, not remote-lab's JSON (a proxy in front of it?)" % (base_url, answered)
    return "%s is not a remote-lab server (%s)" % (base_url, answered)


# ============================================================================================
# 2. Configuration: .env and environment variables
# ============================================================================================


def parse_dotenv(text):
    """Parse ``.env`` text: ``KEY=VALUE`` lines; ``export`` prefix, quotes and comments allowed.

    Double-quoted values understand ``\\n \\t \\" \\\\``; single-quoted values are literal;
    unquoted values end at `` #``. Malformed lines are ignored. Returns a dict.
    """
    result = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("export") and line[6:7] in (" ", "\t"):
            line = line[7:].lstrip()
        key, sep, value = line.partition("=")
        key = key.strip()
        if not sep or not key or not all(c.isalnum() or c in "_.-" for c in key) \
                or key[0].isdigit():
            continue
        value = value.strip()
        if value[:1] in ("'", '"'):
            quote = value[0]
            out = []
            i = 1
            closed = False
            while i < len(value):
                c = value[i]
                if quote == '"' and c == "\\" and i + 1 < len(value):
                    nxt = value[i + 1]
                    out.append({"n": "\n", "t": "\t", "r": "\r"}.get(nxt, nxt)
                               if nxt in 'ntr"\\$' else c + nxt)
                    i += 2
                    continue
                if c == quote:
                    closed = True
                    break
                out.append(c)
                i += 1
            value = "".join(out) if closed else value[1:]
        else:
            for marker in (" #", "\t#"):
                idx = value.find(marker)
                if idx >= 0:
                    value = value[:idx].rstrip()
        result[key] = value
    return result


def read_dotenv(path=None):
    """The ``REMOTE_LAB_*`` variables of ``path`` (default: ``.env`` in the working directory);
    other keys are dropped (no ``LD_PRELOAD`` from a file). A missing file gives {}."""
    path = os.path.join(os.getcwd(), ".env") if path is None else os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        if not isinstance(e, FileNotFoundError) and os.path.exists(path):
            _log.warning("cannot read %s: %s", path, e)
        return {}
    return {key: value for key, value in parse_dotenv(text).items()
            if key.startswith("REMOTE_LAB_")}


def load_dotenv(path=None, override=False):
    """Put the ``REMOTE_LAB_*`` variables of ``path`` (see :func:`read_dotenv`) into
    ``os.environ`` (the client itself never does: it reads them into a :class:`ClientConfig`).

    Variables already set in the environment win unless ``override``. Returns those set.
    """
    applied = {key: value for key, value in read_dotenv(path).items()
               if override or key not in os.environ}
    os.environ.update(applied)
    return applied


def _seconds(name, raw):
    """A non-negative number of seconds from variable ``name`` (blank: None, the default)."""
    if not raw.strip():
        return None
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError("%s must be a number of seconds, not %r" % (name, raw)) from None
    if not value >= 0:  # also rejects NaN
        raise ConfigError("%s must not be negative: %r" % (name, raw))
    return value


def _flag(name, raw):
    return raw.strip().lower() in ("1", "true", "yes", "on")


def _text(name, raw):
    return raw.strip()


# field of ClientConfig: (its variable, how the variable's text becomes the value)
_VARIABLES = {
    "url": ("REMOTE_LAB_URL", _text),
    "request_timeout": ("REMOTE_LAB_REQUEST_TIMEOUT", _seconds),
    "session_timeout": ("REMOTE_LAB_SESSION_TIMEOUT", _seconds),
    "lab_acquisition_timeout": ("REMOTE_LAB_ACQUISITION_TIMEOUT", _seconds),
    "heartbeat_interval": ("REMOTE_LAB_HEARTBEAT_INTERVAL", _seconds),
    "reconnect_timeout": ("REMOTE_LAB_RECONNECT_TIMEOUT", _seconds),
    "token": ("REMOTE_LAB_TOKEN", lambda name, raw: raw or None),
    "ca_file": ("REMOTE_LAB_CA_FILE", lambda name, raw: raw or None),
    "insecure": ("REMOTE_LAB_INSECURE", _flag),
    "server_args": ("REMOTE_LAB_SERVER_ARGS", lambda name, raw: raw),
    "ssh_args": ("REMOTE_LAB_SSH_ARGS", lambda name, raw: raw),
    # who and why, sent with POST /session (unset: user@host and the CI job; "": none)
    "owner": ("REMOTE_LAB_OWNER", _text),
    "note": ("REMOTE_LAB_NOTE", _text),
    "link": ("REMOTE_LAB_LINK", _text),
}
_NUMBERS = ("request_timeout", "session_timeout", "lab_acquisition_timeout",
            "heartbeat_interval", "reconnect_timeout")
# the server's limits of POST /session's fields (longer owner and note are cut)
SESSION_META_LIMITS = {"owner": 64, "note": 200, "link": 500}
_CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_HTTP_URL = re.compile(r"https?://[^\s/]+\S*\Z", re.IGNORECASE)


def _local_user(environ):
    """This process's user name as getpass.getuser() finds it (from ``environ``, then the
    password database), or ``uidN`` where neither knows it (a container's arbitrary uid)."""
    for name in ("LOGNAME", "USER", "LNAME", "USERNAME"):
        if environ.get(name, "").strip():
            return environ[name].strip()
    try:
        import pwd
        return pwd.getpwuid(os.getuid()).pw_name
    except (ImportError, KeyError, OSError, AttributeError):
        return "uid%d" % os.getuid() if hasattr(os, "getuid") else "unknown"


def _local_owner(environ):
    """``user@host`` (the host's first label), as far as this machine can tell."""
    try:
        host = socket.gethostname().strip()
    except OSError:
        host = ""
    if host and not host.replace(".", "").isdigit():
        host = host.split(".")[0]
    return "%s@%s" % (_local_user(environ), host) if host else _local_user(environ)


def ci_session_meta(environ):
    """The CI job this runs in, from its variables: {"note", "link"} (GitHub Actions, GitLab CI,
    Jenkins), plus ``source``: the variable that told; {} outside CI."""
    env = {k: v.strip() for k, v in environ.items() if isinstance(v, str)}

    def words(*parts):
        return " ".join(p for p in parts if p)

    if env.get("GITHUB_ACTIONS") == "true":
        repo, run = env.get("GITHUB_REPOSITORY", ""), env.get("GITHUB_RUN_ID", "")
        number = env.get("GITHUB_RUN_NUMBER", "")
        actor = env.get("GITHUB_TRIGGERING_ACTOR") or env.get("GITHUB_ACTOR", "")
        link = ("%s/%s/actions/runs/%s" % (env.get("GITHUB_SERVER_URL") or "https://github.com",
                                           repo, run) if repo and run else "")
        note = words("GitHub Actions:", repo, env.get("GITHUB_WORKFLOW", ""),
                     "#" + number if number else "", "by " + actor if actor else "")
        return {"note": note, "link": link, "source": "GITHUB_ACTIONS"}
    if env.get("GITLAB_CI"):
        job = env.get("CI_JOB_ID", "")
        user = env.get("GITLAB_USER_LOGIN", "")
        note = words("GitLab CI:", env.get("CI_PROJECT_PATH", ""), env.get("CI_JOB_NAME", ""),
                     "#" + job if job else "", "by " + user if user else "")
        return {"note": note, "link": env.get("CI_JOB_URL", ""), "source": "GITLAB_CI"}
    if env.get("JENKINS_URL") or env.get("BUILD_URL"):
        number = env.get("BUILD_NUMBER", "")
        note = words("Jenkins:", env.get("JOB_NAME", ""), "#" + number if number else "")
        return {"note": note, "link": env.get("BUILD_URL", ""),
                "source": "JENKINS_URL" if env.get("JENKINS_URL") else "BUILD_URL"}
    return {}


def _meta_text(value):
    """One line of text: control characters (newlines, escapes) as spaces, spaces collapsed;
    "" for anything but a string (a server's null, or a value of the wrong type)."""
    return " ".join(_CONTROL_CHARS.sub(" ", value if isinstance(value, str) else "").split())


@dataclass(frozen=True)
class ClientConfig:
    """The client's settings, resolved once by :meth:`resolve` (``os.environ`` is only read).

    ``url`` "" is local mode; ``server_args`` / ``ssh_args`` are shell words (split when a
    server is launched); ``sources`` says where each value came from (``"explicit"``, the
    variable's name, ``".env"`` or ``"default"``); ``dotenv``: the ``.env`` file's variables.
    """
    url: str = ""
    request_timeout: float = 30.0
    session_timeout: float = 600.0
    lab_acquisition_timeout: float = 600.0
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    reconnect_timeout: float = DEFAULT_RECONNECT_TIMEOUT
    token: Optional[str] = None
    ca_file: Optional[str] = None
    insecure: bool = False
    server_args: str = ""
    ssh_args: str = ""
    owner: Optional[str] = None
    note: Optional[str] = None
    link: Optional[str] = None
    sources: dict = field(default_factory=dict, hash=False, compare=False, repr=False)
    dotenv: dict = field(default_factory=dict, hash=False, compare=False, repr=False)

    @classmethod
    def resolve(cls, environ=None, dotenv=None, defaults=None, **explicit):
        """Each setting from: ``explicit`` (a value not None) > the environment (``environ``,
        default ``os.environ``) > the ``.env`` variables (``dotenv``, default
        :func:`read_dotenv`) > ``defaults`` > the built-in default. Bad values: ConfigError."""
        environ = os.environ if environ is None else environ
        dotenv = read_dotenv() if dotenv is None else dict(dotenv)
        unknown = (set(explicit) | set(defaults or ())) - set(_VARIABLES)
        if unknown:
            raise TypeError("unknown settings: %s" % ", ".join(sorted(unknown)))
        values, sources = {}, {}
        for name, (variable, parse) in _VARIABLES.items():
            value, source = explicit.get(name), "explicit"
            if name == "url" and value is not None:
                value = os.fspath(value).strip() or None  # ("" names no server)
            if value is None:
                for source, variables in ((variable, environ), (".env", dotenv)):
                    if variable in variables:
                        value = parse(variable, variables[variable])
                        break
            if value is None and name in (defaults or {}):
                value, source = defaults[name], "default"
            if value is not None:
                values[name] = float(value) if name in _NUMBERS else value
                sources[name] = source
        cls._fill_session_meta(environ, values, sources)
        if values.get("request_timeout", 1) <= 0:
            raise ConfigError("the request timeout must be positive, not %r"
                              % values["request_timeout"])
        return cls(sources=sources, dotenv=dotenv, **values)

    @staticmethod
    def _fill_session_meta(environ, values, sources):
        """Who and why where nothing set them: ``user@host`` and the CI job's note and link."""
        found = dict(ci_session_meta(environ), owner=_local_owner(environ))
        for name in ("owner", "note", "link"):
            if name not in values and found.get(name):
                values[name] = found[name]
                sources[name] = found.get("source", "default") if name != "owner" else "default"

    def session_meta(self):
        """POST /session's body: who and why, one line each, cut to the server's limits; a
        link that is not http(s) or too long to be whole is left out. {}: nothing to say."""
        meta = {}
        for name, limit in SESSION_META_LIMITS.items():
            value = _meta_text(getattr(self, name))
            if name == "link" and (len(value) > limit or not _HTTP_URL.match(value)):
                continue
            if value:
                meta[name] = value if len(value) <= limit else value[:limit - 3].rstrip() + "..."
        return meta

    @property
    def launches(self):
        """True for ssh:// and local mode (no URL): the client launches or finds the server."""
        return not self.url or self.url.startswith("ssh://")

    def source(self, name):
        """Where setting ``name`` came from (see the class docstring)."""
        return self.sources.get(name, "default")

    def launch_options(self):
        """Keyword arguments for :func:`launch` / :class:`Launcher`: the server and ssh args."""
        return {name: shlex.split(words) if isinstance(words, str) else list(words)
                for name, words in (("server_args", self.server_args),
                                    ("ssh_args", self.ssh_args))}

    def command_environment(self, environ=None, **extra):
        """The environment for a command run with the lab: ``environ`` (default
        ``os.environ``) plus the ``.env`` variables it does not set, plus ``extra``."""
        env = dict(self.dotenv)
        env.update(os.environ if environ is None else environ)
        env.update(extra)
        return env


# ============================================================================================
# 3. HTTP: one keep-alive connection per client, retries, streaming multipart upload
# ============================================================================================


class Response:
    """A complete HTTP response: ``status``, ``headers``, ``body`` (bytes), ``data`` (JSON)."""

    __slots__ = ("status", "reason", "headers", "body", "data", "request")

    def __init__(self, status, reason, headers, body):
        self.request = None  # (method, base URL, path), set by HttpTransport.request
        self.status = status
        self.reason = reason
        self.headers = headers
        self.body = body
        self.data = None
        if body:
            try:
                self.data = json.loads(body.decode("utf-8"))
            except (ValueError, RecursionError):  # (deeply nested JSON: not an answer of ours)
                pass

    @property
    def detail(self):
        """The server's ``detail`` text, or whatever explains the response best."""
        if isinstance(self.data, dict) and "detail" in self.data:
            d = self.data["detail"]
            return d if isinstance(d, str) else json.dumps(d)
        if self.body:
            return self.body.decode("utf-8", "replace").strip()[:500]
        return self.reason or "HTTP %d" % self.status


class _NotSent(Exception):
    """Connection setup failed: nothing reached the server, any request may be retried."""


class _Broken(Exception):
    """The connection failed after (part of) the request was sent."""


class _Stale(_Broken):
    """A reused keep-alive connection was closed or reset before any byte of the answer: the
    server had closed it while idle and never processed the request (any request may be sent
    again, once, on a new connection)."""


def _quote_filename(name):
    return name.replace("\\", "\\\\").replace('"', '\\"')


class MultipartBody:
    """A multipart/form-data body streamed from files (never read into memory whole).

    ``fields``: [(name, text)], ``files``: [(field, filename, path)]. ``length`` is known upfront
    from the file sizes; iterating yields the body in chunks and may be repeated.
    """

    def __init__(self, fields, files):
        self.boundary = "remote-lab-" + uuid.uuid4().hex
        self.content_type = "multipart/form-data; boundary=" + self.boundary
        parts = []
        for name, value in fields:
            head = ("--%s\r\nContent-Disposition: form-data; name=\"%s\"\r\n\r\n"
                    % (self.boundary, name))
            parts.append(head.encode("utf-8") + value.encode("utf-8") + b"\r\n")
        for field, filename, path in files:
            try:
                size = os.stat(path).st_size
            except OSError as e:
                raise ConfigError("cannot read %s: %s" % (path, e.strerror or e)) from None
            disposition = 'form-data; name="%s"; filename="%s"' % (field, _quote_filename(filename))
            if any(ord(c) > 127 for c in filename):
                disposition += "; filename*=utf-8''" + urllib.parse.quote(filename, safe="")
            parts.append(("--%s\r\nContent-Disposition: %s\r\n"
                          "Content-Type: application/octet-stream\r\n\r\n"
                          % (self.boundary, disposition)).encode("utf-8"))
            parts.append((path, size))
            parts.append(b"\r\n")
        parts.append(("--%s--\r\n" % self.boundary).encode("ascii"))
        self.parts = parts
        self.length = sum(len(p) if isinstance(p, bytes) else p[1] for p in parts)

    def __iter__(self):
        for part in self.parts:
            if isinstance(part, bytes):
                yield part
                continue
            path, size = part
            left = size
            with open(path, "rb") as f:
                while left > 0:
                    chunk = f.read(min(UPLOAD_CHUNK, left))
                    if not chunk:
                        raise RemoteLabError("%s shrank while it was being uploaded" % path)
                    left -= len(chunk)
                    yield chunk


class _DeadlineSocket:
    """A connected socket whose blocking calls all end by ``deadline`` (a time.monotonic()
    value), so a timeout bounds a whole exchange, also against a server trickling bytes."""

    def __init__(self, sock):
        self._sock = sock
        self.deadline = None
        self.received = 0  # bytes of the answer so far (reset for each exchange)

    def _arm(self):
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise socket.timeout("timed out")
            self._sock.settimeout(left)

    def recv_into(self, *args):
        self._arm()
        n = self._sock.recv_into(*args)
        self.received += n
        return n

    def recv(self, *args):
        self._arm()
        data = self._sock.recv(*args)
        self.received += len(data)
        return data

    def sendall(self, *args):
        self._arm()
        return self._sock.sendall(*args)

    def send(self, *args):
        self._arm()
        return self._sock.send(*args)

    def makefile(self, mode="rb", *args, **kwargs):  # http.client reads answers through this
        # counted as socket.makefile() does: http.client closes the socket once the head of a
        # "Connection: close" answer is read, and the fd must stay open for the body
        self._sock._io_refs += 1
        return io.BufferedReader(socket.SocketIO(self, "rb"))

    def _decref_socketios(self):  # SocketIO.close(): the socket closes once nothing reads it
        self._sock._decref_socketios()

    def __getattr__(self, name):
        return getattr(self._sock, name)


def _read_body(resp, what):
    """The body of ``resp``: ProtocolError when it is over MAX_RESPONSE_BYTES (a Content-Length
    above it is refused before reading anything)."""
    too_large = "%s: the answer is too large (%%s bytes; the limit is %d MiB)" % (
        what, MAX_RESPONSE_BYTES // (1024 * 1024))
    if resp.length is not None and resp.length > MAX_RESPONSE_BYTES:
        raise ProtocolError(too_large % resp.length)
    parts = []
    size = 0
    while True:
        chunk = resp.read(UPLOAD_CHUNK)
        if not chunk:
            return b"".join(parts)
        size += len(chunk)
        if size > MAX_RESPONSE_BYTES:
            raise ProtocolError(too_large % ("over %d" % MAX_RESPONSE_BYTES))
        parts.append(chunk)


def _connection_dropped(sock):
    """True if an idle keep-alive socket was closed by the peer (it is readable: EOF)."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
    except (OSError, ValueError):
        return True
    return bool(readable)


# base URL -> the name its server's certificate must show, where the URL's host stands for
# another: a launcher's tunnel (127.0.0.1 for the lab host) and local mode ("localhost")
_TLS_NAMES = {}


class _NamedHTTPSConnection(http.client.HTTPSConnection):
    """An HTTPSConnection that checks the certificate for ``tls_name``, not for its host."""

    def __init__(self, host, port, tls_name, **kwargs):
        super().__init__(host, port, **kwargs)
        self.tls_name = tls_name

    def connect(self):
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self.tls_name)


class HttpTransport:
    """The client's HTTP layer: one keep-alive ``http.client`` connection guarded by a lock.

    Requests never interleave on the connection. A caller that cannot get the lock within
    ``lock_timeout`` (the heartbeat thread while a long request runs) uses a one-off connection.
    Connection failures before anything was sent are retried for every request, and so is a
    503 with Retry-After (not processed: a stop, the connection cap; after the time it asks,
    at most RETRY_AFTER_CAP) and a reused keep-alive connection closed before any byte of the
    answer (the server closed it idle: sent again at once, once). After that, and for 502,
    504 and a 503 without Retry-After, only idempotent requests are retried (with exponential
    backoff). With ``reconnect_timeout`` (the client sets it once it has a session) these are
    retried for that many seconds, idempotent requests' timeouts too: a restart is waited for.
    """

    def __init__(self, base_url, timeout=30.0, token=None, ca_file=None, insecure=False,
                 retries=4, backoff=0.25, relocate=None):
        self.reconnect_timeout = 0.0
        self.server_gone = False  # relocate() found no server (stopped or died)
        self._target(base_url)
        self.relocate = relocate  # () -> new base URL, when the server may move (ssh tunnel)
        self.timeout = float(timeout)
        self.token = token
        self.ca_file = ca_file
        self.insecure = bool(insecure)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self._lock = threading.Lock()
        self._conn = None
        self._ssl_context = None
        self._outage = None  # since when the server does not answer (any request's failures)
        self._outage_lock = threading.Lock()

    def _target(self, base_url):
        try:
            parts = urllib.parse.urlsplit(base_url)
        except ValueError as e:
            raise ConfigError("bad URL %r: %s" % (base_url, e)) from None
        self.scheme = parts.scheme.lower()
        if self.scheme not in ("http", "https"):
            raise ConfigError("unsupported URL %r: use http:// or https://" % base_url)
        if not parts.hostname:
            raise ConfigError("URL %r has no host" % base_url)
        try:
            self.port = parts.port or (443 if self.scheme == "https" else 80)
        except ValueError:
            raise ConfigError("URL %r has an invalid port" % base_url) from None
        self.host = parts.hostname
        self.prefix = parts.path.rstrip("/")
        self.base_url = urllib.parse.urlunsplit((self.scheme, parts.netloc, self.prefix, "", ""))

    def _relocated(self):
        """Ask ``relocate`` where the server is now (re-creating a dead tunnel); True if moved."""
        try:
            new_url = self.relocate()
        except RemoteLabError as e:
            _log.warning("cannot reach the server again: %s", e)
            # (the launcher's words for a server that was stopped or died: it never comes back,
            # relocate() starts none, so reconnecting is pointless)
            self.server_gone = self.server_gone or "no server is running" in str(e)
            return False
        if new_url.rstrip("/") == self.base_url:
            return False
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            self._target(new_url)
        _log.info("server reached again at %s", self.base_url)
        return True

    # -- outages: one line when the server stops answering, one when it answers again --
    def _outage_begins(self, why, reconnect):
        with self._outage_lock:
            if self._outage is not None:  # (another request, or the heartbeat, said it)
                return
            self._outage = time.monotonic()
        _log.info("%s; retrying for up to %s", why, _duration(reconnect))

    def _answered(self):
        if self._outage is None:  # (the usual case, without the lock)
            return
        with self._outage_lock:
            since, self._outage = self._outage, None
        if since is not None:
            _log.info("the remote lab server at %s answers again (after %s)", self.base_url,
                      _duration(time.monotonic() - since))

    def outage_for(self):
        """Seconds since the server stopped answering, 0 while it answers."""
        since = self._outage
        return 0.0 if since is None else time.monotonic() - since

    # -- connections --
    def _context(self):
        if self._ssl_context is None:
            try:
                ctx = ssl.create_default_context(cafile=self.ca_file or None)
            except (OSError, ssl.SSLError) as e:
                raise ConfigError("cannot load CA file %s: %s" % (self.ca_file, e)) from None
            if self.insecure:
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
            self._ssl_context = ctx
        return self._ssl_context

    def _new_connection(self, timeout):
        name = _TLS_NAMES.get(self.base_url) if self.scheme == "https" else None
        if name:
            return _NamedHTTPSConnection(self.host, self.port, name, timeout=timeout,
                                         context=self._context())
        if self.scheme == "https":
            return http.client.HTTPSConnection(self.host, self.port, timeout=timeout,
                                               context=self._context())
        return http.client.HTTPConnection(self.host, self.port, timeout=timeout)

    def _shared_connection(self, timeout):
        conn = self._conn
        if conn is None:
            conn = self._conn = self._new_connection(timeout)
        elif conn.sock is not None and _connection_dropped(conn.sock):
            conn.close()  # the server closed the idle connection: reconnect
        conn.timeout = timeout
        return conn

    def close(self):
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def url(self, path, query=None):
        return (self.prefix + path
                + ("?" + urllib.parse.urlencode(query) if query else ""))

    # -- requests --
    def request(self, method, path, query=None, headers=None, body=None, content_type=None,
                timeout=None, idempotent=None, retries=None, lock_timeout=None, reconnect=None,
                stop=None):
        """Send a request and read the whole response; returns a :class:`Response`.

        ``body``: bytes, a JSON-able dict/list, or a :class:`MultipartBody`. ``timeout`` bounds
        each attempt as a whole (connect, send, answer); ``reconnect`` (default
        ``reconnect_timeout``) how long connection failures (and 503s with Retry-After) are
        retried, unless the Event ``stop`` is set. Raises ConnectionFailed / RequestTimeout / ProtocolError; HTTP error
        statuses are returned, not raised.
        """
        timeout = self.timeout if timeout is None else float(timeout)
        reconnect = self.reconnect_timeout if reconnect is None else float(reconnect)
        if idempotent is None:
            idempotent = method in ("GET", "HEAD", "DELETE", "PUT", "OPTIONS")
        retries = self.retries if retries is None else retries
        hdrs, body = self._prepare(method, headers, body, content_type)
        attempt = 0
        relocated = resent = False
        outage = None  # when the connection failures (or 503s) of this request began
        while True:
            url = self.url(path, query)  # (again after a relocation)
            what = "%s %s%s" % (method, self.base_url, path)
            failure = None
            safe = True  # to send again: nothing reached the server, or the request is idempotent
            counted = True  # retried `retries` times at least (timeouts: only while reconnecting)
            delay = None  # the server's Retry-After, else exponential backoff
            try:
                resp = self._send_once(method, url, hdrs, body, timeout, lock_timeout)
                resp.request = (method, self.base_url, path)
            except _NotSent as e:
                if self.relocate is not None and not relocated:
                    relocated = True  # once per request: launch again, then retry at once
                    if self._relocated():
                        continue
                failure = ConnectionFailed("cannot connect to the remote lab at %s: %s"
                                           % (self.base_url, _describe(e.args[0])))
            except _Stale as e:
                if not resent:  # closed while idle: the request never got there
                    resent = True
                    _log.debug("%s: %s; sending it again on a new connection", what,
                               _describe(e.args[0]))
                    continue
                failure = ConnectionFailed("%s failed: %s" % (what, _describe(e.args[0])))
                safe = idempotent
            except _Broken as e:
                failure = ConnectionFailed("%s failed: %s" % (what, _describe(e.args[0])))
                safe = idempotent
            except RequestTimeout as e:
                failure = e
                safe = idempotent
                counted = False
            else:
                delay = _retry_after(resp)
                if delay is not None:  # not processed (a stop, the connection cap): any method
                    now = time.monotonic()
                    outage = outage or now
                    if not (attempt < retries or now - outage < reconnect) \
                            or (stop is not None and stop.is_set()):
                        return resp
                    if reconnect > 0:
                        self._outage_begins("%s -> 503 (%s)" % (what, resp.detail), reconnect)
                elif resp.status in (502, 503, 504) and idempotent and attempt < retries:
                    _log.debug("%s -> %d, retrying", what, resp.status)
                else:
                    self._answered()
                    return resp
            if failure is not None:
                now = time.monotonic()
                if self.server_gone:
                    reconnect = 0.0
                outage = outage or now
                if reconnect > 0 and safe:
                    self._outage_begins(failure, reconnect)
                if not safe or not ((counted and attempt < retries) or now - outage < reconnect) \
                        or (stop is not None and stop.is_set()):
                    raise failure from None
            if delay is None:
                delay = min(2.0, self.backoff * 2 ** min(attempt, 8)) \
                    * (0.8 + 0.4 * random.random())
            attempt += 1
            _log.debug("%s: retry %d in %.2f s", what, attempt, delay)
            if stop is not None:
                stop.wait(delay)
            else:
                time.sleep(delay)

    def _prepare(self, method, headers, body, content_type):
        """(headers, body) to send: ours, then the caller's ``headers``; a JSON-able body
        encoded."""
        hdrs = {"User-Agent": "remote-lab-client/" + __version__, "Accept": "application/json"}
        if self.token:
            hdrs["Authorization"] = "Bearer " + self.token
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode("utf-8")
            content_type = content_type or "application/json"
        if isinstance(body, MultipartBody):
            content_type = body.content_type
            hdrs["Content-Length"] = str(body.length)
        elif body is not None:
            hdrs["Content-Length"] = str(len(body))
        elif method in ("POST", "PUT", "PATCH"):
            hdrs["Content-Length"] = "0"
        if content_type:
            hdrs["Content-Type"] = content_type
        hdrs.update(headers or {})
        return hdrs, body

    def _send_once(self, method, url, headers, body, timeout, lock_timeout):
        if lock_timeout is None:
            locked = self._lock.acquire()
        else:
            locked = self._lock.acquire(timeout=lock_timeout)
        try:
            if locked:
                conn = self._shared_connection(timeout)
            else:  # the shared connection is busy with a long request: use a one-off one
                conn = self._new_connection(timeout)
            try:
                return self._exchange(conn, method, url, headers, body, timeout)
            except BaseException:
                conn.close()  # never reuse a connection in an unknown state
                raise
            finally:
                if not locked:
                    conn.close()
        finally:
            if locked:
                self._lock.release()

    def _exchange(self, conn, method, url, headers, body, timeout):
        deadline = time.monotonic() + timeout  # for all of it: connect, send, answer
        what = "%s %s%s" % (method, self.base_url, url[len(self.prefix):])
        reused = conn.sock is not None  # an open keep-alive connection
        try:
            if conn.sock is None:
                conn.timeout = timeout
                conn.connect()
            if not isinstance(conn.sock, _DeadlineSocket):
                conn.sock = _DeadlineSocket(conn.sock)
            sock = conn.sock  # (http.client drops conn.sock when the answer fails)
            sock.deadline = deadline
            sock.received = 0
        except ssl.SSLError as e:  # certificate problems are not worth retrying
            name = _TLS_NAMES.get(self.base_url)
            raise ConnectionFailed(
                "TLS with %s:%s%s failed: %s (for a private CA set REMOTE_LAB_CA_FILE=PEM; "
                "REMOTE_LAB_INSECURE=1 skips verification)" % (
                    self.host, self.port, " (certificate checked for %s)" % name if name else "",
                    _describe(e))) from None
        except (OSError, http.client.HTTPException) as e:
            raise _NotSent(e) from None
        try:
            try:
                conn.request(method, url, body=body, headers=headers)
            except (OSError, http.client.HTTPException) as e:
                if isinstance(e, socket.timeout):
                    raise
                # The server may have answered early and closed (413 for a too large upload,
                # before reading the body): read that answer if it got through.
                try:
                    conn.sock.deadline = min(deadline, time.monotonic() + 5.0)
                    resp = conn.getresponse()
                    return Response(resp.status, resp.reason, resp.headers,
                                    _read_body(resp, what))
                except ProtocolError:
                    raise
                except Exception:
                    raise _broken(e, reused and not sock.received) from None
            resp = conn.getresponse()
            data = _read_body(resp, what)
        except socket.timeout:
            raise RequestTimeout("%s: no answer within %.0f s" % (what, timeout)) from None
        except (OSError, http.client.HTTPException) as e:
            raise _broken(e, reused and not sock.received) from None
        return Response(resp.status, resp.reason, resp.headers, data)


def _broken(error, unanswered_reuse):
    """_Stale for a reused connection closed or reset before any byte of its answer (the
    server closed it idle: http.client's RemoteDisconnected is a ConnectionResetError), else
    _Broken."""
    if unanswered_reuse and isinstance(error, (ConnectionResetError, BrokenPipeError)):
        return _Stale(error)
    return _Broken(error)


def _retry_after(resp):
    """The seconds a 503's Retry-After asks for (at most RETRY_AFTER_CAP; a date: 1 s), or None
    when the answer is no 503 with Retry-After: the server did not process the request."""
    if resp.status != 503 or resp.headers is None:
        return None
    value = resp.headers.get("Retry-After")
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return 1.0
    return min(RETRY_AFTER_CAP, max(0.1, seconds)) if seconds == seconds else 1.0  # (NaN)


def _describe(error):
    text = str(error) or type(error).__name__
    if isinstance(error, http.client.RemoteDisconnected):
        return "the server closed the connection (%s)" % text
    return text


# ============================================================================================
# 4. The client
# ============================================================================================


class Device(Mapping):
    """One lab device: ``name`` and ``raw`` (the server's data: ansible_host, mgmt, ...).

    Also a read-only mapping over ``{"name": name, **raw}``, so ``dict(device)`` and
    ``device["ansible_host"]`` work; unknown attributes are looked up in ``raw`` too.
    """

    __slots__ = ("name", "raw")

    def __init__(self, name, raw=None):
        self.name = name
        self.raw = dict(raw or {})

    @classmethod
    def from_json(cls, obj):
        if isinstance(obj, dict) and "raw" in obj:
            return cls(obj.get("name"), obj.get("raw"))
        if isinstance(obj, dict):
            return cls(obj.get("name"), {k: v for k, v in obj.items() if k != "name"})
        return cls(str(obj), {})

    def to_dict(self):
        """The server's JSON shape: ``{"name": ..., "raw": {...}}``."""
        return {"name": self.name, "raw": dict(self.raw)}

    def __getitem__(self, key):
        if key == "name":
            return self.name
        return self.raw[key]

    def __iter__(self):
        yield "name"
        for key in self.raw:
            if key != "name":
                yield key

    def __len__(self):
        return 1 + sum(1 for key in self.raw if key != "name")

    def __getattr__(self, key):
        if key.startswith("_"):
            raise AttributeError(key)
        try:
            return object.__getattribute__(self, "raw")[key]
        except (KeyError, AttributeError):
            raise AttributeError("device has no attribute %r" % key) from None

    def __getstate__(self):
        return (self.name, self.raw)

    def __setstate__(self, state):
        self.name, self.raw = state

    def __repr__(self):
        return "Device(name=%r, raw=%r)" % (self.name, self.raw)


class DeviceList(list):
    """The devices of an acquired lab; ``reused`` tells whether a running lab was reused."""

    reused = None


def _parse_devices(data, reused=None):
    if data is not None and not isinstance(data, list):
        raise ProtocolError("the server's devices are not a list: %.100r" % (data,))
    devices = DeviceList(Device.from_json(d) for d in (data or []))
    devices.reused = reused
    return devices


def _whole_number(data, key, default, what):
    """``data[key]`` as an int (a JSON number that is whole); ProtocolError for anything else."""
    value = data.get(key, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ProtocolError("%s: the server answered %s=%.100r, not a whole number"
                            % (what, key, value))
    return value


def _clean_upload_name(name):
    name = os.fspath(name)
    if isinstance(name, bytes):
        name = os.fsdecode(name)
    name = name.replace(os.sep, "/")
    parts = name.split("/")
    if not name or name.startswith("/") or any(p in ("", ".", "..") for p in parts) \
            or "\\" in name:
        raise ValueError("invalid upload name %r: use a relative path like 'nodes/r1.yml'" % name)
    return name


def _locate(path, topo_dir):
    """An existing file for ``path``: absolute, else relative to the cwd, else the topology dir."""
    path = os.fspath(path)
    if os.path.exists(path):
        return os.path.abspath(path)
    candidate = os.path.join(topo_dir, path)
    if not os.path.isabs(path) and os.path.exists(candidate):
        return os.path.abspath(candidate)
    raise FileNotFoundError("extra file not found: %s (looked in %s)"
                            % (path, _places(os.getcwd(), topo_dir)))


def _places(*dirs):
    """"A and B", naming each directory once."""
    unique = []
    for d in dirs:
        if os.path.abspath(d) not in unique:
            unique.append(os.path.abspath(d))
    return " and ".join(unique)


def _name_in(path, topo_dir):
    rel = os.path.relpath(path, topo_dir)
    if rel == os.pardir or rel.startswith(os.pardir + os.sep) or os.path.isabs(rel):
        return os.path.basename(path)  # outside the topology's directory: its bare name
    return rel.replace(os.sep, "/")


def collect_upload(topology, extra_files=()):
    """The files of an acquisition: [(field, upload name, local path)].

    ``extra_files`` items are paths (sent under their path relative to the topology's
    directory, or their bare name when outside it; directories are sent recursively) or
    ``(name, path)`` pairs.
    """
    topo = os.path.abspath(os.fspath(topology))
    if os.path.isdir(topo):
        raise IsADirectoryError("topology %s is a directory, not a netlab topology file"
                                % os.fspath(topology))
    if not os.path.isfile(topo):
        raise FileNotFoundError("topology file not found: %s" % os.fspath(topology))
    if not topo.lower().endswith((".yml", ".yaml")):  # the server would refuse it (400)
        raise ValueError("topology %s is not a .yml/.yaml file" % os.fspath(topology))
    topo_dir = os.path.dirname(topo)
    files = [("topology", os.path.basename(topo), topo)]
    seen = {os.path.basename(topo): topo}
    if isinstance(extra_files, (str, bytes, os.PathLike)):
        extra_files = [extra_files]
    for entry in extra_files or ():
        if isinstance(entry, (tuple, list)):
            if len(entry) != 2:
                raise ValueError("extra_files entries are paths or (name, path) pairs, not %r"
                                 % (entry,))
            name = _clean_upload_name(entry[0])
            path = _locate(entry[1], topo_dir)
        else:
            path = _locate(entry, topo_dir)
            name = _name_in(path, topo_dir)
        if os.path.isdir(path):
            members = []
            for root, dirs, names in os.walk(path):
                dirs.sort()
                for n in sorted(names):
                    full = os.path.join(root, n)
                    members.append((name + "/" + os.path.relpath(full, path).replace(os.sep, "/"),
                                    full))
        else:
            members = [(name, path)]
        for member_name, member_path in members:
            member_name = _clean_upload_name(member_name)
            if member_name in seen:
                raise ValueError("two files would be uploaded as %r: %s and %s"
                                 % (member_name, seen[member_name], member_path))
            seen[member_name] = member_path
            files.append(("extra_files", member_name, member_path))
    return files


def lab_fingerprint(topology, extra_files=()):
    """The lab fingerprint the server computes for this upload (``POST /lab``, same arguments
    as ``acquire``): the SHA-256 hex of, in order, ``topology\\0NAME\\0H`` for the topology and
    ``extra\\0NAME\\0H`` for each extra file sorted by NAME, where NAME is the file's upload
    name and H the SHA-256 hex of its content. Equal fingerprints mean a reusable lab."""
    files = collect_upload(topology, extra_files)
    digests = {}
    for _, name, path in files:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 16), b""):
                digest.update(chunk)
        digests[name] = digest.hexdigest()
    topo = files[0][1]
    h = hashlib.sha256(b"topology\0" + topo.encode() + b"\0" + digests[topo].encode())
    for name in sorted(digests):
        if name != topo:
            h.update(b"extra\0" + name.encode() + b"\0" + digests[name].encode())
    return h.hexdigest()


class _LineProgress:
    """``progress=`` that is handed the whole line per position change (the pytest plugin)."""

    def __init__(self, write):
        self.write = write


class _Progress:
    """Shows the queue position while waiting: a status line on a TTY, else a log line per
    change, written to stderr when nobody configured logging (a CI job must not look hung)."""

    def __init__(self, mode, stream=None, page=None, holder=None):
        self.mode = mode  # "tty", "log", "off", a _LineProgress or a callable(position, waited)
        self.stream = stream or sys.stderr
        self.page = page  # the status page URL, shown with each line
        self.holder = holder  # () -> "lab held by ..." or None: whom we wait for
        self.last = None
        self.shown = False
        self.eta = None  # the server's estimated wait (eta_s), None: unknown

    def about(self):
        """What each line says after the position: who holds the lab ("" if unknown)."""
        text = self.holder() if self.holder is not None else None
        return "; " + text if text else ""

    def best(self, position):
        """The position a ``progress=`` callable is given."""
        return position

    def where(self, position):
        """Where we wait: "at position 2, about 3 min"."""
        return "at position %d, %s" % (position, eta_text(self.eta))

    def line(self, position, waited):
        return ("remote lab: waiting in the queue %s (waited %s), status page %s%s"
                % (self.where(position), _duration(waited), self.page, self.about()))

    def update(self, position, waited):
        changed = position != self.last
        self.last = position
        if isinstance(self.mode, _LineProgress):
            if changed:
                self.mode.write(self.line(position, waited))
        elif callable(self.mode):
            if changed and self.best(position) is not None:
                self.mode(self.best(position), waited)
        elif self.mode == "tty":
            text = "remote lab: waiting in the queue %s (%s)%s" % (
                self.where(position), _duration(waited), self.about())
            width = _columns(self.stream) - 1  # a wrapped line could not be rewritten
            self.stream.write("\r\x1b[K" + (text if len(text) <= width
                                             else text[:width - 3] + "..."))
            self.stream.flush()
            self.shown = True
        elif changed and self.mode == "log":
            if _log.hasHandlers():  # this logger's or an ancestor's (root) handler
                _log.info("waiting for the remote lab: queue %s (%s)%s%s", self.where(position)[3:],
                          _duration(waited), ", status page %s" % self.page if self.page else "",
                          self.about())
            else:  # logging.lastResort would drop an INFO line
                self.stream.write(self.line(position, waited) + "\n")
                self.stream.flush()

    def done(self):
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False


def _duration(seconds):
    seconds = int(seconds)
    if seconds < 60:
        return "%d s" % seconds
    return "%d min %02d s" % divmod(seconds, 60)


def _columns(stream):
    """The width of the terminal ``stream`` writes to (80 when it does not say)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (AttributeError, ValueError, OSError):
        return 80


def _held_for(seconds):
    """A hold time, coarse: "40 s", "4 min", "2 h 05 min"."""
    seconds = max(0, int(seconds))
    if seconds < 60:
        return "%d s" % seconds
    if seconds < 3600:
        return "%d min" % (seconds // 60)
    return "%d h %02d min" % divmod(seconds // 60, 60)


def holder_text(status, later=0.0):
    """Who holds the lab, from a GET /status answer, ``later`` seconds after it came: "lab held
    by alice@laptop for 4 min (CI: core #812)"; None when nobody does or it does not say."""
    holder = status.get("holder") if isinstance(status, dict) else None
    if not isinstance(holder, dict):
        return None
    slots = status.get("labs")
    if isinstance(slots, list) and len(slots) > 1:  # --slots N: who holds each
        holders = [s["holder"] for s in slots if isinstance(s, dict)
                   and isinstance(s.get("holder"), dict)]
        return "%d of %d lab slots busy (%s%s)" % (
            len(holders), len(slots), ", ".join(_holder_name(h) for h in holders[:3]),
            ", ..." if len(holders) > 3 else "")
    who = _holder_name(holder)
    held = holder.get("held_s")
    if not isinstance(held, (int, float)) or isinstance(held, bool):
        try:  # a server before held_s: since which wall-clock time
            held = float(status["server_time"]) - float(holder["since"])
        except (KeyError, TypeError, ValueError):
            held = None
    note = _meta_text(holder.get("note"))
    return "lab held by %s%s%s" % (who, "" if held is None else " for " + _held_for(held + later),
                                   " (%s)" % note if note else "")


def _holder_name(holder):
    """Who a /status holder entry is: its owner, else its (short) session id."""
    return _meta_text(holder.get("owner")) \
        or "session %s" % _meta_text(str(holder.get("session") or "?"))[:36]


def eta_text(eta_s):
    """The server's estimated wait (``eta_s`` seconds; None: no history yet) in words."""
    if eta_s is None:
        return "wait unknown"
    if eta_s < 1:
        return "any moment now"
    if eta_s < 60:
        return "about %d s" % round(eta_s)
    if eta_s < 120 * 60:
        return "about %d min" % round(eta_s / 60.0)
    return "about %d h" % round(eta_s / 3600.0)


def _seconds_field(data, key):
    """``data[key]`` when it is a number of seconds (eta_s, hold_left_s, ...), else None."""
    value = data.get(key) if isinstance(data, dict) else None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        return None
    return float(value)


def _progress_mode(progress):
    """``progress=`` as a _Progress mode: None = a status line on a TTY, else log lines."""
    if progress is None:
        return "tty" if _isatty(sys.stderr) else "log"
    if progress is False:
        return "off"
    if progress is True:
        return "tty"
    return progress


class _PoolProgress(_Progress):
    """The waiting line of a session on a pool: the best positions first ("at position 1 on
    lab2, 3 on lab1"); ``position`` is the tuple of (position, host name) of the hosts."""

    def best(self, position):
        return min(p for p, _ in position) if position else None

    def where(self, position):
        return "at position " + ", ".join(
            "%d on %s" % pair for pair in sorted(position))

    def line(self, position, waited):
        return "remote lab: waiting in the pool's queues %s (waited %s)" % (
            self.where(position), _duration(waited))


POOL_TIE_SECONDS = 0.25  # hosts making the session active this close together: free at once


def pool_names(urls):
    """Short names of a pool's hosts for messages: the host name, with the port (then the
    whole URL) where that is not enough to tell them apart."""
    def netloc(url):
        try:
            parts = urllib.parse.urlsplit(url if "://" in url else "http://" + url)
            return parts.hostname or url, "%s:%s" % (parts.hostname, parts.port or "")
        except ValueError:
            return url, url
    hosts = [netloc(u) for u in urls]
    names = [h for h, _ in hosts]
    if len(set(names)) < len(names):
        names = [hp.rstrip(":") for _, hp in hosts]
    return names if len(set(names)) == len(names) else list(urls)


class _PoolMember:
    """One host of a pool while a session waits on all of them: its own single-host client,
    whose thread creates the session there and waits for the turn, and what it reported."""

    def __init__(self, url, name):
        self.url = url
        self.name = name
        self.client = None  # the RemoteLabClient of this host (made by the thread)
        self.position = None  # the last position seen there
        self.active_at = None  # monotonic time it made the session active
        self.error = None  # why this host is out of the race


class _PoolJoin:
    """A session on a pool: joins every host's queue at once, keeps the first host that makes
    it active (among those that do at the same moment, one whose warm lab has the declared
    fingerprint), and leaves every other queue at once -- also when interrupted."""

    def __init__(self, owner, urls):
        self.owner = owner  # the RemoteLabClient the session is for
        self.members = [_PoolMember(u, n) for u, n in zip(urls, pool_names(urls))]
        self.changed = threading.Condition()
        self.stop = threading.Event()  # the race is over: a thread that joins late leaves

    def run(self):
        """The winning member (its client active), or the error of a pool none of which can
        be used (ConnectionFailed naming every host), or QueueTimeout."""
        threads = [threading.Thread(target=self._member_run, args=(m,), daemon=True,
                                    name="remote-lab-pool-%s" % m.name) for m in self.members]
        for t in threads:
            t.start()
        winner = None
        progress = _PoolProgress(self.owner._progress_mode)
        try:
            winner = self._wait(progress)
            return winner
        finally:
            progress.done()
            self.stop.set()
            self._leave_all(winner)

    def _report(self, member, **facts):
        with self.changed:
            for key, value in facts.items():
                setattr(member, key, value)
            self.changed.notify_all()

    def _member_run(self, m):
        owner = self.owner
        try:
            m.client = RemoteLabClient(
                config=dataclasses_replace(owner.config, url=m.url), start_session=False,
                retries=owner._retries, progress=lambda position, waited: self._report(
                    m, position=position))
            m.client.fingerprint = owner.fingerprint
            if self.stop.is_set():
                return
            transport = m.client._http
            transport.retries = 0  # a host refusing connections is skipped at once, and said so
            m.client._create_session()
            transport.retries = owner._retries
            self._report(m, position=m.client.position)
            if self.stop.is_set():
                return self._leave(m)
            m.client._wait_until_active()
            self._report(m, active_at=time.monotonic(), position=0)
        except BaseException as e:  # (a thread: nothing above it to tell)
            if not (self.stop.is_set() and isinstance(e, NotFound)):  # (not: we left it)
                _log.warning("remote lab pool: skipping %s: %s", m.name, e)
            self._report(m, error=e)

    def _wait(self, progress):
        started = time.monotonic()
        deadline = started + self.owner.session_timeout
        with self.changed:
            while True:
                now = time.monotonic()
                active = [m for m in self.members if m.active_at is not None and m.error is None]
                # (position 0: active there, about to say so)
                unheard = [m for m in self.members
                           if not m.position and m.active_at is None and m.error is None]
                # (a moment for the hosts not heard of yet: one may be free too, or down)
                if active and not (unheard and
                                   now < min(m.active_at for m in active) + POOL_TIE_SECONDS):
                    return self._preferred(active)
                if all(m.error is not None for m in self.members):
                    raise self._none_usable()
                if now >= deadline:
                    raise QueueTimeout("no turn at any remote lab of the pool (%s) within %s "
                                       "(session_timeout); the sessions were deleted" % (
                                           ", ".join(m.name for m in self.members),
                                           _duration(self.owner.session_timeout)),
                                       waited=now - started)
                seen = tuple((m.position, m.name) for m in self.members
                             if m.position is not None and m.error is None)
                # (0: active there, it says so in a moment; a host still joining may be free)
                if seen and min(seen)[0] > 0 and (not unheard or now - started > 1.0):
                    progress.update(seen, now - started)
                self.changed.wait(min(deadline - now, POOL_TIE_SECONDS if active else 1.0))

    def _preferred(self, active):
        """The first to make the session active; among those that did at the same moment,
        one whose lab is warm with the declared fingerprint."""
        active.sort(key=lambda m: m.active_at)
        tied = [m for m in active if m.active_at < active[0].active_at + POOL_TIE_SECONDS]
        if len(tied) > 1 and self.owner.fingerprint:
            for m in tied:
                try:
                    lab = m.client.status()
                except RemoteLabError:
                    continue
                if isinstance(lab, dict) and lab.get("fingerprint") == self.owner.fingerprint:
                    return m
        return active[0]

    def _none_usable(self):
        errors = [m.error for m in self.members]
        text = "; ".join("%s: %s" % (m.name, m.error) for m in self.members)
        kind = type(errors[0]) if all(type(e) is type(errors[0]) for e in errors) \
            and isinstance(errors[0], RemoteLabError) else ConnectionFailed
        try:
            return kind("no remote lab of the pool can be used -- " + text)
        except TypeError:
            return ConnectionFailed("no remote lab of the pool can be used -- " + text)

    def _leave(self, m):
        """End ``m``'s session at once (a one-off connection: its thread may be in a
        long-poll); its client is done."""
        client = m.client
        if client is None:
            return
        atexit.unregister(client.close)
        client._closed = True  # close() is a no-op from now on
        sid = client.session_id
        if sid is not None and client._transport is not None:
            try:
                client._transport.request("DELETE", "/session/%s" % sid, retries=1, reconnect=0,
                                          lock_timeout=0.2, timeout=client.request_timeout)
            except RemoteLabError as e:
                _log.warning("leaving the queue of %s: %s", m.name, e)

    def _leave_all(self, winner):
        leaving = [threading.Thread(target=self._leave, args=(m,), daemon=True)
                   for m in self.members if m is not winner]
        for t in leaving:
            t.start()
        for t in leaving:
            t.join(self.owner.request_timeout)


class RemoteLabClient:
    """A session with a remote-lab server, or with the first host of a pool to have a turn.

    Creating the client creates a session and waits until it is active (our turn in the FIFO
    queue; the position is shown while waiting); a daemon thread then sends heartbeats until
    :meth:`close` (also run at interpreter exit and by ``with``).

    ``request_timeout``, ``session_timeout`` (how long to wait in the queue) and
    ``lab_acquisition_timeout`` (how long :meth:`acquire` retries a busy lab and waits for it
    to come up) are overridden by ``REMOTE_LAB_REQUEST_TIMEOUT``, ``REMOTE_LAB_SESSION_TIMEOUT``
    and ``REMOTE_LAB_ACQUISITION_TIMEOUT``. Keyword-only extras: ``heartbeat_interval``
    (``REMOTE_LAB_HEARTBEAT_INTERVAL``, default 30 s, 0 = none), ``token``
    (``REMOTE_LAB_TOKEN``), ``ca_file`` (``REMOTE_LAB_CA_FILE``), ``insecure``
    (``REMOTE_LAB_INSECURE=1``), ``progress`` (None = status line on a TTY else log lines,
    False, or a callable(position, waited)), ``start_session`` (False: create the session
    lazily, on first use) and ``reconnect_timeout`` (``REMOTE_LAB_RECONNECT_TIMEOUT``, default
    60 s: how long a server that cannot be reached is waited for once we have a session;
    heartbeats that fail that long lose the session); these arguments win over the variables.
    Variables come from the environment, else ``.env`` (``os.environ`` is left as it is).
    ``config``: a :class:`ClientConfig` resolved already, used instead of all of these.
    ``owner`` / ``note`` / ``link``: who and why, sent with the session and shown on the status
    page (``REMOTE_LAB_OWNER`` / ``_NOTE`` / ``_LINK``; default ``user@host`` and the CI job).
    ``topology`` / ``extra_files``: the lab this client will ask for first; its
    :func:`lab_fingerprint` (the attribute ``fingerprint``, computed here: a missing file
    raises at once) is declared with the session, so the server may give it that lab warm.

    A pool (``base_url`` / ``REMOTE_LAB_URL`` listing servers separated by commas): the session
    joins every host's queue at once and takes the first host that makes it active (among
    hosts free at the same moment, one whose warm lab has ``fingerprint``); the other queues
    are left at once. A host that is down or refuses is skipped with a warning. From then on
    the client talks to that host only: ``host`` is its entry in the list (for one URL: that
    URL), ``base_url`` its http(s) URL. Before the turn, requests (e.g. :meth:`check`) go to
    the first host that answers.
    """

    def __init__(self, base_url=None, request_timeout=30, session_timeout=600,
                 lab_acquisition_timeout=600, *, heartbeat_interval=None, token=None,
                 ca_file=None, insecure=None, progress=None, retries=4, start_session=True,
                 reconnect_timeout=None, config=None, owner=None, note=None, link=None,
                 topology=None, extra_files=None):
        if config is None:
            config = ClientConfig.resolve(
                defaults={"request_timeout": request_timeout, "session_timeout": session_timeout,
                          "lab_acquisition_timeout": lab_acquisition_timeout},
                url=base_url, heartbeat_interval=heartbeat_interval, token=token,
                ca_file=ca_file, insecure=insecure, reconnect_timeout=reconnect_timeout,
                owner=owner, note=note, link=link)
        self.config = config
        # (before connecting: a missing file fails before a local server is launched)
        self.fingerprint = None if topology is None else lab_fingerprint(topology,
                                                                         extra_files or ())
        self.request_timeout = config.request_timeout
        self.session_timeout = config.session_timeout
        self.lab_acquisition_timeout = config.lab_acquisition_timeout
        self.heartbeat_interval = config.heartbeat_interval
        self.reconnect_timeout = config.reconnect_timeout
        self._retries = retries
        self._pool = pool_urls(config.url)  # one entry, or a pool: the host is chosen at the turn
        self.host = config.url if len(self._pool) == 1 else None  # the pool entry we got
        self._transport = self._connect(config, retries) if len(self._pool) == 1 else None
        self._progress_mode = _progress_mode(progress)
        self.session_id = None
        self.position = None
        self.reused = None  # of the last acquire
        self._held = 0  # acquisitions not yet released
        self._send_meta = True  # False once the server refused POST /session's body
        self._send_fingerprint = True  # False once it refused the body's fingerprint
        self._can_check = True  # False once the server had no POST /lab/check (404/405)
        self._holder_seen = None  # (our position, GET /status, when): whom we wait for
        self._lost = None  # message when the server forgot our session
        self._lost_unreachable = False  # ... or could not be reached for reconnect_timeout
        self._on_lost = None  # called (heartbeat thread) with the message instead of a warning
        self._hold_ends = None  # monotonic time the server's --max-hold ends the session
        self._max_hold = None  # that --max-hold, in seconds
        self._closed = False
        self._state_lock = threading.Lock()
        self._stop = threading.Event()
        self.stop_waiting = threading.Event()  # set: close() no longer waits for a server away
        self._heartbeat_thread = None
        if start_session:
            self.start_session()

    @staticmethod
    def _connect(config, retries):
        """The transport to the server: for ssh:// and local mode this launches (or reconnects
        to) the server, and the transport reconnects through the launcher when it moves."""
        launch_options = config.launch_options() if config.launches else {}
        url = resolve_base_url(config.url, **launch_options)
        return HttpTransport(url, config.request_timeout,
                             relocate=_relauncher(config.url, **launch_options),
                             token=config.token or None, ca_file=config.ca_file,
                             insecure=config.insecure, retries=retries)

    @property
    def _http(self):
        """The transport to the server (on a pool before the turn: to the first that answers)."""
        if self._transport is None:
            self._transport = self._any_pool_transport()
        return self._transport

    def _any_pool_transport(self):
        """A pool's first host that answers ``GET /`` (so: one that takes our token), for
        requests before the turn; the others are skipped with a warning."""
        problems = []
        for url in self._pool:
            try:
                transport = self._connect(dataclasses_replace(self.config, url=url),
                                          self._retries)
                resp = transport.request("GET", "/", retries=1, reconnect=0)
                if resp.status == 200:
                    return transport
                transport.close()
                problem = _error_for(resp, "GET %s/" % transport.base_url, "server")
            except RemoteLabError as e:
                problem = e
            _log.warning("remote lab pool: skipping %s: %s", url, problem)
            problems.append("%s: %s" % (url, problem))
        raise ConnectionFailed("no remote lab of the pool can be used -- " + "; ".join(problems))

    @property
    def base_url(self):
        """The server's http(s) URL (for ssh:// and local mode: where it answers now); None on
        a pool before the turn."""
        return None if self._transport is None else self._transport.base_url

    @property
    def lost(self):
        """None, or why the session is gone (the heartbeat thread sets it when it notices)."""
        return self._lost

    def __repr__(self):
        return "<RemoteLabClient %s session=%s%s>" % (
            self.base_url, self.session_id, " closed" if self._closed else "")

    # -- context manager --
    def __enter__(self):
        self.start_session()
        return self

    def __exit__(self, *exc):
        self.close()

    # -- session lifecycle --
    def start_session(self):
        """Create the session and wait until it is active (no-op if there is one)."""
        self._check()
        if self.session_id is not None:
            return
        try:
            if len(self._pool) > 1:
                self._join_pool()
            else:
                self._create_session()
                self._wait_until_active()
            self._start_heartbeat()
        except BaseException:
            self._abandon()
            raise

    def _post_session(self):
        """POST /session, saying who and why (ClientConfig.session_meta) and the lab it will
        ask for (``fingerprint``) to a server that takes it: one that refuses the body (400,
        415, 422: older than this) is asked again without the fingerprint, then without a
        body, and not sent what it refused again."""
        meta = self.config.session_meta() if self._send_meta else {}
        if self.fingerprint and self._send_meta and self._send_fingerprint:
            meta["fingerprint"] = self.fingerprint
        resp = self._http.request("POST", "/session", body=meta or None)
        if "fingerprint" in meta and resp.status in (400, 415, 422):
            _log.debug("POST /session refused the lab fingerprint (HTTP %d: %s); asking "
                       "without", resp.status, resp.detail)
            self._send_fingerprint = False
            del meta["fingerprint"]
            resp = self._http.request("POST", "/session", body=meta or None)
        if meta and resp.status in (400, 415, 422):
            _log.debug("POST /session refused who and why (HTTP %d: %s); asking without",
                       resp.status, resp.detail)
            self._send_meta = False
            resp = self._http.request("POST", "/session")
        return resp

    def _join_pool(self):
        """The session on a pool (_PoolJoin): this client takes over the winning host's
        session and transport; the other hosts' queues were left."""
        winner = _PoolJoin(self, self._pool).run()
        sub = winner.client
        atexit.unregister(sub.close)
        sub._closed = True  # this client is that host's client from now on
        if self._transport is not None and self._transport is not sub._transport:
            self._transport.close()  # the one the checks before the turn used
        self._transport = sub._transport
        self.session_id, self.position, self.host = sub.session_id, 0, winner.url
        self._send_meta, self._send_fingerprint = sub._send_meta, sub._send_fingerprint
        self._can_check = sub._can_check
        self._hold_ends, self._max_hold = sub._hold_ends, sub._max_hold
        atexit.register(self.close)
        _log.info("remote lab: got %s (%s) of the pool", winner.name, self.base_url)

    def _create_session(self):
        resp = self._post_session()
        if resp.status not in (200, 201) or not isinstance(resp.data, dict) \
                or "session_id" not in resp.data:
            raise _error_for(resp, "cannot create a remote lab session", "join")
        if not isinstance(resp.data["session_id"], (str, int)) \
                or isinstance(resp.data["session_id"], bool):
            raise ProtocolError("cannot create a remote lab session: the server answered "
                                "session_id=%.100r" % (resp.data["session_id"],))
        self.session_id = str(resp.data["session_id"])
        atexit.register(self.close)  # (before any check that may fail: the session exists)
        self.position = _whole_number(resp.data, "position", 0, "creating the session")
        self._http.reconnect_timeout = self.reconnect_timeout  # from now on: ride restarts
        _log.debug("session %s created at position %d", self.session_id, self.position)

    def _wait_until_active(self):
        started = time.monotonic()
        deadline = started + self.session_timeout
        status = "active" if self.position == 0 else "waiting"
        progress = _Progress(self._progress_mode,
                             page="%s/?sid=%s" % (self.base_url, self.session_id),
                             holder=self._holder_now)
        path = self._session_path()
        long_poll = True
        answer = None  # the last poll's answer
        try:
            while status != "active":
                now = time.monotonic()
                if answer is not None:  # (the first poll does not wait: its ETA is shown)
                    progress.update(self.position, now - started)
                remaining = deadline - now
                if remaining <= 0:
                    sid = self.session_id
                    self._delete_session()
                    raise QueueTimeout(
                        "no turn at the remote lab %s within %s (session_timeout): still at "
                        "queue position %d; the session was deleted"
                        % (self.base_url, _duration(self.session_timeout), self.position),
                        position=self.position, waited=now - started, session_id=sid)
                wait = min(LONG_POLL_SECONDS, remaining) if answer is not None else 0.0
                if progress.mode == "tty":
                    wait = min(wait, 1.0)  # refresh the time shown once a second
                # position: what we saw last, so a change between two polls answers at once
                query = {"wait": "%.3f" % wait, "position": self.position} if long_poll else None
                t0 = time.monotonic()
                # the last poll ends with session_timeout (a second more for the answer to come)
                timeout = min(self.request_timeout + wait,
                              remaining + min(self.request_timeout, 1.0))
                try:
                    resp = self._http.request(
                        "GET", path, query=query, timeout=timeout,
                        reconnect=max(0.0, min(self.reconnect_timeout, remaining - timeout)))
                except RequestTimeout:
                    if time.monotonic() < deadline:
                        raise
                    continue  # the time is up: QueueTimeout above
                if resp.status == 400 and long_poll:
                    long_poll = False  # a server that rejects ?wait=: plain polling
                    continue
                if resp.status != 200 or not isinstance(resp.data, dict):
                    self._raise_for(resp, "cannot poll the remote lab session", "session")
                before = (status, self.position)
                answer = resp.data
                progress.eta = _seconds_field(answer, "eta_s")
                status = resp.data.get("status", status)
                if status not in ("waiting", "active"):
                    raise ProtocolError("polling the remote lab session: the server answered "
                                        "status=%.100r" % (status,))
                self.position = _whole_number(resp.data, "position", self.position,
                                              "polling the remote lab session")
                if (status, self.position) == before and status != "active" \
                        and time.monotonic() - t0 < min(wait / 2.0, 1.0):
                    # answered at once without a change: the server ignores ?wait=
                    time.sleep(min(FALLBACK_POLL_SECONDS, max(0.0, deadline - time.monotonic())))
        finally:
            progress.done()
        waited = time.monotonic() - started
        if waited >= 1:
            _log.info("remote lab session %s is active after %s", self.session_id,
                      _duration(waited))
        self._note_hold_limit(answer)

    def _note_hold_limit(self, answer=None):
        """Active now: when the server's --max-hold ends the session (``hold_left_s`` of
        ``answer``, the poll that said active, else of one GET /session/{id}), so that the
        heartbeat thread warns a minute before and a loss then says why."""
        if answer is None:
            try:
                resp = self._http.request("GET", self._session_path(), retries=1)
                answer = resp.data if resp.status == 200 else None
            except RemoteLabError as e:  # (only the warning is lost)
                _log.debug("cannot read the session's hold limit: %s", e)
        self._hold_ends = self._max_hold = None
        left = _seconds_field(answer, "hold_left_s")
        if left is not None:
            self._max_hold = left + (_seconds_field(answer, "held_s") or 0.0)
            self._hold_ends = time.monotonic() + left

    def _holder_now(self):
        """holder_text() of the server's GET /status, asked again when our position changed
        (the holder changes only then); None when the server does not say."""
        seen = self._holder_seen
        if seen is None or seen[0] != self.position:
            try:
                resp = self._http.request("GET", "/status", retries=0, reconnect=0,
                                          timeout=min(self.request_timeout, 5.0))
                status = resp.data if resp.status == 200 else None
            except RemoteLabError:
                status = None
            seen = self._holder_seen = (self.position, status, time.monotonic())
        return holder_text(seen[1], time.monotonic() - seen[2])

    def _start_heartbeat(self):
        if self.heartbeat_interval <= 0 or self._heartbeat_thread is not None:
            return
        t = threading.Thread(target=self._heartbeat_loop, name="remote-lab-heartbeat",
                             daemon=True)
        self._heartbeat_thread = t
        t.start()

    def _heartbeat_loop(self):
        headers = {"X-Session-ID": self.session_id}
        interval = self.heartbeat_interval
        unreachable_since = None
        warned = False
        while not self._stop.wait(self._heartbeat_wait(interval, warned)):
            warned = warned or self._warn_hold_ending()
            started = time.monotonic()
            try:
                resp = self._http.request(
                    "POST", "/session/heartbeat", headers=headers, idempotent=True, retries=1,
                    timeout=min(self.request_timeout, max(5.0, interval)),
                    lock_timeout=min(0.25, interval / 4.0), stop=self._stop)
            except (ConnectionFailed, RequestTimeout) as e:  # retried for reconnect_timeout
                unreachable_since = unreachable_since or started
                if time.monotonic() - unreachable_since >= self.reconnect_timeout \
                        and not self._stop.is_set():
                    self._report_lost(self._session_lost(
                        unreachable_for=time.monotonic() - unreachable_since, error=e))
                    return
                _log.debug("heartbeat failed: %s", e)
                continue
            except Exception as e:  # (a bad answer: the next one may be fine)
                _log.debug("heartbeat failed: %s", e)
                continue
            unreachable_since = None
            if resp.status == 404:
                self._report_lost(self._session_lost(detail=resp.detail))
                return
            if resp.status >= 400:
                _log.warning("heartbeat: %s (HTTP %d)", resp.detail, resp.status)

    def _heartbeat_wait(self, interval, warned):
        """Seconds until the next heartbeat, or until the hold warning is due if sooner."""
        if warned or self._hold_ends is None:
            return interval
        due = self._hold_ends - HOLD_WARNING_SECONDS - time.monotonic()
        return max(0.0, min(interval, due))

    def _warn_hold_ending(self):
        """Log that the server's --max-hold ends the session soon; True once said."""
        if self._hold_ends is None:
            return False
        left = self._hold_ends - time.monotonic()
        if left > HOLD_WARNING_SECONDS:
            return False
        _log.warning("the remote lab server ends session %s in %s: held longer than its "
                     "--max-hold (%s)", self.session_id, _duration(max(0.0, left)),
                     _duration(round(self._max_hold or 0.0)))
        return True

    def _held_too_long(self, detail):
        """Did the server end the session for its --max-hold (its 404 says so, or the hold
        limit has passed)?"""
        return "--max-hold" in (detail or "") or (
            self._hold_ends is not None and time.monotonic() >= self._hold_ends - 1.0)

    def _session_lost(self, what=None, detail=None, unreachable_for=None, error=None):
        """The one way a session gets lost: the server forgot it (404), or it could not be
        reached for ``unreachable_for`` seconds (``error``). The first reason is kept in
        ``lost``; returns the SessionLost to raise, prefixed with ``what`` failed."""
        with self._state_lock:
            if self._lost is None:
                if unreachable_for is not None:
                    self._lost = ("the remote lab server could not be reached for %s "
                                  "(session %s): %s"
                                  % (_duration(unreachable_for), self.session_id, error))
                    self._lost_unreachable = True
                elif self._held_too_long(detail):
                    self._lost = ("the remote lab server ended session %s: it held the lab "
                                  "longer than the server's maximum hold (%s--max-hold)"
                                  % (self.session_id, "%s, " % _duration(round(self._max_hold))
                                     if self._max_hold else ""))
                else:
                    self._lost = ("the remote lab server no longer knows session %s (it "
                                  "expired or the server restarted)%s"
                                  % (self.session_id, ": " + detail if detail else ""))
            message = self._lost
        return SessionLost("%s: %s" % (what, message) if what else message, 404, detail)

    def _report_lost(self, error):
        """The heartbeat thread found the session gone: tell ``_on_lost`` (else log it)."""
        on_lost = self._on_lost
        if on_lost is not None:
            on_lost(str(error))
        else:
            _log.warning("%s", error)

    def _session_path(self):
        return "/session/" + urllib.parse.quote(self.session_id, safe="")

    def _check(self):
        if self._closed:
            raise RemoteLabError("this RemoteLabClient is closed")
        if self._lost:
            raise self._session_lost()

    def _require_session(self):
        self._check()
        if self.session_id is None:
            self.start_session()

    def _delete_session(self, reconnect=0.0):
        sid = self.session_id
        if sid is None:
            return
        try:
            resp = self._http.request("DELETE", self._session_path(), retries=1,
                                      reconnect=reconnect, stop=self.stop_waiting)
            if resp.status not in (200, 204, 404):
                _log.warning("ending session %s: %s (HTTP %d)", sid, resp.detail, resp.status)
        except RemoteLabError as e:
            _log.warning("ending session %s: %s", sid, e)
        # only now: interrupted (a second Ctrl-C), close() - or atexit - tries again
        self.session_id = None

    def _abandon(self):
        # (no self._stop.set(): heartbeats start last, and a later start_session() needs them)
        if not self._lost:
            self._delete_session()
        self.session_id = None
        if self._transport is not None:
            self._transport.reconnect_timeout = 0.0  # no session to go on with
            self._transport.close()
        atexit.unregister(self.close)

    def close(self):
        """Release what this client acquired, end the session and stop heartbeats. Idempotent."""
        with self._state_lock:
            if self._closed:
                return
            self._closed = True
        self._stop.set()
        atexit.unregister(self.close)
        t = self._heartbeat_thread
        if t is not None and t is not threading.current_thread():
            t.join(min(5.0, self.request_timeout))
        try:
            if self.session_id is not None and (not self._lost or self._lost_unreachable):
                headers = {"X-Session-ID": self.session_id}
                # a restart is waited for (else the session holds the lab until it times out),
                # a server that stayed away for the reconnect window already is not
                reconnect = None
                if self._lost_unreachable or self._http.outage_for() >= self.reconnect_timeout:
                    reconnect = 0.0
                while self._held > 0:
                    self._held -= 1
                    try:
                        resp = self._http.request("POST", "/lab/release", headers=headers,
                                                  retries=1, reconnect=reconnect,
                                                  stop=self.stop_waiting)
                    except RemoteLabError as e:
                        _log.warning("releasing the lab: %s", e)
                        break
                    if resp.status not in (200, 204):
                        break  # no lab / not active: the session's end cleans up anyway
                self._delete_session(reconnect)
        finally:
            if self._transport is not None:
                self._transport.close()

    @property
    def closed(self):
        return self._closed

    # -- session-bound requests --
    def _session_request(self, method, path, what, ok=(200,), request="lab", subject=None,
                         **kw):
        self._require_session()
        headers = {"X-Session-ID": self.session_id}
        resp = self._http.request(method, path, headers=headers, **kw)
        if resp.status in ok:
            return resp
        self._raise_for(resp, what, request, subject)

    def _raise_for(self, resp, what, request, subject=None):
        """Raise what ``resp`` means (_STATUS_ERRORS); a 404 is first checked for a lost
        session: GET /session/{id} says it (for a /lab endpoint the 404 may be "no lab")."""
        if resp.status == 404 and (request == "session" or self._session_gone()):
            raise self._session_lost(what, resp.detail)
        raise _error_for(resp, what, request, subject)

    def _session_gone(self):
        try:
            return self._http.request("GET", self._session_path(), retries=1).status == 404
        except RemoteLabError:
            return False

    def check(self, topology, extra_files=()):
        """Ask the server's netlab whether ``topology`` (+ ``extra_files``) is valid, without a
        session or the lab: its node names. TopologyInvalid (422) when netlab rejects it; None
        when the check could not be made (a server without POST /lab/check -- not asked
        again --, too many checks at once, or a server error): the lab's own `up` then says."""
        files = collect_upload(topology, extra_files)
        if not self._can_check:
            return None
        name = os.path.basename(os.fspath(topology))
        resp = self._http.request("POST", "/lab/check", body=MultipartBody([], files),
                                  idempotent=True, timeout=max(self.request_timeout, 120))
        if resp.status in (404, 405):  # an older server (the seed's), or a proxy's page: the
            self._can_check = False  # acquisition says what is wrong; not asked again
            return None
        if resp.status == 422 and isinstance(resp.data, dict):
            raise TopologyInvalid("netlab rejects topology %s: %s" % (
                name, _netlab_complaint(resp.detail)), 422, resp.detail)
        if resp.status == 429 or resp.status >= 500:
            _log.debug("topology check of %s skipped (HTTP %d: %s)", name, resp.status,
                       resp.detail)
            return None
        if resp.status != 200 or not isinstance(resp.data, dict):
            raise _error_for(resp, "checking topology %s" % name, "check", name)
        nodes = resp.data.get("nodes")
        return [str(n) for n in nodes] if isinstance(nodes, list) else []

    def acquire(self, topology, reuse=True, extra_files=()):
        """Upload ``topology`` (+ ``extra_files``) and start or reuse the lab: its devices.

        Before joining the queue (no session yet: ``start_session=False``) the topology is
        checked first (:meth:`check`), so a broken one fails in seconds. A busy lab (423) is
        retried until ``lab_acquisition_timeout`` (then AcquireTimeout); a netlab failure
        raises LabFailed with netlab's output in ``detail``.
        """
        files = collect_upload(topology, extra_files)  # a missing file fails before any wait
        if self.session_id is None:
            self.check(topology, extra_files)
        self._require_session()
        fields = [("reuse", "true" if reuse else "false")]
        name = os.path.basename(os.fspath(topology))
        deadline = time.monotonic() + self.lab_acquisition_timeout
        delay = 0.5
        while True:
            body = MultipartBody(fields, files)
            remaining = deadline - time.monotonic()
            resp = self._session_request(
                "POST", "/lab", "acquiring the lab for %s" % name, ok=(200, 423),
                request="upload", subject=name, body=body, idempotent=False,
                timeout=max(self.request_timeout, remaining))
            if resp.status == 200:
                if not isinstance(resp.data, dict):
                    raise ProtocolError("acquiring the lab for %s: the answer is not a JSON "
                                        "object: %.100r" % (name, resp.body))
                data = resp.data
                devices = _parse_devices(data.get("devices"), data.get("reused"))
                self.reused = devices.reused
                with self._state_lock:
                    self._held += 1
                return devices
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AcquireTimeout(
                    "the remote lab stayed busy for %s (lab_acquisition_timeout): %s"
                    % (_duration(self.lab_acquisition_timeout), resp.detail), 423, resp.detail)
            _log.info("remote lab busy (%s); retrying in %.1f s", resp.detail, delay)
            time.sleep(min(delay, remaining))
            delay = min(delay * 1.5, 5.0)
            self._check()

    def release(self):
        """Drop one reference to the lab (it stays up, idle, for reuse)."""
        try:
            self._session_request("POST", "/lab/release", "releasing the lab", ok=(200, 204))
        except NoLab:
            with self._state_lock:
                self._held = 0
            raise
        with self._state_lock:
            self._held = max(0, self._held - 1)

    def destroy(self, force=True):
        """Tear the lab down: True if one was running, False if there was none."""
        resp = self._session_request("DELETE", "/lab", "destroying the lab", ok=(202, 204),
                                     query={"force": "true" if force else "false"})
        with self._state_lock:
            self._held = 0
        return resp.status == 202

    def devices(self):
        """The running lab's devices (NoLab if none runs)."""
        resp = self._session_request("GET", "/lab/devices", "listing the lab's devices")
        return _parse_devices(resp.data)

    def status(self):
        """The lab's state: ``{"running", "topology", "ref_count", "devices", "netlab_status"}``."""
        return self._session_request("GET", "/lab", "getting the lab status").data

    def session_status(self):
        """Our session's ``{"status", "position"}``."""
        self._require_session()
        resp = self._http.request("GET", self._session_path())
        if resp.status != 200:
            self._raise_for(resp, "getting the session status", "session")
        return resp.data

    # -- session-less requests --
    def health(self):
        """True if the server answers ``GET /healthz``; raises otherwise."""
        resp = self._http.request("GET", "/healthz", retries=1, reconnect=0)
        if resp.status in (200, 204):
            return True
        raise _error_for(resp, "health check")

    def server_status(self):
        """The server's queue and lab, from ``GET /debug/health`` (else ``GET /``)."""
        resp = self._http.request("GET", "/debug/health")
        if resp.status == 200 and isinstance(resp.data, dict):
            return resp.data
        root = self._http.request("GET", "/")
        if root.status == 200 and isinstance(root.data, dict):
            return root.data
        raise _error_for(resp, "getting the server status")

    def queue_view(self):
        """The server's ``GET /status``: ``holder`` and ``queue`` with who and why (owner,
        note, link; the holder's ``held_s``), the lab, recent events."""
        resp = self._http.request("GET", "/status")
        if resp.status == 200 and isinstance(resp.data, dict):
            return resp.data
        raise _error_for(resp, "getting the queue")

    def server_info(self):
        """The server's ``GET /`` summary: version, uptime, queue_length, pid, simulated, ..."""
        resp = self._http.request("GET", "/")
        if resp.status == 200 and isinstance(resp.data, dict) \
                and resp.data.get("service") == "remote-lab":
            return resp.data
        raise _error_for(resp, "getting the server summary")


def _isatty(stream):
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


# ============================================================================================
# 5. Connect / launch: start or reconnect to a server, locally or over SSH (status-file protocol)
# ============================================================================================
#
# Files follow remote-http-launcher's layout, so both tools can see each other's servers:
#   lab host: ~/.remote-http-launcher/server/<key>.json (+ <key>.log, <key>.lock)
#   client:   ~/.remote-http-launcher/client/<key>.json (mode 0600)
# Everything on the lab host is done by ONE program piped to `python3 -`, locally or through one
# ssh connection: the functions of section 5a below, shipped as text (_host_program). It works
# under an flock on <key>.lock, so concurrent launchers end up with exactly one server.

DEFAULT_PORT_RANGE = (8700, 8799)
DEFAULT_LAUNCH_TIMEOUT = 60.0


class LaunchError(RemoteLabError):
    """Starting or reaching a server (locally or over SSH) failed."""


# --------------------------------------------------------------------------------------------
# 5a. Runs on the lab host: this text, from the line above to 5b's banner, is the program piped
#     to `python3 -` (Python >= 3.8; only the modules of _HOST_IMPORTS, names defined here and
#     builtins). The client calls the same functions for the same jobs on its side.
# --------------------------------------------------------------------------------------------

LAUNCHER_DIR = ".remote-http-launcher"


def _launcher_dir(side):
    """~/.remote-http-launcher/<side>, created (the client's side private: it holds URLs)."""
    path = os.path.join(os.path.expanduser("~"), LAUNCHER_DIR, side)
    os.makedirs(path, mode=0o700 if side == "client" else 0o777, exist_ok=True)
    return path


def _proc_stat(pid):
    """(state, start time) of a process from /proc, or None when it does not exist."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return fields[0], fields[19]
    except (OSError, IndexError, ValueError):
        return None


def _proc_start_time(pid):
    stat = _proc_stat(pid)
    return stat[1] if stat else None


def _same_process(pid, start_time):
    """True when ``pid`` runs (not a zombie) and is the process started at ``start_time``."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    if not os.path.isdir("/proc/self"):  # no procfs: the pid alone must do
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    stat = _proc_stat(pid)
    if stat is None or stat[0] in ("Z", "X"):
        return False
    return start_time is None or stat[1] == start_time


def _kill_group(pid, signum):
    """Signal ``pid``'s process group (servers and tunnels lead one), else the pid alone."""
    try:
        os.killpg(pid, signum)
        return True
    except OSError:
        pass
    try:
        os.kill(pid, signum)
        return True
    except OSError:
        return False


def _terminate(pid, start_time, grace=5.0):
    """Stop the process ``pid`` started at ``start_time`` and its group: SIGTERM, then SIGKILL
    after ``grace`` s. True when it was running (and could be signalled)."""
    if not _same_process(pid, start_time) or not _kill_group(pid, signal.SIGTERM):
        return False
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and _same_process(pid, start_time):
        time.sleep(0.05)
        try:
            os.waitpid(pid, os.WNOHANG)  # our own child (a server just started) must not linger
        except OSError:
            pass
    if _same_process(pid, start_time):
        _kill_group(pid, signal.SIGKILL)
    return True


def _probe_connection(url, timeout):
    """An http.client connection for a probe of ``url`` (is it up, what is it): https without
    checking the certificate, as the probes send nothing secret -- never add a token here;
    the client's own requests check it."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "https":
        return http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=timeout)
    import ssl
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return http.client.HTTPSConnection(parts.hostname, parts.port or 443, timeout=timeout,
                                       context=context)


def _healthz(url, timeout=2.0):
    """True when ``GET /healthz`` at the http(s) ``url`` answers 2xx."""
    parts = urllib.parse.urlsplit(url)
    try:
        conn = _probe_connection(url, timeout)
        try:
            conn.request("GET", parts.path.rstrip("/") + "/healthz")
            return 200 <= conn.getresponse().status < 300
        finally:
            conn.close()
    except (OSError, http.client.HTTPException, ValueError):
        return False


def _root_json(url, timeout=2.0):
    """The ``GET /`` summary of the remote-lab server at ``url``, or None (no answer, not one)."""
    parts = urllib.parse.urlsplit(url)
    try:
        conn = _probe_connection(url, timeout)
        try:
            conn.request("GET", parts.path.rstrip("/") + "/", headers={"Accept": "application/json"})
            data = json.loads(conn.getresponse().read(1 << 20).decode("utf-8"))
        finally:
            conn.close()
    except (OSError, http.client.HTTPException, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("service") == "remote-lab" else None


def _read_json_file(path):
    try:
        with open(path) as f:
            data = json.load(f)
        return data if isinstance(data, dict) else None
    except (OSError, ValueError):
        return None


def _write_json_file(path, data, mode=0o666):
    """Replace ``path`` atomically (a unique temp file renamed over it); ``mode`` before umask."""
    tmp = "%s.%d.%d.tmp" % (path, os.getpid(), int(time.time() * 1e6))
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def _host_url(record):
    """The URL of the server a status or lock record names (loopback for a wildcard address)."""
    host = record.get("host") or "127.0.0.1"
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = "[%s]" % host
    return "%s://%s:%s" % (_scheme(record), host, record.get("port"))


def _scheme(record):
    """The scheme a status, lock or client record says its server speaks (before: http)."""
    return "https" if record.get("scheme") == "https" else "http"


def _answer(**fields):
    """The program's answer: one JSON line on stdout (the client reads the last one)."""
    sys.stdout.write(json.dumps(fields) + "\n")
    sys.stdout.flush()


def _log_tail(path, n=20):
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 64 * 1024))
            return "\n".join(f.read().decode("utf-8", "replace").splitlines()[-n:])
    except OSError:
        return ""


def _flags_text(args):
    return "flags '%s'" % " ".join(args) if args else "no extra flags"


def _own_difference(st, command, sha, args):
    """Why the server we started is not the one asked for now, or None when it is."""
    if st.get("server_sha256") != sha:
        return ("remote_lab.py changed since it started" if st.get("server_sha256")
                else "it was started by an older launcher")
    if st.get("server_args") != args:
        return "it runs with %s, and %s were asked" % (_flags_text(st.get("server_args")),
                                                       _flags_text(args))
    if st.get("command") != command:
        return "it was started with another command line (python, address or state dir)"
    return None


def _sessions_of(st):
    """How many sessions the server has (None when it does not say)."""
    root = _root_json(_host_url(st))
    n = root.get("queue_length") if root else None
    return n if isinstance(n, int) else None


def _flag_value(args, name):
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(name + "="):
            return a[len(name) + 1:]
    return None


def _lock_record(path):
    """The record in a server's instance lock file ({} if unreadable), None when nobody holds it."""
    import fcntl  # (here: the client module must import on systems without fcntl)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return None  # nobody holds it
        except OSError:
            pass
        try:
            info = json.loads(os.read(fd, 4096).decode() or "{}")
        except ValueError:
            info = {}
        return info if isinstance(info, dict) else {}
    finally:
        os.close(fd)


def _external_server(state_dir, deadline):
    """The server holding state_dir's instance lock (one started by hand): its lock record
    ({pid, port, host}) plus "root", its GET / (None if it never answered); None if no server."""
    path = os.path.join(state_dir, "server.lock")
    while True:
        info = _lock_record(path)
        if info is None:
            return None
        root = _root_json(_host_url(info)) if info.get("port") else None
        if root and root.get("pid", info.get("pid")) == info.get("pid"):
            return dict(info, root=root)
        if time.time() >= deadline:
            return dict(info, root=None)
        time.sleep(0.1)


def _external_difference(root, args):
    """Why a server we did not start is not the one asked for, or None (also: cannot tell)."""
    if "simulated" not in root:
        return None  # an older server does not say
    simulate = "--simulate" in args
    if bool(root["simulated"]) != simulate:
        return ("--simulate was asked" if simulate
                else "real netlab was asked (no --simulate in the server flags)")
    netlab = _flag_value(args, "--netlab")
    found = shutil.which(netlab) if netlab and not simulate else None
    if found and os.path.abspath(found) != root.get("netlab"):
        return "--netlab %s was asked" % netlab
    return None


def _use_external(other, params, state_dir):
    root = other["root"]
    where = "pid %s, %s" % (other.get("pid", "?"), _host_url(other))
    if root is None:
        _answer(ok=False, error="a server (%s) holds the lock of %s but does not answer as "
                "remote-lab" % (where, state_dir))
        return 1
    kind = "simulated" if root.get("simulated") else "netlab %s" % root.get("netlab", "?")
    differs = _external_difference(root, params["server_args"])
    if differs:
        _answer(ok=False, error="a remote-lab server not started by the launcher runs for %s "
                "(%s, %s), but %s: stop that server, or set REMOTE_LAB_URL=%s to use it as it is"
                % (state_dir, where, kind, differs, _host_url(other)))
        return 1
    _answer(ok=True, reused=True, external=True, pid=other.get("pid"), port=other.get("port"),
            host=other.get("host"), start_time=_proc_start_time(other.get("pid") or 0),
            scheme=_scheme(other))
    return 0


def _replace_idle(st, why, params):
    """Stop our idle server that differs from what is asked; an error message if it is busy."""
    n = _sessions_of(st)
    if n != 0:
        return ("the server on this host (pid %s, port %s) differs from what is asked (%s), but it "
                "is busy (%s): wait until its sessions end, or stop it (%s)"
                % (st.get("pid"), st.get("port"), why, "%d session%s" % (n, "" if n == 1 else "s")
                   if n is not None else "it does not say with what", params.get("stop_command")))
    _terminate(st.get("pid"), st.get("start_time"), grace=60.0)
    return None


class _HostFiles:
    """The lab host's files of one launcher key, and the state dir the server runs on."""

    def __init__(self, params):
        server_dir = _launcher_dir("server")
        self.status = os.path.join(server_dir, params["key"] + ".json")
        self.log = os.path.join(server_dir, params["key"] + ".log")
        self.lock = os.path.join(server_dir, params["key"] + ".lock")
        self.workdir = os.path.abspath(os.path.expanduser(params["workdir"]))
        self.server = params.get("server_path") or os.path.join(self.workdir, "remote_lab.py")


def _host_logs(params, files):
    if not os.path.exists(files.log):
        sys.stderr.write("no server log %s (nothing launched there)\n" % files.log)
        return 1
    with open(files.log, "rb") as f:
        lines = f.read().splitlines(True)[-params.get("lines", 50):]
        sys.stdout.buffer.write(b"".join(lines))
        sys.stdout.flush()
        while params.get("follow"):
            chunk = f.read()
            if chunk:
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            else:
                time.sleep(0.2)
    return 0


def _host_stop(files, st, running):
    stopped = _terminate(st.get("pid"), st.get("start_time"), grace=60.0) if running else False
    if stopped:
        fresh = _read_json_file(files.status) or st
        if fresh.get("status") != "stopped":
            fresh["status"] = "stopped"
            _write_json_file(files.status, fresh)
    other = None if stopped else _external_server(files.workdir, time.time())
    _answer(ok=True, stopped=stopped, pid=st.get("pid"),
            external_pid=other.get("pid") if other else None,
            cleaned=_host_cleanup(st) if stopped else None)
    return 0


def _host_cleanup(st):
    """``stop`` is for good: a stopped server leaves its lab running for its next start, so
    ``remote_lab.py --cleanup`` (same command, same state dir) tears it down. Its summary."""
    command = list(st.get("command") or [])
    if "--status-file" in command:
        at = command.index("--status-file")
        del command[at:at + 2]
    if not command:
        return None
    try:
        p = subprocess.run(command + ["--cleanup"], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
    except (OSError, subprocess.SubprocessError) as e:
        return "cleanup failed: %s" % e
    lines = [l.strip() for l in p.stdout.decode("utf-8", "replace").splitlines() if l.strip()]
    return (lines[-1] if lines else "") + ("" if p.returncode == 0 else
                                           " (exit %d)" % p.returncode)


def _server_command(params, files):
    return [params.get("python") or sys.executable, files.server,
            "--status-file", files.status,
            "--port-range", str(params["port_range"][0]), str(params["port_range"][1]),
            "--host", params["host"], "--state-dir", files.workdir] + params["server_args"]


def _reuse_running(params, files, st, command, deadline):
    """For a live server of ours: (exit code, None) when answered (reused or refused), else
    (None, why it was replaced, or None when it died)."""
    while time.time() < deadline:
        if st.get("status") == "running" and _healthz(_host_url(st)):
            replaced = None if params.get("reuse_only") else _own_difference(
                st, command, params.get("server_sha256"), params["server_args"])
            if replaced is None:
                _answer(ok=True, reused=True, **st)
                return 0, None
            refused = _replace_idle(st, replaced, params)
            if refused:
                _answer(ok=False, error=refused)
                return 1, None
            return None, replaced
        if not _same_process(st.get("pid"), st.get("start_time")):
            return None, None
        time.sleep(0.1)
        st = _read_json_file(files.status) or st
    _answer(ok=False, error="a server (pid %s) is running but does not answer on port %s"
            % (st.get("pid"), st.get("port")), log_tail=_log_tail(files.log))
    return 1, None


def _install_server(params, path):
    """Write the shipped remote_lab.py to ``path`` unless it is there already; False if corrupt."""
    blob = base64.b64decode(params["server_b64"])
    if hashlib.sha256(blob).hexdigest() != params["server_sha256"]:
        return False
    current = None
    if os.path.exists(path):
        with open(path, "rb") as f:
            current = hashlib.sha256(f.read()).hexdigest()
    if current != params["server_sha256"]:
        tmp = path + ".%d.tmp" % os.getpid()
        with open(tmp, "wb") as f:
            f.write(blob)
        os.chmod(tmp, 0o755)
        os.replace(tmp, path)
    return True


def _start_server(params, files, command, deadline, replaced):
    """Start the server detached, write the launcher's record, wait for running or failed."""
    logf = open(files.log, "wb")
    try:
        proc = subprocess.Popen(command, cwd=files.workdir, stdin=subprocess.DEVNULL, stdout=logf,
                                stderr=subprocess.STDOUT, start_new_session=True)
    except OSError as e:
        _answer(ok=False, error="cannot start %s: %s" % (command[0], e))
        return 1
    finally:
        logf.close()
    st = {"workdir": files.workdir, "log": files.log, "command": command, "uid": os.getuid(),
          "pid": proc.pid, "start_time": _proc_start_time(proc.pid), "status": "starting",
          "key": params["key"], "network_interface": params["host"],
          "server_args": params["server_args"], "server_sha256": params.get("server_sha256")}
    _write_json_file(files.status, st)
    while time.time() < deadline:
        cur = _read_json_file(files.status) or st
        if cur.get("status") == "running" and _healthz(_host_url(cur)):
            _answer(ok=True, reused=False, replaced=replaced, **cur)
            return 0
        if cur.get("status") == "failed":
            _answer(ok=False, error=cur.get("error") or "server start-up failed",
                    log_tail=_log_tail(files.log))
            proc.wait(10)
            return 1
        if proc.poll() is not None:
            _answer(ok=False, error="server exited with code %s during start-up" % proc.returncode,
                    log_tail=_log_tail(files.log))
            return 1
        time.sleep(0.05)
    _terminate(st["pid"], st["start_time"], grace=5.0)
    _answer(ok=False, error="server did not start within %.0f s" % params["timeout"],
            log_tail=_log_tail(files.log))
    return 1


def _host_launch(params, files, st, running):
    deadline = time.time() + params["timeout"]
    command = _server_command(params, files)
    replaced = None
    if running:
        code, replaced = _reuse_running(params, files, st, command, deadline)
        if code is not None:
            return code
    other = _external_server(files.workdir, deadline)  # one server per state dir, so per host
    if other is not None:
        return _use_external(other, params, files.workdir)
    if params.get("reuse_only"):
        _answer(ok=False, error="no server is running (it was stopped or died)")
        return 1
    os.makedirs(files.workdir, exist_ok=True)
    if params.get("server_b64") and not _install_server(params, files.server):
        _answer(ok=False, error="server file corrupted in transit (SHA-256 mismatch)")
        return 1
    return _start_server(params, files, command, deadline, replaced)


def _host_main(params):
    """The lab-host program: one action (launch, stop, status, logs) on one launcher key."""
    import fcntl
    files = _HostFiles(params)
    if params["action"] == "logs":
        return _host_logs(params, files)
    with open(files.lock, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        st = _read_json_file(files.status) or {}
        running = (st.get("status") in ("running", "starting")
                   and _same_process(st.get("pid"), st.get("start_time")))
        if params["action"] == "status":
            _answer(ok=True, running=running and _healthz(_host_url(st)),
                    status_file=files.status, log=files.log, **st)
            return 0
        if params["action"] == "stop":
            return _host_stop(files, st, running)
        return _host_launch(params, files, st, running)


# --------------------------------------------------------------------------------------------
# 5b. Runs on the client: ship 5a, open the tunnel, keep the connection record
# --------------------------------------------------------------------------------------------

_HOST_IMPORTS = ("import base64, hashlib, http.client, json, os, shutil, signal, subprocess, "
                 "sys, time, urllib.parse")
_HOST_SECTION = ("# 5a. ", "# 5b. ")  # how the banner lines that open 5a and 5b start


def _host_section():
    """Section 5a's text, read from this file by its banners (so it is the code that runs here)."""
    try:
        with open(__file__, encoding="utf-8") as f:
            lines = f.read().splitlines(True)
    except (OSError, ValueError) as e:  # e.g. run from bytecode only, without the .py file
        raise LaunchError("cannot read the launcher's own source (%s): run remote_lab_client.py "
                          "from its .py file" % e) from None
    begin, end = (next((i for i, line in enumerate(lines) if line.startswith(marker)), None)
                  for marker in _HOST_SECTION)
    if begin is None or end is None or end < begin:
        raise LaunchError("%s has no lab-host section to ship (its banner '%s' is missing)"
                          % (__file__, _HOST_SECTION[0].strip()))
    return "".join(lines[begin - 1:end - 1])  # from 5a's banner to the rule above 5b's


def _host_program(params):
    """The program piped to the lab host's `python3 -`: section 5a, then one call."""
    return "%s\n\n%s\nsys.exit(_host_main(json.loads(%r)))\n" % (
        _HOST_IMPORTS, _host_section(), json.dumps(params))


def _server_facts(info):
    """["remote-lab 0.1.0", "pid 123", "simulated"]: what a GET / summary says of its server."""
    facts = ["remote-lab %s" % info.get("version", "?")]
    if isinstance(info.get("pid"), int):
        facts.append("pid %d" % info["pid"])
    if info.get("simulated"):
        facts.append("simulated")
    return facts


@dataclass
class SSHTarget:
    """``[user@]host[:port]`` plus extra ssh options (shell words)."""
    host: str
    user: Optional[str] = None
    port: Optional[int] = None
    extra_args: Tuple[str, ...] = ()

    @classmethod
    def parse(cls, text, extra_args=()):
        m = re.match(r"^(?:([^@/\s]+)@)?(\[[^\]]+\]|[^:/@\s]+)(?::(\d+))?$", text or "")
        if not m:
            raise LaunchError("bad SSH target %r (expected [USER@]HOST[:PORT])" % text)
        user, host = m.group(1), m.group(2).strip("[]")
        if any(part and part.lstrip("[").startswith("-") for part in (user, host)):
            # ssh would take "-oProxyCommand=..." as an option: a URL must never run commands
            # (checked without the brackets: "[-oProxyCommand=...]" is no IPv6 address)
            raise LaunchError("bad SSH target %r: user and host must not start with '-'" % text)
        return cls(host, user, int(m.group(3)) if m.group(3) else None, tuple(extra_args))

    def __str__(self):
        return "%s%s%s" % (self.user + "@" if self.user else "", self.host,
                           ":%d" % self.port if self.port else "")

    def ssh_argv(self, connect_timeout):
        argv = ["ssh", "-o", "BatchMode=yes", "-o", "ConnectTimeout=%d" % max(1, int(connect_timeout))]
        if self.port:
            argv += ["-p", str(self.port)]
        argv += list(self.extra_args)
        # "--": whatever the destination looks like, ssh takes no option from it
        argv += ["--", "%s@%s" % (self.user, self.host) if self.user else self.host]
        return argv


def launcher_key(target, workdir):
    """The state-file key: from host and workdir, restricted to [A-Za-z0-9._-]."""
    where = str(target) if target else "local"
    raw = "%s--%s" % (where, workdir.strip("/").replace("/", "--"))
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", raw)[:80]
    digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
    return "remote-lab-%s-%s" % (safe, digest)


def find_local_server():
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "remote_lab.py")
    if os.path.isfile(here):
        return here
    found = shutil.which("remote_lab.py")
    return found


def _run_bootstrap(params, target, python, timeout, stream=False):
    """Run the lab-host program locally or over one ssh connection; return its JSON answer."""
    program = _host_program(params).encode()
    if target is None:
        argv = [python or sys.executable, "-"]
    else:
        argv = target.ssh_argv(min(timeout, 30)) + [python or "python3", "-"]
    if stream:  # logs --follow: hand the terminal the output as it comes
        return _stream_bootstrap(argv, program, target, python)
    try:
        proc = subprocess.run(argv, input=program, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=timeout + 15)
    except subprocess.TimeoutExpired:
        raise LaunchError("%s did not answer within %.0f s" % (
            "ssh %s" % target if target else "the local launcher", timeout + 15)) from None
    except FileNotFoundError as e:
        raise LaunchError("cannot run %s: %s" % (argv[0], e)) from None
    stdout = proc.stdout.decode("utf-8", "replace")
    stderr = proc.stderr.decode("utf-8", "replace").strip()
    error = _failed_run(target, python, proc.returncode, stderr)
    if error is not None:  # (stderr alone proves nothing: a noisy .bashrc writes there too)
        raise error
    answer = _last_json_line(stdout)
    if answer is None:
        raise LaunchError("launcher on %s gave no answer (exit %d): %s" % (
            target or "this machine", proc.returncode, _last_line(stderr) or stdout[-300:]))
    if not answer.get("ok"):
        msg = answer.get("error") or "launch failed"
        tail = [line.strip() for line in (answer.get("log_tail") or "").splitlines()
                if line.strip() and line.strip() not in msg]  # the server's own error is in msg
        if tail:
            msg += " | server log: " + " / ".join(tail[-5:])
        raise LaunchError(msg)
    return answer


def _stream_bootstrap(argv, program, target, python):
    """Run the program with its stdout on ours (logs, --follow until Ctrl-C)."""
    proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(program)
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait(5)
        return {"ok": True}
    if proc.returncode != 0:
        err = err.decode("utf-8", "replace")
        raise _failed_run(target, python, proc.returncode, err) or LaunchError(
            _last_line(err) or "the launcher failed (exit %d)" % proc.returncode)
    return {"ok": True}


def _last_json_line(stdout):
    """The program's answer: the last line that parses as JSON (shell noise may come before)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                pass
    return None


def _failed_run(target, python, returncode, stderr):
    """The LaunchError when ssh or the host's shell could not run the bootstrap, else None."""
    if target is not None and returncode == 255:
        return LaunchError("ssh to %s failed: %s" % (target, _last_line(stderr) or "exit 255"))
    if returncode == 127:
        return LaunchError("%s not found on %s" % (python or "python3", target or "this machine"))
    return None


def _last_line(text):
    lines = [l for l in (text or "").splitlines() if l.strip()]
    return lines[-1].strip() if lines else ""


class _FileLock:
    """An exclusive flock held for a ``with`` block (serialises launchers of one key)."""

    def __init__(self, path):
        self.path = path
        self.fd = None

    def __enter__(self):
        import fcntl
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self.fd)


def _free_local_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _processes_alive(conn, local):
    """True when a client record's tunnel (if any) and, ``local``, its server still run."""
    if conn.get("tunnel_pid") and not _same_process(conn["tunnel_pid"],
                                                    conn.get("tunnel_start_time")):
        return False
    # a local server that died: whatever answers on its port now is not it
    return not local or _same_process(conn.get("server_pid"), conn.get("server_start_time"))


@dataclass
class Launched:
    """Where a launched (or reconnected) server answers."""
    url: str
    key: str
    reused: bool
    server_pid: Optional[int] = None
    server_port: Optional[int] = None
    target: Optional[str] = None
    tunnel_pid: Optional[int] = None
    version: Optional[str] = None  # the server's, from its GET /
    simulated: Optional[bool] = None
    external: bool = False  # a server the launcher did not start (by hand, same state dir)
    replaced: Optional[str] = None  # why an idle server that differed was stopped first


class Launcher:
    """Start, reconnect to, stop and inspect one server: local (target None) or over SSH."""

    def __init__(self, host=None, workdir=None, python=None, tunnel=None, server_args=None,
                 ssh_args=None, timeout=DEFAULT_LAUNCH_TIMEOUT, port_range=DEFAULT_PORT_RANGE):
        if ssh_args is None:
            ssh_args = shlex.split(os.environ.get("REMOTE_LAB_SSH_ARGS", ""))
        if server_args is None:
            server_args = shlex.split(os.environ.get("REMOTE_LAB_SERVER_ARGS", ""))
        self.target = SSHTarget.parse(host, ssh_args) if host else None
        self.workdir = workdir or os.path.join("~", ".remote-lab")
        if self.target is None:
            self.workdir = os.path.abspath(os.path.expanduser(self.workdir))
        self.python = python
        self.tunnel = (self.target is not None) if tunnel is None else bool(tunnel)
        if self.tunnel and self.target is None:
            self.tunnel = False  # nothing to tunnel to on this machine
        self.server_args = list(server_args)
        self.timeout = float(timeout)
        self.port_range = tuple(port_range)
        self.key = launcher_key(self.target, self.workdir)
        client_dir = _launcher_dir("client")
        self.client_file = os.path.join(client_dir, self.key + ".json")
        self.client_lock = os.path.join(client_dir, self.key + ".lock")
        self.external_pid = None  # after stop(): the server there that the launcher did not start

    @property
    def where(self):
        return str(self.target) if self.target else "this machine"

    def _params(self, action, **extra):
        p = {"action": action, "key": self.key, "workdir": self.workdir, "timeout": self.timeout}
        p.update(extra)
        return p

    def connection(self):
        """The client file's record when its server (and tunnel) still answer, else None."""
        conn = _read_json_file(self.client_file)
        if not conn or "url" not in conn or not _processes_alive(conn, self.target is None):
            return None
        return conn if _healthz(conn["url"]) else None

    def _server_file(self):
        """(path, bytes) of the remote_lab.py to run, (None, None) when there is none."""
        path = find_local_server()
        if not path:
            return None, None
        with open(path, "rb") as f:
            return path, f.read()

    def _launched(self, conn, reused, answer=None):
        if conn.get("tls_name"):
            _TLS_NAMES[conn["url"]] = conn["tls_name"]
        info = _root_json(conn["url"]) or {}
        answer = answer or {}
        return Launched(conn["url"], self.key, reused, conn.get("server_pid"),
                        conn.get("tunneled-port") or conn.get("port"), conn.get("ssh"),
                        conn.get("tunnel_pid"), info.get("version"), info.get("simulated"),
                        bool(conn.get("external")), answer.get("replaced"))

    def launch(self, start=True):
        """Reconnect to the running server, else (``start``) start one: a ``Launched``.

        A server this launcher started whose flags or remote_lab.py (SHA-256) differ from what
        is asked now is restarted when idle, refused (LaunchError) when busy; a server started
        by hand on the same state dir is used when it is of the kind asked (simulated or not).
        """
        with _FileLock(self.client_lock):
            deadline = time.monotonic() + self.timeout  # for all of it: bootstrap and tunnel
            server_path, blob = self._server_file()
            asked = {"server_args": self.server_args,
                     "server_sha256": hashlib.sha256(blob).hexdigest() if blob else None}
            conn = self.connection()
            if conn and (not start or all(conn.get(k) == v for k, v in asked.items())):
                return self._launched(conn, True)
            old = _read_json_file(self.client_file) or {}
            if old.get("tunnel_pid"):
                _terminate(old["tunnel_pid"], old.get("tunnel_start_time"))
            bind = "127.0.0.1" if (self.target is None or self.tunnel) else "0.0.0.0"
            params = self._launch_params(bind, server_path, blob, asked, start)
            answer = _run_bootstrap(params, self.target, self.python, self.timeout)
            if answer.get("replaced"):
                _log.info("stopped the idle server on %s: %s; started a new one", self.where,
                          answer["replaced"])
            conn = self._connection_record(answer, bind, deadline)
            conn.update(asked)
            _write_json_file(self.client_file, conn, mode=0o600)
            return self._launched(conn, bool(answer.get("reused")), answer)

    def _launch_params(self, bind, server_path, blob, asked, start):
        """What the lab-host program is told for a launch (the server file: path or bytes)."""
        extra = {"host": bind, "port_range": list(self.port_range),
                 "server_args": self.server_args, "python": self.python,
                 "server_sha256": asked["server_sha256"], "reuse_only": not start,
                 "stop_command": "remote-lab-client stop" + (
                     " --ssh %s" % self.target if self.target else "")}
        if self.target is None:
            if not server_path:
                raise LaunchError("no remote_lab.py next to %s or on PATH to start a local "
                                  "server" % os.path.abspath(__file__))
            extra["server_path"] = server_path
        else:
            if not blob:
                raise LaunchError("cannot find remote_lab.py next to %s or on PATH to install on "
                                  "the lab host" % os.path.basename(__file__))
            extra["server_b64"] = base64.b64encode(blob).decode()
        return self._params("launch", **extra)

    def _connection_record(self, answer, bind, deadline):
        """The client file's record of the server the answer names (through a new tunnel)."""
        rport = int(answer["port"])
        rhost = answer.get("host") or bind
        scheme = _scheme(answer)
        conn = {"key": self.key, "ssh": str(self.target) if self.target else None,
                "workdir": self.workdir, "server_pid": answer.get("pid"),
                "server_start_time": answer.get("start_time"),
                "external": bool(answer.get("external")), "scheme": scheme}
        if scheme == "https" and (self.tunnel or self.target is None):
            # what the certificate must name where the URL says 127.0.0.1: the lab host
            conn["tls_name"] = self.target.host if self.target else "localhost"
        if self.tunnel:
            lport, tpid, tstart = self._open_tunnel(rhost, rport, deadline, scheme)
            conn.update({"hostname": "localhost", "port": lport,
                         "tunneled-host": self.target.host, "tunneled-port": rport,
                         "tunneled-network-interface": rhost,
                         "tunnel_pid": tpid, "tunnel_start_time": tstart,
                         "url": "%s://127.0.0.1:%d" % (scheme, lport)})
        else:
            hostname = self.target.host if self.target else "127.0.0.1"
            shown = "[%s]" % hostname if ":" in hostname else hostname
            conn.update({"hostname": hostname, "port": rport,
                         "url": "%s://%s:%d" % (scheme, shown, rport)})
        return conn

    def _open_tunnel(self, rhost, rport, deadline, scheme="http"):
        """ssh -N -L 127.0.0.1:LPORT:RHOST:RPORT; ready when /healthz answers through it."""
        fwd = "127.0.0.1" if rhost in ("0.0.0.0", "::", "") else rhost
        if ":" in fwd:
            fwd = "[%s]" % fwd
        log_path = os.path.join(os.path.dirname(self.client_file), self.key + ".tunnel.log")
        last = ""
        for _ in range(5):
            lport = _free_local_port()
            argv = self.target.ssh_argv(min(deadline - time.monotonic(), 30))
            argv[1:1] = ["-N", "-o", "ExitOnForwardFailure=yes", "-o", "ServerAliveInterval=15",
                         "-L", "127.0.0.1:%d:%s:%d" % (lport, fwd, rport)]
            fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.fchmod(fd, 0o600)
            with open(fd, "wb") as errf:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=errf, start_new_session=True)
            url = "%s://127.0.0.1:%d" % (scheme, lport)
            try:
                while time.monotonic() < deadline:
                    if proc.poll() is not None:
                        with open(log_path, errors="replace") as f:
                            last = _last_line(f.read())
                        break
                    if _healthz(url, 1.0):
                        return lport, proc.pid, _proc_start_time(proc.pid)
                    time.sleep(0.05)
                else:
                    raise LaunchError("ssh tunnel to %s did not come up within %.0f s"
                                      % (self.target, self.timeout))
            except BaseException:  # timeout, Ctrl-C: no tunnel nobody knows about stays behind
                proc.kill()
                proc.wait()
                raise
            if "forward" not in last.lower() and "in use" not in last.lower():
                break  # not a port clash: retrying will not help
        raise LaunchError("ssh tunnel to %s failed: %s" % (self.target, last or "ssh exited"))

    def stop(self):
        """Stop the server and its tunnel; returns True when a server was stopped."""
        with _FileLock(self.client_lock):
            conn = _read_json_file(self.client_file) or {}
            if conn.get("tunnel_pid"):
                _terminate(conn["tunnel_pid"], conn.get("tunnel_start_time"))
            answer = _run_bootstrap(self._params("stop"), self.target, self.python, self.timeout)
            try:
                os.unlink(self.client_file)
            except FileNotFoundError:
                pass
            self.external_pid = answer.get("external_pid")  # a server it must leave alone
            self.cleaned = answer.get("cleaned")  # what --cleanup tore down after the stop
            return bool(answer.get("stopped"))

    def status(self):
        return _run_bootstrap(self._params("status"), self.target, self.python, self.timeout)

    def logs(self, follow=False, lines=50):
        _run_bootstrap(self._params("logs", follow=follow, lines=lines), self.target, self.python,
                       self.timeout, stream=True)


def launch(host=None, start=True, **kwargs):
    """Start or reconnect to a server (``host`` = ``[user@]host[:port]`` over SSH, None = local).

    Returns a ``Launched`` whose ``url`` the client can use (``start=False``: reconnect only).
    Keyword arguments: workdir, python, tunnel, server_args, ssh_args, timeout, port_range.
    """
    return Launcher(host, **kwargs).launch(start)


def running_servers():
    """What the state files say is running: client records and this machine's server files."""
    rows = []
    base = os.path.join(os.path.expanduser("~"), LAUNCHER_DIR)
    for side in ("client", "server"):
        folder = os.path.join(base, side)
        try:
            names = sorted(n for n in os.listdir(folder)
                           if n.startswith("remote-lab-") and n.endswith(".json"))
        except FileNotFoundError:
            continue
        for name in names:
            data = _read_json_file(os.path.join(folder, name)) or {}
            if side == "client":
                alive = (_processes_alive(data, not data.get("ssh")) and data.get("url")
                         and _healthz(data["url"], 1.0))
                rows.append({"side": "client", "key": name[:-5], "where": data.get("ssh") or "local",
                             "url": data.get("url"), "tunnel_pid": data.get("tunnel_pid"),
                             "alive": bool(alive)})
            else:
                alive = (data.get("status") == "running"
                         and _same_process(data.get("pid"), data.get("start_time")))
                rows.append({"side": "server", "key": name[:-5], "where": "local",
                             "url": _host_url(data) if data.get("port") else None,
                             "pid": data.get("pid"), "status": data.get("status"), "alive": alive})
    return rows


def parse_ssh_url(url):
    """``ssh://[user@]host[:port][/workdir]`` → (target text, workdir or None)."""
    try:
        parts = urllib.parse.urlsplit(url)
        _ = (parts.hostname, parts.port)  # (on 3.8 urllib checks these only when asked)
    except ValueError as e:
        raise ConfigError("bad ssh URL %r (expected ssh://[user@]host[:port][/workdir]): %s"
                          % (url, e)) from None
    if parts.scheme != "ssh" or not parts.hostname:
        raise LaunchError("bad ssh URL %r (expected ssh://[user@]host[:port][/workdir])" % url)
    target = parts.netloc
    workdir = urllib.parse.unquote(parts.path) or None
    if workdir and workdir.startswith("/~"):
        workdir = workdir[1:]
    return target, workdir


def pool_urls(url):
    """The servers ``url`` (``REMOTE_LAB_URL``, ``base_url``, ``--url``) names, in order: one,
    or several separated by commas -- a pool, any mix of http(s):// and ssh:// URLs, each
    launched or reconnected as a single URL is. [""] is local mode."""
    parts = [p.strip() for p in os.fspath(url or "").split(",")]
    if len(parts) > 1 and not all(parts):
        raise ConfigError("bad remote lab pool %r: an empty entry between commas" % (url,))
    if len(set(parts)) != len(parts):
        raise ConfigError("bad remote lab pool %r: a server is named twice" % (url,))
    return parts


def _source_url(base_url=None):
    return (os.fspath(base_url) if base_url else os.environ.get("REMOTE_LAB_URL", "")).strip()


def resolve_base_url(base_url=None, timeout=DEFAULT_LAUNCH_TIMEOUT, start=True,
                     **launch_options):
    """The server's http(s) base URL, from ``base_url`` or ``REMOTE_LAB_URL``:

    - ``http(s)://host:port`` (or ``host:port``): used as it is;
    - ``ssh://[user@]host[:port][/workdir]``: launch or reconnect over SSH, then the tunnel's URL;
    - unset: local mode, a server on this machine (``remote_lab.py`` next to this file or on
      PATH) shared by every local test run; ``REMOTE_LAB_SERVER_ARGS`` adds server flags.

    ``launch_options`` (server_args, ssh_args) go to :func:`launch`.
    """
    url = _source_url(base_url)
    if url.startswith("ssh://"):
        target, workdir = parse_ssh_url(url)
        return launch(target, start, workdir=workdir, timeout=timeout, **launch_options).url
    if not url:
        if not find_local_server():
            raise ConfigError(NO_URL_MESSAGE)
        try:
            return launch(None, start, timeout=timeout, **launch_options).url
        except LaunchError as e:
            if not start:
                raise
            raise LaunchError("REMOTE_LAB_URL is not set and a local server could not be started: "
                              "%s (set REMOTE_LAB_URL=http://HOST:PORT or ssh://[USER@]HOST to "
                              "use a lab host; REMOTE_LAB_SERVER_ARGS=--simulate to try without "
                              "netlab)" % e) from None
    if "://" not in url:
        url = "http://" + url
    try:
        scheme = urllib.parse.urlsplit(url).scheme.lower()
    except ValueError as e:
        raise ConfigError("bad remote lab URL %r: %s" % (url, e)) from None
    if scheme not in ("http", "https"):
        raise ConfigError("unsupported remote lab URL %r: use http(s)://HOST:PORT or "
                          "ssh://[USER@]HOST[:PORT][/WORKDIR]" % url)
    return url.rstrip("/")


def _relauncher(base_url=None, **launch_options):
    """For ssh:// and local mode: a callable that reconnects (a dead tunnel is re-created) and
    returns the new URL; None for plain http(s) URLs. It never starts a server: one that was
    stopped or died does not know our session anyway."""
    url = _source_url(base_url)
    if url and not url.startswith("ssh://"):
        return None
    return lambda: resolve_base_url(base_url, start=False, **launch_options)


# ============================================================================================
# 6. pytest plugin (pytest is imported lazily, only from here)
# ============================================================================================

_PLUGIN_NAME = "remote-lab-client-plugin"
_lab_specs = []  # every remote_lab_fixture() in definition order


class _LabSpec:
    __slots__ = ("index", "topology", "extra_files", "reuse", "error")

    def __init__(self, index, topology, extra_files, reuse, error=None):
        self.index = index
        self.topology = topology
        self.extra_files = extra_files
        self.reuse = reuse
        self.error = error


def remote_lab_fixture(topology, name=None, reuse_lab=False, extra_files=()):
    """A function-scoped pytest fixture yielding the devices of ``topology``'s lab.

    Assign it in a conftest or test module (``lab = remote_lab_fixture("topo.yml")``); the
    fixture's name is ``name`` or the variable's. Relative paths are looked up next to the
    calling file, then in the working directory. The lab is released after each test; tests
    sharing a lab fixture run together. A missing file is a collection error of the tests
    that use the fixture.
    """
    import pytest

    caller = sys._getframe(1).f_globals.get("__file__")
    base = os.path.dirname(os.path.abspath(caller)) if caller else os.getcwd()

    def find(path):
        path = os.fspath(path)
        for candidate in ((path,) if os.path.isabs(path)
                          else (os.path.join(base, path), os.path.abspath(path))):
            if os.path.exists(candidate):
                return os.path.abspath(candidate)
        return None

    label = "remote_lab_fixture(%r)" % os.fspath(topology)
    error = None
    topo = find(topology)
    if topo is None or not os.path.isfile(topo):
        error = "%s: topology file not found (looked in %s)" % (label, _places(base, os.getcwd()))
        topo = os.path.abspath(os.fspath(topology))
    if isinstance(extra_files, (str, bytes, os.PathLike)):
        extra_files = [extra_files]
    extras = []
    for entry in extra_files or ():
        pair = isinstance(entry, (tuple, list))
        path = entry[1] if pair else entry
        found = find(path)
        if found is None and not os.path.isabs(os.fspath(path)):
            candidate = os.path.join(os.path.dirname(topo), os.fspath(path))
            found = candidate if os.path.exists(candidate) else None
        if found is None:
            error = error or "%s: extra file %r not found" % (label, os.fspath(path))
            continue
        extras.append((entry[0], found) if pair else found)
    if error is None:
        try:
            collect_upload(topo, extras)  # the checks acquire() makes, now
        except (ValueError, OSError) as e:
            error = "%s: %s" % (label, e)
    # an error is reported as a collection error of the tests using the fixture (raising here
    # would show a traceback for a conftest, and break runs that do not use this fixture)
    spec = _LabSpec(len(_lab_specs), topo, tuple(extras), bool(reuse_lab), error)
    _lab_specs.append(spec)

    def remote_lab(remote_lab_client):
        if spec.error:
            pytest.fail(spec.error, pytrace=False)
        devices = remote_lab_client.acquire(spec.topology, reuse=spec.reuse,
                                            extra_files=spec.extra_files)
        try:
            yield devices
        finally:
            try:
                remote_lab_client.release()
            except NoLab:
                pass  # the test destroyed the lab itself
            except SessionLost:
                if not getattr(remote_lab_client, "_lost_reported", False):
                    raise  # (else the test failed with it already)

    remote_lab._remote_lab_spec = spec
    if name:
        remote_lab.__name__ = name
        return pytest.fixture(name=name)(remote_lab)
    return pytest.fixture(remote_lab)


def _check_lab_specs(client, specs):
    """Before queueing: each lab fixture of the run checked by the server's netlab; a rejected
    one fails its tests (``spec.error``) at once. The error when every one is rejected (the
    run need not queue at all), else None."""
    rejected = []
    for spec in specs:
        if spec.error:
            continue
        try:
            client.check(spec.topology, spec.extra_files)
        except TopologyInvalid as e:
            spec.error = "remote lab: %s" % e
            rejected.append(spec.error)
    if rejected and all(spec.error for spec in specs):
        return "\n".join(rejected)
    return None


def _first_lab_fingerprint(specs):
    """The fingerprint of the lab the run asks for first (declared with the session): the
    first fixture in the test order (tests run sorted by their fixture's index) that its
    check did not reject. None when there is none, or its files cannot be read now."""
    for spec in sorted(specs, key=lambda spec: spec.index):
        if spec.error:
            continue
        try:
            return lab_fingerprint(spec.topology, spec.extra_files)
        except (OSError, ValueError) as e:  # (acquire() will say it in the test)
            _log.debug("no lab fingerprint declared: %s", e)
            return None
    return None


def _spec_of(fixturedef):
    func = getattr(fixturedef, "func", None)
    while func is not None:
        spec = getattr(func, "_remote_lab_spec", None)
        if spec is not None:
            return spec
        func = getattr(func, "__wrapped__", None)
    return None


def _lab_fixtures_of(item):
    """[(fixture name, spec)] of the remote lab fixtures ``item`` uses (directly or not)."""
    info = getattr(item, "_fixtureinfo", None)
    if info is None:
        return []
    found = {}
    for argname in getattr(item, "fixturenames", ()):
        defs = info.name2fixturedefs.get(argname) or ()
        for fixturedef in reversed(defs):  # overrides first; follow them while they use super
            spec = _spec_of(fixturedef)
            if spec is not None:
                found.setdefault(id(spec), (argname, spec))
                break
            if argname not in getattr(fixturedef, "argnames", ()):
                break
    return sorted(found.values(), key=lambda pair: pair[1].index)


class _LostInterrupt:
    """While a test runs: when the heartbeat thread finds the session gone, interrupt the main
    thread (SIGUSR1, when nobody else handles it) so the test fails at once with SessionLost."""

    SIGNAL = getattr(signal, "SIGUSR1", None)

    def __init__(self, client):
        self.client = client
        self.lock = threading.Lock()
        self.armed = self.sent = self.delivered = False
        self.old = None

    def __enter__(self):
        if self.SIGNAL is None or threading.current_thread() is not threading.main_thread() \
                or signal.getsignal(self.SIGNAL) != signal.SIG_DFL or self.client.lost:
            return self
        self.old = signal.signal(self.SIGNAL, self._handler)
        self.main = threading.main_thread().ident
        self.armed = True
        self.client._on_lost = self._notify
        return self

    def _notify(self, message):  # (heartbeat thread)
        _log.warning("%s", message)
        with self.lock:
            if self.armed:
                self.sent = True
                signal.pthread_kill(self.main, self.SIGNAL)

    def _handler(self, signum, frame):
        self.delivered = True
        if self.armed:
            self.client._lost_reported = True
            raise SessionLost(self.client.lost, 404)

    def __exit__(self, *exc):
        if self.old is None:
            return
        self.client._on_lost = None
        with self.lock:
            self.armed = False
        deadline = time.monotonic() + 2.0
        while self.sent and not self.delivered and time.monotonic() < deadline:
            time.sleep(0.01)  # a signal on its way must find our handler, not SIG_DFL
        signal.signal(self.SIGNAL, self.old)


def _make_pytest_plugin():
    """(hooks, fixtures): two plugin objects, registered by pytest_configure."""
    import types

    import pytest

    @pytest.fixture(scope="session")
    def remote_lab_client(request):
        """The session's RemoteLabClient (waits for our turn; closed at the end)."""
        error = None
        try:
            client = RemoteLabClient(config=_plugin_config(request.config)[0],
                                     progress=_pytest_progress(request.config),
                                     start_session=False)
            specs = getattr(request.config, "_remote_lab_specs", ())
            error = _check_lab_specs(client, specs)
            if error is None:
                client.fingerprint = _first_lab_fingerprint(specs)
                client.start_session()
                _note_host(request.config, client)
        except RemoteLabError as e:
            error = "remote lab: %s" % e
        if error:  # failed outside the except: once, no "During handling of the above ..."
            pytest.fail(error, pytrace=False)
        try:
            yield client
        finally:
            client.close()

    # the fixtures live in a module, as plain functions: pytest >= 9.2 deprecates session
    # fixtures that are instance methods (PytestRemovedIn10Warning)
    fixtures = types.ModuleType("remote_lab_client_fixtures")
    fixtures.remote_lab_client = remote_lab_client

    class RemoteLabPlugin:
        """Hooks, registered by pytest_configure (so importing needs no pytest)."""

        @pytest.hookimpl(hookwrapper=True)
        def pytest_runtest_call(self, item):
            client = (getattr(item, "funcargs", None) or {}).get("remote_lab_client")
            if not isinstance(client, RemoteLabClient):
                yield
                return
            with _LostInterrupt(client):
                yield

        @pytest.hookimpl(hookwrapper=True)
        def pytest_make_collect_report(self, collector):
            outcome = yield
            rep = outcome.get_result()
            if not rep.passed or not rep.result:
                return
            problems = []
            for node in rep.result:
                if not isinstance(node, pytest.Item):
                    continue
                labs = _lab_fixtures_of(node)
                for _, spec in labs:
                    if spec.error and spec.error not in problems:
                        problems.append(spec.error)
                if len(labs) > 1:
                    problems.append(
                        "%s uses %d remote lab fixtures (%s): a test can use only one lab, "
                        "the lab host runs one topology at a time"
                        % (node.nodeid, len(labs), ", ".join(n for n, _ in labs)))
                elif labs:
                    node.add_marker("remote_lab")
                    if _xdist_group_wanted(collector.config):
                        node.add_marker(pytest.mark.xdist_group(name=labs[0][0]))
            if problems:
                rep.outcome = "failed"
                rep.longrepr = "\n".join(problems)
                rep.result = []

        @pytest.hookimpl(trylast=True)
        def pytest_collection_modifyitems(self, session, config, items):
            if _xdist_group_wanted(config) and config.getoption("loadgroup", False):
                _apply_xdist_groups(items)
            keyed = []
            for pos, item in enumerate(items):
                labs = _lab_fixtures_of(item)
                keyed.append(((labs[0][1].index if labs else float("inf")), pos, item,
                              labs[0] if labs else None))
            self.groups = []
            config._remote_lab_specs = list({id(k[3][1]): k[3][1] for k in keyed
                                             if k[3]}.values())  # checked at start
            if not any(k[3] for k in keyed):
                return
            keyed.sort(key=lambda k: (k[0], k[1]))
            items[:] = [k[2] for k in keyed]
            for _, _, item, lab in keyed:
                label = ("%s (%s)" % (lab[0], os.path.basename(lab[1].topology)) if lab
                         else "without a remote lab")
                if not self.groups or self.groups[-1][0] != label:
                    self.groups.append((label, []))
                self.groups[-1][1].append(item.nodeid)

        @pytest.hookimpl(trylast=True)
        def pytest_collection_finish(self, session):
            verbose = session.config.getoption("verbose", 0) or 0
            reporter = session.config.pluginmanager.get_plugin("terminalreporter")
            if verbose <= 0 or reporter is None or not getattr(self, "groups", None):
                return
            reporter.ensure_newline()
            reporter.write_line("remote lab test order (tests sharing a lab run together):")
            for n, (label, members) in enumerate(self.groups, 1):
                reporter.write_line("  %d. %s: %d test%s" % (
                    n, label, len(members), "" if len(members) == 1 else "s"))
                if verbose > 1:
                    for nodeid in members:
                        reporter.write_line("       %s" % nodeid)

        def pytest_report_header(self, config):
            if hasattr(config, "workerinput"):
                return []  # an xdist worker: nobody sees its header (the controller's says it)
            try:
                settings, source = _plugin_config(config)
                lines = _header_lines(settings.url, source, settings.token,
                                      _xdist_workers(config))
            except RemoteLabError as e:  # (the fixture fails with it too)
                return "remote lab: %s" % e
            return ["remote lab: %s" % line for line in lines]

        @pytest.hookimpl(hookwrapper=True)
        def pytest_runtest_makereport(self, item, call):
            outcome = yield
            got = getattr(item.config, "_remote_lab_got", None)
            if got is not None and hasattr(item.config, "workerinput"):
                # an xdist worker's session got its host: the report carries it to the
                # controller (reports are sent with their attributes), which says it
                outcome.get_result().remote_lab_got = got
                item.config._remote_lab_got = None

        def pytest_runtest_logreport(self, report):
            got = getattr(report, "remote_lab_got", None)
            node = getattr(report, "node", None)  # (the controller's: the worker it came from)
            if got is None or node is None:
                return
            worker = (getattr(node, "workerinput", None) or {}).get("workerid", "?")
            _terminal_line(node.config, "remote lab: [%s] got %s" % (worker, got))

    return RemoteLabPlugin(), fixtures


def _xdist_group_wanted(config):
    """--remote-lab-xdist-group or the ini key, and pytest-xdist loaded (without it the marker
    would mean nothing: nothing is marked)."""
    wanted = config.getoption("remote_lab_xdist_group", None)
    if wanted is None:
        wanted = config.getini("remote_lab_xdist_group")
    return bool(wanted) and _xdist_loaded(config)


def _apply_xdist_groups(items):
    """In an xdist worker with --dist loadgroup: make the "@group" suffix xdist gave each
    grouped test's node id take effect. xdist (<= 3.8) writes it to ``item._nodeid``, which
    pytest >= 9.2 no longer reads (its node ids are structured, ``item._id``), so groups are
    silently ignored there (pytest-dev/pytest-xdist#1386); a no-op where the suffix works."""
    for item in items:
        grouped = item.__dict__.get("_nodeid")
        if not isinstance(grouped, str) or grouped == item.nodeid or "@" not in grouped:
            continue
        path, _, rest = grouped.partition("::")
        try:  # the names keep any "[params]@group" whole: str() gives back ``grouped``
            item._id = type(item._id)(path=path, names=tuple(rest.split("::")) if rest else ())
        except (AttributeError, TypeError, ValueError) as e:  # another pytest: leave it
            _log.debug("cannot apply xdist group %r: %s", grouped, e)
            return


def _xdist_loaded(config):
    # its options exist (its plugin's name depends on how it was loaded: entry point or -p)
    return hasattr(config.option, "dist") and hasattr(config.option, "numprocesses")


def _plugin_config(config):
    """(ClientConfig, where its URL came from): the URL from --remote-lab-url >
    REMOTE_LAB_URL > the ini key remote_lab_url > .env; source None: local mode."""
    option = (config.getoption("remote_lab_url", None) or "").strip()
    ini = (config.getini("remote_lab_url") or "").strip()
    url, source = None, None
    if option:
        url, source = option, "--remote-lab-url"
    elif ini and not os.environ.get("REMOTE_LAB_URL", "").strip():
        url, source = ini, "ini remote_lab_url"
    settings = ClientConfig.resolve(url=url)
    if source is None and settings.url:
        source = settings.source("url")  # REMOTE_LAB_URL or .env
    return settings, source


def _xdist_workers(config):
    """How many pytest-xdist workers this pytest starts: 0 in a worker, without xdist, with
    it off (-n 0) or when it runs no tests (--collect-only)."""
    if hasattr(config, "workerinput") or not _xdist_loaded(config):
        return 0
    if config.option.dist == "no" or config.getoption("collectonly", False):
        return 0
    return len(getattr(config.option, "tx", None) or ())


def _host_words(client):
    """ "lab host http://lab1:8000" (the pool entry the session got; for ssh:// and local mode,
    with the URL it talks to)."""
    host = client.host or ""
    if not host:
        return "the local lab server, %s" % client.base_url
    if host.rstrip("/") == client.base_url.rstrip("/"):
        return "lab host %s" % host
    return "lab host %s (%s)" % (host, client.base_url)


def _note_host(config, client):
    """Once the session is active: which host it got. An xdist worker's line goes to the
    controller with the next test report (its own terminal is not shown); a run on a pool
    says it itself."""
    if hasattr(config, "workerinput"):
        config._remote_lab_got = _host_words(client)
    elif len(pool_urls(client.config.url)) > 1:
        _terminal_line(config, "remote lab: got %s" % _host_words(client))


def _terminal_line(config, line):
    """``line`` on the terminal, also from a fixture (past the capture)."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    capman = config.pluginmanager.get_plugin("capturemanager")
    if reporter is None:
        return

    def write():
        if getattr(reporter, "_width_of_current_line", 0):  # after progress dots (xdist's
            reporter.write("\n")  # are not known to ensure_newline)
        reporter.write_line(line)
    if capman is None:
        write()
    else:
        with capman.global_and_fixture_disabled():
            write()


def _header_lines(url, source=None, token=None, workers=0):
    """The pytest header's lines: each server of the pool (``_header_server``), and when
    ``workers`` xdist workers are more than the labs the pool's servers run at once, that
    some will take turns (not said when a server does not answer: it may have more)."""
    entries = pool_urls(url)
    lines = []
    for entry in entries:
        lines += _header_server(entry, source, token)
    slots = [_server_slots(entry, token) for entry in entries] if workers > 1 else [None]
    if None in slots or workers <= sum(slots):
        return lines
    if slots == [1]:
        lines.append("%d xdist workers share one lab host with one slot: they will take turns; "
                     "add hosts to REMOTE_LAB_URL or --slots on the server" % workers)
    else:
        lines.append("%d xdist workers share %d lab slots on %d host%s: some will take turns; "
                     "add hosts to REMOTE_LAB_URL or --slots on the servers" % (
                         workers, sum(slots), len(entries), "" if len(entries) == 1 else "s"))
    return lines


def _server_slots(url, token=None):
    """How many labs the server at ``url`` (a pool entry) runs at once: GET /sessions' slots,
    1 from a server before --slots; None when it does not answer or is not started yet."""
    url = _header_base_url(url)
    if url is None:
        return None
    listed = _get_json(url, "/sessions", token)
    if listed is not None:
        slots = listed.get("slots")
        return slots if isinstance(slots, int) else None
    return 1 if _get_json(url, "/status", token) is not None else None


def _header_base_url(url):
    """The http(s) URL the header asks for ``url`` (a pool entry): itself, or for ssh:// and
    local mode the recorded connection's; None when there is none (nothing is started)."""
    if url and not url.startswith("ssh://"):
        return url if "://" in url else "http://" + url
    try:
        target, workdir = parse_ssh_url(url) if url else (None, None)
        conn = Launcher(target, workdir=workdir).connection()  # state files, no ssh
    except (RemoteLabError, OSError, ValueError):
        conn = None
    return conn["url"] if conn is not None else None


def _header_server(url, source=None, token=None):
    """The pytest header's lines for the server: its URL, where the URL came from (``source``)
    and, when it answers, what it is (version, pid, simulated), then who holds its lab.
    Nothing is started for this."""
    def named(u):
        return "%s (%s)" % (u, source) if source else u
    if not url or url.startswith("ssh://"):
        conn_url = _header_base_url(url)
        if conn_url is None:
            return ["%s (launched on first use)" % named(url) if url else
                    "REMOTE_LAB_URL not set (local mode: a server on this machine, started on "
                    "first use)"]
        where, url = ("%s via " % named(url) if url else "local mode, "), conn_url
    else:
        where, url = "", _header_base_url(url)
    info = _root_json(url) if not token else _get_json(url, "/", token)  # (a token: verified TLS)
    if info is not None and info.get("service") != "remote-lab":
        info = None
    what = ", ".join(_server_facts(info)) if info else \
        "refuses %s: REMOTE_LAB_TOKEN" % ("its token" if token else "requests without a token") \
        if _get_json(url, "/", token, status_only=True) == 401 else "not answering as remote-lab"
    lines = ["%s%s (%s)" % (where, url if where else named(url), what)]
    holder = _header_holder(url, token) if info else None
    return lines + [holder] if holder else lines


def _get_json(url, path, token=None, timeout=2.0, status_only=False):
    """``GET path`` at ``url`` through the client's own transport (certificate checked, the
    token sent): the JSON object of a 200, else None (``status_only``: the status, or None
    when nothing answered)."""
    transport = None
    try:
        transport = HttpTransport(url, timeout, token=token, retries=0)
        resp = transport.request("GET", path, reconnect=0)
        if status_only:
            return resp.status
        return resp.data if resp.status == 200 and isinstance(resp.data, dict) else None
    except RemoteLabError:
        return None
    finally:
        if transport is not None:
            transport.close()


def _header_holder(url, token=None, timeout=2.0):
    """The header's words on the lab: "lab held by alice@laptop for 4 min (CI: core #812), 2
    waiting, about 3 min" (a new session's estimated wait) or "lab free"; None from a server
    without GET /status."""
    status = _get_json(url, "/status", token, timeout)
    if status is None:
        return None
    if status.get("holder") is None:
        return "lab free"
    waiting = len(status.get("queue") or [])  # and how long a session joining now may wait
    return "%s%s, %s" % (holder_text(status) or "lab in use",
                         ", %d waiting" % waiting if waiting else "",
                         eta_text(_seconds_field(status, "join_eta_s")))


def _pytest_progress(config):
    def report(message):
        reporter = config.pluginmanager.get_plugin("terminalreporter")
        capman = config.pluginmanager.get_plugin("capturemanager")
        _log.info("%s", message)
        if reporter is None:
            return
        if capman is not None:
            with capman.global_and_fixture_disabled():
                reporter.write_line(message)
        else:
            reporter.write_line(message)
    return _LineProgress(report)


def pytest_addoption(parser):
    """pytest hook: ``--remote-lab-url``, ``--remote-lab-xdist-group`` and their ini keys (own
    --help group)."""
    group = parser.getgroup("remote-lab", "remote lab (remote_lab_client)")
    group.addoption("--remote-lab-url", dest="remote_lab_url", metavar="URL", default=None,
                    help="the remote-lab server: http(s)://HOST:PORT or "
                         "ssh://[USER@]HOST[:PORT][/WORKDIR]; wins over REMOTE_LAB_URL, the "
                         "remote_lab_url ini key and .env (none: local mode)")
    parser.addini("remote_lab_url", "the remote-lab server URL when neither --remote-lab-url "
                  "nor REMOTE_LAB_URL is given (wins over .env)", default="")
    group.addoption("--remote-lab-xdist-group", dest="remote_lab_xdist_group",
                    action="store_true", default=None,
                    help="pytest-xdist: mark each test using a lab fixture with an xdist_group "
                         "named after the fixture, so that --dist loadgroup runs one fixture's "
                         "tests in one worker (fewer netlab ups, less parallelism)")
    parser.addini("remote_lab_xdist_group", "like --remote-lab-xdist-group (true/false)",
                  type="bool", default=False)


def pytest_configure(config):
    """pytest hook (entry point ``pytest11`` or ``pytest_plugins = ["remote_lab_client"]``)."""
    config.addinivalue_line(
        "markers", "remote_lab: the test uses a remote netlab lab (set on lab fixture users)")
    if config.pluginmanager.get_plugin(_PLUGIN_NAME) is None:
        hooks, fixtures = _make_pytest_plugin()
        config.pluginmanager.register(hooks, _PLUGIN_NAME)
        config.pluginmanager.register(fixtures, _PLUGIN_NAME + "-fixtures")


# ============================================================================================
# 7. Command line
# ============================================================================================


class _CliError(Exception):
    pass


class _CommandError(Exception):
    """``run``'s command cannot be run: the message and the shell's exit code (127, 126)."""


class _Signalled(KeyboardInterrupt):
    """SIGTERM/SIGHUP turned into an exception, so cleanup runs."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _CliError("%s (see %s --help)" % (message, self.prog))


def _build_parser():
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", default=argparse.SUPPRESS,
                        help="server URL (default: $REMOTE_LAB_URL, also read from .env)")
    # before or after the subcommand alike (SUPPRESS: a subcommand does not reset them)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="only errors on stderr")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="debug output on stderr")
    p = _Parser(prog="remote-lab-client",
                description="Talk to a remote-lab server: check it, show its queue and lab, "
                            "hold a lab, or run a command while holding one.",
                parents=[common])
    p.add_argument("--version", action="version", version="remote-lab-client " + __version__)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    sub.add_parser("health", parents=[common], help="check that the server answers")
    s = sub.add_parser("status", parents=[common], help="queue, active session, lab, devices")
    s.add_argument("--json", action="store_true", help="machine-readable JSON")
    for name, text in (("acquire", "hold a lab until Ctrl-C; prints its devices as JSON"),
                       ("run", "hold a lab while running CMD (after --); exit with CMD's code")):
        a = sub.add_parser(name, parents=[common], help=text,
                           usage="%%(prog)s [--url URL] TOPOLOGY [--extra FILE ...] [--no-reuse]%s"
                           % (" -- CMD [ARGS ...]" if name == "run" else ""))
        a.add_argument("topology", nargs="?", help="netlab topology file (.yml)")
        a.add_argument("--extra", action="extend", nargs="+", default=[], metavar="FILE",
                       help="extra file or directory to upload (path relative to the topology's "
                            "directory is kept)")
        a.add_argument("--no-reuse", action="store_true",
                       help="do not reuse a running lab with the same files: restart it")
    where = argparse.ArgumentParser(add_help=False)
    where.add_argument("--ssh", metavar="[USER@]HOST[:PORT]",
                       help="the lab host (default: this machine, or the host of an ssh:// "
                            "--url / REMOTE_LAB_URL)")
    where.add_argument("--workdir", help="server directory on the host (default ~/.remote-lab)")
    where.add_argument("--python", help="Python on the host (default python3)")
    where.add_argument("--ssh-arg", action="append", default=None, metavar="ARG",
                       help="extra ssh option, repeatable (shell words; also REMOTE_LAB_SSH_ARGS)")
    where.add_argument("--timeout", type=float, default=DEFAULT_LAUNCH_TIMEOUT, metavar="S",
                       help="overall deadline in seconds (default %.0f)" % DEFAULT_LAUNCH_TIMEOUT)
    a = sub.add_parser("launch", parents=[common, where],
                       help="start a server (here or over SSH) or reconnect to the running one")
    a.add_argument("--tunnel", dest="tunnel", action="store_true", default=None,
                   help="reach the server through an ssh tunnel (default with --ssh)")
    a.add_argument("--no-tunnel", dest="tunnel", action="store_false",
                   help="reach the server directly (it then listens on all interfaces)")
    a.add_argument("--server-args", metavar="ARGS", default=None,
                   help="extra server flags as one string, e.g. --server-args='--simulate' "
                        "(default $REMOTE_LAB_SERVER_ARGS)")
    a.add_argument("--json", action="store_true", help="print the result as JSON")
    sub.add_parser("stop", parents=[common, where], help="stop a launched server and its tunnel")
    a = sub.add_parser("ps", parents=[common], help="launched servers and tunnels, from the state files")
    a.add_argument("--json", action="store_true", help="machine-readable JSON")
    a = sub.add_parser("logs", parents=[common, where], help="show a launched server's log")
    a.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    a.add_argument("-n", "--lines", type=int, default=50, help="lines to show (default 50)")
    return p


def _cli_config(args):
    """The command's ClientConfig (--url, else REMOTE_LAB_URL, else .env), resolved once."""
    if getattr(args, "config", None) is None:
        args.config = ClientConfig.resolve(url=getattr(args, "url", None))
    return args.config


def _launcher_from_args(args, server_args=None, **extra):
    config = _cli_config(args)
    host = args.ssh
    workdir = args.workdir
    if host is None and config.url.startswith("ssh://"):
        host, url_workdir = parse_ssh_url(config.url)
        workdir = workdir or url_workdir
    options = config.launch_options()
    for word in args.ssh_arg or ():
        options["ssh_args"] += shlex.split(word)
    if server_args is not None:
        options["server_args"] = server_args
    return Launcher(host, workdir=workdir, python=args.python, timeout=args.timeout,
                    **dict(options, **extra))


def _cmd_launch(args, command):
    server_args = None if args.server_args is None else shlex.split(args.server_args)
    launcher = _launcher_from_args(args, tunnel=args.tunnel, server_args=server_args)
    started = launcher.launch()
    if args.json:
        print(json.dumps(dataclasses_asdict(started)))
    else:
        how = ("in use, not started by the launcher" if started.external
               else "reconnected" if started.reused else "started")
        facts = _server_facts({"version": started.version, "pid": started.server_pid,
                               "simulated": started.simulated})
        print("%s (%s on %s: %s)" % (started.url, how, launcher.where, ", ".join(facts)))
    return 0


def _cmd_stop(args, command):
    launcher = _launcher_from_args(args)
    stopped = launcher.stop()
    if launcher.external_pid:
        print("left the server on %s alone (pid %s): it was not started by the launcher; stop "
              "it where it was started" % (launcher.where, launcher.external_pid))
        return 0
    print("stopped the server on %s" % launcher.where if stopped
          else "no server was running on %s" % launcher.where)
    if getattr(launcher, "cleaned", None):
        print(launcher.cleaned)  # e.g. "remote-lab: 0 session(s) forgotten, 1 lab dir(s) ..."
    return 0


def _cmd_ps(args, command):
    rows = running_servers()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("nothing launched")
        return 0
    line = "%-6s %-5s %-24s %-26s %s"
    print(line % ("SIDE", "STATE", "WHERE", "URL", "KEY"))
    for r in rows:
        print(line % (
            r["side"], "up" if r["alive"] else "down", r["where"], r.get("url") or "-", r["key"]))
    return 0


def _cmd_logs(args, command):
    _launcher_from_args(args).logs(follow=args.follow, lines=args.lines)
    return 0


def _cli_client(args, **lab):
    """The client of a command; ``lab``: topology= and extra_files= of the lab it will ask
    for (``run``, ``acquire``), declared with the session."""
    return RemoteLabClient(config=_cli_config(args), start_session=False, **lab)


def _pool_entries(args):
    """The servers of the command's URL: one, or several (a pool; see pool_urls)."""
    return pool_urls(_cli_config(args).url)


def _host_config(config, entry):
    """``config`` for one server of a pool (the same settings, that server's URL)."""
    return dataclasses_replace(config, url=entry)


def _error_text(error):
    """An error as main() words it: one line (its type too when it is not one of ours)."""
    if isinstance(error, (RemoteLabError, OSError, ValueError)):
        return _one_line(str(error))
    return "%s: %s" % (type(error).__name__, _one_line(str(error)))


def _each_host(config, entries, job):
    """``job(config of the host)`` for every server of a pool at once, so a host that does not
    answer holds up none of the others: [(entry, result, None) or (entry, None, error text)],
    in the pool's order."""
    results = [None] * len(entries)

    def run(i, entry):
        try:
            results[i] = (entry, job(_host_config(config, entry)), None)
        except Exception as e:  # (reported for its host; the others go on)
            _log.debug("%s: full error:\n%s", entry, e)
            results[i] = (entry, None, _error_text(e))

    threads = [threading.Thread(target=run, args=(i, entry), daemon=True,
                                name="remote-lab-host-%d" % i) for i, entry in enumerate(entries)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def _host_label(entry, base_url):
    """A pool's host as written, and where it answers when that differs (ssh://, a tunnel)."""
    return entry if entry.rstrip("/") == base_url else "%s (%s)" % (entry, base_url)


def _pool_verdict(results):
    """The exit code of a pool's ``health`` / ``status``: 0 if every host answered, else 1,
    with one line on stderr naming those that failed (their own lines say why)."""
    failed = [entry for entry, _, error in results if error is not None]
    if not failed:
        return 0
    print("remote-lab-client: error: %d of %d hosts failed: %s"
          % (len(failed), len(results), ", ".join(failed)), file=sys.stderr)
    return 1


def _health_of(config):
    """GET /healthz of one server, then what GET / says of it: (its URL, " (facts...)")."""
    client = RemoteLabClient(config=config, start_session=False)
    # a server that accepts but never answers: say what we wait for, not just hang
    waiting = threading.Timer(1.0, _log.info, ("waiting for %s to answer GET /healthz (giving up "
                                               "after %s)", client.base_url,
                                               _duration(client.request_timeout)))
    waiting.daemon = True
    waiting.start()
    try:
        try:
            client.health()
        finally:
            waiting.cancel()
        info = ""
        try:
            data = client.server_info()
            info = " (%s, up %s, %s session(s))" % (
                ", ".join(_server_facts(data)), _duration(float(data.get("uptime", 0))),
                data.get("queue_length", "?"))
        except (RemoteLabError, TypeError, ValueError):
            pass
        return client.base_url, info
    finally:
        client.close()


def _cmd_health(args, command):
    entries = _pool_entries(args)
    if len(entries) == 1:
        print("%s: ok%s" % _health_of(_cli_config(args)))
        return 0
    results = _each_host(_cli_config(args), entries, _health_of)
    for entry, answer, error in results:
        print("%s: error: %s" % (entry, error) if error is not None
              else "%s: ok%s" % (_host_label(entry, answer[0]), answer[1]))
    return _pool_verdict(results)


def _status_of(config):
    """What ``status`` shows of one server: {"url", "data" (GET /debug/health), "info" (GET /),
    "holder"}."""
    client = RemoteLabClient(config=config, start_session=False)
    try:
        data = client.server_status()
        try:
            info = client.server_info()  # pid, simulated (not in /debug/health)
        except RemoteLabError:
            info = {}
        holder = _status_holder(client)
    finally:
        client.close()
    return {"url": client.base_url, "data": data, "info": info, "holder": holder}


def _status_sessions(data):
    # /debug/health: "sessions" is a count (as the seed answers) and the list is "session_list";
    # servers of this project before that answered the list as "sessions"
    return data.get("session_list", data.get("sessions"))


def _status_json(status):
    """``status --json``'s object for one server."""
    data, info = status["data"], status["info"]
    sessions = _status_sessions(data)
    if isinstance(sessions, list):
        active = next((s.get("session_id") for s in sessions if s.get("position") == 0), None)
    else:
        active = data.get("active_session")
    out = {"url": status["url"], "version": data.get("version"),
           "uptime": data.get("uptime"), "queue_length": data.get("queue_length"),
           "sessions": sessions if isinstance(sessions, list) else [],
           "active_session": active, "lab": data.get("lab") or {}, "pid": info.get("pid"),
           "simulated": info.get("simulated"), "netlab": info.get("netlab"),
           "holder": status["holder"]}
    if isinstance(data.get("labs"), list):  # --slots N: every slot's lab (each with "slot")
        out.update(slots=data.get("slots"), labs=data["labs"])
    return out


def _queue_lines(data):
    """``status``'s lines on one server's queue."""
    sessions = _status_sessions(data)
    if not isinstance(sessions, list):
        return ["queue    %s session(s); active: %s" % (data.get("queue_length"),
                                                        data.get("active_session") or "none")]
    out = ["queue    %d session%s" % (len(sessions), "" if len(sessions) == 1 else "s")]
    if sessions:
        out.append("  %-4s %-8s %-36s %9s %9s  %s" % ("POS", "STATUS", "SESSION", "AGE",
                                                     "IDLE", "OWNER"))
        for s in sessions:
            out.append("  %-4s %-8s %-36s %8.1fs %8.1fs  %s" % (
                s.get("position"), s.get("status"), s.get("session_id"),
                float(s.get("age") or 0), float(s.get("idle") or 0),
                _meta_text(s.get("owner")) or "-"))
    return out


def _lab_lines(lab):
    """``status``'s lines on one server's lab and its devices."""
    state = lab.get("state") or ("running" if lab.get("running") else "stopped")
    out = ["lab      %s%s" % (state, "  %s  ref count %s" % (lab.get("topology"),
                                                             lab.get("ref_count"))
                              if lab.get("topology") else "")]
    if lab.get("last_error"):
        out.append("         last error: %s" % lab["last_error"].strip().splitlines()[-1])
    devices = [Device.from_json(d) for d in lab.get("devices") or []]
    if devices:
        out.append("devices")
        out.append("  %-16s %-12s %s" % ("NAME", "OS", "ADDRESS"))
        for d in devices:
            mgmt = d.raw.get("mgmt") if isinstance(d.raw.get("mgmt"), dict) else {}
            out.append("  %-16s %-12s %s" % (
                d.name, d.raw.get("ansible_network_os") or d.raw.get("device") or "-",
                d.raw.get("ansible_host") or mgmt.get("ipv4") or "-"))
    return out


def _status_lines(status):
    """``status``'s text for one server: server, holder, queue, lab, devices."""
    data, info = status["data"], status["info"]
    facts = _server_facts(dict(info, version=data.get("version", info.get("version", "?"))))
    out = ["server   %s (%s, up %s)" % (status["url"], ", ".join(facts),
                                        _duration(float(data.get("uptime") or 0)))]
    out += _holder_lines(status["holder"])
    out += _queue_lines(data)
    labs = data.get("labs")
    if isinstance(labs, list) and len(labs) > 1:  # --slots N: each slot's lab, and who has it
        sessions = _status_sessions(data)
        holders = {s.get("slot"): s for s in sessions or () if isinstance(s, dict)
                   and s.get("slot") is not None} if isinstance(sessions, list) else {}
        for lab in labs:
            if isinstance(lab, dict):
                lines = _lab_lines(lab)
                holder = holders.get(lab.get("slot"))
                who = "  held by %s (session %s)" % (
                    _meta_text(holder.get("owner")) or "unknown",
                    _meta_text(holder.get("session_id"))) if holder else "  free"
                out += ["slot %-3s %s%s" % (lab.get("slot"), lines[0][9:], who)] + lines[1:]
        return out
    return out + _lab_lines(data.get("lab") or {})


def _cmd_status(args, command):
    entries = _pool_entries(args)
    if len(entries) == 1:
        status = _status_of(_cli_config(args))
        print(json.dumps(_status_json(status), indent=2, sort_keys=True) if args.json
              else "\n".join(_status_lines(status)))
        return 0
    results = _each_host(_cli_config(args), entries, _status_of)
    if args.json:  # a list, one object per host in the pool's order: "host" and "error" added
        print(json.dumps([dict(_status_json(status), host=entry, error=None) if error is None
                          else {"host": entry, "error": error}
                          for entry, status, error in results], indent=2, sort_keys=True))
    else:
        blocks = []
        for n, (entry, status, error) in enumerate(results, 1):
            head = "host     %s (%d of %d in the pool)" % (entry, n, len(results))
            blocks.append(head + ": error: %s" % error if error is not None
                          else "\n".join([head] + _status_lines(status)))
        print("\n\n".join(blocks))
    return _pool_verdict(results)


def _status_holder(client):
    """Who holds the lab, from GET /status: {"session", "owner", "note", "link", "held_s"}, or
    None (nobody, or a server without /status)."""
    try:
        holder = client.queue_view().get("holder")
    except RemoteLabError:
        return None
    if not isinstance(holder, dict):
        return None
    return {key: holder.get(key) for key in ("session", "owner", "note", "link", "held_s")}


def _holder_lines(holder):
    """``status``'s lines on the holder: who, for how long, why (note) and the link."""
    if holder is None:
        return []
    text = lambda key: _meta_text(holder[key])  # noqa: E731
    held = holder["held_s"]
    lines = ["holder   %s%s (session %s)" % (
        text("owner") or "unknown", " for %s" % _held_for(held)
        if isinstance(held, (int, float)) else "", text("session"))]
    lines += ["         %s  %s" % (key, text(key)) for key in ("note", "link") if text(key)]
    return lines


def _install_handlers(handler, signals=(signal.SIGINT, signal.SIGTERM, signal.SIGHUP)):
    old = {}
    for sig in signals:
        try:
            old[sig] = signal.signal(sig, handler)
        except (ValueError, OSError):  # not the main thread / not supported
            pass
    return old


def _restore_handlers(old):
    for sig, handler in old.items():
        signal.signal(sig, handler)


def _raise_signalled(signum, frame):
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise _Signalled(signum)


def _close_quietly(client):
    """close() with signals held off, so a second Ctrl-C cannot skip the cleanup; it only stops
    the waiting for a server that does not answer (restarting, or gone)."""
    old = _install_handlers(lambda signum, frame: client.stop_waiting.set())
    try:
        client.close()
    finally:
        _restore_handlers(old)


def _devices_json(devices):
    return json.dumps([d.to_dict() for d in devices], indent=2)


def _check_before_queueing(args, command=None):
    """Fail at once, not after waiting for the lab: the files, and the command of ``run``."""
    collect_upload(args.topology, args.extra)
    if not command:
        return
    name = command[0]
    path = shutil.which(name) if os.sep not in name else name
    if path is None or not os.path.exists(path):
        raise _CommandError("cannot run %s: command not found" % name, 127)
    if os.path.isdir(path) or not os.access(path, os.X_OK):
        raise _CommandError("cannot run %s: not executable" % name, 126)


def _cmd_acquire(args, command):
    _check_before_queueing(args)
    old = _install_handlers(_raise_signalled)
    try:
        client = _cli_client(args, topology=args.topology, extra_files=args.extra)
        # (acquire() checks the topology, then joins the queue declaring its fingerprint)
        client._on_lost = _ignore  # main() reports the SessionLost below, in one line
        try:
            devices = client.acquire(args.topology, reuse=not args.no_reuse,
                                     extra_files=args.extra)
            sys.stdout.write(_devices_json(devices) + "\n")
            sys.stdout.flush()
            _log.info("lab acquired (session %s); press Ctrl-C to release it", client.session_id)
            try:
                while True:
                    time.sleep(0.5)
                    client._check()  # the heartbeat thread reports a lost session here
            except KeyboardInterrupt:
                _log.info("releasing the lab and ending session %s", client.session_id)
            return 0
        finally:
            _close_quietly(client)
    finally:
        _restore_handlers(old)


def _cmd_run(args, command):
    if not command:
        raise _CliError("run needs a command after --, e.g. run topo.yml -- pytest tests/")
    _check_before_queueing(args, command)
    old = _install_handlers(_raise_signalled)
    path = None
    lost = None
    try:
        client = _cli_client(args, topology=args.topology, extra_files=args.extra)
        # (acquire() checks the topology, then joins the queue declaring its fingerprint)
        client._on_lost = _ignore  # reported below (or by main()), in one line
        try:
            devices = client.acquire(args.topology, reuse=not args.no_reuse,
                                     extra_files=args.extra)
            fd, path = tempfile.mkstemp(prefix="remote-lab-devices-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                f.write(_devices_json(devices) + "\n")
            env = client.config.command_environment(REMOTE_LAB_DEVICES=path,
                                                    REMOTE_LAB_SESSION=client.session_id)
            try:
                proc, tty = _start_command(command, env)
            except OSError as e:
                print("remote-lab-client: cannot run %s: %s" % (command[0], e.strerror or e),
                      file=sys.stderr)
                return 127 if isinstance(e, FileNotFoundError) else 126
            rc = _wait_forwarding(proc, tty, lambda: client.lost)
            if rc is None:  # the lab is gone: the command was stopped
                lost = "lab lost: %s; stopped %s (exit %d)" % (client.lost, command[0],
                                                              EXIT_LAB_LOST)
                return EXIT_LAB_LOST
            return rc
        finally:
            _close_quietly(client)
            if path:
                try:
                    os.unlink(path)
                except OSError:
                    pass
            if lost:
                print("remote-lab-client: %s" % lost, file=sys.stderr)
    finally:
        _restore_handlers(old)


def _ignore(*args):
    pass


def _own_process_group():  # (preexec_fn before Python 3.11's process_group=0)
    os.setpgid(0, 0)


def _start_command(command, env):
    """Start CMD in a process group of its own, so a lost lab stops it with everything it
    started; on a terminal that group gets the foreground (Ctrl-C, Ctrl-Z, input).
    Returns (Popen, the terminal's fd or None)."""
    tty = sys.stdin.fileno() if _in_terminal_foreground() else None
    if sys.version_info >= (3, 11):
        proc = subprocess.Popen(command, env=env, process_group=0)
    else:
        proc = subprocess.Popen(command, env=env, preexec_fn=_own_process_group)
    if tty is not None:
        _give_terminal(tty, proc.pid)
        _signal_group(proc, signal.SIGCONT)  # in case it touched the terminal before that
    return proc, tty


def _give_terminal(fd, pgrp):
    """Make ``pgrp`` the terminal's foreground group (we may be in the background: no SIGTTOU)."""
    old = signal.signal(signal.SIGTTOU, signal.SIG_IGN)
    try:
        os.tcsetpgrp(fd, pgrp)
    except OSError:
        pass
    finally:
        signal.signal(signal.SIGTTOU, old)


def _signal_group(proc, signum):
    try:
        os.killpg(proc.pid, signum)
    except OSError:  # the group is gone
        pass


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except OSError:
        return False


def _stop_group(proc):
    """SIGTERM to ``proc``'s process group, SIGKILL to what is left of it after the grace."""
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    _signal_group(proc, signal.SIGTERM)
    _signal_group(proc, signal.SIGCONT)  # a stopped process acts on SIGTERM once it runs
    try:
        proc.wait(STOP_GRACE_SECONDS)
    except subprocess.TimeoutExpired:
        pass
    while time.monotonic() < deadline and _group_alive(proc.pid):
        time.sleep(0.05)
    _signal_group(proc, signal.SIGKILL)
    proc.wait()


def _follow_suspend(proc, tty):
    """Ctrl-Z stopped the command (it has the terminal): stop too, so the shell gets its job
    back; when continued, give the command the terminal again (if we have it) and continue it."""
    stat = _proc_stat(proc.pid)
    if not stat or stat[0] != "T":
        return
    _give_terminal(tty, os.getpgrp())
    os.kill(os.getpid(), signal.SIGSTOP)
    try:
        foreground = os.tcgetpgrp(tty) == os.getpgrp()
    except OSError:
        foreground = False
    if foreground:
        _give_terminal(tty, proc.pid)
    _signal_group(proc, signal.SIGCONT)


def _in_terminal_foreground():
    try:
        return os.tcgetpgrp(sys.stdin.fileno()) == os.getpgrp()
    except (OSError, ValueError, AttributeError):
        return False


def _wait_forwarding(proc, tty=None, lost=None):
    """Wait for ``proc`` (a process group leader), forwarding signals to its group: its exit
    code (128+N if killed by N), or None when ``lost()`` said the lab is gone: then the group
    is stopped (SIGTERM, SIGKILL after STOP_GRACE_SECONDS). ``tty``: the terminal it has."""
    def forward(signum, frame):  # (a Ctrl-C typed in the terminal reached the command only)
        _signal_group(proc, signum)

    old = _install_handlers(forward)
    try:
        while True:
            try:
                rc = proc.wait(0.2)
                break
            except subprocess.TimeoutExpired:
                pass
            if lost is not None and lost():
                _stop_group(proc)
                return None
            if tty is not None:
                _follow_suspend(proc, tty)
    finally:
        _restore_handlers(old)
        if tty is not None:
            _give_terminal(tty, os.getpgrp())
    return rc if rc >= 0 else 128 - rc


def _one_line(text):
    """A multi-line message (netlab output in a detail) as one line: first and last lines."""
    lines = [line.strip() for line in text.splitlines()
             if line.strip() and not line.strip().startswith("---")]
    if len(lines) <= 1:
        return lines[0] if lines else text.strip()
    return "%s ... %s" % (lines[0], lines[-1])


_COMMANDS = {"health": _cmd_health, "status": _cmd_status, "acquire": _cmd_acquire,
             "run": _cmd_run, "launch": _cmd_launch, "stop": _cmd_stop, "ps": _cmd_ps,
             "logs": _cmd_logs}


def main(argv=None):
    """``remote-lab-client`` / ``python3 remote_lab_client.py``: returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = None
    if "--" in argv:
        i = argv.index("--")
        argv, command = argv[:i], argv[i + 1:]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("remote-lab-client: %(message)s"))
    old_level, old_propagate = _log.level, _log.propagate
    _log.addHandler(handler)
    _log.propagate = False
    try:
        try:
            args = _build_parser().parse_args(argv)
        except SystemExit as e:  # --help / --version
            return e.code or 0
        _log.setLevel(logging.DEBUG if getattr(args, "verbose", False) else
                      logging.WARNING if getattr(args, "quiet", False) else logging.INFO)
        if command is not None and args.command != "run":
            raise _CliError("unexpected arguments after --")
        if args.command in ("acquire", "run") and args.topology is None:
            if not args.extra:  # `--extra F TOPO`: --extra took the topology too
                raise _CliError("%s needs a TOPOLOGY (see remote-lab-client %s --help)"
                                % (args.command, args.command))
            args.topology = args.extra.pop()
        return _COMMANDS[args.command](args, command)
    except _Signalled as e:
        print("remote-lab-client: stopped by signal %s" % e.args[0], file=sys.stderr)
        return 128 + int(e.args[0])
    except KeyboardInterrupt:
        print("remote-lab-client: interrupted", file=sys.stderr)
        return 130
    except _CliError as e:
        print("remote-lab-client: error: %s" % e, file=sys.stderr)
        return 2
    except _CommandError as e:
        print("remote-lab-client: %s" % e.args[0], file=sys.stderr)
        return e.args[1]
    except SessionLost as e:  # the session ended under us (run, acquire): try again later
        print("remote-lab-client: lab lost: %s" % _one_line(str(e)), file=sys.stderr)
        return EXIT_LAB_LOST
    except (RemoteLabError, OSError, ValueError) as e:
        _log.debug("full error:\n%s", e)
        print("remote-lab-client: error: %s" % _one_line(str(e)), file=sys.stderr)
        return 1
    except Exception as e:  # never a traceback
        print("remote-lab-client: error: %s: %s" % (type(e).__name__, _one_line(str(e))),
              file=sys.stderr)
        return 1
    finally:
        _log.removeHandler(handler)
        _log.setLevel(old_level)
        _log.propagate = old_propagate


if __name__ == "__main__":
    sys.exit(main())
