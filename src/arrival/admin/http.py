"""The admin HTTP server: ``/metrics``, a JSON API under ``/api/`` and the dashboard.

It runs the standard library's ``ThreadingHTTPServer`` in a thread of its own and calls
the engine directly (the engine is thread-safe): nothing of it runs on the broker's
event loop, so a slow scrape or a large dead-letter listing never delays a client.

Invariants:
1. No request can stop the broker: every failure becomes a JSON error
   (``{"error": "..."}``) with a 4xx/5xx status, and only its own connection sees it.
2. Reads (GET) change nothing. With a token, every POST must carry it as
   ``Authorization: Bearer TOKEN``; POSTs must be ``application/json``, which a web page
   of another origin cannot send without the CORS preflight this server never grants.
3. Bound to a loopback address, it answers only requests whose ``Host`` names a
   loopback address or ``localhost``: a web page cannot reach it through DNS rebinding.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import json
import logging
import re
import socket
import threading
from collections.abc import Callable
from dataclasses import asdict, fields
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from arrival import __version__
from arrival._backend import LocalBackend
from arrival._sync import Broker
from arrival.admin.metrics import CONTENT_TYPE, registry_for, render
from arrival.aio import Broker as AioBroker
from arrival.engine import DLQ_GROUP, DeadMessage, Engine
from arrival.errors import (
    ArrivalError,
    ClosedError,
    ConflictError,
    EnvironmentFailure,
    NotSupported,
    UnknownQueue,
    UsageError,
)
from arrival.model import QueueStats

__all__ = [
    "DEFAULT_HTTP",
    "AdminServer",
    "parse_address",
]

log = logging.getLogger("arrival.admin")

DEFAULT_HTTP = "127.0.0.1:7712"  # the admin port: next to the broker's 7711
DEFAULT_DLQ_LIMIT = 100  # dead letters one listing returns unless ?limit= says otherwise
MAX_DLQ_LIMIT = 10_000  # at most: a listing is held in memory and sent at once
MAX_BODY_PREVIEW = 64 << 10  # characters of a dead letter's body shown in a listing
MAX_REQUEST_BYTES = 1 << 20  # a POST body larger than this is refused (413)
MAX_RESULT_LETTERS = 1000  # letters a replay or purge answer lists (its counts are exact)
REQUEST_TIMEOUT_S = 30.0  # a client that sends nothing for this long is dropped

_STATIC_NAME = re.compile(r"[a-z0-9][a-z0-9-]*\.(?:html|css|js|svg)")
_CONTENT_TYPES = {
    "html": "text/html; charset=utf-8",
    "css": "text/css; charset=utf-8",
    "js": "text/javascript; charset=utf-8",
    "svg": "image/svg+xml",
}
_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}
_CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
_SELECTION_KEYS = {"ids", "offsets", "dry_run", "limit", "max_replays"}


class HTTPError(Exception):
    """A request that fails with ``status``; ``message`` is the JSON error shown."""

    def __init__(self, status: HTTPStatus, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


def parse_address(value: str, option: str = "--http") -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) as ``(host, port)``; UsageError if not."""
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"{option} takes HOST:PORT (e.g. {DEFAULT_HTTP}), not {value!r}")
    return host.strip("[]"), int(port)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _host_of(header: str) -> str:
    """The host part of a ``Host`` header: ``[::1]:80`` -> ``::1``, ``a:80`` -> ``a``."""
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rpartition(":")[0] if ":" in header else header


def _engine_of(target: object) -> Engine:
    """The engine of an embedded broker (blocking or asyncio), or ``target`` itself."""
    if isinstance(target, Engine):
        return target
    if isinstance(target, Broker | AioBroker):
        return target.engine  # NotSupported for a broker over the network
    raise UsageError(
        f"AdminServer serves an embedded broker (arrival.connect(path)) or its engine, "
        f"not {type(target).__name__}"
    )


# =====================================================================================
# the JSON API
# =====================================================================================


def _stats_json(st: QueueStats) -> dict[str, Any]:
    out = asdict(st)
    out["guarantee"] = str(st.guarantee)
    return out


def _letter_json(d: DeadMessage) -> dict[str, Any]:
    """Every field of ``d`` (its provenance), the body as text for display."""
    out = {f.name: getattr(d, f.name) for f in fields(d) if f.name != "body"}
    text = d.body.decode("utf-8", errors="replace")
    out["body"] = text[:MAX_BODY_PREVIEW]
    out["body_bytes"] = len(d.body)
    out["body_truncated"] = len(text) > MAX_BODY_PREVIEW
    return out


