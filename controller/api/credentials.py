"""Device enrolment on the embedded MQTT broker: ``POST/DELETE /api/v1/devices/{id}/credentials``.

Admin role: a credential lets its holder publish as the device. ``POST`` makes a new random
password for the device (username = device id; only its hash is stored, the password is in
this answer and nowhere else), rewrites the embedded broker's password file from the
database and reloads the broker; the answer carries what an agent config needs (broker URL
with the port the broker really listens on, the controller's trusted signing keys).
``DELETE`` removes the login and reloads the broker: the device can no longer connect; it
is shown offline (state ``revoked``, event ``device.revoked``) and its retained status on
the broker is cleared, so a restarted controller does not see it online again.
With an external broker (``broker.url``) the controller cannot add users: 409, enrol with
``edgefleet devices enroll ID --password-file FILE`` on the broker's host instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import APIRouter, HTTPException, Request, status
from pydantic import BaseModel

from controller.api.auth import Admin
from controller.api.errors import AUTH, responses
from controller.api.params import DeviceId
from controller.db.session import Database
from controller.fleet.credentials import issue_credential, revoke_credential

router = APIRouter(prefix="/api/v1", tags=["devices"], responses=AUTH)


@dataclass(frozen=True, slots=True)
class EnrolmentTarget:
    """What enrolment needs from the running controller (``app.state.enrolment``)."""

    broker_url: Callable[[], str | None]
    """The embedded broker's URL; None with an external broker."""
    reload: Callable[[], None]
    """Rewrite the embedded broker's password file from the database and reload it."""
    forget_status: Callable[[str], None] = lambda _device_id: None
    """Clear a revoked device's retained status on the broker (it said "online")."""
    trusted_keys: list[Path] = field(default_factory=list)


class TrustedKey(BaseModel):
    path: str
    """Where the controller reads the key (``models.trusted_keys``)."""
    pem: str


class CredentialsOut(BaseModel):
    device_id: str
    broker_url: str
    username: str
    password: str
    """Shown once; only a hash is stored."""
    trusted_keys: list[TrustedKey]


class RevokedOut(BaseModel):
    device_id: str
    revoked: bool


def _target(request: Request) -> EnrolmentTarget:
    target: EnrolmentTarget | None = getattr(request.app.state, "enrolment", None)
    if target is None or target.broker_url() is None:
        raise HTTPException(
            status_code=status.HTTP_409_CONFLICT,
            detail=(
                "this controller uses an external MQTT broker (broker.url), whose users it "
                "cannot change: on the broker's host run `edgefleet devices enroll ID "
                "--password-file /etc/mosquitto/edgefleet.passwd --broker-url URL` and reload "
                "mosquitto (docs/controller.md, Enrolling devices)"
            ),
        )
    return target


def _keys(paths: list[Path]) -> list[TrustedKey]:
    keys = []
    for p in paths:
        try:
            keys.append(TrustedKey(path=str(p), pem=p.read_text(encoding="utf-8")))
        except OSError as err:
            raise HTTPException(
                status_code=status.HTTP_500_INTERNAL_SERVER_ERROR,
                detail=f"cannot read the trusted key {p} (models.trusted_keys): {err.strerror}",
            ) from err
    return keys


@router.post(
    "/devices/{device_id}/credentials",
    status_code=status.HTTP_201_CREATED,
    responses=responses(409),
)
def create_credentials(request: Request, device_id: DeviceId, _token: Admin) -> CredentialsOut:
    """Enrol a device on the embedded broker: a new password (an earlier one stops working)."""
    target = _target(request)
    db: Database = request.app.state.db
    with db.begin() as conn:
        password = issue_credential(conn, device_id, now=request.app.state.clock())
    target.reload()
    return CredentialsOut(
        device_id=device_id,
        broker_url=target.broker_url() or "",
        username=device_id,
        password=password,
        trusted_keys=_keys(target.trusted_keys),
    )


@router.delete("/devices/{device_id}/credentials", responses=responses(404, 409))
def delete_credentials(request: Request, device_id: DeviceId, _token: Admin) -> RevokedOut:
    """Revoke the device's broker login; the broker reloads and refuses it from now on."""
    target = _target(request)
    db: Database = request.app.state.db
    with db.begin() as conn:
        revoked = revoke_credential(conn, device_id, now=request.app.state.clock())
    if not revoked:
        raise HTTPException(
            status_code=status.HTTP_404_NOT_FOUND,
            detail=f"device {device_id!r} has no broker login; nothing to revoke",
        )
    target.reload()
    target.forget_status(device_id)
    return RevokedOut(device_id=device_id, revoked=True)
