"""HTTP API routes under /api/v1: devices, tags, telemetry, events and tokens (models:
``controller.api.models``, rollouts: ``controller.api.rollouts``)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Query, Request, status

from controller.api.auth import Admin, Operator, Viewer
from controller.api.errors import AUTH, responses
from controller.api.models import bundle_path
from controller.api.params import (
    DeviceId,
    EpochSeconds,
    EventCode,
    FleetSearch,
    Level,
    ModelFilter,
    Offset,
    TagList,
    TokenId,
)
from controller.api.schemas import (
    DeviceList,
    DeviceOut,
    EventList,
    EventOut,
    FleetPageOut,
    TagsIn,
    TagsOut,
    TelemetryList,
    TelemetryOut,
    TokenCreated,
    TokenCreateIn,
    TokenList,
    TokenOut,
    WhoAmI,
)
from controller.db.session import Database
from controller.fleet import devices, history, listing, tokens
from controller.fleet.devices import MAX_TAGS_PER_DEVICE
from controller.fleet.listing import Order, SortKey, StateFilter

__all__ = ["bundle_path", "router"]

router = APIRouter(prefix="/api/v1", responses=AUTH)


def _db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


def _no_device(device_id: str) -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_404_NOT_FOUND,
        detail=f"no device {device_id!r}; `edgefleet devices list` shows the known devices",
    )


@router.get("/whoami", tags=["auth"])
def whoami(token: Viewer) -> WhoAmI:
    """The token's name and role."""
    return WhoAmI(id=token.id, name=token.name, role=token.role)


_Q = Query(description="a device id substring, tag substring or model substring (any case)")
_STATE = Query(description="online; offline (neither online nor revoked); revoked")
_SORT = Query(
    description="sort key; fps and p95 are the largest over the device's streams; "
    "missing values last in both orders, ties by id"
)
_TAGS = Query(description="only devices with all these tags")
_MODEL = Query(description="only devices running name@version")


@router.get("/devices", tags=["devices"])
def list_devices(
    request: Request,
    _token: Viewer,
    tag: Annotated[TagList, _TAGS] = [],  # noqa: B006
    online: bool | None = None,
    model: Annotated[ModelFilter | None, _MODEL] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 1000,
    offset: Annotated[Offset, Query()] = 0,
    q: Annotated[FleetSearch | None, _Q] = None,
    state: Annotated[StateFilter | None, _STATE] = None,
    sort: Annotated[SortKey, _SORT] = "id",
    order: Order = "asc",
) -> DeviceList:
    """Full device records, one page; ``GET /api/v1/fleet`` has the fleet page's summary
    (latest telemetry, counts, total)."""
    with _db(request).connect() as conn:
        ids = listing.page_ids(
            conn,
            q=q,
            tags=tag,
            model=model,
            state=state,
            online=online,
            sort=sort,
            order=order,
            limit=limit,
            offset=offset,
        )
        found = devices.device_records(conn, ids)
    return DeviceList(devices=[DeviceOut.model_validate(d) for d in found])


@router.get("/fleet", tags=["devices"])
def fleet(
    request: Request,
    _token: Viewer,
    q: Annotated[FleetSearch | None, _Q] = None,
    tag: Annotated[TagList, _TAGS] = [],  # noqa: B006
    model: Annotated[ModelFilter | None, _MODEL] = None,
    state: Annotated[StateFilter | None, _STATE] = None,
    sort: Annotated[SortKey, _SORT] = "id",
    order: Order = "asc",
    limit: Annotated[int, Query(ge=1, le=1000)] = 50,
    offset: Annotated[Offset, Query()] = 0,
) -> FleetPageOut:
    """The fleet page: one page of devices with their latest telemetry summary (CPU, memory,
    temperature; fps and p95 per stream), the number matching the filters (``total``) and
    the whole fleet's counts."""
    with _db(request).connect() as conn:
        page = listing.fleet_page(
            conn,
            q=q,
            tags=tag,
            model=model,
            state=state,
            sort=sort,
            order=order,
            limit=limit,
            offset=offset,
        )
    return FleetPageOut.model_validate(page)


@router.get("/devices/{device_id}", tags=["devices"], responses=responses(404))
def get_device(request: Request, device_id: DeviceId, _token: Viewer) -> DeviceOut:
    with _db(request).connect() as conn:
        found = devices.get_device(conn, device_id)
    if found is None:
        raise _no_device(device_id)
    return DeviceOut.model_validate(found)


