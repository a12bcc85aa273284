"""The FastAPI application: OpenAI's fine-tuning, files, models and chat APIs, and the web
dashboard (``web``), a client of them served at ``/``.

``create_app(settings)`` builds it; the routes (``routes``) are a few lines each that call the
service's functions. Errors of every kind answer in OpenAI's error shape.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunesmith.errors import ModelError, ServiceError, TunesmithError
from tunesmith.service.chat import ChatService
from tunesmith.service.context import Service
from tunesmith.service.http_errors import error_body, error_headers
from tunesmith.service.inference import ModelCache
from tunesmith.service.routes import router
from tunesmith.service.settings import ServiceSettings
from tunesmith.service.store import Store
from tunesmith.service.web import mount_dashboard
from tunesmith.service.worker import Worker, start_worker_thread

log = logging.getLogger("tunesmith.service")
# pydantic marks which branch of a union failed ("literal['auto']", "constrained-int"); noise
_UNION_MARKERS = ("literal[", "constrained-", "function-", "int", "float", "str", "bool",
                  "list[", "dict[", "json-or-python")


def _error(message: str, status: int, code: str | None = None, param: str | None = None
           ) -> JSONResponse:
    return JSONResponse(error_body(message, status=status, code=code, param=param),
                        status_code=status, headers=error_headers(status))


def _validation_message(err: RequestValidationError) -> tuple[str, str | None]:
    lines, first = [], None
    for e in err.errors():
        loc = [str(p) for p in e.get("loc", ()) if p not in ("body", "query", "path")
               and not str(p).startswith(_UNION_MARKERS)]
        where = ".".join(loc)
        first = first or where or None
        lines.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "; ".join(dict.fromkeys(lines)) or "invalid request", first


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)
    async def _service_error(_: Request, err: ServiceError) -> JSONResponse:
        return _error(str(err), err.status, err.code, err.param)

    @app.exception_handler(TunesmithError)
    async def _tunesmith_error(_: Request, err: TunesmithError) -> JSONResponse:
        # a model that is configured but cannot be loaded is the server's problem, not yours
        status = 500 if isinstance(err, ModelError) else 400
        return _error(str(err), status, type(err).__name__)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(err)
        return _error(message, 400, "invalid_request", param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, err: StarletteHTTPException) -> JSONResponse:
        return _error(str(err.detail), err.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, err: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return _error(f"internal error: {type(err).__name__}", 500, "server_error")


def create_app(settings: ServiceSettings, *, worker: bool = True) -> FastAPI:
    """The application; with ``worker`` it also trains jobs in a background thread."""
    from tunesmith.models.resolve import resolve_model

    for ref in settings.base_models.values():
        resolve_model(ref, home=settings.home)  # a misconfigured model stops the start, loudly
    settings.files_dir.mkdir(parents=True, exist_ok=True)
    settings.runs_dir.mkdir(parents=True, exist_ok=True)
    store = Store(settings.url)
    cache = ModelCache(settings.cache_budget_bytes)
    service = Service(settings, store, cache, ChatService(settings, store, cache))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if settings.torch_threads:
            import torch

            torch.set_num_threads(settings.torch_threads)
        background: tuple[Worker, threading.Thread] | None = None
        if worker:
            w = Worker(settings, store)
            background = (w, start_worker_thread(w))
        try:
            yield
        finally:
            if background is not None:
                background[0].stop()
                background[1].join(timeout=30)
            store.close()

    app = FastAPI(title="tunesmith", version="1", lifespan=lifespan,
                  summary="OpenAI-compatible fine-tuning and chat on your own machines.")
    app.state.service = service
    _install_error_handlers(app)
    app.include_router(router)
    mount_dashboard(app)
    return app
