"""The OpenAI-compatible HTTP API (FastAPI) over one `Server`, and `run` for `lynx-exit serve`.

Routes: POST /v1/chat/completions, POST /v1/completions, GET /v1/models, GET /health,
GET /metrics, and the playground page at GET / (`--no-ui` turns it off; with an API key, open it as
`/?key=KEY`). Handlers only validate, enqueue and read their request's events; the engine runs
on the worker thread, so concurrent requests share its batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from lynx_exit.exits import method_names
from lynx_exit.serve.generation import Generation
from lynx_exit.serve.planning import RequestPlan
from lynx_exit.serve.protocol import APIError, ChatCompletionRequest, CompletionRequest, parse_body
from lynx_exit.serve.responses import full_response, now, stream
from lynx_exit.serve.server import Server

logger = logging.getLogger(__name__)


def create_app(server: Server) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        server.worker.start(post=lambda fn, arg: _post(loop, fn, arg))
        yield
        server.accepting = False
        await asyncio.to_thread(server.worker.stop)
        server.prompt_pool.shutdown(wait=False, cancel_futures=True)

    # With an API key, nothing is open without it: the documentation routes are off.
    docs: dict[str, Any] = (
        {"docs_url": None, "redoc_url": None, "openapi_url": None} if server.options.api_key else {}
    )
    app = FastAPI(title="lynx-exit", lifespan=lifespan, **docs)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = APIError(
            exc.status_code, str(exc.detail), code="not_found" if exc.status_code == 404 else None
        )
        return JSONResponse(error.body(), status_code=exc.status_code)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _api(server, request, "chat", lambda: _completions(server, request, chat=True))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _api(server, request, "completions", lambda: _completions(server, request, chat=False))

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        return await _api(server, request, "models", lambda: _models(server))

    if server.options.ui:
        page = (Path(__file__).parent / "static" / "playground.html").read_text(encoding="utf-8")

        @app.get("/", response_class=HTMLResponse)
        async def playground(request: Request) -> Response:
            return await _api(server, request, "playground", lambda: _page(page))

    @app.get("/health")
    async def health() -> JSONResponse:
        worker = server.worker
        status = (
            ("ok" if worker.ready.is_set() else "warming_up")
            if worker.alive and server.accepting
            else ("shutting_down" if worker.alive else "down")
        )
        body = {
            "status": status,
            "running": server.worker.engine.num_running,
            "waiting": server.worker.engine.num_waiting,
            "in_flight": server.in_flight,
        }
        return JSONResponse(body, status_code=200 if status == "ok" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def _post(loop: asyncio.AbstractEventLoop, fn: Callable[[Any], None], arg: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop has closed: nobody is left to hear it
        loop.call_soon_threadsafe(fn, arg)


async def _api(
    server: Server, request: Request, endpoint: str, handler: Callable[[], Awaitable[Response]]
) -> Response:
    """Auth, OpenAI-style errors and the request counter around one API route."""
    try:
        _check_key(server, request)
        response = await handler()
    except APIError as exc:
        response = JSONResponse(exc.body(), status_code=exc.status)
    except ClientDisconnect:  # the client left while sending its body: nobody to answer
        logger.debug("client disconnected during its upload to %s", request.url.path)
        response = Response(status_code=499)
    except Exception as exc:  # a fault of ours: an OpenAI-shaped 500, one log line, counted like any answer
        logger.error(
            "unhandled %s in %s: %s",
            type(exc).__name__,
            request.url.path,
            exc,
            exc_info=logger.isEnabledFor(logging.DEBUG),
        )
        error = APIError(
            500,
            f"internal error ({type(exc).__name__}); the request was not completed",
            kind="server_error",
            code="internal_error",
        )
        response = JSONResponse(error.body(), status_code=500)
    server.metrics.requests.labels(endpoint, str(response.status_code)).inc()
    return response


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with a 413 as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> APIError:
    return APIError(
        413,
        f"the request body is {size} bytes or more; this server accepts at most {limit} bytes "
        "(lynx-exit serve --max-body-mb)",
        code="request_too_large",
    )


def _check_key(server: Server, request: Request) -> None:
    key = server.options.api_key
    if key is None:
        return
    given = request.headers.get("authorization", "")
    if (
        request.url.path == "/" and "key" in request.query_params
    ):  # the page: a browser cannot send the header
        given = f"Bearer {request.query_params['key']}"
    if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
        raise APIError(
            401,
            "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
            kind="authentication_error",
            code="invalid_api_key",
        )


async def _page(page: str) -> Response:
    return HTMLResponse(page, headers={"Cache-Control": "no-cache"})


async def _models(server: Server) -> Response:
    bundle_info: dict[str, Any] = {}
    if server.options.probe is not None:
        bundle, _ = server.methods.loaded_probe()
        bundle_info = {
            "name": server.options.probe_label or Path(server.options.probe).name,
            "calibrated_deltas": {
                mode: sorted({t.delta for t in getattr(bundle, f"{mode}_thresholds")})
                for mode in ("event", "trajectory", "harm", "give_up")
            },
            "decision_points": list(bundle.kinds),
        }
    card = {
        "id": server.options.model_name,
        "object": "model",
        "created": server.started,
        "owned_by": "lynx-exit",
        "max_model_len": server.context_length,
        "exit": {
            "default_method": server.options.exit_method,
            "defaults": dict(server.options.exit_defaults),
            "methods": method_names(),
            "probe": bundle_info or None,
        },
    }
    return JSONResponse({"object": "list", "data": [card]})


async def _completions(server: Server, request: Request, chat: bool) -> Response:
    raw = await _read_body(request, server.options.max_body_bytes)

    def parse_and_plan() -> tuple[Any, RequestPlan]:
        body = parse_body(ChatCompletionRequest if chat else CompletionRequest, raw)
        return body, server.plan(body)

    # Parsing, templating and tokenizing take time in proportion to the body: off the event loop, so
    # /health and every stream keep flowing while a large prompt is read.
    body, plan = await asyncio.get_running_loop().run_in_executor(server.prompt_pool, parse_and_plan)
    points = bool(body.stream and body.stream_options and body.stream_options.lynx_decision_points)
    generation = server.start(plan, body.seed, split=chat, points=points)
    meta = {
        "id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}",
        "created": now(),
        "model": server.options.model_name,
    }
    prompt_tokens = sum(len(p) for p in plan.prompts)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        chunks = stream(generation, plan, meta, chat, prompt_tokens, include_usage, points)
        return StreamingResponse(
            chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
        )
    if not await _until_done_or_gone(generation, request):
        return Response(status_code=499)  # the client left; nobody reads this
    return JSONResponse(full_response(generation, plan, meta, chat, prompt_tokens))


async def _until_done_or_gone(generation: Generation, request: Request) -> bool:
    """Run to the end unless the client disconnects first (then abort); True if it ran to the end."""
    run = asyncio.ensure_future(generation.run())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({run, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not run.done():  # the client left first (or this handler was cancelled)
            run.cancel()
            generation.cancel()
    if not run.done() or run.cancelled():  # a cancelled task is done only once it has run again: no result
        return False
    run.result()  # re-raises an engine failure as its APIError
    return True


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


def run(server: Server, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve until SIGINT/SIGTERM; then refuse new requests and let in-flight ones finish (bounded)."""
    import uvicorn

    timeout = server.options.shutdown_timeout_s

    class _Uvicorn(uvicorn.Server):
        expiry: threading.Timer | None = None

        def handle_exit(self, sig: int, frame: Any) -> None:
            server.accepting = False
            if self.expiry is None:
                # At the timeout, what still runs is failed by the worker (503
                # shutting_down): each stream ends
                # with an error event and [DONE] instead of being cut; uvicorn's own limit comes after that.
                self.expiry = threading.Timer(
                    timeout, server.worker.expire, args=("the server shut down before this request finished",)
                )
                self.expiry.daemon = True
                self.expiry.start()
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        create_app(server),
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=math.ceil(timeout) + 2,
    )
    _Uvicorn(config).run()
