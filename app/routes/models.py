"""Trained models: list them, describe one."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query

from app.deps import RegistryDep
from app.schemas import ID_PATTERN, MODEL_CURSOR_PATTERN, ModelList, ModelOut
from app.schemas import error_responses as _errors

router = APIRouter(tags=["models"])

ModelId = Annotated[str, Path(pattern=ID_PATTERN, description="An id from GET /models.")]


@router.get("/models")
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


@router.get("/models/{model_id}", responses=_errors(404))
def get_model(model_id: ModelId, registry: RegistryDep) -> ModelOut:
    return ModelOut.model_validate(registry.describe(model_id))
