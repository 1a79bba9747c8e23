"""The REST API. Each route parses (schema, dependencies), makes one call, encodes the answer.

Routes that run models await the inference gate (`app.backpressure`), which runs the model
in threads of its own, a few at a time, so inference never blocks the event loop and never
delays the ops routes, which are `async`. Errors are raised as domain exceptions (app.errors).
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Annotated, Any

import anyio
import numpy as np
from fastapi import APIRouter, Depends, Path, Query, Request, Response
from fastapi.responses import StreamingResponse

from app import events, inference
from app.deps import (
    InferenceDep,
    JobGauges,
    MetricsDep,
    QueueDep,
    RegistryDep,
    Seed,
    SettingsDep,
    StoreDep,
    impute_k,
    job_gauges,
    loglik_k,
    readiness,
    require_token,
    sample_count,
    send_job,
    served_model,
    train_config,
    uploaded_digit,
    uploaded_masked_digit,
    waiting_for,
)
from app.images import MaskedDigit, encode_imputation_strip, encode_png, encode_png_grid
from app.metrics import CONTENT_TYPE
from app.registry import ServedModel
from app.schemas import (
    CURSOR_PATTERN,
    ID_PATTERN,
    MODEL_CURSOR_PATTERN,
    HealthOut,
    ImageFormat,
    ImputationOut,
    JobList,
    JobOut,
    JobStatus,
    LoglikOut,
    ModelList,
    ModelOut,
    ReadyOut,
    ReconstructionOut,
    SamplesOut,
)
from app.schemas import error_responses as _errors
from models.config import TrainConfig

log = logging.getLogger(__name__)
router = APIRouter()

JobId = Annotated[str, Path(pattern=ID_PATTERN, description="The id POST /train returned.")]
ModelId = Annotated[str, Path(pattern=ID_PATTERN, description="An id from GET /models.")]
Model = Annotated[ServedModel, Depends(served_model)]
Digit = Annotated[np.ndarray, Depends(uploaded_digit)]
Masked = Annotated[MaskedDigit, Depends(uploaded_masked_digit)]
Format = Annotated[ImageFormat, Query(description="`png` (an image) or `json` (the pixel values).")]


_MODEL_ERRORS = _errors(404, 409, 503)  # 503: the inference gate is full or timed out
_UPLOAD_ERRORS = _errors(400, 404, 409, 413, 415, 503)
_PNG = {200: {"content": {"image/png": {}}, "description": "PNG by default, JSON on request."}}
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
    tags=["jobs"],
)
def train(
    config: Annotated[TrainConfig, Depends(train_config)],
    store: StoreDep,
    enqueue: QueueDep,
    response: Response,
) -> JobOut:
    """Queue a training job; poll `Location` (GET /jobs/{job_id}) for its progress.

    422 also when the job asks for more compute than the server allows: k*m*batch_size
    importance samples per step above IWAE_MAX_SAMPLES_PER_STEP, or epochs*images*k*m in
    all above IWAE_MAX_TRAIN_SAMPLES; the message names the cost and the limit.
    """
    job = store.create(config.to_dict())
    send_job(enqueue, job.job_id)
    response.headers["Location"] = f"/jobs/{job.job_id}"
    return JobOut.of(job)


@router.get("/jobs", tags=["jobs"])
def list_jobs(
    store: StoreDep,
    status: Annotated[JobStatus | None, Query(description="Only jobs in this state.")] = None,
    study_id: Annotated[
        str | None, Query(pattern=ID_PATTERN, description="Only the cells of this study.")
    ] = None,
    limit: Annotated[int, Query(ge=1, le=10_000, description="At most this many.")] = 1000,
    cursor: Annotated[
        str | None,
        Query(pattern=CURSOR_PATTERN, description="`next_cursor` of the previous page."),
    ] = None,
) -> JobList:
    """Jobs, newest first, a page at a time: pass `next_cursor` back for the next page."""
    jobs, next_cursor = store.page(limit=limit, cursor=cursor, status=status, study_id=study_id)
    return JobList(jobs=[JobOut.of(job) for job in jobs], next_cursor=next_cursor)


@router.get("/jobs/{job_id}", responses=_errors(404), tags=["jobs"])
def get_job(job_id: JobId, store: StoreDep, settings: SettingsDep) -> JobOut:
    """A job's status, progress, metrics and model id; `waiting_for` says why a queued job
    does not start (e.g. no GPU worker is up)."""
    job = store.get(job_id)
    return JobOut.of(job).model_copy(update={"waiting_for": waiting_for(settings, store, job)})


@router.get(
    "/jobs/{job_id}/events",
    response_class=StreamingResponse,
    responses={**_EVENTS, **_errors(404)},
    tags=["jobs"],
)
async def job_events(job_id: JobId, store: StoreDep, request: Request) -> StreamingResponse:
    """The job's progress as server-sent events (`text/event-stream`) until it finishes.

    `event: job` carries the job as GET /jobs/{job_id} shows it, first and at every change;
    a `: keep-alive` comment follows 15 s without one; `event: end` (`{"status": ...}`)
    comes after a finished job's record, or `event: error` (`{"detail": ...}`) when the job
    can no longer be read, and the stream closes. Browsers: `new EventSource(url)`, closed
    by the client on `end` or `error` (EventSource reconnects otherwise).
    """
    read = partial(store.get, job_id)
    first = await anyio.to_thread.run_sync(read)  # 404 before the stream starts
    return StreamingResponse(
        events.job_events(read, first, request.is_disconnected),
        media_type=events.MEDIA_TYPE,
        headers=events.HEADERS,
    )


@router.post(
    "/jobs/{job_id}/cancel",
    status_code=202,
    dependencies=[Depends(require_token)],
    responses=_errors(401, 404, 409),
    tags=["jobs"],
)
def cancel_job(job_id: JobId, store: StoreDep) -> JobOut:
    """Cancel a queued job now, or stop a running one at its next heartbeat (<= 10 s)."""
    return JobOut.of(store.request_cancel(job_id))


@router.get("/models", tags=["models"])
def list_models(
    registry: RegistryDep,
    limit: Annotated[int, Query(ge=1, le=1000, description="At most this many.")] = 100,
    cursor: Annotated[
        str | None,
        Query(pattern=MODEL_CURSOR_PATTERN, description="`next_cursor` of the previous page."),
    ] = None,
) -> ModelList:
    """Trained models with their config and final metrics, newest first, a page at a time."""
    models, next_cursor = registry.page(limit=limit, cursor=cursor)
    return ModelList(models=[ModelOut.model_validate(m) for m in models], next_cursor=next_cursor)


@router.get("/models/{model_id}", responses=_errors(404), tags=["models"])
def get_model(model_id: ModelId, registry: RegistryDep) -> ModelOut:
    return ModelOut.model_validate(registry.describe(model_id))


@router.get(
    "/samples", response_model=SamplesOut, responses={**_PNG, **_MODEL_ERRORS}, tags=["models"]
)
async def samples(
    call: InferenceDep,
    model: Model,
    n: Annotated[int, Depends(sample_count)],
    seed: Seed = None,
    format: Format = "png",
) -> Any:
    """Digits drawn from the model: a PNG grid, or JSON with 784 Bernoulli means each."""
    return await call(_samples_answer, model, n, seed, format)


def _samples_answer(model: ServedModel, n: int, seed: int | None, format: str) -> Response:
    """Drawn and encoded in the inference thread: encoding 1024 digits takes about 0.5 s,
    which on the event loop would stall every other request."""
    images = inference.sample(model, n, seed)  # [n, 784]
    if format == "png":
        return Response(encode_png_grid(images), media_type="image/png")
    body = SamplesOut(model_id=model.model_id, samples=np.round(images, 4).tolist())
    return Response(body.model_dump_json(), media_type="application/json")


@router.post(
    "/reconstruct",
    response_model=ReconstructionOut,
    responses={**_PNG, **_UPLOAD_ERRORS},
    tags=["models"],
)
async def reconstruct(
    call: InferenceDep, digit: Digit, model: Model, format: Format = "png"
) -> Any:
    """The uploaded digit passed through the encoder's mean and the decoder."""
    image = await call(inference.reconstruct, model, digit)  # [784]
    if format == "png":
        return Response(encode_png(image), media_type="image/png")
    return ReconstructionOut(
        model_id=model.model_id, input=digit.tolist(), reconstruction=np.round(image, 4).tolist()
    )


