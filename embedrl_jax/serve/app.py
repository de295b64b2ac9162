"""The HTTP side: Starlette routes (async) in front of one model worker thread.

    POST /v1/embeddings   (also /embeddings)   OpenAI schema + reasoning / return_tcot / input_type
    GET  /v1/models       the served model
    GET  /health          200 once warm-up is done, else 503 (open without the API key)
    GET  /metrics         Prometheus text (open without the API key)

A request is parsed on the event loop, its items are prepared (decoded, tokenised) in one
preparation thread, queued in the `Batcher` and run by the worker thread; the handler awaits
the items' futures. The worker is the only thread that calls jax.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import threading
import time
from concurrent.futures import InvalidStateError, ThreadPoolExecutor

import numpy as np
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .batcher import Batcher, Closed, QueueFull
from .engine import Engine, matryoshka
from .metrics import SIZE_BUCKETS, TOKEN_BUCKETS, CompileCounter, Metrics
from .schema import APIError, error_body, parse_request

__all__ = ["Server", "create_app"]

log = logging.getLogger("embedrl.serve")


def _settle(future, result=None, exc: BaseException | None = None) -> None:
    """Resolve a job's future unless it is already done (a disconnected client cancels it)."""
    if future.done():
        return
    try:
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)
    except InvalidStateError:  # cancelled in between
        pass


