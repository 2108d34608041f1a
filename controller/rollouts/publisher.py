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
from protocol import Desired, ModelRef, desired_topic, encode

log = logging.getLogger(__name__)

PublishFn = Callable[[Sequence[tuple[str, bytes]]], list[bool]]
"""Publish (topic, payload) pairs retained at QoS 1; True for each one acknowledged."""


def desired_message(row: DesiredRow) -> Desired:
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

    def publish_pending(self) -> int:
        """Publish unpublished desired states until none is left or one is not acknowledged;
        returns how many were acknowledged."""
        done = 0
        while True:
            with self.db.connect() as conn:
                rows = unpublished_desired(conn, limit=self.batch_size)
            if not rows:
                return done
            messages = []
            for row in rows:
                try:
                    messages.append((desired_topic(row.device_id), encode(desired_message(row))))
                except (msgspec.ValidationError, ValueError) as err:  # never written by the engine
                    log.error(
                        "desired state of %s rev %d is invalid: %s", row.device_id, row.rev, err
                    )
                    messages.append(("", b""))
            acks = self.publish([m for m in messages if m[0]])
            it = iter(acks)
            acked = [
                (row.device_id, row.rev)
                for row, (topic, _) in zip(rows, messages, strict=True)
                if topic and next(it)
            ]
            with self.db.begin() as conn:
                mark_published(conn, acked, now=self.clock())
            done += len(acked)
            self.published += len(acked)
            if len(acked) < len(rows):
                missing = len(rows) - len(acked)
                log.warning(
                    "%d desired state(s) not acknowledged by the MQTT broker; publishing them again "
                    "on the next pass",
                    missing,
                )
                return done
            if len(rows) < self.batch_size:
                return done

    def republish_all(self) -> int:
        """Mark every desired state unpublished (after a connect without a broker session,
        the broker may have lost its retained messages); the next pass publishes them."""
        with self.db.begin() as conn:
            n = mark_all_unpublished(conn)
        if n:
            log.info("publishing %d desired states again (new MQTT session)", n)
        return n
