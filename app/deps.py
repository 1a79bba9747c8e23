"""Dependencies of the routes: shared objects, authentication, and checks that need state.

The app's objects (settings, job store, model registry, metrics) are built by the lifespan
and kept on `app.state`; routes reach them only through the functions here, which tests
replace with `app.dependency_overrides`. `get_job_queue` is the API's one seam to Celery.
"""

from __future__ import annotations

import secrets
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Annotated

import numpy as np
from fastapi import Depends, File, Query, Request, Security, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.errors import NotAuthenticated, NotReady
from app.images import MaskedDigit, binarize, masked_digit, preprocess
from app.metrics import Metrics
from app.registry import ModelRegistry, ServedModel
from app.schemas import ID_PATTERN, MAX_SEED, ReadyOut
from app.settings import Settings
from worker.jobs import JobStore, WorkerInfo

JobQueue = Callable[[str], None]


def current_settings(request: Request) -> Settings:
    return request.app.state.settings


def job_store(request: Request) -> JobStore:
    return request.app.state.store


def model_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


def app_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def get_job_queue(request: Request) -> JobQueue:
    """`enqueue_training(job_id)`: the only Celery call the API makes (tests fake it)."""
    from worker.queue import enqueue_training  # Celery is loaded only when a job is queued

    return partial(enqueue_training, settings=current_settings(request))


SettingsDep = Annotated[Settings, Depends(current_settings)]
StoreDep = Annotated[JobStore, Depends(job_store)]
RegistryDep = Annotated[ModelRegistry, Depends(model_registry)]
MetricsDep = Annotated[Metrics, Depends(app_metrics)]
QueueDep = Annotated[JobQueue, Depends(get_job_queue)]

_bearer = HTTPBearer(
    auto_error=False,
    description="Required by POST /train and cancel when the server sets IWAE_API_TOKEN.",
)


def require_token(
    settings: SettingsDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> None:
    """Open when no IWAE_API_TOKEN is set; otherwise the request must carry it as Bearer."""
    if settings.api_token is None:
        return
    expected = settings.api_token.get_secret_value().encode()
    given = credentials.credentials.encode() if credentials is not None else b""
    if not secrets.compare_digest(given, expected):
        raise NotAuthenticated(
            "this endpoint needs the header 'Authorization: Bearer <IWAE_API_TOKEN>'"
        )


def served_model(
    registry: RegistryDep,
    model_id: Annotated[
        str | None,
        Query(
            pattern=ID_PATTERN,
            description="A trained model's id (GET /models); default: the newest one.",
        ),
    ] = None,
) -> ServedModel:
    """The requested model, loaded; 404 for an unknown id, 409 when none is trained."""
    return registry.load(model_id)


def uploaded_digit(
    settings: SettingsDep,
    file: Annotated[
        UploadFile,
        File(description="An image of one digit: PNG, JPEG, GIF, BMP, WebP... any size."),
    ],
) -> np.ndarray:
    """The upload as an MNIST digit, binarized at 0.5: `[784]` in {0, 1}."""
    return binarize(preprocess(file.file.read(), settings.max_image_pixels))


def uploaded_masked_digit(
    settings: SettingsDep,
    file: Annotated[
        UploadFile,
        File(
            description="An image of one digit, framed like MNIST (the digit fills about the "
            "middle 20/28 of a square frame); a PNG's transparent pixels are missing when no "
            "`mask` is sent."
        ),
    ],
    mask: Annotated[
        UploadFile | None,
        File(description="Same size as `file`: white (or transparent) pixels are missing."),
    ] = None,
) -> MaskedDigit:
    """The upload as a 28x28 binarized digit and its missing pixels."""
    mask_bytes = None if mask is None else mask.file.read()
    return masked_digit(file.file.read(), mask_bytes, settings.max_image_pixels)


def _above_limit(name: str, value: int, limit: int) -> RequestValidationError:
    """The 422 that `Query(le=limit)` would give, for limits that are settings."""
    return RequestValidationError(
        [
            {
                "type": "less_than_equal",
                "loc": ("query", name),
                "msg": f"Input should be less than or equal to {limit}",
                "input": value,
                "ctx": {"le": limit},
            }
        ]
    )


def sample_count(
    settings: SettingsDep,
    n: Annotated[
        int, Query(ge=1, description="How many digits; at most IWAE_MAX_SAMPLES (1024).")
    ] = 16,
) -> int:
    if n > settings.max_samples:
        raise _above_limit("n", n, settings.max_samples)
    return n


def loglik_k(
    settings: SettingsDep,
    k: Annotated[
        int | None,
        Query(
            ge=1,
            description="Importance samples; default IWAE_DEFAULT_LOGLIK_K (5000), at most "
            "IWAE_MAX_LOGLIK_K (100000). More samples, tighter bound, longer wait.",
            examples=[5000],
        ),
    ] = None,
) -> int:
    k = settings.default_loglik_k if k is None else k
    if k > settings.max_loglik_k:
        raise _above_limit("k", k, settings.max_loglik_k)
    return k


IMPUTE_K = 1000  # about 15 ms of one CPU core for a Burda-size model


def impute_k(
    settings: SettingsDep,
    k: Annotated[
        int | None,
        Query(
            ge=1,
            description=f"Importance samples; default {IMPUTE_K} (or IWAE_MAX_IMPUTE_K if "
            "lower), at most IWAE_MAX_IMPUTE_K (10000).",
            examples=[IMPUTE_K],
        ),
    ] = None,
) -> int:
    k = min(IMPUTE_K, settings.max_impute_k) if k is None else k
    if k > settings.max_impute_k:
        raise _above_limit("k", k, settings.max_impute_k)
    return k


Seed = Annotated[
    int | None,
    Query(ge=0, le=MAX_SEED, description="Fix the random draws: same seed, same answer."),
]


def _writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            return True
    except OSError:
        return False


def _broker_reachable(url: str) -> bool:
    from kombu import Connection

    try:
        with Connection(url, connect_timeout=2) as connection:
            connection.ensure_connection(max_retries=1, timeout=2)
        return True
    except Exception:  # any failure to connect means "not ready", whatever the transport
        return False


def _pings(store: JobStore) -> bool:
    try:
        return bool(store.ping())
    except Exception:  # a store that raises is as unreachable as one that says False
        return False


def readiness(settings: SettingsDep, store: StoreDep) -> ReadyOut:
    """Storage writable, job store and broker answering; `NotReady` (503) otherwise."""
    checks = {
        "storage": _writable(settings.models_dir),
        "job_store": _pings(store),
        "broker": (
            _writable(settings.broker_dir)
            if settings.broker_url is None
            else _broker_reachable(settings.broker_url)
        ),
    }
    failing = [name for name, ok in checks.items() if not ok]
    if failing:
        raise NotReady(f"not ready: {', '.join(failing)} unreachable")
    return ReadyOut(checks=checks, workers=len(live_workers(settings, store)))


def live_workers(settings: Settings, store: JobStore) -> list[WorkerInfo]:
    """Workers that reported within three reaper intervals and consume the training queue."""
    window = 3 * settings.reaper_interval_s
    return [w for w in store.workers() if w.seen_s_ago <= window and settings.queue in w.queues]