def _letters_json(letters: list[DeadMessage]) -> dict[str, Any]:
    """The first ``MAX_RESULT_LETTERS`` of a replay's or purge's letters."""
    return {
        "letters": [_letter_json(d) for d in letters[:MAX_RESULT_LETTERS]],
        "letters_truncated": len(letters) > MAX_RESULT_LETTERS,
    }


def _int_or_none(value: Any, what: str, minimum: int) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise HTTPError(
            HTTPStatus.BAD_REQUEST, f"{what} must be an integer of at least {minimum} or null"
        )
    return value


class _Selection:
    """Which dead letters a replay or purge takes, from its JSON body."""

    def __init__(self, body: Any) -> None:
        if not isinstance(body, dict):
            raise HTTPError(
                HTTPStatus.BAD_REQUEST,
                'the body must be a JSON object such as {"ids": null, "dry_run": true}',
            )
        unknown = sorted(set(body) - _SELECTION_KEYS)
        if unknown:
            raise HTTPError(
                HTTPStatus.BAD_REQUEST,
                f"unknown field(s) {', '.join(unknown)}: the body takes "
                f"{', '.join(sorted(_SELECTION_KEYS))}",
            )
        ids = body.get("ids")
        offsets = body.get("offsets")
        if ids is not None and (
            not isinstance(ids, list) or not all(isinstance(i, str) for i in ids)
        ):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "ids must be a list of message ids or null")
        if offsets is not None and (
            not isinstance(offsets, list)
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise HTTPError(
                HTTPStatus.BAD_REQUEST, "offsets must be a list of dead-letter offsets or null"
            )
        if ids is not None and offsets is not None:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "give ids or offsets, not both")
        dry_run = body.get("dry_run", False)
        if not isinstance(dry_run, bool):
            raise HTTPError(HTTPStatus.BAD_REQUEST, "dry_run must be true or false")
        self.dry_run = dry_run
        self.limit = _int_or_none(body.get("limit"), "limit", 1)
        self.max_replays = _int_or_none(body.get("max_replays"), "max_replays", 0)
        self.where: Callable[[DeadMessage], bool] | None = None
        if ids is not None:
            wanted_ids = set(ids)
            self.where = lambda d: d.id in wanted_ids
        elif offsets is not None:
            wanted = set(offsets)
            self.where = lambda d: d.offset in wanted


