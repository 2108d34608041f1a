"""Staged OTA rollouts (docs/ota.md, "Rollouts").

- ``spec``: parsing of durations, percentages, stages and device selectors;
- ``store``: database access (rollouts, their executions, per-device desired states);
- ``commands``: what operators do (create, pause, resume, abort, rollback, progress);
- ``engine``: the idempotent, restart-safe ``tick(now)`` that drives every rollout;
- ``publisher``: publishes the desired states the engine wrote (retained, QoS 1);
- ``runner``: the background thread (PostgreSQL: one replica at a time) running both.
"""
