"""Dependencies of the routes: shared objects, authentication, and checks that need state.

The app's objects (settings, job store, model registry, metrics) are built by the lifespan
and kept on `app.state`; routes reach them only through the functions here, which tests
replace with `app.dependency_overrides`. `get_job_queue` is the API's one seam to Celery.
"""

from __future__ import annotations

import logging
import secrets
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Annotated

import anyio
import numpy as np
from fastapi import Depends, File, Query, Request, Security, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import ValidationError

from app.backpressure import InferenceCall
from app.errors import NotAuthenticated, NotReady
from app.images import MaskedDigit, binarize, masked_digit, preprocess
from app.metrics import Metrics
from app.registry import ModelRegistry, ServedModel
from app.schemas import ID_PATTERN, MAX_SEED, ReadyOut, StudyRequest, TrainRequest
from app.settings import Settings
from models.config import VR_OBJECTIVES, TrainConfig
from models.cost import train_cost
from models.study.cache import StudyReports
from models.study.grid import cell_config, expand_grid
from worker.jobs import GridPoint, JobRecord, JobStore, WorkerInfo

log = logging.getLogger(__name__)

JobQueue = Callable[[str], None]


async def current_settings(request: Request) -> Settings:
    return request.app.state.settings


async def job_store(request: Request) -> JobStore:
    return request.app.state.store


async def model_registry(request: Request) -> ModelRegistry:
    return request.app.state.registry


async def study_reports(request: Request) -> StudyReports:
    return request.app.state.reports


async def app_metrics(request: Request) -> Metrics:
    return request.app.state.metrics


async def inference_call(request: Request) -> AsyncIterator[InferenceCall]:
    """This request's place at the inference gate (503 when full), held until it is
    answered: `await call(fn, *args)`. Routes declare it first, so that a refused request
    is refused before its upload is decoded or its model loaded."""
    with request.app.state.gate.admit(request.receive) as call:
        yield call


SettingsDep = Annotated[Settings, Depends(current_settings)]


def get_job_queue(settings: SettingsDep) -> JobQueue:
    """`enqueue_training(job_id)`: the only Celery call the API makes (tests fake it)."""
    from worker.queue import enqueue_training  # Celery is loaded only when a job is queued

    return partial(enqueue_training, settings=settings)


def send_job(enqueue: JobQueue, job_id: str) -> None:
    """Send a created job's message; if that fails, the workers' reaper sends it later."""
    try:
        enqueue(job_id)
    except Exception:  # the job is recorded: nothing is lost
        log.exception("could not enqueue job %s; it stays queued for the reaper", job_id)


StoreDep = Annotated[JobStore, Depends(job_store)]
RegistryDep = Annotated[ModelRegistry, Depends(model_registry)]
ReportsDep = Annotated[StudyReports, Depends(study_reports)]
MetricsDep = Annotated[Metrics, Depends(app_metrics)]
QueueDep = Annotated[JobQueue, Depends(get_job_queue)]
InferenceDep = Annotated[InferenceCall, Depends(inference_call)]

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
        File(description="An image of one digit: PNG, JPEG, GIF, BMP, TIFF or WebP; any size."),
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


@dataclass(frozen=True)
class _Budget:
    cost: str  # the `TrainCost` property
    setting: str
    formula: str
    what: str
    knobs: str


_BUDGETS = (
    _Budget(
        "samples_per_step",
        "IWAE_MAX_SAMPLES_PER_STEP",
        "k*m*batch_size = {c.k}*{c.groups}*{c.batch_size}",
        "importance samples per training step",
        "k, m or batch_size",
    ),
    _Budget(
        "train_samples",
        "IWAE_MAX_TRAIN_SAMPLES",
        "epochs*images*k*m = {c.epochs}*{c.images}*{c.k}*{c.groups}",
        "importance samples in the whole run",
        "epochs, train_size, k or m",
    ),
)


def check_budget(config: TrainConfig, settings: Settings) -> None:
    """422 when a training run would draw more importance samples than the settings allow:
    per step (its memory, IWAE_MAX_SAMPLES_PER_STEP) or in all (its time,
    IWAE_MAX_TRAIN_SAMPLES). For every route that queues training."""
    cost = train_cost(config)
    errors = []
    for budget in _BUDGETS:
        value = getattr(cost, budget.cost)
        limit = getattr(settings, budget.setting.removeprefix("IWAE_").lower())
        if value > limit:
            errors.append(
                {
                    "type": "compute_budget",
                    "loc": ("body",),
                    "msg": f"the job asks for {budget.formula.format(c=cost)} = {value:,} "
                    f"{budget.what}, more than {budget.setting} = {limit:,}; "
                    f"lower {budget.knobs}",
                    "input": value,
                    "ctx": {"cost": budget.cost, "limit": limit, "setting": budget.setting},
                }
            )
    if errors:
        raise RequestValidationError(errors)


