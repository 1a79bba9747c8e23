"""K studies: a grid of training jobs, its results and its report.

A study's cells are ordinary training jobs, queued at once: one message per stack group
(cells whose training steps share a shape, `models.stacked.stack_groups`), which one worker
trains as one stacked model, each cell keeping its own job record, model and cancel.
Everything shown about a study is read from its cells' job records when asked; the report
(HTML and PNG figures) is built then too, at the inference gate (it loads the cells' models
and draws with matplotlib), and kept on disk until a cell changes status
(`models.study.cache.StudyReports`).
"""

from __future__ import annotations

from pathlib import Path as FilePath
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Response
from fastapi.responses import FileResponse

from app.deps import GroupQueueDep, InferenceDep, RegistryDep, ReportsDep, StoreDep, require_token
from app.errors import FigureNotFound
from app.params import Cursor, PageSize
from app.planning import StudyPlan, study_plan
from app.schemas import (
    ID_PATTERN,
    RESULTS_EXAMPLE,
    StudyList,
    StudyOut,
    StudySummaryOut,
    error_responses,
)
from models.study.cache import StudyReports
from models.study.report import FIGURE_NAMES
from worker.jobs import JobStore

router = APIRouter(tags=["studies"])

StudyId = Annotated[str, Path(pattern=ID_PATTERN, description="The id POST /studies returned.")]


# 409: no cell has succeeded yet; 503: the inference gate is full, or no MNIST test images.
_REPORT_ERRORS = error_responses(404, 409, 503)


@router.post(
    "/studies",
    status_code=202,
    dependencies=[Depends(require_token)],
    responses=error_responses(400, 401, 413, 429, 503),
)
def create_study(
    plan: Annotated[StudyPlan, Depends(study_plan)],
    store: StoreDep,
    send_group: GroupQueueDep,
    registry: RegistryDep,
    response: Response,
) -> StudyOut:
    """Queue one training job per cell (objective, k, seed) at once, a message per group of
    cells that train stacked (same K and network: seeds, objectives), so that every idle
    worker takes a group; poll `Location` (GET /studies/{study_id}).

    422 for a grid over IWAE_MAX_STUDY_JOBS cells, an empty or repeated list, an unknown
    field (k, objective and seed come from the grid), or a cell over the compute budget of
    POST /train. 429 (nothing queued) when the cells would take the queued and running jobs
    past IWAE_MAX_ACTIVE_JOBS.
    """
    study = store.create_study(plan.config.to_dict(), plan.cells)
    for group in plan.groups:
        send_group([study.cells[i].job_id for i in group])
    response.headers["Location"] = f"/studies/{study.study_id}"
    view = store.view(study)
    return StudyOut.of(view, view.results(registry.checkpoint))


@router.get("/studies")
def list_studies(store: StoreDep, limit: PageSize = 100, cursor: Cursor = None) -> StudyList:
    """Studies with their status and cells by status, newest first, a page at a time."""
    studies, next_cursor = store.study_page(limit=limit, cursor=cursor)
    summaries = [StudySummaryOut.of(store.view(study)) for study in studies]
    return StudyList(studies=summaries, next_cursor=next_cursor)


@router.get("/studies/{study_id}", responses=error_responses(404))
def get_study(study_id: StudyId, store: StoreDep, registry: RegistryDep) -> StudyOut:
    """The study's status, each cell's job (status, progress, error), and the results of
    the cells that ended."""
    view = store.study(study_id)
    return StudyOut.of(view, view.results(registry.checkpoint))


@router.get(
    "/studies/{study_id}/results.json",
    responses={
        200: {"content": {"application/json": {"example": RESULTS_EXAMPLE}}},
        **error_responses(404),
    },
)
def study_results(study_id: StudyId, store: StoreDep, registry: RegistryDep) -> dict[str, Any]:
    """Every cell with the config and seed that produced its numbers, and the summary per
    (objective, k): the `results` of GET /studies/{study_id}, and the report's numbers."""
    return store.study(study_id).results(registry.checkpoint)


@router.get(
    "/studies/{study_id}/report",
    response_class=FileResponse,
    responses={
        200: {"content": {"text/html": {}}, "description": "One self-contained HTML page."},
        **_REPORT_ERRORS,
    },
)
async def study_report(
    call: InferenceDep, study_id: StudyId, store: StoreDep, reports: ReportsDep
) -> FileResponse:
    """The report: tables and figures (embedded, so the page reads offline) of the cells
    that succeeded. Built when first asked after a cell ends (seconds); 409 until one cell
    has succeeded."""
    folder = await call(_report_folder, store, reports, study_id)
    return FileResponse(folder / "report.html", media_type="text/html")


@router.get(
    "/studies/{study_id}/figures/{name}.png",
    response_class=FileResponse,
    responses={200: {"content": {"image/png": {}}}, **_REPORT_ERRORS},
)
async def study_figure(
    call: InferenceDep,
    study_id: StudyId,
    name: Annotated[str, Path(description=f"One of {', '.join(FIGURE_NAMES)}.")],
    store: StoreDep,
    reports: ReportsDep,
) -> FileResponse:
    """One figure of the report, as a PNG."""
    if name not in FIGURE_NAMES:
        raise FigureNotFound(f"no figure {name!r}; the figures are {', '.join(FIGURE_NAMES)}")
    folder = await call(_report_folder, store, reports, study_id)
    return FileResponse(folder / "figures" / f"{name}.png", media_type="image/png")


def _report_folder(store: JobStore, reports: StudyReports, study_id: str) -> FilePath:
    return reports.folder(store.study(study_id))


@router.post(
    "/studies/{study_id}/cancel",
    status_code=202,
    dependencies=[Depends(require_token)],
    responses=error_responses(401, 404),
)
def cancel_study(study_id: StudyId, store: StoreDep, registry: RegistryDep) -> StudyOut:
    """Cancel the study's unfinished cells: queued ones at once, running ones at their next
    heartbeat (<= 10 s). Finished cells keep their results."""
    view = store.cancel_study(study_id)
    return StudyOut.of(view, view.results(registry.checkpoint))
