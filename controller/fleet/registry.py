"""The model registry: uploaded OTA model bundles (metadata; the files live in the blob store)."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, insert, select

from controller.db.models import models
from controller.db.sql import from_row
from controller.errors import ControllerError


@dataclass(frozen=True, slots=True)
class ModelInfo:
    id: int
    name: str
    version: str
    sha256: str
    size: int
    runtime: str
    manifest: dict[str, Any]
    signature: str | None
    key_id: str | None
    download_key: str
    created_at: float

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def lineage(self) -> dict[str, Any] | None:
        """The signed manifest's ``lineage`` (source commit, data, metrics, labels), if any."""
        found = self.manifest.get("lineage")
        return found if isinstance(found, dict) else None


class DuplicateModelError(ControllerError):
    """``name@version`` is already stored (raised inside the caller's transaction)."""


def _model_info(row: Any) -> ModelInfo:
    return from_row(ModelInfo, row)


def add_model(
    conn: Connection,
    *,
    name: str,
    version: str,
    sha256: str,
    size: int,
    runtime: str,
    manifest: dict[str, Any],
    signature: str | None,
    key_id: str | None,
    now: float,
) -> ModelInfo:
    """Insert a model; raise DuplicateModelError when ``name@version`` exists."""
    from sqlalchemy.exc import IntegrityError

    if get_model(conn, name, version) is not None:
        raise DuplicateModelError(f"{name}@{version}")
    values: dict[str, Any] = {
        "name": name,
        "version": version,
        "sha256": sha256,
        "size": size,
        "runtime": runtime,
        "manifest": manifest,
        "signature": signature,
        "key_id": key_id,
        "download_key": secrets.token_urlsafe(24),
        "created_at": now,
    }
    try:
        model_id = conn.execute(insert(models).values(**values).returning(models.c.id))
        values["id"] = int(model_id.scalar_one())
    except IntegrityError as err:  # a concurrent upload won; the caller's transaction rolls back
        raise DuplicateModelError(f"{name}@{version}") from err
    return ModelInfo(**values)


def get_model(conn: Connection, name: str, version: str) -> ModelInfo | None:
    row = conn.execute(
        select(models).where(models.c.name == name, models.c.version == version)
    ).first()
    return None if row is None else _model_info(row)


def list_models(conn: Connection, *, name: str | None = None) -> list[ModelInfo]:
    """Models, newest first (optionally only versions of ``name``)."""
    query = select(models).order_by(models.c.created_at.desc(), models.c.id.desc())
    if name is not None:
        query = query.where(models.c.name == name)
    return [_model_info(r) for r in conn.execute(query)]


def get_model_by_id(conn: Connection, model_id: int) -> ModelInfo | None:
    row = conn.execute(select(models).where(models.c.id == model_id)).first()
    return None if row is None else _model_info(row)
