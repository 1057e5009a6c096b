"""The web server of `cellar view`: a Starlette app over a `viewer.session.Session`, run by uvicorn.

Routes (JSON unless stated):

- `GET /`: the page (`viewer/static/index.html` and its bundled script; nothing is loaded from elsewhere);
- `GET /api/info`: image size and channels, tile pyramids, columns with units, colormaps, limits;
- `POST /api/state` `{"where", "by", "cmap", "range", "others"}`: a view state: its token, the match count
  and the legend;
- `GET /api/histogram?token&column[&bins&lo&hi]`: a column's histogram, over all objects and the matching ones;
- `GET /api/rows?token[&offset&limit&sort&desc]`: a page of the matching objects;
- `GET /api/object?token&(x&y[&z] | id)`: the object at an image pixel, or by label id: its row with units;
- `GET /tiles/image/{level}/{x}/{y}.png[?c=index:rrggbb:low:high,...&z]`: an image tile (PNG);
- `GET /tiles/overlay/{token}/{style}/{level}/{x}/{y}.png[?z]`: an overlay tile (PNG with alpha).

Security: the server listens on 127.0.0.1 unless told otherwise, and then answers only requests addressed to
a loopback name (no DNS rebinding); it sends no CORS headers, takes state changes only as JSON (which a page
of another origin cannot send without the permission it is not given), serves a Content-Security-Policy that
keeps the page to its own origin, and runs the filter box's SQL in `viewer.sql.Sandbox` (read-only, no
files, no extensions, a time and a row limit). Errors are 4xx with `{"error": "..."}`: 400 for a condition or
parameter that is wrong, 403 for what the sandbox refuses, 404 for tiles, levels and states that do not exist.
"""

from __future__ import annotations

import ipaddress
import math
import os
import socket
import sys
import threading
import webbrowser
from contextlib import contextmanager
from pathlib import Path

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from ..schemas.errors import CellarError, UsageError
from .session import Session, UnknownState
from .sql import Refused
from .tiles import TileNotFound

STATIC = Path(__file__).parent / "static"
LOOPBACK_NAMES = ["127.0.0.1", "localhost", "::1", "[::1]"]
HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; "
                               "script-src 'self'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
                               "form-action 'none'",
}
TILE_HEADERS = {**HEADERS, "Cache-Control": "private, max-age=3600"}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=HEADERS)


_REQUIRED = object()


def _param(request: Request, name: str, kind=float, default=_REQUIRED):
    """A query parameter as `kind` (a UsageError, so HTTP 400, if it is missing or does not convert)."""
    text = request.query_params.get(name)
    if text is None or text == "":
        if default is _REQUIRED:
            raise UsageError(f"missing parameter {name!r}")
        return default
    try:
        value = kind(text)
    except ValueError:
        raise UsageError(f"parameter {name}={text!r}: expected a{'n integer' if kind is int else ' number'}") from None
    if kind is float and not math.isfinite(value):
        raise UsageError(f"parameter {name}={text!r}: expected a finite number")
    return value