class Server:
    """State shared by the routes and the worker: engine, batcher, metrics, readiness."""

    def __init__(self, engine: Engine, *, api_key: str | None = None):
        self.engine = engine
        self.cfg = engine.cfg
        self.api_key = api_key
        self.metrics = Metrics(CompileCounter.get())
        self.batcher = Batcher(engine.capacity, max_queue=self.cfg.max_queue, max_delay_s=self.cfg.max_delay_ms / 1e3)
        self.prep_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedrl-prep")
        self.ready = threading.Event()
        self.failed: str | None = None
        self.draining = False
        self.created = int(time.time())
        self._worker: threading.Thread | None = None

    # ------------------------------------------------------------------ worker thread
    def start(self) -> None:
        self._worker = threading.Thread(target=self._work, name="embedrl-model", daemon=True)
        self._worker.start()

    def _work(self) -> None:
        try:
            shapes = self.engine.warmup()
        except Exception as e:  # the server stays up and says why on /health
            log.exception("warm-up failed")
            self.failed = f"warm-up failed: {type(e).__name__}: {e}"
            return
        for stage, n in shapes.items():
            self.metrics.set("warmup_shapes", n, stage=stage)
        self.metrics.mark_warm()
        self.ready.set()
        while True:
            jobs = self.batcher.next_batch()
            if jobs is None:
                return
            try:
                self._run(jobs)
            except Exception as e:  # the worker never dies; whatever is unsettled fails
                log.exception("worker error")
                for j in jobs:
                    _settle(j.future, exc=APIError(500, f"internal error: {type(e).__name__}: {e}",
                                                   code="server_error"))

    def _run(self, jobs) -> None:
        stage = jobs[0].stage
        now = time.monotonic()
        for j in jobs:
            self.metrics.observe("queue_time_seconds", now - j.t_enqueue, stage=stage)
        self.metrics.set("queue_items", len(self.batcher))
        b, _ = self.engine.plan(stage).fit(len(jobs), jobs[0].seq, [])
        self.metrics.observe("batch_size", len(jobs), SIZE_BUCKETS, stage=stage)
        self.metrics.observe("batch_tokens", sum(j.length for j in jobs), TOKEN_BUCKETS, stage=stage)
        self.metrics.observe("batch_padded_tokens", b * jobs[0].seq, TOKEN_BUCKETS, stage=stage)
        t0 = time.perf_counter()
        try:
            out = self.engine.run_embed(jobs) if stage == "embed" else self.engine.run_reason(jobs)
        except Exception as e:  # only this batch's items fail
            log.exception("%s batch of %d items failed", stage, len(jobs))
            self.metrics.inc("batches_total", stage=stage, outcome="error")
            err = APIError(500, f"the model failed on a batch holding this request's items: {type(e).__name__}: {e}",
                           code="batch_failed")
            for j in jobs:
                _settle(j.future, exc=err)
            return
        self.metrics.observe("batch_seconds", time.perf_counter() - t0, stage=stage)
        self.metrics.inc("batches_total", stage=stage, outcome="ok")
        self.metrics.inc("items_total", len(jobs), stage=stage)
        if stage == "embed":
            for j, vec in zip(jobs, out):
                _settle(j.future, {"vec": vec, "tokens": j.length, "tcot": j.tcot, "reason_tokens": j.reason_tokens})
            return
        follow = []
        for j, (text, tokens) in zip(jobs, out):
            try:
                follow.append(self.engine.embed_job_after_reasoning(j, text, tokens))
            except APIError as e:
                _settle(j.future, exc=e)
        if follow:
            self.batcher.submit(follow, force=True)

    def begin_drain(self) -> None:
        self.draining = True

    def stop(self, timeout: float | None = None) -> None:
        """Finish queued work, then stop the worker."""
        self.draining = True
        self.batcher.close()
        if self._worker is not None:
            self._worker.join(self.cfg.drain_timeout_s if timeout is None else timeout)
        self.prep_pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ request handling
    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if not auth:
            raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="missing_api_key")
        if scheme.lower() != "bearer" or token.strip() != self.api_key:
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    async def read_json(self, request: Request):
        limit = self.cfg.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body of {declared} bytes is over the {limit}-byte limit",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body is over the {limit}-byte limit", code="request_too_large")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None

    def _prepare_all(self, req):
        return [self.engine.prepare(item, param, reasoning=req.reasoning, side=side)
                for item, param, side in zip(req.items, req.params, req.sides)]

    async def embeddings(self, request: Request) -> Response:
        self.check_key(request)
        if self.failed:
            raise APIError(503, self.failed, code="unavailable")
        if not self.ready.is_set():
            raise APIError(503, "the server is warming up (compiling its shapes); retry when /health is 200",
                           code="warming_up")
        if self.draining or self.batcher.closed:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        body = await self.read_json(request)
        req = parse_request(body, max_inputs=self.cfg.max_inputs, default_side=self.cfg.reason.default_side)
        if req.model is not None and req.model != self.engine.model_name:
            raise APIError(404, f"the model {req.model!r} does not exist; this server serves "
                                f"{self.engine.model_name!r}", param="model", code="model_not_found")
        if req.dimensions is not None and not 1 <= req.dimensions <= self.engine.dim:
            raise APIError(400, f"dimensions must be in [1, {self.engine.dim}], got {req.dimensions}",
                           param="dimensions", code="invalid_value")
        if req.reasoning and self.engine.reasoner is None:
            raise APIError(400, "reasoning needs a Reasoner; this server was started without --reasoner",
                           param="reasoning", code="reasoning_unavailable")
        if self.batcher.room() < len(req.items):
            raise APIError(429, "the server's queue is full; retry later", code="queue_full")
        loop = asyncio.get_running_loop()
        jobs = await loop.run_in_executor(self.prep_pool, self._prepare_all, req)
        try:
            self.batcher.submit(jobs)
        except QueueFull as e:
            raise APIError(429, f"the server's queue is full; retry later ({e})", code="queue_full") from None
        except Closed:
            raise APIError(503, "the server is shutting down", code="shutting_down") from None
        self.metrics.set("queue_items", len(self.batcher))
        results = await asyncio.gather(*(asyncio.wrap_future(j.future) for j in jobs), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                if isinstance(r, APIError):
                    raise r
                raise APIError(500, f"{type(r).__name__}: {r}", code="server_error")
        vecs = matryoshka(np.stack([r["vec"] for r in results]), req.dimensions)
        data = []
        for i, (r, v) in enumerate(zip(results, vecs)):
            if req.encoding_format == "base64":
                emb = base64.b64encode(np.asarray(v, "<f4").tobytes()).decode("ascii")
            else:
                emb = v.astype(np.float32).tolist()
            entry = {"object": "embedding", "index": i, "embedding": emb}
            if req.return_tcot:
                entry["tcot"] = r["tcot"]
            data.append(entry)
        prompt_tokens = sum(r["tokens"] for r in results)
        reason_tokens = sum(r["reason_tokens"] for r in results)
        usage = {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + reason_tokens}
        if req.reasoning:
            usage["reasoning_tokens"] = reason_tokens
        return JSONResponse({"object": "list", "data": data, "model": self.engine.model_name, "usage": usage})

    async def models(self, request: Request) -> Response:
        self.check_key(request)
        return JSONResponse({"object": "list", "data": [{
            "id": self.engine.model_name, "object": "model", "created": self.created, "owned_by": "embedrl_jax",
            "embedding_dimensions": self.engine.dim, "reasoning": self.engine.reasoner is not None,
            "max_input_tokens": self.engine.embed_plan.seqs[-1]}]})

    async def health(self, request: Request) -> Response:
        if self.failed:
            return JSONResponse({"status": "failed", "detail": self.failed}, status_code=503)
        if self.draining:
            return JSONResponse({"status": "draining"}, status_code=503)
        if not self.ready.is_set():
            return JSONResponse({"status": "warming up", "compiled": dict(self.engine.warmed)}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics_text(self, request: Request) -> Response:
        self.metrics.set("queue_items", len(self.batcher))
        return PlainTextResponse(self.metrics.render(), media_type="text/plain; version=0.0.4")


def _api_route(server: Server, fn):
    async def endpoint(request: Request) -> Response:
        t0 = time.perf_counter()
        try:
            resp = await fn(request)
        except APIError as e:
            resp = JSONResponse(e.body(), status_code=e.status)
        except Exception as e:  # never let a request kill the server
            log.exception("unhandled error")
            resp = JSONResponse(error_body(f"internal error: {type(e).__name__}: {e}", "server_error", None,
                                           "server_error"), status_code=500)
        server.metrics.inc("requests_total", status=str(resp.status_code), route=request.url.path)
        server.metrics.observe("request_duration_seconds", time.perf_counter() - t0, route=request.url.path)
        return resp
    return endpoint


def create_app(engine: Engine, *, api_key: str | None = None, server: Server | None = None) -> Starlette:
    """The ASGI app; its lifespan starts the worker (warm-up first) and drains it on shutdown."""
    server = server or Server(engine, api_key=api_key)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.start()
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, server.stop)

    routes = [
        Route("/v1/embeddings", _api_route(server, server.embeddings), methods=["POST"]),
        Route("/embeddings", _api_route(server, server.embeddings), methods=["POST"]),
        Route("/v1/models", _api_route(server, server.models), methods=["GET"]),
        Route("/health", server.health, methods=["GET"]),
        Route("/metrics", server.metrics_text, methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.server = server
    return app
