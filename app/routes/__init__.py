"""The REST API, one module per resource; `router` includes them all.

Each route parses (schema, dependencies), makes one call, encodes the answer; errors are
raised as domain exceptions (`app.errors`). The order here is the order of the OpenAPI paths.
"""

from __future__ import annotations

from fastapi import APIRouter

from app.routes import inference, jobs, models, operations, studies

router = APIRouter()
for module in (jobs, models, inference, operations, studies):
    router.include_router(module.router)
