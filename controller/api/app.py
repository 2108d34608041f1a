"""The FastAPI application: routes, /healthz (liveness), /readyz (readiness: database and
MQTT), /metrics; state lives on ``app.state``."""

from __future__ import annotations

import time
from collections.abc import Callable

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from controller.api import errors
from controller.api.auth import AuthLimiter
from controller.api.bodylimit import BodyLimit
from controller.api.credentials import router as credentials_router
from controller.api.models import ModelRows
from controller.api.models import router as models_router
from controller.api.params import MAX_JSON_BODY_BYTES
from controller.api.rollouts import router as rollouts_router
from controller.api.routes import router
from controller.api.schemas import Health
from controller.api.snapshots import router as snapshots_router
from controller.console import install as install_console
from controller.db.session import Database
from controller.ingest.stats import IngestSnapshot
from controller.metrics import build_registry

API_VERSION = "0.1.0"


def create_app(
    *,
    db: Database,
    ingest_snapshot: Callable[[], IngestSnapshot] | None = None,
    clock: Callable[[], float] = time.time,
    auth_limiter: AuthLimiter | None = None,
) -> FastAPI:
    """Build the app for ``db``; ``ingest_snapshot`` feeds /metrics and /healthz (optional).

    ``auth_limiter`` limits failed token attempts per client address (default: 10 per
    60 s, see ``controller.api.auth``).
    """
    app = FastAPI(
        title="edgefleet controller",
        version=API_VERSION,
        description=(
            "Fleet state of edgefleet devices. Authenticate with `Authorization: Bearer TOKEN` "
            "(roles: viewer < operator < admin); create tokens with `edgefleet tokens create`."
        ),
    )
    app.state.db = db
    app.state.clock = clock
    app.state.ingest_snapshot = ingest_snapshot
    app.state.auth_limiter = auth_limiter if auth_limiter is not None else AuthLimiter()
    app.state.model_rows = ModelRows()
    app.state.registry = build_registry(
        db=db, ingest_snapshot=ingest_snapshot, auth=app.state.auth_limiter
    )
    errors.install(app)
    app.add_middleware(BodyLimit, max_bytes=MAX_JSON_BODY_BYTES)
    app.include_router(router)
    app.include_router(models_router)
    app.include_router(rollouts_router)
    app.include_router(credentials_router)
    install_console(app)  # the web console under /ui (controller.console)
    app.include_router(snapshots_router)

    @app.get("/healthz", tags=["ops"], responses={503: {"model": Health}})
    def healthz(request: Request) -> Response:
        """200 when the database answers (status "degraded" while MQTT is down), else 503."""
        try:
            request.app.state.db.ping()
            database = "ok"
        except Exception:  # noqa: BLE001 - report, do not fail the probe itself
            database = "unreachable"
        snap = request.app.state.ingest_snapshot
        if snap is None:
            mqtt = "not running"
        else:
            mqtt = "connected" if snap().mqtt_connected else "disconnected"
        ok = database == "ok"
        healthy = ok and mqtt != "disconnected"
        body = Health(status="ok" if healthy else "degraded", database=database, mqtt=mqtt)  # type: ignore[arg-type]
        return JSONResponse(body.model_dump(), status_code=200 if ok else 503)

    @app.get(
        "/readyz",
        tags=["ops"],
        responses={503: {"description": "not ready: the database or the MQTT connection is down"}},
    )
    def readyz(request: Request) -> Response:
        """Readiness (send traffic here?): 200 only when the database answers AND the MQTT
        connection is up; 503 otherwise. ``rollout_leader``: this replica drives rollouts
        (holds the PostgreSQL rollout lock; always true on SQLite, null when disabled)."""
        try:
            request.app.state.db.ping()
            database = "ok"
        except Exception:  # noqa: BLE001 - report, do not fail the probe itself
            database = "unreachable"
        snap = request.app.state.ingest_snapshot
        mqtt = (
            "not running"
            if snap is None
            else ("connected" if snap().mqtt_connected else "disconnected")
        )
        ready = database == "ok" and mqtt == "connected"
        leadership = getattr(request.app.state, "rollouts_leadership", None)
        body = {
            "status": "ready" if ready else "not ready",
            "database": database,
            "mqtt": mqtt,
            "rollout_leader": None if leadership is None else bool(leadership.held),
        }
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["ops"], response_class=Response)
    def metrics(request: Request) -> Response:
        """Prometheus text format: fleet gauges and ingest figures."""
        return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)

    return app
