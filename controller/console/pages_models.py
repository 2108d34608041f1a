"""The model registry pages: versions, and one version's lineage, golden samples and devices."""

from __future__ import annotations

import tarfile
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from controller.blobstore import ModelHosting
from controller.console.render import render
from controller.console.session import ConsoleUser, PageError, viewer
from controller.errors import ControllerError
from controller.fleet.devices import device_records, model_counts
from controller.fleet.listing import page_ids
from controller.fleet.registry import ModelInfo, get_model, list_models

router = APIRouter()

RUNNING_LIMIT = 500
"""Most devices the detail page lists as running a version."""
MAX_GOLDEN_BYTES = 8 << 20


@router.get("/models")
def models_page(request: Request, _user: Annotated[ConsoleUser, Depends(viewer)]) -> Response:
    with request.app.state.db.connect() as conn:
        found = list_models(conn)
        running = model_counts(conn)
    return render(request, "models.html", models=found, running=running)


def _model(request: Request, name: str, version: str) -> ModelInfo:
    with request.app.state.db.connect() as conn:
        found = get_model(conn, name, version)
    if found is None:
        raise PageError(
            404, f"no model {name[:64]}@{version[:64]}; the models page lists the registry"
        )
    return found


def _golden(m: ModelInfo) -> list[dict[str, Any]]:
    """The manifest's golden samples: image path and expected (label, score, box) boxes."""
    out = []
    for i, sample in enumerate(m.manifest.get("golden") or []):
        boxes = []
        for det in sample.get("expected") or []:
            label, score, box = det[0], float(det[1]), [float(v) for v in det[2]]
            boxes.append({"label": str(label), "score": score, "box": box})
        out.append({"index": i, "image": str(sample.get("image", "")), "boxes": boxes})
    return out


@router.get("/models/{name}/{version}")
def model_page(
    request: Request, name: str, version: str, _user: Annotated[ConsoleUser, Depends(viewer)]
) -> Response:
    m = _model(request, name, version)
    with request.app.state.db.connect() as conn:
        running = device_records(conn, page_ids(conn, model=m.ref, limit=RUNNING_LIMIT))
    lineage = m.lineage or {}
    return render(
        request,
        "model.html",
        model=m,
        lineage=lineage,
        golden=_golden(m),
        running=running,
        running_limit=RUNNING_LIMIT,
    )


@router.get("/models/{name}/{version}/golden/{index}")
def golden_image(
    request: Request,
    name: str,
    version: str,
    index: int,
    _user: Annotated[ConsoleUser, Depends(viewer)],
) -> Response:
    """The golden sample image ``index`` read from the model's bundle in the blob store."""
    m = _model(request, name, version)
    samples = _golden(m)
    if not 0 <= index < len(samples):
        raise PageError(404, f"{m.ref} has no golden sample {index}")
    hosting: ModelHosting | None = getattr(request.app.state, "models", None)
    if hosting is None:
        raise PageError(404, "this controller does not host models (no blob store configured)")
    member = samples[index]["image"]
    data = _golden_bytes(hosting, m, member)
    if data is None:
        raise PageError(404, f"the bundle of {m.ref} has no readable {member!r}")
    media = "image/png" if data.startswith(b"\x89PNG") else "application/octet-stream"
    return Response(data, media_type=media, headers={"Cache-Control": "private, max-age=3600"})


def _golden_bytes(hosting: ModelHosting, m: ModelInfo, member: str) -> bytes | None:
    """``member`` of the bundle, read forward from whichever store keeps it (models.storage)."""
    from controller.artifacts import open_bundle_stream

    try:
        with (
            open_bundle_stream(hosting.holder(m.sha256)[0], m.sha256, m.size) as raw,
            tarfile.open(fileobj=raw, mode="r|*") as tar,
        ):
            for info in tar:
                if info.name == member:
                    if not info.isfile() or info.size > MAX_GOLDEN_BYTES:
                        return None
                    f = tar.extractfile(info)
                    return f.read() if f is not None else None
    except (OSError, tarfile.TarError, ControllerError):
        return None
    return None
