"""`create_app()`: the FastAPI application, wired once per process.

Nothing here touches the disk or the network at import or in `create_app`; the lifespan
opens the job store and checks the storage directory when the server starts, and closes
the store when it stops.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import torch
from fastapi import FastAPI

from app.backpressure import InferenceGate
from app.errors import install_error_handlers
from app.events import EventStreams
from app.hosts import AllowedHostsMiddleware, parse_hosts
from app.images import configure_pillow
from app.limits import BodyLimitMiddleware
from app.metrics import Metrics, MetricsMiddleware
from app.page import install_page
from app.registry import ModelRegistry
from app.routes import router
from app.settings import Settings, get_settings
from models.data import load_mnist
from models.study.cache import StudyReports
from worker.jobs import open_job_store

OPS_THREADS = 4

DESCRIPTION = """
Train VAE and IWAE models of MNIST digits (Burda et al., 2015) and use them.

* `POST /train` queues a training job; `GET /jobs/{job_id}` shows its progress.
* `GET /samples`, `POST /reconstruct` and `POST /loglik` use a trained model: the newest one,
  or the one named by `model_id` (see `GET /models`).
* Log-likelihoods are in nats per image, estimated with `k` importance samples.
* `GET /jobs/{job_id}/events` streams a job's progress as server-sent events.
* `POST /studies` queues a K study (one job per objective, K and seed); `GET /studies/{id}`
  shows its results as cells end, `GET /studies/{id}/report` its report.
* The web page at `/` does all of this in a browser, through these endpoints only.
* Model calls are limited (IWAE_INFERENCE_CONCURRENCY running, IWAE_INFERENCE_QUEUE waiting);
  past that, or past IWAE_INFERENCE_TIMEOUT_S, they answer 503 with `Retry-After`.
"""


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    configure_pillow(settings.max_image_pixels)
    if settings.torch_threads is not None:
        # Before the first request: the threads that will run inference inherit it.
        torch.set_num_threads(settings.torch_threads)
    settings.models_dir.mkdir(parents=True, exist_ok=True)
    store = open_job_store(settings)
    app.state.store = store
    storage = settings.open_storage()
    app.state.registry = ModelRegistry(
        storage, settings.model_cache_size, device=settings.inference_device
    )
    # The report's reconstructions need test digits; the API never downloads them (the
    # workers have, into the same folder).
    app.state.reports = StudyReports(
        storage,
        settings.cache_dir,
        app.state.registry.checkpoint,
        lambda: load_mnist(settings.mnist_dir).test_images,
        retention_s=settings.job_retention_s,
    )
    app.state.gate = InferenceGate(
        settings.inference_slots, settings.inference_queue, settings.inference_timeout_s
    )
    # /readyz and /metrics do blocking I/O in threads of their own, never behind other work.
    app.state.ops_threads = anyio.CapacityLimiter(OPS_THREADS)
    app.state.streams = EventStreams(settings.max_event_streams, settings.event_stream_max_s)
    try:
        yield
    finally:
        store.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    """The API; `settings` default to the environment's (`get_settings()`)."""
    settings = settings or get_settings()
    app = FastAPI(
        title="IWAE service",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = Metrics()
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes)
    app.add_middleware(MetricsMiddleware, metrics=app.state.metrics)
    if settings.allowed_hosts is not None and (hosts := parse_hosts(settings.allowed_hosts)):
        app.add_middleware(AllowedHostsMiddleware, hosts=hosts)  # outermost: before anything
    install_error_handlers(app)
    app.include_router(router)
    install_page(app)
    return app