@router.post("/loglik", responses=_UPLOAD_ERRORS, tags=["models"])
async def loglik(
    call: InferenceDep,
    digit: Digit,
    model: Model,
    k: Annotated[int, Depends(loglik_k)],
    settings: SettingsDep,
    seed: Seed = None,
) -> LoglikOut:
    """log p(x) of the uploaded digit, estimated with K importance samples, in nats.

    Stops between chunks of samples at IWAE_INFERENCE_TIMEOUT_S or when the client leaves.
    """
    score = await call(
        inference.score,
        model,
        digit,
        k,
        chunk_size=settings.loglik_chunk_size,
        seed=seed,
        on_chunk=call.check,
    )
    return LoglikOut(
        model_id=model.model_id,
        k=k,
        log_likelihood=score.log_likelihood,
        std_error=score.std_error,
        elbo=score.elbo,
        bits_per_dim=score.bits_per_dim,
        ess=score.ess,
        pareto_k=score.pareto_k,
    )


@router.post(
    "/impute",
    response_model=ImputationOut,
    responses={**_PNG, **_UPLOAD_ERRORS},
    tags=["models"],
)
async def impute(
    call: InferenceDep,
    masked: Masked,
    model: Model,
    k: Annotated[int, Depends(impute_k)],
    n: Annotated[int, Query(ge=0, le=64, description="Multiple imputations to draw.")] = 8,
    seed: Seed = None,
    format: Format = "png",
) -> Any:
    """Fill in the missing pixels: a PNG strip (input, mask, single imputation, n draws), or
    JSON. Any trained model works; one trained with `missing_rate` > 0 should do better."""
    return await call(_impute_answer, model, masked, k, n, seed, format)


