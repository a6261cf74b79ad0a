"""`headstart serve RUN`: an HTTP prediction service with a web page (FastAPI on uvicorn).

  POST /v1/predict   images (multipart files, or raw image bytes) -> top-k labels per image
  GET  /v1/model     classes, backbone, preprocessing, training results, frozen proof, engine
  GET  /healthz      the process is up;   GET /readyz: the model is loaded and warmed up
  GET  /metrics      Prometheus: requests, errors, latency, batch sizes
  GET  /             a page to drop, pick or photograph images (self-contained: no CDN)

Concurrent requests are gathered into one forward pass (up to --max-batch images, or --max-wait-ms
after the first), run off the event loop. Uploads are limited in bytes, pixels, images per request
and time; a bad upload is a 4xx JSON error naming the problem, and the server keeps serving.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations (Request)
# at runtime, and Request is imported inside create_app so that FastAPI stays optional.
import asyncio
import contextlib
import json
import os
import select
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path

import torch

from headstart.core import logs
from headstart.core.errors import ConfigError
from headstart.core.files import RESULTS, read_json
from headstart.deploy.serve_http import ApiError, ServeConfig, authorised, decode, read_images
from headstart.inference.predictor import Prediction

PAGE = Path(__file__).with_name("static") / "index.html"
LOOPBACK = ("127.0.0.1", "localhost", "::1")
SETTLE_S = 2.0  # at most this long after SIGTERM for connections already made to send their request


def require_stack() -> None:
    """FastAPI, uvicorn, python-multipart and prometheus-client are the serve extra: say so."""
    from importlib.util import find_spec

    modules = {"fastapi": "fastapi", "uvicorn": "uvicorn", "python_multipart": "python-multipart",
               "prometheus_client": "prometheus-client"}  # fmt: skip
    missing = [package for module, package in modules.items() if find_spec(module) is None]
    if missing:
        raise ConfigError(
            f"headstart serve needs {', '.join(missing)}, not installed here: pip install 'headstart[serve]'."
        )


class Batcher:
    """Gathers images from concurrent requests into one forward pass, run in a worker thread."""

    def __init__(self, predictor, *, max_batch: int, max_wait_ms: float, on_batch=None):
        self.predictor, self.max_batch, self.max_wait = predictor, max_batch, max_wait_ms / 1000
        self.queue: asyncio.Queue = asyncio.Queue()
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="headstart-model")
        self.on_batch = on_batch
        self.task: asyncio.Task | None = None

    def start(self) -> None:
        """Run the gathering loop on the current event loop."""
        self.task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        """Finish what is queued, then stop."""
        while not self.queue.empty():
            await asyncio.sleep(0.01)
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.executor.shutdown(wait=True)

    async def predict(self, x: torch.Tensor) -> Prediction:
        """Every class ranked for one preprocessed image [3, H, W] (with its set and OOD score when the
        run has them), batched with whatever else is waiting."""
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((x, future))
        return await future

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.max_wait
            while len(batch) < self.max_batch:
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), max(0.0, deadline - loop.time())))
                except asyncio.TimeoutError:  # noqa: UP041 - a different class before Python 3.11
                    break
            x = torch.stack([item[0] for item in batch])
            try:
                preds = await loop.run_in_executor(self.executor, self._rank, x)
            except Exception as e:  # noqa: BLE001 - every waiting request gets the error, the loop goes on
                for _, f in batch:
                    if not f.done():
                        f.set_exception(e)
                continue
            if self.on_batch is not None:
                self.on_batch(len(batch))
            for (_, f), p in zip(batch, preds, strict=True):
                if not f.done():
                    f.set_result(p)

    def _rank(self, x: torch.Tensor) -> list[Prediction]:
        p = self.predictor
        return p.rank(*p.outputs(x), len(p.classes), reject=p.rejection is not None)


def model_card(run: Path, predictor, engine: str) -> dict:
    """GET /v1/model: what the model is, how it was trained and how it preprocesses."""
    card = {
        "engine": engine,
        "classes": list(predictor.classes),
        "temperature": predictor.temperature,
        "preprocessing": predictor.preprocess.to_dict(),
        "tta": predictor.tta,  # an ONNX graph's own; `serve --tta` may change the run's
    }
    record = getattr(predictor, "record", {}) or {}
    card["backbone"] = (
        record.get("backbone", {}).get("name") if isinstance(record.get("backbone"), dict) else None
    )
    results = read_json(run / RESULTS) if run.is_dir() and (run / RESULTS).exists() else {}
    keys = (
        "val_accuracy",
        "val_loss",
        "strategy",
        "num_train",
        "num_val",
        "best_epoch",
        "head",
        "frozen_tensors_checked",
        "frozen_tensors_changed",
        "calibration",
    )
    card["training"] = {k: results[k] for k in keys if k in results}
    card["backbone"] = card["backbone"] or results.get("backbone")
    return card


class Service:
    """The model behind the endpoints: loaded and warmed in the background, with its metrics."""

    def __init__(self, run: Path, cfg: ServeConfig):
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.run, self.cfg = run, cfg
        self.ready, self.error_text = False, None
        self.warming: asyncio.Task | None = None
        self.predictor = self.card = self.batcher = None
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "headstart_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry
        )
        self.errors = Counter(
            "headstart_errors", "Refused or failed requests, by code", ["code"], registry=self.registry
        )
        self.latency = Histogram(
            "headstart_request_seconds",
            "Request latency",
            ["endpoint"],
            registry=self.registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.batch_sizes = Histogram(
            "headstart_batch_size",
            "Images per forward pass",
            registry=self.registry,
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
        )

    def load(self) -> None:
        """Open the predictor and run one forward pass (kernels, the fast-path copy): then it is warm."""
        from headstart.inference.onnx import open_predictor

        predictor = open_predictor(self.run, engine=self.cfg.engine, device=self.cfg.device, tta=self.cfg.tta)
        size = predictor.preprocess.input_size
        predictor.predict_tensor(torch.zeros(1, 3, size, size))
        self.predictor, self.card = predictor, model_card(self.run, predictor, self.cfg.engine)

    def start(self) -> None:
        """Begin loading once: from the lifespan, or from the first request where the app is mounted
        in another (Starlette runs no lifespan of a mounted app)."""
        if self.warming is None:
            self.warming = asyncio.get_running_loop().create_task(self.warm())

    async def wait_ready(self) -> bool:
        """Wait for a load in progress (up to the request timeout): a request is not refused for
        arriving first."""
        if not self.ready and self.warming is not None and not self.warming.done():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.warming), self.cfg.timeout_s)
        return self.ready

    async def warm(self) -> None:
        """load() off the event loop, then start batching; a failure is reported by /readyz."""
        try:
            await asyncio.get_running_loop().run_in_executor(None, self.load)
            self.batcher = Batcher(
                self.predictor,
                max_batch=self.cfg.max_batch,
                max_wait_ms=self.cfg.max_wait_ms,
                on_batch=self.batch_sizes.observe,
            )
            self.batcher.start()
            self.ready = True
        except Exception as e:  # noqa: BLE001 - the process stays up to say what went wrong
            self.error_text = f"{type(e).__name__}: {e}"

    def refuse(self, status: int, code: str, message: str, endpoint: str):
        """A JSON error counted in the metrics."""
        from fastapi.responses import JSONResponse

        self.errors.labels(code).inc()
        self.requests.labels(endpoint, str(status)).inc()
        return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)

    async def predict(self, request, top_k: int | None) -> dict:
        """Read, decode and predict every image of a request, within the time limit (ApiError or
        asyncio.TimeoutError otherwise)."""
        k = max(1, min(top_k or self.cfg.top_k, len(self.predictor.classes)))
        uploads, preds = await asyncio.wait_for(self._read_and_predict(request), self.cfg.timeout_s)
        out = []
        for (name, _), p in zip(uploads, preds, strict=True):
            top = [
                {"label": lab, "probability": pr}
                for lab, pr in zip(p.labels[:k], p.probabilities[:k], strict=True)
            ]
            row = {"name": name, "label": top[0]["label"], "probability": top[0]["probability"], "top": top}
            if p.set is not None:
                row["set"] = p.set
            if p.ood_score is not None:  # label stays the closest class; `unknown` says it is a stranger
                row |= {"unknown": p.unknown, "ood_score": p.ood_score}
            out.append(row)
        return {"predictions": out}

    async def _read_and_predict(self, request):
        uploads = await read_images(request, self.cfg)
        loop = asyncio.get_running_loop()
        tensors = [
            await loop.run_in_executor(None, decode, data, name, self.predictor, self.cfg.max_pixels)
            for name, data in uploads
        ]
        return uploads, await asyncio.gather(*(self.batcher.predict(x) for x in tensors))


def create_app(run: str | os.PathLike, config: ServeConfig | None = None):
    """The ASGI app for a run folder (or a .onnx file with engine 'onnx'): mount it in your own app
    or serve it with uvicorn. The model loads in the background; /readyz says when it is warm."""
    require_stack()
    from fastapi import FastAPI, Request
    from fastapi.responses import HTMLResponse, JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    svc = Service(Path(run), config or ServeConfig())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        svc.start()
        yield
        svc.warming.cancel()
        if svc.batcher is not None:
            await svc.batcher.stop()  # uvicorn has drained the requests in flight by now

    app = FastAPI(title="headstart", lifespan=lifespan, docs_url="/docs", redoc_url=None)
    app.state.headstart = svc

    @app.middleware("http")
    async def guard(request: Request, call_next):
        svc.start()
        path = request.url.path
        if (path.startswith("/v1/") or path == "/metrics") and not authorised(
            request.headers, svc.cfg.api_key
        ):
            return svc.refuse(
                401, "unauthorised", "send the API key: 'Authorization: Bearer KEY' or 'X-API-Key: KEY'", path
            )
        return await call_next(request)

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        if svc.ready:
            return {"status": "ready"}
        status = "failed" if svc.error_text else "warming up"
        return JSONResponse({"status": status, "error": svc.error_text}, status_code=503)

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(svc.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/model")
    async def model():
        if not await svc.wait_ready():
            return svc.refuse(503, "not_ready", svc.error_text or "the model is still loading", "/v1/model")
        return svc.card

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return HTMLResponse(PAGE.read_text(encoding="utf-8"))

    @app.post("/v1/predict")
    async def predict(request: Request, top_k: int | None = None):
        t0, endpoint = time.perf_counter(), "/v1/predict"
        if not await svc.wait_ready():
            return svc.refuse(503, "not_ready", svc.error_text or "the model is still loading", endpoint)
        try:
            body = await svc.predict(request, top_k)
        except ApiError as e:
            return svc.refuse(e.status, e.code, e.message, endpoint)
        except asyncio.TimeoutError:  # noqa: UP041 - a different class before Python 3.11
            return svc.refuse(
                504, "timeout", f"the request took longer than {svc.cfg.timeout_s:g}s", endpoint
            )
        svc.requests.labels(endpoint, "200").inc()
        svc.latency.labels(endpoint).observe(time.perf_counter() - t0)
        return body

    return app


def check_exposure(host: str, api_key: str | None) -> None:
    """Binding beyond loopback exposes the model to the network: only with an API key."""
    if host not in LOOPBACK and not api_key:
        raise ConfigError(
            f"--host {host} serves the model to the network: pass --api-key KEY (or set HEADSTART_API_KEY) "
            "so that only callers who know it are answered, or keep the default --host 127.0.0.1."
        )


def serve(
    run: str | os.PathLike,
    config: ServeConfig,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
) -> None:
    """Run the service with uvicorn until SIGTERM / Ctrl-C (which drain in-flight requests first)."""
    require_stack()
    import uvicorn

    check_exposure(host, config.api_key)
    if workers > 1:  # each process loads the model: uvicorn imports the factory by name
        os.environ["HEADSTART_SERVE"] = json.dumps({"run": str(run), **asdict(config)})
        app, kw = "headstart.deploy.serve:app_from_env", {"factory": True, "workers": workers}
    else:
        app, kw = create_app(run, config), {}
    options = {"host": host, "port": port, "timeout_graceful_shutdown": int(config.timeout_s) + 5,
               "log_level": "warning", **kw}  # fmt: skip
    # uvicorn drains on SIGTERM, then raises the signal again: end with status 0 instead of -15
    previous = signal.signal(signal.SIGTERM, _drained)
    try:
        if workers > 1:  # uvicorn's supervisor builds its own servers
            uvicorn.run(app, **options)
        else:
            _settling_server_class()(uvicorn.Config(app, **options)).run()
    except _Drained:
        logs.info("headstart serve: stopped after answering the requests in flight")
    finally:
        signal.signal(signal.SIGTERM, previous)


def _settling_server_class() -> type:
    """Built on first use: uvicorn is an optional dependency."""
    import uvicorn

    class SettlingServer(uvicorn.Server):
        """uvicorn.Server that lets connections already made send their request before it stops.

        uvicorn's shutdown closes the listening socket (the kernel resets connections still in its
        backlog) and closes connections whose request has not been read yet (reset, as their bytes
        are unread): clients that connected before the signal would see a reset, not an answer.
        So first keep serving until no connection waits in the backlog or for its first request.
        """

        async def shutdown(self, sockets=None) -> None:
            deadline = time.monotonic() + SETTLE_S
            while time.monotonic() < deadline and (self._backlog() or self._fresh()):
                await asyncio.sleep(0.02)
            await super().shutdown(sockets)

        def _backlog(self) -> bool:
            listening = [sock for server in self.servers for sock in server.sockets]
            return bool(listening and select.select(listening, [], [], 0)[0])

        def _fresh(self) -> bool:
            return any(getattr(c, "cycle", 0) is None for c in self.server_state.connections)

    return SettlingServer


class _Drained(Exception):
    """SIGTERM, re-raised by uvicorn once the requests in flight were answered."""


def _drained(signum, frame) -> None:
    raise _Drained


def app_from_env():
    """create_app from $HEADSTART_SERVE (how `--workers N` hands the options to each process)."""
    d = json.loads(os.environ["HEADSTART_SERVE"])
    run = d.pop("run")
    return create_app(run, ServeConfig(**d))
