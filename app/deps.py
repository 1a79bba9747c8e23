"""Dependencies of the routes: the app's shared objects, the job queue, authentication and
the served model (the shape of the FastAPI full-stack template's `api/deps.py`).

The app's objects (settings, job store, model registry, metrics) are built by the lifespan
and kept on `app.state`; routes reach them only through the functions here, which tests
replace with `app.dependency_overrides`. `get_job_queue` is the API's one seam to Celery.
Dependencies with logic of their own live beside them: `app.uploads`, `app.params`
(query limits), `app.planning` (compute budget, study plan), `app.health`.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Annotated, Any

from fastapi import Depends, Query, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from app.backpressure import InferenceCall
from app.errors import NotAuthenticated
from app.metrics import Metrics
from app.registry import ModelRegistry, ServedModel
from app.schemas import ID_PATTERN
from app.settings import Settings
from models.study.cache import StudyReports
from worker.jobs import JobStore

log = logging.getLogger(__name__)

JobQueue = Callable[[str], None]
GroupQueue = Callable[[list[str]], None]


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


def get_group_queue(settings: SettingsDep) -> GroupQueue:
    """`enqueue_training_group(job_ids)`: one message for a study's stack group (tests fake
    it)."""
    from worker.queue import enqueue_training_group

    return partial(enqueue_training_group, settings=settings)


def _send_job(enqueue: Callable[[Any], None], job_ids: str | list[str]) -> None:
    try:
        enqueue(job_ids)
    except Exception:  # the jobs are recorded: nothing is lost
        log.exception("could not enqueue job %s; it stays queued for the reaper", job_ids)


def job_sender(enqueue: Annotated[JobQueue, Depends(get_job_queue)]) -> JobQueue:
    """`send(job_id)` for a created job: never raises; if the message cannot be sent, the
    workers' reaper sends it later."""
    return partial(_send_job, enqueue)


def group_sender(enqueue: Annotated[GroupQueue, Depends(get_group_queue)]) -> GroupQueue:
    """`send(job_ids)` for a study's stack group, as `job_sender` (the reaper sends each
    job's own message if it is lost)."""
    return partial(_send_job, enqueue)


StoreDep = Annotated[JobStore, Depends(job_store)]
RegistryDep = Annotated[ModelRegistry, Depends(model_registry)]
ReportsDep = Annotated[StudyReports, Depends(study_reports)]
MetricsDep = Annotated[Metrics, Depends(app_metrics)]
QueueDep = Annotated[JobQueue, Depends(job_sender)]
GroupQueueDep = Annotated[GroupQueue, Depends(group_sender)]
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
