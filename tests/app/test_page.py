"""GET /: the web page's files are served, self-contained, and call only the public API.

The page itself is exercised in a real browser by tests/web/test_page_browser.py.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path, PurePosixPath

from fastapi.testclient import TestClient

from app.page import STATIC_DIR

REPO_ROOT = Path(__file__).resolve().parents[2]
SVG_NAMESPACE = "http://www.w3.org/2000/svg"  # a name, never fetched


def test_the_page_and_its_files_are_served(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    csp = page.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert page.headers["cache-control"] == "no-cache"
    for path, kind in (("/static/app.js", "javascript"), ("/static/style.css", "text/css")):
        assert f'"{path}"' in page.text
        response = client.get(path)
        assert response.status_code == 200 and kind in response.headers["content-type"]
        assert response.headers["cache-control"] == "no-cache"  # revalidated at every load
        again = client.get(path, headers={"If-None-Match": response.headers["etag"]})
        assert again.status_code == 304
    assert client.get("/static/nope.js").status_code == 404


def test_the_page_is_not_part_of_the_api_schema(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and not any(path.startswith("/static") for path in paths)


def test_nothing_is_loaded_from_another_server() -> None:
    for path in STATIC_DIR.iterdir():
        text = path.read_text().replace(SVG_NAMESPACE, "")
        assert not re.search(r"https?:|//[a-z0-9.-]+\.[a-z]{2,}/", text, re.I), path.name
        assert "@import" not in text and "@font-face" not in text, path.name


def test_the_script_calls_only_routes_of_the_api(client: TestClient) -> None:
    """Every URL in app.js is an OpenAPI path: nothing on the page that the API does not do."""
    api = {re.sub(r"\{[^}]+\}", "{}", path) for path in client.get("/openapi.json").json()["paths"]}
    script = (STATIC_DIR / "app.js").read_text()
    called = re.findall(r"""["`](/[a-z][^"`?]*)""", script)
    assert len(called) >= 8
    for url in called:
        path = re.sub(r"\$\{[^}]+\}", "{}", url)
        assert path == "/openapi.json" or path in api, url


def test_every_static_file_is_packaged() -> None:
    """`pip install .` (the Docker image) ships the files that `GET /` serves."""
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["app"]
    for path in STATIC_DIR.rglob("*"):
        name = PurePosixPath(path.relative_to(STATIC_DIR.parent).as_posix())
        matched = any(
            len(name.parts) == len(PurePosixPath(p).parts) and name.match(p) for p in patterns
        )
        assert path.is_dir() or matched, name


def _luminance(colour: str) -> float:
    """Relative luminance of #rrggbb (WCAG 2.1, "relative luminance")."""
    channels = [int(colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
    r, g, b = [c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4 for c in channels]
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def _contrast(a: str, b: str) -> float:
    high, low = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (high + 0.05) / (low + 0.05)


def test_text_colours_meet_wcag_aa_contrast() -> None:
    """Every text/background pair the style sheet uses: 4.5:1 for text, 3:1 for the focus ring."""
    css = (STATIC_DIR / "style.css").read_text()
    colour = dict(re.findall(r"--([a-z-]+):\s*(#[0-9a-f]{6});", css))
    text_pairs = [
        ("ink", "paper"), ("ink", "panel"), ("muted", "paper"), ("muted", "panel"),
        ("accent", "paper"), ("accent", "panel"), ("accent-ink", "accent"), ("bad", "paper"),
        ("bad", "panel"), ("paper", "ok"), ("paper", "bad"), ("paper", "wait"), ("paper", "off"),
    ]  # fmt: skip
    for fg, bg in text_pairs:
        assert _contrast(colour[fg], colour[bg]) >= 4.5, (fg, bg)
    assert min(_contrast(colour["focus"], colour[bg]) for bg in ("paper", "panel")) >= 3
