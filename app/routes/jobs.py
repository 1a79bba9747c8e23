"""Training jobs: queue one, list them, follow one (JSON or server-sent events), cancel one."""

from __future__ import annotations

from functools import partial
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import StreamingResponse

from app import events
from app.deps import QueueDep, SettingsDep, StoreDep, require_token
from app.health import waiting_for
from app.params import Cursor
from app.planning import train_config
from app.schemas import ID_PATTERN, JobList, JobOut, JobStatus
from app.schemas import error_responses as _errors
from models.config import TrainConfig

router = APIRouter(tags=["jobs"])

JobId = Annotated[str, Path(pattern=ID_PATTERN, description="The id POST /train returned.")]

_EVENTS = {
    200: {
        "content": {events.MEDIA_TYPE: {"schema": {"type": "string"}}},
        "description": "A stream of server-sent events that ends when the job does.",
    }
}


@router.post(
    "/train",
    status_code=202,
    dependencies=[Depends(require_token)],
    # 400: a body FastAPI cannot parse at all (not UTF-8, nested too deeply); 413: too big.
    responses=_errors(400, 401, 413, 429, 503),
)
def train(
    config: Annotated[TrainConfig, Depends(train_config)],
    store: StoreDep,
    send_job: QueueDep,
    response: Response,
) -> JobOut:
    """Queue a training job; poll `Location` (GET /jobs/{job_id}) for its progress.

    422 also when the job asks for more compute than the server allows: k*m*batch_size
    importance samples per step above IWAE_MAX_SAMPLES_PER_STEP, or FLOPs (the network's
    width counted) above IWAE_MAX_STEP_FLOPS per step or IWAE_MAX_TRAIN_FLOPS in all; the
    message names the cost and the limit.
    """
    job = store.create(config.to_dict())
    send_job(job.job_id)
    response.headers["Location"] = f"/jobs/{job.job_id}"
    return JobOut.of(job)


@router.get("/jobs")
def list_jobs(
    store: StoreDep,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this state.")] = None,
    study_id: Annotated[
        str | None, Query(pattern=ID_PATTERN, description="Only the cells of this study.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=10_000, description="At most this many.")] = 1000,
    cursor: Cursor = None,
) -> JobList:
    """Jobs, newest first, a page at a time: pass `next_cursor` back for the next page."""
    jobs, next_cursor = store.page(limit=limit, cursor=cursor, status=status, study_id=study_id)
    return JobList(jobs=[JobOut.of(job) for job in jobs], next_cursor=next_cursor)


@router.get("/jobs/{job_id}", responses=_errors(404))
def get_job(job_id: JobId, store: StoreDep, settings: SettingsDep) -> JobOut:
    """A job's status, progress, metrics and model id; `waiting_for` says why a queued job
    does not start (e.g. no GPU worker is up)."""
    job = store.get(job_id)
    return JobOut.of(job).model_copy(update={"waiting_for": waiting_for(settings, store, job)})


@router.get(
    "/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses={**_EVENTS, **_errors(404, 429)},
)
async def job_events(job_id: JobId, store: StoreDep, request: Request) -> StreamingResponse:
    """The job's progress as server-sent events (`text/event-stream`) until it finishes.

    `event: job` carries the job as GET /jobs/{job_id} shows it, first and at every change;
    a `: keep-alive` comment follows 15 s without one; `event: end` (`{"status": ...}`)
    comes after a finished job's record, or `event: error` (`{"detail": ...}`) when the job
    can no longer be read, and the stream closes. Browsers: `new EventSource(url)`, closed
    by the client on `end` or `error` (EventSource reconnects otherwise). At most
    IWAE_MAX_EVENT_STREAMS streams are open at once (429 with Retry-After past it), each
    for at most IWAE_EVENT_STREAM_MAX_S, after which it closes and EventSource reconnects.
    """
    streams: events.EventStreams = request.app.state.streams
    read = partial(store.get, job_id)
    first = await streams.read(read)  # 404 before the stream starts
    return streams.respond(read, first, request.is_disconnected)


@router.post(
    "/jobs/{job_id}/cancel",
    status_code=202,
    dependencies=[Depends(require_token)],
    responses=_errors(401, 404, 409),
)
def cancel_job(job_id: JobId, store: StoreDep) -> JobOut:
    """Cancel a queued job now, or stop a running one at its next heartbeat (<= 10 s)."""
    return JobOut.of(store.request_cancel(job_id))
