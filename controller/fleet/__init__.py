"""The fleet's data in the controller's database: one repository module per concern.

Functions take a SQLAlchemy ``Connection`` (the caller owns the transaction, see
``Database.begin``) and return plain frozen dataclasses. Statements are Core and portable
between SQLite and PostgreSQL; upserts use each dialect's ``ON CONFLICT``
(``controller.db.sql``).

- ``tokens``: API tokens and roles;
- ``devices``: devices, their streams and tags (queries, tag edits, counts);
- ``history``: telemetry and event history;
- ``writes``: writing decoded device messages (the ingest path);
- ``retention``: downsampling and deleting old telemetry and events;
- ``registry``: uploaded model bundles.
"""
