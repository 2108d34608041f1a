"""Bounds of every HTTP API input (path, query, header and JSON body values), declared once.

Each type here carries its bounds into the published OpenAPI schema (``minimum``,
``maximum``, ``maxLength``, ``pattern``, ``enum``) and pydantic enforces exactly those, so a
request the schema calls valid is never refused for its shape and one it calls invalid
never reaches the database: integers fit SQL BIGINT (row ids from 1), floats are finite,
strings have a length bound and never carry NUL (which PostgreSQL cannot store).
``PATTERN_HINTS`` says in words what each pattern accepts, for the 422 messages.
"""

from __future__ import annotations

from typing import Annotated, Final

from annotated_types import Ge, Gt, Le, MaxLen
from pydantic import AllowInfNan, StringConstraints

from controller.fleet.devices import MAX_TAGS_PER_DEVICE
from controller.fleet.listing import MAX_QUERY_LEN
from controller.rollouts.spec import TAG_BODY, VERSION_BODY
from protocol.limits import MODEL_NAME_BODY, NAME_BODY
from protocol.messages import EventLevel

MAX_DB_INT: Final = 2**63 - 1
"""Largest SQL BIGINT: no integer parameter may exceed it (SQLite and PostgreSQL refuse more)."""
MAX_INT32: Final = 2**31 - 1
"""Largest SQL INTEGER: the bound of ids stored in 32-bit columns (API tokens)."""
MAX_JSON_BODY_BYTES: Final = 1024 * 1024
"""Largest JSON request body; model uploads have their own limit (models.max_bundle_bytes)."""
MAX_DURATION_S: Final = 365 * 86400.0
"""Longest rollout bake or timeout: a year."""
MAX_MIN_EXECUTED: Final = 1_000_000
MAX_SELECT: Final = 10_000
"""Most ``select`` entries of a rollout (device ids, tags, ``all``)."""
MAX_STAGES: Final = 10
MAX_NOTE_LEN: Final = 500
MAX_NAME_LEN: Final = 100
"""Token names and event codes (their database columns are 100 characters)."""
MAX_MODEL_REF_LEN: Final = 200

NO_NUL: Final = r"^[^\x00]*$"
NO_CONTROL: Final = r"^[^\x00-\x1f\x7f]*$"
# The bodies are the protocol's (ids, model names) and the rollout selector's (tags, versions).
DEVICE_ID_PATTERN: Final = f"^{NAME_BODY}$"
TAG_PATTERN: Final = f"^{TAG_BODY}$"
MODEL_NAME_PATTERN: Final = f"^{MODEL_NAME_BODY}$"
MODEL_VERSION_PATTERN: Final = f"^{VERSION_BODY}$"
MODEL_REF_PATTERN: Final = f"^ *{MODEL_NAME_BODY}@{VERSION_BODY} *$"
STREAM_PATTERN: Final = f"^(\\*|{NAME_BODY})$"
SELECT_PATTERN: Final = f"^ *(all|tag={TAG_BODY}|{NAME_BODY}) *$"
_SHARE = r"(100(\.0{1,6})?|[1-9][0-9]?(\.[0-9]{1,6})?|0\.[0-9]{0,5}[1-9][0-9]{0,5})%"
_STAGE = rf" *([1-9][0-9]{{0,8}}|{_SHARE}) *"
STAGE_PATTERN: Final = f"^{_STAGE}$"
STAGES_PATTERN: Final = f"^{_STAGE}(,{_STAGE}){{0,{MAX_STAGES - 1}}}$"
DOWNLOAD_KEY_PATTERN: Final = r"^[A-Za-z0-9_-]{1,64}$"

