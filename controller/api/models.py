"""HTTP API of models (OTA bundles) under /api/v1/models: upload, list, show, download."""

from __future__ import annotations

import hmac
import os
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response, status
from fastapi.responses import RedirectResponse, StreamingResponse
from sqlalchemy import Connection

from controller.api.auth import Operator, Viewer, require
from controller.api.errors import AUTH, responses
from controller.api.params import (
    DownloadKey,
    HeaderText,
    ModelName,
    ModelVersion,
    RangeHeader,
)
from controller.api.schemas import ModelList, ModelOut
from controller.artifacts import BundleStore, StorageError
from controller.blobstore import ModelHosting
from controller.bundles import BundleError, BundleInfo, read_bundle, verify_signature
from controller.db.session import Database
from controller.fleet import registry
from protocol import Manifest

router = APIRouter(prefix="/api/v1", tags=["models"], responses=AUTH)


def _db(request: Request) -> Database:
    db: Database = request.app.state.db
    return db


class ModelRows:
    """Models by name and version, remembered once found, for bundle downloads (a rollout's
    devices each fetch the same few): without it every download checked a database
    connection out of the pool for one row, and bursts of downloads opened and closed
    overflow connections (measured in bench.rollout: the database round trips were most of a
    download's time, and each replica serves thousands in a stage).

    A version is immutable and is never deleted, so a row once found stays true; ``ttl_s``
    only bounds what a database restored from an older backup could leave stale. A model
    not found is not remembered: another replica may store it the next moment.
    """

    def __init__(
        self, *, ttl_s: float = 60.0, size: int = 256, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl_s = ttl_s
        self._size = size
        self._clock = clock
        self._rows: OrderedDict[tuple[str, str], tuple[float, registry.ModelInfo]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, db: Database, name: str, version: str) -> registry.ModelInfo | None:
        key, now = (name, version), self._clock()
        with self._lock:
            hit = self._rows.get(key)
            if hit is not None and now - hit[0] < self._ttl_s:
                self._rows.move_to_end(key)
                return hit[1]
        with db.connect() as conn:
            row = registry.get_model(conn, name, version)
        if row is not None:
            with self._lock:
                self._rows[key] = (now, row)
                self._rows.move_to_end(key)
                while len(self._rows) > self._size:
                    self._rows.popitem(last=False)
        return row


def _model_rows(request: Request) -> ModelRows:
    rows: ModelRows = request.app.state.model_rows
    return rows


def _hosting(request: Request) -> ModelHosting:
    hosting: ModelHosting | None = getattr(request.app.state, "models", None)
    if hosting is None:
        raise HTTPException(
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            detail="this controller does not host models (no blob store configured)",
        )
    return hosting


def _model_out(m: registry.ModelInfo) -> ModelOut:
    return ModelOut(
        name=m.name,
        version=m.version,
        ref=m.ref,
        sha256=m.sha256,
        size=m.size,
        runtime=m.runtime,
        signature=m.signature,
        key_id=m.key_id,
        created_at=m.created_at,
        download_url=bundle_path(m),
        manifest=m.manifest,
        lineage=m.lineage,
    )


def bundle_path(m: registry.ModelInfo) -> str:
    """The device download path of a model's bundle (prefix the controller's public URL)."""
    return f"/api/v1/models/{m.name}/{m.version}/bundle?key={m.download_key}"


def _no_model(name: str, version: str) -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_404_NOT_FOUND,
        detail=f"no model {name}@{version}; `edgefleet model list` shows the uploaded models",
    )


def _check_upload(hosting: ModelHosting, path: Path) -> tuple[BundleInfo, str | None]:
    try:
        info = read_bundle(path)
        if not _VERSION.fullmatch(info.manifest.version):
            raise BundleError(
                f"version {info.manifest.version!r} cannot be part of a URL: use letters, "
                "digits, '.', '_', '+' or '-' (max 64), e.g. 1.2.0"
            )
        key = verify_signature(info, hosting.trusted_keys) if hosting.trusted_keys else None
    except BundleError as err:
        # The message names the temporary file the upload went to: say "the upload".
        message = str(err).replace(str(path), "the upload")
        raise HTTPException(status_code=422, detail=f"bundle rejected: {message}") from err
    return info, key


