"""The OpenAI-compatible HTTP server: FastAPI routes on uvicorn, as vLLM and SGLang serve theirs.

The event loop only parses requests and writes responses; the engine thread (engine.py) does all JAX
work and hands each request's tokens back through `loop.call_soon_threadsafe`. Streaming responses
are server-sent events: one chunk per engine call that made text final (text.py), then a usage
record and `data: [DONE]`. A client that goes away cancels its request, which frees its slot at the
next block boundary. uvicorn's graceful shutdown (SIGTERM/SIGINT) lets open requests finish before
the lifespan hook drains and stops the engine.

Python API: `create_app(engine, texts, model_name)` -> FastAPI app; `Server(...)` runs it on a
background thread (tests, benchmarks); `serve(...)` runs it in the foreground (`edlm serve`).
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import threading

import uvicorn
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.responses import JSONResponse, Response, StreamingResponse

from efficient_dlm.serve import protocol
from efficient_dlm.serve.engine import Engine, QueueFull, Request, RequestError
from efficient_dlm.serve.text import Texts, TextStream


def _error(status: int, message: str, kind: str = "invalid_request_error", param: str | None = None) -> JSONResponse:
    return JSONResponse(protocol.error_body(message, kind, param, status), status_code=status)


class _Job:
    """One request's bridge from the engine thread to the event loop: (text delta, finish reason) items."""

    def __init__(self, loop, texts: Texts, stops: list[str], prompt: list[int], max_new: int, settings: dict):
        self.loop, self.queue = loop, asyncio.Queue()
        self.stream = TextStream(texts, stops)
        self.completion_tokens = 0
        self.request = Request(prompt, max_new, settings, self._on_tokens)

    def _on_tokens(self, tokens: list[int], reason: str | None) -> bool:
        self.completion_tokens += len(tokens)
        delta, hit = self.stream.add(tokens, reason is not None)
        if hit:
            reason = "stop"
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (delta, reason))
        return hit


def create_app(engine: Engine, texts: Texts, model_name: str) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(engine.stop, True)  # after uvicorn has let open requests finish

    app = FastAPI(title="edlm serve", lifespan=lifespan)

    @app.get("/health")
    async def health():
        if engine.error is not None:
            return _error(503, f"the engine failed: {engine.error!r}", "server_error")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "edlm"}]}

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.text(), media_type="text/plain; version=0.0.4")

    async def handle(http: HTTPRequest, chat: bool):
        try:
            body = json.loads(await http.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            return _error(400, f"the request body is not valid JSON ({err})")
        try:
            max_new, settings, stops, stream = protocol.common(body, engine)
            model = body.get("model")
            if model is not None and model != model_name:
                return _error(404, f"model {model!r} is not served here; this server serves {model_name!r}",
                              "invalid_request_error", "model")
            prompt = texts.render_chat(protocol.chat_messages(body)) if chat else protocol.completion_prompt(body, texts)
            job = _Job(asyncio.get_running_loop(), texts, stops, prompt, max_new, settings)
            engine.submit(job.request)
        except RequestError as err:
            return _error(400, str(err), param=err.param)
        except QueueFull as err:
            return _error(429, f"the server is busy: {err}", "rate_limit_error")
        except RuntimeError as err:
            return _error(503, str(err), "server_error")
        responder = protocol.Responder(chat, model_name)
        if stream:
            return StreamingResponse(_events(job, responder, len(prompt)), media_type="text/event-stream")
        return await _whole(http, job, responder, len(prompt))

    @app.post("/v1/completions")
    async def completions(http: HTTPRequest):
        return await handle(http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HTTPRequest):
        return await handle(http, chat=True)

    return app


async def _whole(http: HTTPRequest, job: _Job, responder, prompt_tokens: int):
    """Waits for the end of a request, cancelling it if the client disconnects meanwhile."""
    text, reason = [], None
    while reason is None:
        try:
            delta, reason = await asyncio.wait_for(job.queue.get(), timeout=0.5)
        except asyncio.TimeoutError:
            if await http.is_disconnected():
                job.request.cancel()
                return Response(status_code=499)
            continue
        text.append(delta)
    if reason == "error":
        return _error(500, "the engine failed while decoding this request", "server_error")
    return responder.whole("".join(text), reason, responder.usage(prompt_tokens, job.completion_tokens))


def _sse(obj) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def _events(job: _Job, responder, prompt_tokens: int):
    first = True
    try:
        if responder.chat:
            yield _sse(responder.chunk(None, None, first=True))
            first = False
        reason = None
        while reason is None:
            delta, reason = await job.queue.get()
            if reason == "error":
                yield _sse(protocol.error_body("the engine failed while decoding this request", "server_error"))
                break
            if delta or reason is not None:
                yield _sse(responder.chunk(delta, reason, first))
                first = False
        yield _sse(responder.usage_chunk(responder.usage(prompt_tokens, job.completion_tokens)))
        yield "data: [DONE]\n\n"
    finally:
        job.request.cancel()  # no-op for a finished request; frees the slot of one whose client left


class Server:
    """Runs the app with uvicorn on a background thread (port 0: a free one); `url` once started."""

    def __init__(self, app: FastAPI, host: str = "127.0.0.1", port: int = 0):
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
        self.thread = threading.Thread(target=self.server.run, name="edlm-http", daemon=True)

    def __enter__(self) -> "Server":
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError("the HTTP server did not start")
            threading.Event().wait(0.02)
        host, port = self.server.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(60)


def serve(engine: Engine, texts: Texts, model_name: str, host: str = "127.0.0.1", port: int = 8000) -> None:
    """Serves in the foreground until SIGTERM / SIGINT (uvicorn's handlers: finish open requests, then stop)."""
    engine.start()
    uvicorn.run(create_app(engine, texts, model_name), host=host, port=port, log_level="info", lifespan="on")