PATTERN_HINTS: Final[dict[str, str]] = {
    NO_NUL: "must not contain NUL characters",
    NO_CONTROL: "must not contain control characters (NUL, newline, tab, ...)",
    DEVICE_ID_PATTERN: (
        "a device id is 1-64 characters of a-z, 0-9, '_' or '-', starting with a letter or digit"
    ),
    TAG_PATTERN: (
        "a tag is 1-64 characters of letters, digits, '_', '.', ':' or '-', starting with a "
        "letter or digit (e.g. site:berlin)"
    ),
    MODEL_NAME_PATTERN: (
        "a model name is 1-64 characters of a-z, 0-9, '.', '_' or '-', starting with a "
        "letter or digit"
    ),
    MODEL_VERSION_PATTERN: (
        "a version is 1-64 characters of letters, digits, '.', '_', '+' or '-', starting with "
        "a letter or digit (e.g. 1.2.0)"
    ),
    MODEL_REF_PATTERN: "use MODEL@VERSION, e.g. blazeface@1.2.0 (`edgefleet model list`)",
    STREAM_PATTERN: "a stream name (1-64 characters of a-z, 0-9, '_' or '-') or * for every stream",
    SELECT_PATTERN: "use all, tag=KEY:VALUE (e.g. tag=site:berlin) or a device id",
    STAGE_PATTERN: (
        "a stage is a device count (1 to 999999999) or a percentage above 0% and at most 100%"
    ),
    STAGES_PATTERN: (
        f"use 1 to {MAX_STAGES} comma-separated cumulative stages, each a device count or "
        "a percentage above 0% and at most 100% (e.g. 1,10%,50%,100%)"
    ),
    DOWNLOAD_KEY_PATTERN: "the key of the model's download URL (letters, digits, '_', '-')",
}


def _text(pattern: str, max_length: int, min_length: int | None = None) -> StringConstraints:
    return StringConstraints(pattern=pattern, max_length=max_length, min_length=min_length)


RowId = Annotated[int, Ge(1), Le(MAX_DB_INT)]
"""A database row id in a BIGINT column (rollouts)."""
TokenId = Annotated[int, Ge(1), Le(MAX_INT32)]
"""An API token's id (a 32-bit INTEGER column)."""
Offset = Annotated[int, Ge(0), Le(MAX_DB_INT)]
EpochSeconds = Annotated[float, AllowInfNan(False)]
"""A finite time in UNIX epoch seconds."""
Duration = Annotated[float, AllowInfNan(False), Ge(0), Le(MAX_DURATION_S)]
PositiveDuration = Annotated[float, AllowInfNan(False), Gt(0), Le(MAX_DURATION_S)]
Share = Annotated[float, AllowInfNan(False), Ge(0), Le(1)]
MinExecuted = Annotated[int, Ge(0), Le(MAX_MIN_EXECUTED)]

DeviceId = Annotated[str, _text(DEVICE_ID_PATTERN, 64)]
Tag = Annotated[str, _text(TAG_PATTERN, 64)]
TagList = Annotated[list[Tag], MaxLen(MAX_TAGS_PER_DEVICE)]
ModelName = Annotated[str, _text(MODEL_NAME_PATTERN, 64)]
ModelVersion = Annotated[str, _text(MODEL_VERSION_PATTERN, 64)]
ModelRef = Annotated[str, _text(MODEL_REF_PATTERN, MAX_MODEL_REF_LEN)]
ModelFilter = Annotated[str, _text(NO_CONTROL, MAX_MODEL_REF_LEN, 1)]
"""``name@version`` as a filter (matched exactly; an unknown one matches nothing)."""
FleetSearch = Annotated[str, _text(NO_CONTROL, MAX_QUERY_LEN)]
"""Free text of the device listings: a device id, tag or model substring (any case; empty:
no filter)."""
StreamSpec = Annotated[str, _text(STREAM_PATTERN, 64)]
SelectItem = Annotated[str, _text(SELECT_PATTERN, 80)]
StageItem = Annotated[str, _text(STAGE_PATTERN, 40)]
StageSpec = Annotated[str, _text(STAGES_PATTERN, 400)]
EventCode = Annotated[str, _text(NO_CONTROL, MAX_NAME_LEN, 1)]
Level = EventLevel
Name = Annotated[str, _text(NO_CONTROL, MAX_NAME_LEN, 1)]
"""A token name: 1-100 characters, no control characters."""
Note = Annotated[str, _text(NO_NUL, MAX_NOTE_LEN)]
"""Free text for the record (newlines allowed, NUL not)."""
DownloadKey = Annotated[str, _text(DOWNLOAD_KEY_PATTERN, 64)]
RangeHeader = Annotated[str, _text(NO_CONTROL, 100)]
"""A ``Range`` header: one that is not a single satisfiable byte range gets 416."""
HeaderText = Annotated[str, _text(NO_CONTROL, 1024)]