@router.post(
    "/devices/{device_id}/tags",
    tags=["devices"],
    responses=responses(
        400, 404, 409, 413, e409=f"the device would have more than {MAX_TAGS_PER_DEVICE} tags"
    ),
)
def change_tags(request: Request, device_id: DeviceId, body: TagsIn, _token: Operator) -> TagsOut:
    """Add and remove tags (a tag in both lists is removed); a device keeps at most
    64 tags (409 beyond that)."""
    try:
        with _db(request).begin() as conn:
            tags = devices.set_tags(conn, device_id, add=body.add, remove=body.remove)
    except devices.TooManyTagsError as err:
        raise HTTPException(status_code=status.HTTP_409_CONFLICT, detail=str(err)) from err
    if tags is None:
        raise _no_device(device_id)
    return TagsOut(device_id=device_id, tags=tags)


@router.get("/devices/{device_id}/telemetry", tags=["telemetry"], responses=responses(404))
def telemetry_history(
    request: Request,
    device_id: DeviceId,
    _token: Viewer,
    since: Annotated[EpochSeconds | None, Query(description="epoch seconds, inclusive")] = None,
    until: Annotated[EpochSeconds | None, Query(description="epoch seconds, exclusive")] = None,
    limit: Annotated[int, Query(ge=1, le=100_000)] = 1000,
) -> TelemetryList:
    """The newest ``limit`` samples in the range, oldest first (raw and averaged)."""
    with _db(request).connect() as conn:
        if devices.get_device(conn, device_id) is None:
            raise _no_device(device_id)
        rows = history.telemetry_history(conn, device_id, since=since, until=until, limit=limit)
    return TelemetryList(
        device_id=device_id, samples=[TelemetryOut.model_validate(r) for r in rows]
    )


@router.get("/events", tags=["events"])
def list_events(
    request: Request,
    _token: Viewer,
    device: DeviceId | None = None,
    code: EventCode | None = None,
    level: Annotated[Level | None, Query(description="only events of this level")] = None,
    since: Annotated[EpochSeconds | None, Query(description="epoch seconds, inclusive")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> EventList:
    """The newest matching events, newest first."""
    with _db(request).connect() as conn:
        rows = history.list_events(
            conn, device_id=device, since=since, code=code, level=level, limit=limit
        )
    return EventList(events=[EventOut.model_validate(r) for r in rows])


@router.get("/devices/{device_id}/events", tags=["events"], responses=responses(404))
def device_events(
    request: Request,
    device_id: DeviceId,
    _token: Viewer,
    since: Annotated[EpochSeconds | None, Query(description="epoch seconds, inclusive")] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> EventList:
    with _db(request).connect() as conn:
        if devices.get_device(conn, device_id) is None:
            raise _no_device(device_id)
        rows = history.list_events(conn, device_id=device_id, since=since, limit=limit)
    return EventList(events=[EventOut.model_validate(r) for r in rows])


@router.get("/tokens", tags=["auth"])
def list_tokens(request: Request, _token: Admin, include_revoked: bool = False) -> TokenList:
    with _db(request).connect() as conn:
        rows = tokens.list_tokens(conn, include_revoked=include_revoked)
    return TokenList(tokens=[TokenOut.model_validate(r) for r in rows])


@router.post(
    "/tokens",
    tags=["auth"],
    status_code=status.HTTP_201_CREATED,
    responses=responses(400, 413),
)
def create_token(request: Request, body: TokenCreateIn, _token: Admin) -> TokenCreated:
    with _db(request).begin() as conn:
        info, token = tokens.create_token(
            conn, name=body.name, role=body.role, now=request.app.state.clock()
        )
    return TokenCreated(**TokenOut.model_validate(info).model_dump(), token=token)


@router.delete("/tokens/{token_id}", tags=["auth"], responses=responses(404))
def revoke_token(request: Request, token_id: TokenId, _token: Admin) -> TokenOut:
    with _db(request).begin() as conn:
        if not tokens.revoke_token(conn, token_id, now=request.app.state.clock()):
            raise HTTPException(
                status_code=status.HTTP_404_NOT_FOUND,
                detail=f"no active token with id {token_id}; `edgefleet tokens list` shows them",
            )
        info = next(t for t in tokens.list_tokens(conn, include_revoked=True) if t.id == token_id)
    return TokenOut.model_validate(info)
