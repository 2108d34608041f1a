"""Publishes the desired states the engine wrote: retained, QoS 1, marked once acknowledged.

A row of ``device_desired`` stays ``published = false`` until the broker acknowledged the
message of exactly that ``rev`` (a row rewritten meanwhile stays unpublished and goes out
again with its new rev), so desired states written before a crash or during a broker
outage are published on the next pass. Only one publisher may run per database (the one
that drives the rollouts): it publishes every device's newest rev in order on one
connection, so an older rev can never overwrite a newer retained one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

import msgspec

from controller.db.session import Database
from controller.rollouts.desired import (
    DesiredRow,
    mark_all_unpublished,
    mark_published,
    unpublished_desired,
)
from protocol import Desired, ModelRef, ProtocolError, desired_topic, encode_checked
from protocol.limits import MAX_SAFE_INT

log = logging.getLogger(__name__)

PublishFn = Callable[[Sequence[tuple[str, bytes]]], list[bool]]
"""Publish (topic, payload) pairs retained at QoS 1; True for each one acknowledged."""


def desired_message(row: DesiredRow) -> Desired:
    """The retained message of a desired state; ValueError/ValidationError if it has none."""
    if not 1 <= row.rev <= MAX_SAFE_INT:
        raise ValueError(f"rev {row.rev} is outside 1..{MAX_SAFE_INT} (not JSON-safe)")
    return Desired(
        schema=1,
        rev=row.rev,
        models={s: msgspec.convert(ref, ModelRef) for s, ref in sorted(row.models.items())},
        rollout_id=None if row.rollout_id is None else str(row.rollout_id),
    )


class DesiredPublisher:
    def __init__(
        self,
        db: Database,
        *,
        publish: PublishFn,
        clock: Callable[[], float] = time.time,
        batch_size: int = 500,
    ) -> None:
        self.db = db
        self.publish = publish
        self.clock = clock
        self.batch_size = batch_size
        self.published = 0
        """Messages acknowledged since start (for tests and the benchmark)."""
        self._reported: set[tuple[str, int | None]] = set()

    def publish_pending(self) -> int:
        """Publish unpublished desired states until none is left or one is not acknowledged;
        returns how many were acknowledged. A malformed row (one device's) is skipped, logged
        once, and left unpublished: it never holds up the others."""
        done = 0
        after: tuple[float, str] | None = None
        while True:
            with self.db.connect() as conn:
                page = unpublished_desired(conn, limit=self.batch_size, after=after)
            if page.last is None:
                return done
            after = page.last
            for device_id, fault in page.faults.items():
                self._invalid(device_id, None, fault.reason)
            rows, messages = [], []
            for row in page.rows:
                try:
                    payload = encode_checked(desired_message(row))
                    messages.append((desired_topic(row.device_id), payload))
                # never written by the engine: a row edited by hand, a bound it cannot meet
                except (msgspec.ValidationError, ValueError, ProtocolError) as err:
                    self._invalid(row.device_id, row.rev, str(err))
                    continue
                rows.append(row)
            acks = self.publish(messages) if messages else []
            acked = [(row.device_id, row.rev) for row, ok in zip(rows, acks, strict=True) if ok]
            with self.db.begin() as conn:
                mark_published(conn, acked, now=self.clock())
            done += len(acked)
            self.published += len(acked)
            if len(acked) < len(rows):
                log.warning(
                    "%d desired state(s) not acknowledged by the MQTT broker; publishing them again "
                    "on the next pass",
                    len(rows) - len(acked),
                )
                return done
            if page.size < self.batch_size:
                return done

    def _invalid(self, device_id: str, rev: int | None, why: str) -> None:
        if (device_id, rev) not in self._reported:
            self._reported.add((device_id, rev))
            log.error(
                "desired state of %s (rev %s) is invalid, not published: %s", device_id, rev, why
            )

    def republish_all(self) -> int:
        """Mark every desired state unpublished (after a connect without a broker session,
        the broker may have lost its retained messages); the next pass publishes them."""
        with self.db.begin() as conn:
            n = mark_all_unpublished(conn)
        if n:
            log.info("publishing %d desired states again (new MQTT session)", n)
        return n