class _Api:
    """The operations behind the routes, on one engine."""

    def __init__(self, engine: Engine, connections: Callable[[], int] | None) -> None:
        self.engine = engine
        self.backend = LocalBackend(engine, "admin")  # never closed: the engine isn't ours
        self.connections = connections

    def overview(self) -> dict[str, Any]:
        e = self.engine
        info = asdict(e.info())
        info["connections"] = self.connections() if self.connections is not None else None
        info["version"] = __version__
        info["now"] = e.clock.now()
        queues = []
        specs = {name: e.spec(name) for name in e.queue_names()}
        owners: dict[str, list[str]] = {}
        for name, spec in specs.items():
            if spec.dead_letter is not None:
                owners.setdefault(spec.dead_letter, []).append(name)
        for name, spec in specs.items():
            q = _stats_json(e.stats(name))
            q["dead_letter"] = spec.dead_letter
            q["dead_letter_of"] = owners.get(name, [])
            q["dead_letters"] = self._dead_count(spec.dead_letter)
            queues.append(q)
        return {"broker": info, "queues": queues}

    def _dead_count(self, dlq: str | None) -> int | None:
        if dlq is None:
            return None
        try:
            groups = self.engine.stats(dlq).groups
        except UnknownQueue:
            return None
        return next((g.backlog for g in groups if g.group == DLQ_GROUP), None)

    def queue(self, name: str) -> dict[str, Any]:
        d = self.engine.describe(name)
        spec = asdict(d.spec)
        spec["guarantee"] = str(d.spec.guarantee)
        spec["drop"] = str(d.spec.drop)
        return {
            "name": d.name,
            "guarantee": str(d.guarantee),
            "promise": d.promise,
            "mechanism": list(d.mechanism),
            "limits": d.limits,
            "spec": spec,
            "stats": _stats_json(self.engine.stats(name)),
            "dead_letters": self._dead_count(d.spec.dead_letter),
        }

    def dead_letters(self, name: str, query: dict[str, list[str]]) -> dict[str, Any]:
        raw = query.get("limit", [str(DEFAULT_DLQ_LIMIT)])[-1]
        if not raw.isdigit() or not 1 <= int(raw) <= MAX_DLQ_LIMIT:
            raise HTTPError(
                HTTPStatus.BAD_REQUEST,
                f"limit must be a whole number from 1 to {MAX_DLQ_LIMIT}, not {raw!r}",
            )
        spec = self.engine.spec(name)
        letters = self.backend.dead_letters(name, int(raw)).wait()
        return {
            "queue": name,
            "dead_letter_queue": spec.dead_letter,
            "total": self._dead_count(spec.dead_letter),
            "letters": [_letter_json(d) for d in letters],
        }

    def replay(self, name: str, body: Any) -> dict[str, Any]:
        sel = _Selection(body)
        self.engine.spec(name)  # UnknownQueue before anything else
        chosen, held = self.backend.replay_dead_letters(
            name, sel.where, sel.limit, sel.dry_run, sel.max_replays
        ).wait()
        return {
            "queue": name,
            "dry_run": sel.dry_run,
            "replayed": len(chosen),
            **_letters_json(chosen),
            "held": [_letter_json(d) for d in held[:MAX_RESULT_LETTERS]],  # by the loop guard
        }

    def purge(self, name: str, body: Any) -> dict[str, Any]:
        sel = _Selection(body)
        if sel.max_replays is not None:
            raise HTTPError(HTTPStatus.BAD_REQUEST, "max_replays applies to a replay, not a purge")
        if "ids" not in body and "offsets" not in body:  # deleting everything must be asked for
            raise HTTPError(
                HTTPStatus.BAD_REQUEST,
                'say which letters to purge: "ids" or "offsets" ({"ids": null} purges them all)',
            )
        self.engine.spec(name)
        chosen = self.backend.dead_letters(name, None).wait()
        if sel.where is not None:
            chosen = [d for d in chosen if sel.where(d)]
        if sel.limit is not None:
            chosen = chosen[: sel.limit]
        purged = 0
        if not sel.dry_run and chosen:
            offsets = {d.offset for d in chosen}
            purged = self.backend.purge_dead_letters(name, lambda d: d.offset in offsets).wait()
        return {
            "queue": name,
            "dry_run": sel.dry_run,
            "purged": len(chosen) if sel.dry_run else purged,
            **_letters_json(chosen),
        }


def _status_for(exc: ArrivalError) -> HTTPStatus:
    if isinstance(exc, UnknownQueue | NotSupported):
        return HTTPStatus.NOT_FOUND  # the queue, or its dead-letter queue, does not exist
    if isinstance(exc, ClosedError | EnvironmentFailure):
        return HTTPStatus.SERVICE_UNAVAILABLE
    if isinstance(exc, ConflictError):
        return HTTPStatus.CONFLICT
    if isinstance(exc, UsageError):
        return HTTPStatus.BAD_REQUEST
    return HTTPStatus.INTERNAL_SERVER_ERROR


# =====================================================================================
# HTTP
# =====================================================================================


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True  # a stuck client never keeps the process alive
    allow_reuse_address = True
    admin: AdminServer


