"""Per-device logins on the embedded MQTT broker, kept in the database.

``issue_credential`` makes a random password for the device (username = device id) and
stores only its Mosquitto ``$7$`` hash; ``broker_users`` gives every stored user for the
embedded broker's password file, which the controller rewrites from the database on every
start and after every change (then reloads the broker), so enrolments survive restarts.
"""

from __future__ import annotations

import secrets

from sqlalchemy import delete, select, update
from sqlalchemy.engine import Connection

from controller.broker import password_hash
from controller.db.models import device_credentials, devices, events

REVOKED_STATE = "revoked"
"""``devices.state`` of a device whose login was revoked, until it connects again."""


def issue_credential(conn: Connection, device_id: str, *, now: float) -> str:
    """A new random password for ``device_id`` (replacing any earlier one); returned once."""
    password = secrets.token_urlsafe(24)
    conn.execute(delete(device_credentials).where(device_credentials.c.device_id == device_id))
    conn.execute(
        device_credentials.insert().values(
            device_id=device_id, password_hash=password_hash(password), created_at=now
        )
    )
    return password


def revoke_credential(conn: Connection, device_id: str, *, now: float) -> bool:
    """Remove the device's login, mark it offline and record why; False when it had none.

    The device cannot say it went offline itself: the broker drops it on the reload and
    refuses its last will along with its login.
    """
    result = conn.execute(
        delete(device_credentials).where(device_credentials.c.device_id == device_id)
    )
    if not result.rowcount:
        return False
    known = conn.execute(
        update(devices).where(devices.c.id == device_id).values(online=False, state=REVOKED_STATE)
    ).rowcount
    if known:
        conn.execute(
            events.insert().values(
                device_id=device_id,
                ts=now,
                received_at=now,
                code="device.revoked",
                level="warning",
                message="broker login revoked: the device can no longer connect "
                "(enrol it again with `edgefleet devices enroll`)",
                details={},
            )
        )
    return True


def broker_users(conn: Connection) -> list[tuple[str, str]]:
    """Every enrolled device as (username, password hash), sorted by device id."""
    rows = conn.execute(
        select(device_credentials.c.device_id, device_credentials.c.password_hash).order_by(
            device_credentials.c.device_id
        )
    )
    return [(r.device_id, r.password_hash) for r in rows]
