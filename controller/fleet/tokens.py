"""API tokens and roles: create, verify, list and revoke (stored as sha256 hashes)."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Any, Literal

from sqlalchemy import Connection, insert, select, update

from controller.db.models import api_tokens
from controller.db.sql import from_row

Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "operator", "admin")
TOKEN_PREFIX = "efc_"  # noqa: S105 - the public prefix of generated tokens, not a secret
_LAST_USED_EVERY_S = 60.0


@dataclass(frozen=True, slots=True)
class TokenInfo:
    id: int
    name: str
    role: Role
    prefix: str
    created_at: float
    last_used_at: float | None
    revoked_at: float | None


def hash_token(token: str) -> str:
    """sha256 hex of the token: tokens are 256-bit random, so a plain hash is enough."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def role_allows(have: str, need: Role) -> bool:
    return have in ROLES and ROLES.index(have) >= ROLES.index(need)


def _token_info(row: Any) -> TokenInfo:
    return from_row(TokenInfo, row)


def create_token(conn: Connection, *, name: str, role: Role, now: float) -> tuple[TokenInfo, str]:
    """Create a token; returns its info and the token itself (shown once, stored as a hash)."""
    if role not in ROLES:
        raise ValueError(f"unknown role {role!r}; use one of {', '.join(ROLES)}")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    prefix = token[: len(TOKEN_PREFIX) + 6]
    result = conn.execute(
        insert(api_tokens)
        .values(name=name, role=role, token_hash=hash_token(token), prefix=prefix, created_at=now)
        .returning(api_tokens.c.id)
    )
    token_id = int(result.scalar_one())
    info = TokenInfo(
        id=token_id,
        name=name,
        role=role,
        prefix=prefix,
        created_at=now,
        last_used_at=None,
        revoked_at=None,
    )
    return info, token


def verify_token(conn: Connection, token: str, *, now: float) -> TokenInfo | None:
    """The token's info if it exists and is not revoked; None otherwise."""
    digest = hash_token(token)
    row = conn.execute(select(api_tokens).where(api_tokens.c.token_hash == digest)).first()
    if row is None or not hmac.compare_digest(row.token_hash, digest) or row.revoked_at:
        return None
    if row.last_used_at is None or now - row.last_used_at > _LAST_USED_EVERY_S:
        conn.execute(update(api_tokens).where(api_tokens.c.id == row.id).values(last_used_at=now))
    return _token_info(row)


def list_tokens(conn: Connection, *, include_revoked: bool = False) -> list[TokenInfo]:
    query = select(api_tokens).order_by(api_tokens.c.id)
    if not include_revoked:
        query = query.where(api_tokens.c.revoked_at.is_(None))
    return [_token_info(r) for r in conn.execute(query)]


def revoke_token(conn: Connection, token_id: int, *, now: float) -> bool:
    """Revoke by id; False if there is no such active token."""
    result = conn.execute(
        update(api_tokens)
        .where(api_tokens.c.id == token_id, api_tokens.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    return bool(result.rowcount)


def revoke_tokens_named(conn: Connection, name: str, *, now: float) -> int:
    result = conn.execute(
        update(api_tokens)
        .where(api_tokens.c.name == name, api_tokens.c.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    return int(result.rowcount)