class _HTTPServer6(_HTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    server_version = f"arrival/{__version__}"
    timeout = REQUEST_TIMEOUT_S

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        log.debug("%s %s", self.address_string(), format % args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """A request the base class could not parse: a JSON error too, then close."""
        self.close_connection = True
        status = HTTPStatus(code)
        with contextlib.suppress(OSError):
            self._json(status, {"error": f"bad request: {message or status.phrase}"})

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:
        self._dispatch("PATCH")

    def do_OPTIONS(self) -> None:
        self._dispatch("OPTIONS")

    # -- dispatch -----------------------------------------------------------------------

    def _dispatch(self, method: str) -> None:
        self._body_read = False
        try:
            self._check_host()
            self._route(method)
        except HTTPError as exc:
            self._drain()
            self._json(exc.status, {"error": exc.message}, exc.headers, head=method == "HEAD")
        except ArrivalError as exc:
            self._drain()
            self._json(_status_for(exc), {"error": str(exc)}, head=method == "HEAD")
        except OSError:  # the client went away mid-request: nothing to answer
            log.debug("client %s went away", self.address_string())
        except Exception:
            log.exception("admin request %s %s failed", method, self.path)
            self._json(
                HTTPStatus.INTERNAL_SERVER_ERROR,
                {"error": "internal error: the broker logged the details; please report it"},
                head=method == "HEAD",
            )

    def _check_host(self) -> None:
        admin = self.server.admin
        if not admin.loopback_only:
            return
        header = self.headers.get("Host")
        if header is not None and not _is_loopback(_host_of(header.strip().lower())):
            raise HTTPError(
                HTTPStatus.FORBIDDEN,
                f"this admin server answers only requests to a loopback address or localhost, "
                f"not to {header!r}: open it as http://127.0.0.1:{admin.address[1]}/",
            )

    def _route(self, method: str) -> None:
        admin = self.server.admin
        url = urlsplit(self.path)
        parts = [unquote(p) for p in url.path.split("/")[1:]]
        if parts and parts[-1] == "" and len(parts) > 1:
            parts.pop()  # a trailing slash
        get = ("GET", "HEAD")
        head = method == "HEAD"
        if parts == [""]:
            self._allow(method, get)
            self._static("index.html", head)
        elif len(parts) == 2 and parts[0] == "static":
            self._allow(method, get)
            self._static(parts[1], head)
        elif parts == ["metrics"]:
            self._allow(method, get)
            self._send(HTTPStatus.OK, render(admin.registry), CONTENT_TYPE, head=head)
        elif parts[:1] == ["api"]:
            self._api(method, parts[1:], parse_qs(url.query), head)
        else:
            raise HTTPError(HTTPStatus.NOT_FOUND, f"no such page: {url.path}")

    def _api(self, method: str, parts: list[str], query: dict[str, list[str]], head: bool) -> None:
        api = self.server.admin.api
        get = ("GET", "HEAD")
        if parts == ["overview"]:
            self._allow(method, get)
            self._json(HTTPStatus.OK, api.overview(), head=head)
        elif len(parts) == 2 and parts[0] == "queues":
            self._allow(method, get)
            self._json(HTTPStatus.OK, api.queue(parts[1]), head=head)
        elif len(parts) == 3 and parts[0] == "queues" and parts[2] == "dlq":
            self._allow(method, get)
            self._json(HTTPStatus.OK, api.dead_letters(parts[1], query), head=head)
        elif len(parts) == 4 and parts[0] == "queues" and parts[2] == "dlq":
            action = {"replay": api.replay, "purge": api.purge}.get(parts[3])
            if action is None:
                raise HTTPError(HTTPStatus.NOT_FOUND, f"no such API: /api/{'/'.join(parts)}")
            self._allow(method, ("POST",))
            self._authorize()
            self._json(HTTPStatus.OK, action(parts[1], self._body()))
        else:
            raise HTTPError(HTTPStatus.NOT_FOUND, f"no such API: /api/{'/'.join(parts)}")

    @staticmethod
    def _allow(method: str, allowed: tuple[str, ...]) -> None:
        if method not in allowed:
            raise HTTPError(
                HTTPStatus.METHOD_NOT_ALLOWED,
                f"{method} is not allowed here; use {' or '.join(allowed)}",
                {"Allow": ", ".join(allowed)},
            )

    def _authorize(self) -> None:
        token = self.server.admin.token
        if token is None:
            return
        given = self.headers.get("Authorization", "")
        scheme, _, value = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            value.strip().encode(), token.encode()
        ):
            raise HTTPError(
                HTTPStatus.UNAUTHORIZED,
                "this server requires its token for changes: send the header "
                "'Authorization: Bearer TOKEN' (the token given to arrival serve --token)",
                {"WWW-Authenticate": 'Bearer realm="arrival"'},
            )

    def _body(self) -> Any:
        ctype = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if ctype != "application/json":
            raise HTTPError(
                HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                "send the body as JSON, with the header 'Content-Type: application/json'",
            )
        length = self.headers.get("Content-Length")
        if length is None or not length.strip().isdigit():
            raise HTTPError(HTTPStatus.LENGTH_REQUIRED, "send a Content-Length header")
        n = int(length)
        if n > MAX_REQUEST_BYTES:
            raise HTTPError(
                HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                f"the body is {n} bytes; at most {MAX_REQUEST_BYTES} are accepted",
            )
        raw = self.rfile.read(n)
        self._body_read = True
        try:
            return json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise HTTPError(HTTPStatus.BAD_REQUEST, f"the body is not valid JSON: {exc}") from None

    def _drain(self) -> None:
        """Read the body of a request refused before its body was read: closing a socket
        with unread data resets it, and the client could lose the answer."""
        length = self.headers.get("Content-Length", "").strip()
        if not self._body_read and length.isdigit() and int(length) <= MAX_REQUEST_BYTES:
            self._body_read = True
            self.rfile.read(int(length))

    # -- responses ----------------------------------------------------------------------

    def _static(self, name: str, head: bool) -> None:
        if not _STATIC_NAME.fullmatch(name):
            raise HTTPError(HTTPStatus.NOT_FOUND, f"no such file: {name}")
        path = resources.files("arrival.admin").joinpath("static", name)
        if not path.is_file():
            raise HTTPError(HTTPStatus.NOT_FOUND, f"no such file: {name}")
        ctype = _CONTENT_TYPES[name.rsplit(".", 1)[1]]
        self._send(
            HTTPStatus.OK,
            path.read_bytes(),
            ctype,
            {"Content-Security-Policy": _CSP, "Cache-Control": "no-cache"},
            head=head,
        )

    def _json(
        self,
        status: HTTPStatus,
        data: Any,
        headers: dict[str, str] | None = None,
        *,
        head: bool = False,
    ) -> None:
        body = json.dumps(data, allow_nan=False, default=str).encode()
        extra = {"Cache-Control": "no-store", **(headers or {})}
        self._send(status, body, "application/json", extra, head=head)

    def _send(
        self,
        status: HTTPStatus,
        body: bytes,
        ctype: str,
        headers: dict[str, str] | None = None,
        *,
        head: bool = False,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in {**_SECURITY_HEADERS, **(headers or {})}.items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(body)


class AdminServer:
    """The admin HTTP server (metrics, JSON API, dashboard) of one embedded broker.

    ```python
    broker = arrival.connect("./data")
    with arrival.admin.AdminServer(broker, "127.0.0.1:7712") as admin:
        print(f"dashboard: {admin.url}")  # http://127.0.0.1:7712/
        ...
    ```
    ``start()`` binds and serves from a thread of its own; ``close()`` stops it (the
    broker stays open). Port 0 picks a free port: read it from ``address`` after start.
    With a ``token``, changes (POST) require ``Authorization: Bearer TOKEN``. Reads need
    no token: keep the server on a loopback address (docs/operations.md).
    """

    def __init__(
        self,
        broker: Broker | AioBroker | Engine,
        listen: str = DEFAULT_HTTP,
        *,
        token: str | None = None,
        connections: Callable[[], int] | None = None,
    ) -> None:
        self.engine = _engine_of(broker)
        self.host, self.port = parse_address(listen, "listen")
        self.token = token or None
        self.api = _Api(self.engine, connections)
        self.registry = registry_for(self.engine, connections)
        self.loopback_only = _is_loopback(self.host)
        self.address: tuple[str, int] = (self.host, self.port)
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        state = "serving" if self._thread is not None else "not started"
        return f"<AdminServer {state} on {self.url} for {self.engine!r}>"

    @property
    def url(self) -> str:
        host, port = self.address
        return f"http://[{host}]:{port}/" if ":" in host else f"http://{host}:{port}/"

    def start(self) -> tuple[str, int]:
        """Bind and serve in a daemon thread; returns the address (the real port)."""
        if self._httpd is not None:
            raise UsageError("this AdminServer is started already")
        kind = _HTTPServer6 if ":" in self.host else _HTTPServer
        try:
            httpd = kind((self.host, self.port), _Handler)
        except OSError as exc:
            raise OSError(
                exc.errno,
                f"the admin http server can't listen on {self.host}:{self.port} "
                f"({exc.strerror or exc}): choose another address",
            ) from None
        httpd.admin = self
        self._httpd = httpd
        self.address = (self.host, int(httpd.server_address[1]))
        self._thread = threading.Thread(
            target=httpd.serve_forever,
            kwargs={"poll_interval": 0.1},
            name="arrival-admin-http",
            daemon=True,
        )
        self._thread.start()
        log.info("admin http on %s", self.url)
        return self.address

    def close(self) -> None:
        """Stop serving and release the port; requests running finish on their own."""
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def __enter__(self) -> AdminServer:
        if self._httpd is None:
            self.start()
        return self

    def __exit__(
        self, t: type[BaseException] | None, v: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