@router.post(
    "/models",
    status_code=status.HTTP_201_CREATED,
    responses=responses(
        409,
        413,
        422,
        503,
        e409="this name@version exists already (versions are immutable)",
        e413="the bundle is larger than models.max_bundle_bytes",
        e422="the body is empty or not a valid bundle (structure, hashes, signature)",
    ),
    openapi_extra={
        "requestBody": {
            "required": True,
            "description": "the .efb bundle file (`edgefleet model package`)",
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
            },
        }
    },
)
async def upload_model(request: Request, _token: Operator) -> ModelOut:
    """Upload a bundle (the raw ``.efb`` bytes as the body). The bundle's structure and
    hashes are checked, and its signature when the controller trusts public keys; an
    empty body or anything else that is not a valid bundle gets 422 saying why."""
    import anyio

    hosting = _hosting(request)
    tmp = hosting.blobs.temp_file()
    try:
        digest, size = await _receive(request, hosting, tmp)
        info, key = await anyio.to_thread.run_sync(_check_upload, hosting, tmp)
        m = info.manifest
        return await anyio.to_thread.run_sync(
            lambda: _store_model(request, hosting, tmp, info, key, digest, size, m)
        )
    finally:
        tmp.unlink(missing_ok=True)


async def _receive(request: Request, hosting: ModelHosting, tmp: Path) -> tuple[str, int]:
    import hashlib

    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > hosting.max_bundle_bytes:
        raise _too_large(hosting)
    h = hashlib.sha256()
    size = 0
    with tmp.open("wb") as f:
        async for chunk in request.stream():
            size += len(chunk)
            if size > hosting.max_bundle_bytes:
                raise _too_large(hosting)
            h.update(chunk)
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    if size == 0:
        raise HTTPException(
            status_code=422,
            detail="empty upload: send the .efb file as the request body (`edgefleet model push`)",
        )
    return h.hexdigest(), size


def _too_large(hosting: ModelHosting) -> HTTPException:
    return HTTPException(
        status_code=413,
        detail=(
            f"the bundle is larger than {hosting.max_bundle_bytes} bytes; raise "
            "models.max_bundle_bytes in the controller config"
        ),
    )


def _duplicate(ref: str) -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_409_CONFLICT,
        detail=(
            f"model {ref} already exists; versions are immutable: package it again with a "
            "new --version"
        ),
    )


def _store_model(
    request: Request,
    hosting: ModelHosting,
    tmp: Path,
    info: BundleInfo,
    key: str | None,
    digest: str,
    size: int,
    m: Manifest,
) -> ModelOut:
    import msgspec

    db = _db(request)
    with db.connect() as conn:
        if registry.get_model(conn, m.name, m.version) is not None:
            raise _duplicate(m.ref)
    store = hosting.bundles
    if not store.transactional:
        _put(store, tmp, digest, size, None)
    try:
        with db.begin() as conn:
            row = registry.add_model(
                conn,
                name=m.name,
                version=m.version,
                sha256=digest,
                size=size,
                runtime=m.runtime,
                manifest=msgspec.to_builtins(m),
                signature=info.signature,
                key_id=key,
                now=request.app.state.clock(),
            )
            if store.transactional:
                _put(store, tmp, digest, size, conn)
    except registry.DuplicateModelError as err:
        raise _duplicate(m.ref) from err
    return _model_out(row)


def _put(store: BundleStore, tmp: Path, digest: str, size: int, conn: Connection | None) -> None:
    try:
        store.put(tmp, digest, size, conn)
    except StorageError as err:
        raise HTTPException(
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE,
            detail=f"the bundle could not be stored: {err}",
        ) from err


@router.get("/models")
def list_models(request: Request, _token: Viewer, name: ModelName | None = None) -> ModelList:
    """Uploaded models, newest first."""
    with _db(request).connect() as conn:
        rows = registry.list_models(conn, name=name)
    return ModelList(models=[_model_out(r) for r in rows])


@router.get("/models/{name}/{version}", responses=responses(404))
def get_model(request: Request, name: ModelName, version: ModelVersion, _token: Viewer) -> ModelOut:
    with _db(request).connect() as conn:
        row = registry.get_model(conn, name, version)
    if row is None:
        raise _no_model(name, version)
    return _model_out(row)


_VERSION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
_TAR = "application/x-tar"
_BINARY: dict[str, Any] = {"schema": {"type": "string", "format": "binary"}}
_RANGE = re.compile(r"bytes=(\d*)-(\d*)")


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """(start, end inclusive) of a single ``bytes=`` range; None when unsatisfiable."""
    match = _RANGE.fullmatch(header.strip())
    if match is None:
        return None
    first, last = match.groups()
    if not first and not last:
        return None
    if not first:  # suffix: the last N bytes
        n = int(last)
        if n == 0 or size == 0:
            return None
        return max(0, size - n), size - 1
    start = int(first)
    end = int(last) if last else size - 1
    if start >= size or end < start:
        return None
    return start, min(end, size - 1)


