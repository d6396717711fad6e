"""The web dashboard at /ui: static HTML, CSS and JavaScript modules shipped in the package
(src/overnight/api/ui, no build step). The page holds no secrets and needs no key to load; it
signs in with an API key and calls the public API (/v1/files, /v1/batches, /v1/models) and the
admin routes (/v1/admin/...) like any other client."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.responses import RedirectResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

UI_DIR = Path(__file__).with_name("ui")
# Only this origin's scripts and styles, no inline script, no framing: the key the page holds in
# sessionStorage is out of reach of injected markup, and no other site can frame the page.
_HEADERS = {
    "content-security-policy": "default-src 'self'; img-src 'self' data:; object-src 'none'; "
    "base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    # Served from the package; a stale copy after an upgrade would call routes that changed.
    "cache-control": "no-cache",
}


class DashboardFiles(StaticFiles):
    """StaticFiles with the headers above on every answer."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers.update(_HEADERS)
        return response


def mount_dashboard(app: FastAPI) -> None:
    @app.get("/ui", include_in_schema=False)
    def dashboard_root() -> Response:
        return RedirectResponse("/ui/", status_code=307)

    app.mount("/ui", DashboardFiles(directory=UI_DIR, html=True), name="ui")
