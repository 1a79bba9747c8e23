"""Operations: liveness, readiness and Prometheus metrics.

These routes are `async` and do their blocking reads in the app's own ops threads, so they
answer while inference and uploads fill every other thread.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Response

from app.deps import MetricsDep
from app.health import JobGauges, job_gauges, readiness
from app.metrics import CONTENT_TYPE
from app.schemas import HealthOut, ReadyOut
from app.schemas import error_responses as _errors

router = APIRouter(tags=["ops"])


@router.get("/healthz")
async def healthz() -> HealthOut:
    """The process is alive."""
    return HealthOut()


@router.get("/readyz", responses=_errors(503))
async def readyz(ready: Annotated[ReadyOut, Depends(readiness)]) -> ReadyOut:
    """Storage is writable and the job store and broker answer; 503 otherwise."""
    return ready


@router.get("/metrics", response_class=Response)
async def metrics(
    metrics: MetricsDep, gauges: Annotated[JobGauges, Depends(job_gauges)]
) -> Response:
    """Prometheus text: requests and latencies per route, jobs per status, queue depth,
    live workers and what they handled. Reads a few keys, whatever the job history.
    """
    return Response(metrics.render(*gauges), media_type=CONTENT_TYPE)