def create_app(session: Session, allowed_hosts: list[str] | None = None) -> Starlette:
    """The app; `allowed_hosts` are the Host names it answers to (default: loopback names only; ["*"]: any)."""

    def state_of(request: Request):
        token = request.query_params.get("token")
        if not token:
            raise UsageError("missing parameter 'token'")
        return session.get_state(token)

    def index(request: Request):
        return FileResponse(STATIC / "index.html", headers={**HEADERS, "Cache-Control": "no-cache"})

    def info(request: Request):
        return JSONResponse(session.info(), headers=HEADERS)

    async def state(request: Request):
        if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
            return _error(415, "expected a JSON body (Content-Type: application/json)")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body is not valid JSON")
        if not isinstance(body, dict):
            return _error(400, "expected a JSON object")
        where, by = body.get("where"), body.get("by")
        if not (where is None or isinstance(where, str)) or not (by is None or isinstance(by, str)):
            return _error(400, "'where' and 'by' must be strings")
        vrange = body.get("range")
        if vrange is not None and not (isinstance(vrange, list) and len(vrange) == 2
                                       and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vrange)):
            return _error(400, "'range' must be [low, high] numbers or null")
        made = await run_in_threadpool(session.state, where, by, str(body.get("cmap") or "viridis"),
                                       tuple(vrange) if vrange else None, str(body.get("others") or "hide"))
        return JSONResponse(session.describe(made), headers=HEADERS)

    def histogram(request: Request):
        column = request.query_params.get("column")
        if not column:
            raise UsageError("missing parameter 'column'")
        result = session.histogram(column, state_of(request), bins=_param(request, "bins", int, 64),
                                   lo=_param(request, "lo", float, None), hi=_param(request, "hi", float, None))
        return JSONResponse(result, headers=HEADERS)

    def rows(request: Request):
        result = session.page(state_of(request), offset=_param(request, "offset", int, 0),
                              limit=_param(request, "limit", int, 50), sort=request.query_params.get("sort") or None,
                              descending=request.query_params.get("desc") in ("1", "true"))
        return JSONResponse(result, headers=HEADERS)

    def object_(request: Request):
        token = request.query_params.get("token")
        current = session.get_state(token) if token else None
        if request.query_params.get("id"):
            label_id = _param(request, "id", int)
            if not 0 <= label_id < 2**64:
                raise UsageError(f"id {label_id}: label ids are 0 to 2^64-1")
        else:
            label_id = session.label_at(_param(request, "x"), _param(request, "y"), _param(request, "z", float, 0.0))
        found = session.object(label_id, current) if label_id else None
        if found is None:
            return JSONResponse({"label_id": str(label_id) if label_id else None, "found": False}, headers=HEADERS)
        return JSONResponse({**found, "found": True}, headers=HEADERS)

    def image_tile(request: Request):
        p = request.path_params
        channels = session.parse_channels(request.query_params.get("c"))
        data = session.image_tile(p["level"], p["x"], p["y"], channels, _param(request, "z", float, 0.0))
        return Response(data, media_type="image/png", headers=TILE_HEADERS)

    def overlay_tile(request: Request):
        p = request.path_params
        data = session.overlay_tile(p["token"], p["style"], p["level"], p["x"], p["y"], _param(request, "z", float, 0.0))
        return Response(data, media_type="image/png", headers=TILE_HEADERS)

    async def refused(request: Request, exc: Exception):
        return _error(403, str(exc))

    async def bad(request: Request, exc: Exception):
        return _error(400, str(exc))

    async def missing(request: Request, exc: Exception):
        return _error(404, str(exc))

    async def http(request: Request, exc: HTTPException):
        return _error(exc.status_code, f"{exc.detail}: {request.url.path}")

    async def bug(request: Request, exc: Exception):
        # A bug, not the request's fault: the client still gets JSON, and Starlette raises the exception on
        # afterwards, so its traceback is printed.
        return _error(500, f"internal error ({type(exc).__name__}: {exc}); please report it")

    routes = [
        Route("/", index),
        Route("/api/info", info),
        Route("/api/state", state, methods=["POST"]),
        Route("/api/histogram", histogram),
        Route("/api/rows", rows),
        Route("/api/object", object_),
        Route("/tiles/image/{level:int}/{x:int}/{y:int}.png", image_tile),
        Route("/tiles/overlay/{token:str}/{style:str}/{level:int}/{x:int}/{y:int}.png", overlay_tile),
        Mount("/static", StaticFiles(directory=STATIC), name="static"),
    ]
    hosts = allowed_hosts or LOOPBACK_NAMES
    return Starlette(
        routes=routes,
        middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=hosts)],
        exception_handlers={Refused: refused, TileNotFound: missing, UnknownState: missing, CellarError: bad,
                            HTTPException: http, Exception: bug},
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on (host, port); port 0 takes a free one. A busy port or unknown host is a UsageError."""
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise UsageError(f"--host {host}: cannot resolve it ({exc.strerror})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket, host: str) -> str:
    port = sock.getsockname()[1]
    shown = host.strip("[]")
    if shown in ("0.0.0.0", "::", ""):
        shown = "127.0.0.1"
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}/"


def _server(session: Session, host: str):
    import uvicorn

    hosts = LOOPBACK_NAMES if _is_loopback(host.strip("[]")) else ["*"]
    app = create_app(session, hosts)
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
    return uvicorn.Server(config)


def serve(image: str | None, store: str, *, labels: str | None = None, image_name: str | None = None,
          host: str = "127.0.0.1", port: int = 0, open_browser: bool = True, timeout_s: float = 5.0,
          max_rows: int = 500) -> None:
    """Open the session, listen, print the URL and serve until interrupted (Ctrl-C)."""
    sock = listen(host, port)
    try:
        session = Session(image, store, labels=labels, image_name=image_name, timeout_s=timeout_s, max_rows=max_rows)
        server = _server(session, host)
        url = url_of(sock, host)
        everywhere = " (listening on every interface)" if host.strip("[]") in ("0.0.0.0", "::") else ""
        print(f"cellar view: {session.entry['image']}/labels/{session.entry['label_image']}, "
              f"{session.table.num_rows:,} objects, at {url}{everywhere} (Ctrl-C to stop)", flush=True)
        if open_browser and (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")
                             or sys.platform in ("darwin", "win32")):
            threading.Timer(0.5, webbrowser.open, [url]).start()
        try:
            server.run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn shuts down cleanly on Ctrl-C, then passes the interrupt on
            print("cellar view: stopped", flush=True)
    finally:
        sock.close()


@contextmanager
def running(session: Session, host: str = "127.0.0.1", port: int = 0):
    """Serve `session` from a background thread; yields the URL (for tests and benchmarks)."""
    sock = listen(host, port)
    server = _server(session, host)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the viewer's server did not start")
            threading.Event().wait(0.01)
        yield url_of(sock, host)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
