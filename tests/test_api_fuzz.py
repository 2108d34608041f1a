"""Schema-driven fuzzing of the controller's HTTP API (schemathesis) on SQLite and PostgreSQL.

A real controller app (uvicorn on loopback, a migrated database with devices, telemetry,
events and an uploaded model) is fuzzed from its own live OpenAPI document, as
``schemathesis run`` does (examples, coverage, fuzzing and stateful phases), with every
check on: no request may get a 5xx, every status code, content type and body must be the
documented ones, valid input must be accepted and invalid input refused. An operator token
drives the whole API; an admin token then drives the token routes. The counts are printed
(``pytest -s``) and written to ``fuzz-report.txt`` in the test's tmp dir.

The budget is EDGEFLEET_FUZZ_SECONDS per database (default 25); EDGEFLEET_FUZZ_SEED picks
another seed for a longer hunt, e.g. ``EDGEFLEET_FUZZ_SECONDS=600 EDGEFLEET_FUZZ_SEED=7
pytest --timeout 0 -s tests/test_api_fuzz.py``.
"""

from __future__ import annotations

import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import schemathesis
from schemathesis.engine import events, from_schema
from schemathesis.engine.statistic import Statistic
from sqlalchemy import create_engine, text, update

from controller.api import create_app
from controller.api.auth import AuthLimiter
from controller.blobstore import BlobStore, ModelHosting
from controller.bundles import package_model
from controller.db.models import api_tokens
from controller.db.session import Database
from controller.fleet.tokens import create_token
from controller.fleet.writes import write_messages
from controller.ingest.stats import IngestStats
from tests.controller.conftest import (
    PG_BASE,
    event,
    pg_enabled,
    received,
    reported,
    serving,
    status,
    telemetry,
)

MANIFEST = (
    Path(__file__).resolve().parents[1] / "inference" / "assets" / "blazeface-short-int8.json"
)
MAX_EXAMPLES = 25
"""Cases per operation and phase; the phases repeat until the time budget is spent."""
BUDGET_S = int(os.environ.get("EDGEFLEET_FUZZ_SECONDS", "25"))
ADMIN_SHARE = 0.2
"""Of the budget, what the admin pass over the token routes gets."""
SEED = int(os.environ.get("EDGEFLEET_FUZZ_SEED", "20240610"))
ADMIN_TOKEN_ID = 2**30 + 12345
"""The admin token's id, away from the small ids the fuzzer revokes (so it keeps its token)."""
ACCEPTED = ["2xx", "3xx", "401", "403", "404", "409", "429"]
"""What schemathesis's positive_data_acceptance accepts for schema-valid input (less 5xx)."""
STATE_DEPENDENT: dict[tuple[str, str], list[str]] = {
    # The body must be a valid .efb bundle (tar structure, hashes, signature): no schema
    # can say that, so schema-valid random bytes get 422 "bundle rejected: ..." (and an
    # empty body 422 "empty upload: ...").
    ("POST", "/api/v1/models"): ["422"],
    # Whether the stages fit the selection and the selected devices report the stream
    # depends on the fleet, and that gate overrides agree with each other (no comparison
    # settings with compare=false) is not in the schema: 422 saying which.
    ("POST", "/api/v1/rollouts"): ["422"],
    # A Range that is not one byte range within the file is unsatisfiable: 416.
    ("GET", "/api/v1/models/{name}/{version}/bundle"): ["416"],
}


@dataclass
class FuzzReport:
    cases: int = 0
    failures: list[str] = field(default_factory=list)
    by_check: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    phases: Counter[str] = field(default_factory=Counter)

    def add(self, other: FuzzReport) -> None:
        self.cases += other.cases
        self.failures += other.failures
        self.by_check.update(other.by_check)
        self.errors += other.errors
        self.phases.update(other.phases)

    def summary(self, db: str) -> str:
        lines = [
            f"schemathesis {schemathesis.__version__} on {db}: {self.cases} cases, "
            f"{len(self.failures)} failures ({self.by_check['Server error']} server errors, "
            f"{self.by_check['Undocumented status code']} undocumented status codes), "
            f"{len(self.errors)} errors",
            "  phases run: " + ", ".join(f"{p} x{n}" for p, n in sorted(self.phases.items())),
            *(f"  {check}: {n}" for check, n in sorted(self.by_check.items())),
            *(f"  FAILURE {f}" for f in self.failures),
            *(f"  ERROR {e}" for e in self.errors),
        ]
        return "\n".join(lines)


