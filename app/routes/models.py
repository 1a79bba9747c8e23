"""Trained models: list them, describe one."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path

from app.deps import RegistryDep
from app.params import ModelCursor, PageSize
from app.schemas import ID_PATTERN, ModelList, ModelOut
from app.schemas import error_responses as _errors

router = APIRouter(tags=["models"])

ModelId = Annotated[str, Path(pattern=ID_PATTERN, description="An id from GET /models.")]


@router.get("/models")
def list_models(
    registry: RegistryDep, limit: PageSize = 100, cursor: ModelCursor = None
) -> ModelList:
    """Trained models with their config and final metrics, newest first, a page at a time."""
    models, next_cursor = registry.page(limit=limit, cursor=cursor)
    return ModelList(models=[ModelOut.model_validate(m) for m in models], next_cursor=next_cursor)


@router.get("/models/{model_id}", responses=_errors(404))
def get_model(model_id: ModelId, registry: RegistryDep) -> ModelOut:
    return ModelOut.model_validate(registry.describe(model_id))