def train_config(body: TrainRequest, settings: SettingsDep) -> TrainConfig:
    """The job's config from the request body, within the compute budget (422 otherwise)."""
    config = TrainConfig.from_dict(body.to_config())
    check_budget(config, settings)
    return config


@dataclass(frozen=True)
class StudyPlan:
    """A study to create: its base config and every cell with its job's config."""

    config: TrainConfig
    cells: list[GridPoint]


def study_plan(body: StudyRequest, settings: SettingsDep) -> StudyPlan:  # type: ignore[valid-type]
    """The study's grid and each cell's config (422 for a grid `expand_grid` refuses, a
    combination of options that a cell's config refuses, or a cell over the compute budget).
    """
    try:
        grid = expand_grid(body.ks, body.objectives, body.seeds, settings.max_study_jobs)
        base = _base_config(body)
        configs = [cell_config(base, cell) for cell in grid]
    except ValidationError as exc:  # options that the grid's objectives refuse (alpha, ...)
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        raise RequestValidationError(
            [{**error, "loc": ("body", *error["loc"])} for error in errors]
        ) from exc
    except ValueError as exc:  # StudyGridError, or a TrainConfig refusing snr_draws
        raise RequestValidationError(
            [{"type": "study_grid", "loc": ("body",), "msg": str(exc), "input": None}]
        ) from exc
    for config in configs:
        check_budget(config, settings)
    cells = [
        GridPoint(cell.objective, cell.k, cell.seed, config.to_dict())
        for cell, config in zip(grid, configs, strict=True)
    ]
    return StudyPlan(base, cells)


def _base_config(body: StudyRequest) -> TrainConfig:  # type: ignore[valid-type]
    """The config every cell starts from: the request's POST /train fields, with the largest
    K (so k_min is checked against it) and an objective that takes the request's alpha."""
    fields = body.model_dump(exclude_unset=True, include=set(TrainRequest.model_fields))
    objective = body.objectives[0]
    if body.alpha is not None:
        objective = next((o for o in body.objectives if o in VR_OBJECTIVES), objective)
    request = TrainRequest(**fields, k=max(body.ks), objective=objective, seed=body.seeds[0])
    base = TrainConfig.from_dict(request.to_config())
    return base.with_changes(snr_draws=body.snr_draws)


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


async def readiness(request: Request, settings: SettingsDep, store: StoreDep) -> ReadyOut:
    """Storage writable, job store and broker answering; `NotReady` (503) otherwise.

    The checks block (disk, network), so they run in the app's own few ops threads: never
    queued behind uploads or model calls.
    """
    limiter = request.app.state.ops_threads
    return await anyio.to_thread.run_sync(_readiness, settings, store, limiter=limiter)


def _readiness(settings: Settings, store: JobStore) -> ReadyOut:
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
    return ReadyOut(
        checks=checks,
        workers=len(live_workers(settings, store)),
        gpu_workers=len(live_workers(settings, store, settings.queue_for("cuda"))),
    )


def live_workers(settings: Settings, store: JobStore, queue: str | None = None) -> list[WorkerInfo]:
    """Workers that reported within three reaper intervals and consume `queue` (default: the
    training queue; a GPU worker also consumes the CUDA jobs' queue)."""
    window = 3 * settings.reaper_interval_s
    queue = queue or settings.queue
    return [w for w in store.workers() if w.seen_s_ago <= window and queue in w.queues]


def waiting_for(settings: Settings, store: JobStore, job: JobRecord) -> str | None:
    """Why a queued job is not picked up: no live worker consumes its queue (a job that asks
    for device 'cuda' waits for a GPU worker); None otherwise."""
    if job.status != "queued":
        return None
    queue = settings.queue_for(job.config.get("device"))
    if live_workers(settings, store, queue):
        return None
    kind = "GPU worker" if queue != settings.queue else "worker"
    return f"no {kind} is up: the job waits on the queue {queue!r} until one starts"


JobGauges = tuple[dict[str, int] | None, list[WorkerInfo] | None]


async def job_gauges(request: Request, settings: SettingsDep, store: StoreDep) -> JobGauges:
    """Jobs by status and the live workers, for /metrics (read in the ops threads); None
    for both while the job store is down."""
    try:
        return await anyio.to_thread.run_sync(
            _job_gauges, settings, store, limiter=request.app.state.ops_threads
        )
    except Exception:  # the request metrics stay useful while the job store is down
        log.warning("job store unreachable; /metrics without job counts", exc_info=True)
        return None, None


def _job_gauges(settings: Settings, store: JobStore) -> JobGauges:
    return store.counts(), live_workers(settings, store)
