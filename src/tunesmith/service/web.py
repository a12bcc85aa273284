"""The web dashboard: static files served at ``/`` by the same process as the API.

The dashboard is a client of the ``/v1`` API and nothing more: the browser sends the user's
API key with each fetch, so it sees exactly what that key's organisation sees, and no route
here touches the store. Closing the page changes nothing on the server.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

ASSETS = Path(__file__).with_name("dashboard")
# Only the dashboard's own files may run or load: no inline script, no third-party origin,
# so an injected string cannot read the API key from sessionStorage and send it elsewhere.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                               "object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
                               "form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}

router = APIRouter(include_in_schema=False)


@router.get("/")
def index() -> FileResponse:
    return FileResponse(ASSETS / "index.html", media_type="text/html",
                        headers=SECURITY_HEADERS)


class _Assets(StaticFiles):
    async def get_response(self, path, scope):  # type: ignore[no-untyped-def]
        response = await super().get_response(path, scope)
        response.headers.update(SECURITY_HEADERS)
        return response


def mount_dashboard(app: FastAPI) -> None:
    """Serve the dashboard at ``/`` and its files under ``/dashboard/``."""
    app.include_router(router)
    app.mount("/dashboard", _Assets(directory=ASSETS), name="dashboard")