def run_fuzz(url: str, token: str, *, seconds: int, paths: str | None = None) -> FuzzReport:
    """Every phase of ``schemathesis run`` against ``url``'s OpenAPI, all checks on, for
    ``seconds``; ``paths``: only the operations whose path matches this regex."""
    config = schemathesis.Config.from_dict(
        {
            "seed": SEED,
            "max-time": seconds,
            "headers": {"Authorization": f"Bearer {token}"},
            "generation": {"max-examples": MAX_EXAMPLES, "mode": "all", "database": "none"},
            "checks": {"enabled": True},
            "workers": 1,
            "operations": [
                {
                    "include-path": path,
                    "include-method": method,
                    "checks": {
                        "positive_data_acceptance": {"expected-statuses": [*ACCEPTED, *extra]}
                    },
                }
                for (method, path), extra in STATE_DEPENDENT.items()
            ],
        }
    )
    schema: schemathesis.BaseSchema = schemathesis.openapi.from_url(
        f"{url}/openapi.json", config=config
    )
    if paths is not None:
        schema = schema.include(path_regex=paths)
    stat = Statistic()
    report = FuzzReport()
    for ev in from_schema(schema).execute():
        if isinstance(ev, events.ScenarioFinished):
            stat.on_scenario_finished(ev.recorder)
        elif isinstance(ev, events.NonFatalError):
            report.errors.append(f"{ev.label}: {ev.info.message}")
        elif isinstance(ev, events.FatalError):
            raise ev.exception
        elif isinstance(ev, events.EngineFinished):
            stat.record_run_check_failures(ev.failures, label="run")
        elif isinstance(ev, events.PhaseFinished) and ev.status.value != "skip":
            report.phases[ev.phase.name.value] += 1
    report.cases = stat.total_cases
    for label, groups in stat.failures.items():
        for group in groups.values():
            resp = group.response
            code = resp.status_code if resp is not None else None
            body = resp.content[:300] if resp is not None and resp.content else b""
            for failure in group.failures:
                report.by_check[failure.title] += 1
                message = " / ".join(failure.message.splitlines()[:3])
                report.failures.append(f"{label} -> {code}: {failure.title}: {message} {body!r}")
    return report


@contextmanager
def _pg_schema() -> Iterator[str]:
    """A PostgreSQL URL whose search_path is a fresh schema (as tests/controller/conftest.py)."""
    schema = f"ef_fuzz_{uuid.uuid4().hex[:12]}"
    admin = create_engine(PG_BASE, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE SCHEMA "{schema}"'))
        yield f"{PG_BASE}?options=-csearch_path%3D{schema}"
    finally:
        with admin.connect() as conn:
            conn.execute(text(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Database]:
    """A migrated database: SQLite (a file in tmp_path) or PostgreSQL (a fresh schema)."""
    with ExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path / 'controller.db'}"
        elif not pg_enabled():
            pytest.skip("PostgreSQL tests disabled with EDGEFLEET_TEST_PG=0")
        else:
            url = stack.enter_context(_pg_schema())
        db = Database.from_url(url)
        stack.callback(db.dispose)
        db.upgrade()
        yield db


@dataclass(frozen=True)
class Served:
    url: str
    operator: str
    admin: str


@pytest.fixture
def served_app(database: Database, tmp_path: Path) -> Iterator[Served]:
    """A controller app with devices, history and one uploaded model, and its tokens."""
    now = time.time()
    with database.begin() as conn:
        write_messages(
            conn,
            [
                received(status("cam-1"), at=now),
                received(reported("cam-1"), at=now),
                received(status("cam-2", "offline"), at=now),
                *[received(telemetry("cam-1", ts=now - 10 * i), at=now) for i in range(3)],
                received(event("cam-1", "deploy.failed"), at=now),
            ],
        )
        _, token = create_token(conn, name="fuzz", role="operator", now=now)
        info, admin = create_token(conn, name="fuzz-admin", role="admin", now=now)
        moved = update(api_tokens).where(api_tokens.c.id == info.id).values(id=ADMIN_TOKEN_ID)
        conn.execute(moved)
    # The ingest counters of a controller whose MQTT connection is up (none runs here), so
    # /readyz answers 200 like a serving replica; its 503 is tested in the replica tests.
    stats = IngestStats()
    stats.mqtt_connected = True
    app = create_app(
        db=database, auth_limiter=AuthLimiter(max_failures=0), ingest_snapshot=stats.snapshot
    )
    hosting = ModelHosting(blobs=BlobStore(tmp_path / "blobs"), max_bundle_bytes=10_000_000)
    app.state.models = hosting
    with serving(app) as url:
        bundle = tmp_path / "face.efb"
        package_model(MANIFEST, out=bundle, name="face", version="1.0.0")
        pushed = httpx.post(
            f"{url}/api/v1/models",
            content=bundle.read_bytes(),
            headers={"Authorization": f"Bearer {token}"},
        )
        assert pushed.status_code == 201, pushed.text
        yield Served(url=url, operator=token, admin=admin)


def test_fuzzing_the_openapi_finds_no_server_error_and_no_undocumented_answer(
    served_app: Served, database: Database, tmp_path: Path
) -> None:
    admin_s = max(1, round(BUDGET_S * ADMIN_SHARE))
    report = run_fuzz(served_app.url, served_app.operator, seconds=BUDGET_S - admin_s)
    report.add(run_fuzz(served_app.url, served_app.admin, seconds=admin_s, paths="^/api/v1/tokens"))
    summary = report.summary(database.dialect)
    (tmp_path / "fuzz-report.txt").write_text(summary + "\n")
    print(summary)
    # It did fuzz: hundreds of cases (on a quiet 2-core machine about 1,000 in the default
    # budget; a loaded one still manages well over 300). The budget is time, so the count is a
    # floor, not a target.
    assert report.cases > 200, summary
    assert report.by_check["Server error"] == 0, summary
    assert report.by_check["Undocumented status code"] == 0, summary
    assert report.failures == [], summary
    assert report.errors == [], summary