@router.get(
    "/models/{name}/{version}/bundle",
    response_class=Response,
    responses={
        200: {"description": "the bundle file", "content": {_TAR: _BINARY}},
        206: {"description": "a byte range", "content": {_TAR: _BINARY}},
        304: {"description": "not modified (If-None-Match)"},
        307: {"description": "models.storage = s3: download from the presigned URL in Location"},
        416: {"description": "the range is not satisfiable (Content-Range: bytes */SIZE)"},
        **responses(404, 410, 503),
    },
)
def download_bundle(
    request: Request,
    name: ModelName,
    version: ModelVersion,
    key: Annotated[DownloadKey | None, Query(description="the model's download key")] = None,
    range_header: Annotated[RangeHeader | None, Header(alias="range")] = None,
    if_none_match: Annotated[HeaderText | None, Header()] = None,
    if_range: Annotated[HeaderText | None, Header()] = None,
    authorization: Annotated[HeaderText | None, Header()] = None,
) -> Response:
    """The ``.efb`` file, with ETag (the sha256), ``Range`` (one range), ``If-Range`` and
    ``If-None-Match``. With ``models.storage = "s3"`` the answer is a 307 redirect to a
    short-lived presigned URL of the bucket (follow it; send ``Range`` there).

    Devices authenticate with the URL's ``key`` (the download URL in the desired state);
    operators may use a viewer token instead.
    """
    row = _model_rows(request).get(_db(request), name, version)
    key_ok = row is not None and key is not None and hmac.compare_digest(key, row.download_key)
    if not key_ok:
        _check_viewer(request, authorization)
    if row is None:
        raise _no_model(name, version)
    store = _hosting(request).bundles
    etag = f'"{row.sha256}"'
    headers = {"ETag": etag, "Accept-Ranges": "bytes", "Cache-Control": "private, max-age=0"}
    if if_none_match is not None and etag in {t.strip() for t in if_none_match.split(",")}:
        return Response(status_code=status.HTTP_304_NOT_MODIFIED, headers=headers)
    try:
        redirect = store.redirect_url(row.sha256)
        size = None
        if redirect is None:
            store, size = _hosting(request).holder(row.sha256)
    except StorageError as err:
        raise HTTPException(
            status_code=status.HTTP_503_SERVICE_UNAVAILABLE, detail=str(err)
        ) from err
    if redirect is not None:
        return RedirectResponse(
            redirect, status_code=307, headers={"ETag": etag, "Cache-Control": "no-store"}
        )
    if size is None:
        raise HTTPException(
            status_code=status.HTTP_410_GONE,
            detail=(
                f"the bundle of {row.ref} is missing from {store.describe()}; upload it again "
                "(or `edgefleet model migrate-storage` if it is still in another store)"
            ),
        )
    whole = store.cached(row.sha256)  # in memory: one body, no threadpool hop per block
    if range_header is not None and (if_range is None or if_range.strip() == etag):
        span = _parse_range(range_header, size)
        if span is None:
            return Response(
                status_code=416,
                headers={**headers, "Content-Range": f"bytes */{size}"},
            )
        start, end = span
        length = end - start + 1
        headers.update(
            {"Content-Range": f"bytes {start}-{end}/{size}", "Content-Length": str(length)}
        )
        return _body(store, row.sha256, whole, start, length, 206, headers)
    headers["Content-Length"] = str(size)
    return _body(store, row.sha256, whole, 0, size, 200, headers)


def _body(
    store: BundleStore,
    sha256: str,
    whole: bytes | None,
    start: int,
    length: int,
    status_code: int,
    headers: dict[str, str],
) -> Response:
    """``length`` bytes from ``start``: from ``whole`` (a bundle in memory) in one body, else
    streamed from ``store``."""
    media = "application/x-tar"
    if whole is not None:
        return Response(whole[start : start + length], status_code, headers, media)
    body = store.read(sha256, start, length)
    return StreamingResponse(body, status_code=status_code, headers=headers, media_type=media)


def _check_viewer(request: Request, authorization: str | None) -> None:
    from fastapi.security import HTTPAuthorizationCredentials

    scheme, _, credentials = (authorization or "").partition(" ")
    creds = (
        HTTPAuthorizationCredentials(scheme=scheme, credentials=credentials.strip())
        if scheme.lower() == "bearer"
        else None
    )
    require("viewer")(request, creds)
