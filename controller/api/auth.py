"""Bearer-token authentication with roles: viewer < operator < admin."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from controller import store
from controller.store import Role, TokenInfo

bearer = HTTPBearer(auto_error=False, description="a token from `edgefleet tokens create`")

HOW_TO_CREATE = (
    "create one on the controller host with `edgefleet tokens create --role {role} "
    "--name NAME` and pass it with --token or EDGEFLEET_TOKEN"
)


def _unauthorized(detail: str) -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail=detail,
        headers={"WWW-Authenticate": "Bearer"},
    )


def require(role: Role) -> Callable[..., TokenInfo]:
    """A dependency that authenticates the request and checks it has at least ``role``."""

    def check(
        request: Request,
        creds: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> TokenInfo:
        if creds is None or not creds.credentials:
            raise _unauthorized(
                "missing bearer token (Authorization: Bearer TOKEN); "
                + HOW_TO_CREATE.format(role=role)
            )
        db = request.app.state.db
        with db.begin() as conn:
            info = store.verify_token(conn, creds.credentials, now=request.app.state.clock())
        if info is None:
            raise _unauthorized(
                "the token is unknown or revoked; " + HOW_TO_CREATE.format(role=role)
            )
        if not store.role_allows(info.role, role):
            raise HTTPException(
                status_code=status.HTTP_403_FORBIDDEN,
                detail=(
                    f"token {info.name!r} has role {info.role}; this needs {role} or higher: "
                    f"ask an admin for a token with `edgefleet tokens create --role {role}`"
                ),
            )
        return info

    return check


Viewer = Annotated[TokenInfo, Depends(require("viewer"))]
Operator = Annotated[TokenInfo, Depends(require("operator"))]
Admin = Annotated[TokenInfo, Depends(require("admin"))]