def _impute_answer(
    model: ServedModel, masked: MaskedDigit, k: int, n: int, seed: int | None, format: str
) -> Response:
    """Imputed and encoded in the inference thread, like `_samples_answer`."""
    result = inference.impute(model, masked.digit, masked.missing, k, n, seed)
    if format == "png":
        return Response(
            encode_imputation_strip(masked, result.single, result.draws), media_type="image/png"
        )
    body = ImputationOut(
        model_id=model.model_id,
        k=k,
        input=masked.digit.tolist(),
        missing=masked.missing.astype(int).tolist(),
        single=np.round(result.single, 4).tolist(),
        draws=result.draws.tolist(),
        observed_log_likelihood=result.observed_log_likelihood,
    )
    return Response(body.model_dump_json(), media_type="application/json")


@router.get("/healthz", tags=["ops"])
async def healthz() -> HealthOut:
    """The process is alive."""
    return HealthOut()


@router.get("/readyz", responses=_errors(503), tags=["ops"])
async def readyz(ready: Annotated[ReadyOut, Depends(readiness)]) -> ReadyOut:
    """Storage is writable and the job store and broker answer; 503 otherwise."""
    return ready


@router.get("/metrics", response_class=Response, tags=["ops"])
async def metrics(
    metrics: MetricsDep, gauges: Annotated[JobGauges, Depends(job_gauges)]
) -> Response:
    """Prometheus text: requests and latencies per route, jobs per status, queue depth,
    live workers and what they handled. Reads a few keys, whatever the job history.
    """
    return Response(metrics.render(*gauges), media_type=CONTENT_TYPE)
