"""HTTP API routes of camera snapshots: the latest JPEG per stream of a device (viewer role).

The agent publishes them with ``[snapshots] enabled = true`` (README, "Agent
configuration"); the controller keeps the latest per stream (``controller.fleet.snapshots``).
"""

from __future__ import annotations

import hashlib
from typing import Annotated

from fastapi import APIRouter, Header, HTTPException, Request, Response, status
from pydantic import BaseModel, Field

from controller.api.auth import Viewer
from controller.api.errors import AUTH, responses
from controller.api.params import DeviceId, HeaderText
from controller.db.session import Database
from controller.fleet import devices
from controller.fleet.snapshots import list_snapshots, read_snapshot

router = APIRouter(prefix="/api/v1", responses=AUTH)

StreamName = DeviceId
"""Stream names follow the device-id rule (protocol.limits.NAME_BODY)."""
JPEG = "image/jpeg"


class SnapshotDetection(BaseModel):
    label: str
    score: float = Field(description="0 to 1")
    box: list[float] = Field(
        description="[xmin, ymin, xmax, ymax], normalized to the image (0 to 1)",
        min_length=4,
        max_length=4,
    )


class SnapshotOut(BaseModel):
    stream: str
    ts: float = Field(description="when the frame was captured (device clock, epoch s)")
    received_at: float = Field(description="when the controller received it (epoch s)")
    model: str | None = Field(description="name@version of the model whose boxes are drawn")
    width: int = Field(description="of the JPEG, pixels")
    height: int = Field(description="of the JPEG, pixels")
    detections: list[SnapshotDetection]
    bytes: int = Field(description="size of the JPEG")


class SnapshotList(BaseModel):
    snapshots: list[SnapshotOut] = Field(description="one per stream, by stream name")


def _db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


def _no_device(device_id: str) -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_404_NOT_FOUND,
        detail=f"no device {device_id!r}; `edgefleet devices list` shows the known devices",
    )


@router.get(
    "/devices/{device_id}/snapshots",
    tags=["devices"],
    responses=responses(404, e404="no such device"),
)
def get_snapshots(request: Request, device_id: DeviceId, _token: Viewer) -> SnapshotList:
    """The latest snapshot of each stream of the device (without the images; fetch one
    with ``GET /api/v1/devices/{device_id}/snapshots/{stream}``). Empty while the device
    sent none (the agent's ``[snapshots]`` is off by default)."""
    with _db(request).connect() as conn:
        if devices.get_device(conn, device_id) is None:
            raise _no_device(device_id)
        found = list_snapshots(conn, device_id)
    return SnapshotList(
        snapshots=[
            SnapshotOut(
                stream=s.stream,
                ts=s.ts,
                received_at=s.received_at,
                model=s.model,
                width=s.width,
                height=s.height,
                detections=[SnapshotDetection.model_validate(d) for d in s.detections],
                bytes=s.bytes,
            )
            for s in found
        ]
    )


@router.get(
    "/devices/{device_id}/snapshots/{stream}",
    tags=["devices"],
    response_class=Response,
    responses={
        200: {
            "description": "the JPEG, boxes and labels drawn",
            "content": {JPEG: {"schema": {"type": "string", "format": "binary"}}},
        },
        304: {"description": "not modified (If-None-Match)"},
        **responses(404, e404="no such device, or no snapshot of that stream"),
    },
)
def get_snapshot_image(
    request: Request,
    device_id: DeviceId,
    stream: StreamName,
    _token: Viewer,
    if_none_match: Annotated[HeaderText | None, Header()] = None,
) -> Response:
    """The latest snapshot of one stream as ``image/jpeg``, with an ETag (``Cache-Control:
    no-cache``: revalidate with ``If-None-Match``, a new snapshot replaces it)."""
    with _db(request).connect() as conn:
        found = read_snapshot(conn, device_id, stream)
        known = found is not None or devices.get_device(conn, device_id) is not None
    if not known:
        raise _no_device(device_id)
    if found is None:
        raise HTTPException(
            status_code=status.HTTP_404_NOT_FOUND,
            detail=(
                f"device {device_id!r} has no snapshot of stream {stream!r}; the agent sends "
                "them with `[snapshots] enabled = true`, from a frame with a detection"
            ),
        )
    etag = f'"{hashlib.sha256(found.jpeg).hexdigest()[:32]}"'
    headers = {"ETag": etag, "Cache-Control": "no-cache"}
    if if_none_match is not None and etag in {t.strip() for t in if_none_match.split(",")}:
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    return Response(content=found.jpeg, media_type=JPEG, headers=headers)
