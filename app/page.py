"""The web page at `GET /`: static HTML, CSS and JavaScript shipped in the package.

No build step and nothing fetched from elsewhere: the page is `static/index.html`, its script
and its style sheet, and it talks only to the public REST endpoints (it is their first
client). The Content-Security-Policy keeps it that way: scripts, styles, images and requests
may only come from this server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response

STATIC_DIR = Path(__file__).resolve().parent / "static"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


# Browsers revalidate the files at every load (an ETag, then 304 while unchanged), so a page
# and its script never come from two different versions of the service.
REVALIDATE = {"Cache-Control": "no-cache"}


class _RevalidatedFiles(StaticFiles):
    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers.update(REVALIDATE)
        return response


def page() -> FileResponse:
    headers = {"Content-Security-Policy": CSP, **REVALIDATE}
    return FileResponse(STATIC_DIR / "index.html", headers=headers)


def install_page(app: FastAPI) -> None:
    """`GET /` (the page) and `/static/...` (its files); both outside the OpenAPI schema."""
    app.add_api_route("/", page, methods=["GET"], include_in_schema=False)
    app.mount("/static", _RevalidatedFiles(directory=STATIC_DIR, check_dir=False), name="static")
