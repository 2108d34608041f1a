"""Staged OTA rollouts (docs/ota.md, "Rollouts").

- ``spec``: parsing of durations, percentages, stages and device selectors;
- ``records``: rollout states and result types, the rollouts table, progress counts;
- ``executions``: the (device, stream) executions of rollouts and what judges them;
- ``desired``: per-device desired states and their publication marks;
- ``faults``: one device's unusable data as that device's failure (never the rollout's);
- ``locks``: how writers of rollouts are serialised (row and advisory locks);
- ``commands``: what operators do (create, pause, resume, abort, rollback, progress);
- ``decisions``: the engine's pure decisions (execution status, abort criteria, ModelRef);
- ``engine``: the idempotent, restart-safe ``tick(now)`` that drives every rollout;
- ``publisher``: publishes the desired states the engine wrote (retained, QoS 1);
- ``runner``: the background thread (PostgreSQL: one replica at a time) running both.
"""
