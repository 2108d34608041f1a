"""Staged OTA rollouts (docs/ota.md, "Rollouts").

- ``spec``: parsing of durations, percentages, stages and device selectors;
- ``records``: rollout states and result types, the rollouts table, progress counts;
- ``executions``: the (device, stream) executions of rollouts and what judges them;
- ``desired``: per-device desired states and their publication marks;
- ``locks``: how writers of rollouts are serialised (row and advisory locks);
- ``commands``: what operators do (create, pause, resume, abort, rollback, progress);
- ``engine``: the idempotent, restart-safe ``tick(now)`` that drives every rollout;
- ``publisher``: publishes the desired states the engine wrote (retained, QoS 1);
- ``runner``: the background thread (PostgreSQL: one replica at a time) running both.
"""
