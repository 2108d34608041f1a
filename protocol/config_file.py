"""What the agent's and the controller's TOML config files share (pure: text in, values out).

The strict table base, the ``[broker]`` keys both parties write, TOML text to a validated
Struct with errors that name the file, the line and the key (``agent.toml:14: ota.fps_factor
must be in 0..1, got 1.5 ...``), and the JSON Schema of a config type. Errors are
:class:`ProtocolError`; each side wraps them into its own ``ConfigError``.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, TypeVar

import msgspec
from msgspec import inspect as mi

from protocol.broker import parse_broker_url
from protocol.errors import ProtocolError
from protocol.jsonschema import clean_descriptions

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = [
    "BrokerClientSection",
    "ConfigSection",
    "ConfigSource",
    "check_broker_table",
    "key_path",
    "locate",
    "parse_toml",
    "schema_document",
    "schema_text",
    "to_struct",
]

T = TypeVar("T")
KeyPath = Sequence[str | int]
"""A key path as msgspec reports it: ``$.streams[1].fps`` is ``("streams", 1, "fps")``."""

_PATH_PART = re.compile(r"\.([^.\[`]+)|\[(\d+)\]")
_AT = re.compile(r" - at `(\$[^`]*)`")
_UNKNOWN = re.compile(r"unknown field `([^`]+)`")
_HEADER = re.compile(r"^\[\[?\s*[\w\"'-]")


class ConfigSection(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A table of a config file: an unknown key is an error, not a silent default."""


class BrokerClientSection(ConfigSection, frozen=True, kw_only=True):
    """The ``[broker]`` keys of every MQTT client config (agent and controller)."""

    username: str | None = None
    password: str | None = None
    """Prefer the EDGEFLEET_BROKER_PASSWORD environment variable."""
    ca_file: str | None = None
    cert_file: str | None = None
    key_file: str | None = None
    client_id: str | None = None
    """Unset: ``edgefleet-agent-{device_id}`` or ``edgefleet-controller-{hostname}``; must be
    unique per client."""
    keepalive_s: Annotated[int, msgspec.Meta(ge=5, description="MQTT keepalive in seconds")] = 30
    connect_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class ConfigSource:
    """Where a config came from: a file name (or ``<defaults>``) and its text, if any."""

    name: str
    text: str | None = None

    def at(self, *path: str | int) -> str:
        """``name:line`` of the key at ``path`` when the text shows it, else ``name``."""
        line = locate(self.text, path) if self.text is not None else None
        return f"{self.name}:{line}" if line else self.name


def key_path(path: KeyPath) -> str:
    """``("streams", 1, "fps")`` → ``streams[1].fps``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else part
    return out


def _occurrence(path: KeyPath, tables: int) -> int:
    """Which ``[[table]]`` of an array the first ``tables`` names of ``path`` point at."""
    seen = 0
    for i, part in enumerate(path):
        if isinstance(part, str):
            seen += 1
            if seen == tables:
                after = path[i + 1] if i + 1 < len(path) else None
                return after if isinstance(after, int) else 0
    return 0


def _table_line(lines: list[str], header: str, occurrence: int) -> int | None:
    pattern = re.compile(rf"^\[\[?\s*{re.escape(header)}\s*\]\]?\s*(#.*)?$")
    found = [i for i, line in enumerate(lines) if pattern.match(line.strip())]
    return found[occurrence] if occurrence < len(found) else None


def _key_line(lines: list[str], start: int, keys: list[str]) -> int | None:
    dotted, first = ".".join(keys), keys[0]
    exact = re.compile(rf"^[\"']?{re.escape(dotted)}[\"']?\s*=")
    table = re.compile(rf"^[\"']?{re.escape(first)}[\"']?\s*[=.]")
    for pattern in (exact, table):
        for i in range(start, len(lines)):
            stripped = lines[i].strip()
            if _HEADER.match(stripped):
                break
            if pattern.match(stripped):
                return i
    return None


def locate(text: str, path: KeyPath) -> int | None:
    """Best-effort 1-based line where the key at ``path`` is written, else its table's."""
    lines = text.splitlines()
    names = [p for p in path if isinstance(p, str)]
    table: int | None = None
    for split in range(len(names), -1, -1):
        start = 0
        if split:
            header = _table_line(lines, ".".join(names[:split]), _occurrence(path, split))
            if header is None:
                continue
            if split == len(names):
                return header + 1
            table = header if table is None else table
            start = header + 1
        line = _key_line(lines, start, names[split:]) if split < len(names) else None
        if line is not None:
            return line + 1
    return None if table is None else table + 1


def parse_toml(source: ConfigSource) -> dict[str, Any]:
    """The TOML text of ``source`` as a dict; ProtocolError saying where it is not TOML."""
    try:
        return tomllib.loads(source.text or "")
    except tomllib.TOMLDecodeError as err:
        raise ProtocolError(f"{source.name}: not valid TOML: {err}") from err


def to_struct(raw: dict[str, Any], type_: type[T], source: ConfigSource, *, docs: str) -> T:
    """Validate a parsed config against ``type_``; ProtocolError naming file, line and key.

    ``docs`` says where the keys are documented (named in the unknown-key message).
    """
    try:
        return msgspec.convert(raw, type_)
    except msgspec.ValidationError as err:
        raise ProtocolError(_explain(str(err), raw, type_, source, docs)) from err


def _explain(msg: str, raw: dict[str, Any], type_: type, source: ConfigSource, docs: str) -> str:
    at = _AT.search(msg)
    path: list[str | int] = []
    for m in _PATH_PART.finditer(at.group(1) if at else ""):
        path.append(m.group(1) if m.group(1) is not None else int(m.group(2)))
    unknown = _UNKNOWN.search(msg)
    if unknown:
        key = unknown.group(1)
        return (
            f"{source.at(*path, key)}: unknown key {key!r} in {key_path(path) or 'top level'}; "
            f"check the spelling against the documented keys ({docs})"
        )
    where, name = source.at(*path), key_path(path)
    if not name:
        return f"{where}: {msg}"
    rule, description = _rule(mi.type_info(type_), path)
    if rule is None or ", got `" in msg:
        return f"{where}: {name}: {msg}"
    value = _value(raw, path)
    got = "" if value is _MISSING else f", got {value!r}"
    about = f" ({description})" if description else ""
    if rule.startswith("match the pattern") and description:
        rule, about = f"be a {description}", ""
    return f"{where}: {name} must {rule}{about}{got} ({msg})"


_MISSING = object()


def _value(raw: Any, path: KeyPath) -> Any:
    try:
        for part in path:
            raw = raw[part]
    except (KeyError, IndexError, TypeError):
        return _MISSING
    return raw


def _rule(node: mi.Type, path: KeyPath) -> tuple[str | None, str | None]:
    """What the value at ``path`` must satisfy (``be in 0..1``) and its description."""
    description: str | None = None
    for part in [*path, None]:
        while True:
            if isinstance(node, mi.Metadata):
                description = (node.extra_json_schema or {}).get("description", description)
                node = node.type
            elif isinstance(node, mi.UnionType):
                options = [t for t in node.types if not isinstance(t, mi.NoneType)]
                node = next((t for t in options if _fits(t, part)), options[0])
            else:
                break
        if part is None:
            break
        if isinstance(part, int) and isinstance(node, (mi.ListType, mi.SetType)):
            node = node.item_type
        elif isinstance(part, str) and isinstance(node, mi.StructType):
            field = next((f for f in node.fields if f.encode_name == part), None)
            if field is None:
                return None, None
            node = field.type
        else:
            return None, None
        description = None
    return _predicate(node), description


def _fits(node: mi.Type, part: str | int | None) -> bool:
    if isinstance(part, int):
        return isinstance(node, (mi.ListType, mi.SetType))
    if isinstance(part, str):
        return isinstance(node, mi.StructType)
    return True


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(value)


def _predicate(node: mi.Type) -> str | None:
    """``be in 0..1``, ``be > 0``, ``match the pattern ...``: what a value of ``node`` must do."""
    if isinstance(node, mi.LiteralType):
        return "be one of " + ", ".join(repr(v) for v in node.values)
    if isinstance(node, (mi.IntType, mi.FloatType)):
        return _range(node)
    if isinstance(node, mi.StrType) and node.pattern is not None:
        return f"match the pattern {node.pattern}"
    if isinstance(node, (mi.StrType, mi.ListType, mi.SetType)) and node.min_length:
        return f"have a length of at least {node.min_length}"
    return None


def _range(node: mi.IntType | mi.FloatType) -> str | None:
    if node.ge is not None and node.le is not None and node.gt is None and node.lt is None:
        sep = "-" if isinstance(node, mi.IntType) else ".."
        return f"be in {_number(node.ge)}{sep}{_number(node.le)}"
    bounds = [
        f"{op} {_number(v)}"
        for op, v in ((">=", node.ge), (">", node.gt), ("<=", node.le), ("<", node.lt))
        if v is not None
    ]
    return "be " + " and ".join(bounds) if bounds else None


def check_broker_table(
    broker: BrokerClientSection, url: str | None, source: ConfigSource, table: str = "broker"
) -> None:
    """The rules of a ``[broker]`` table msgspec cannot express: the URL is a broker URL,
    ``cert_file`` and ``key_file`` come together."""
    if url is not None:
        try:
            parse_broker_url(url)
        except ProtocolError as err:
            raise ProtocolError(f"{source.at(table, 'url')}: {table}.url: {err}") from err
    if (broker.cert_file is None) != (broker.key_file is None):
        raise ProtocolError(
            f"{source.at(table, 'cert_file' if broker.key_file is None else 'key_file')}: "
            f"{table}.cert_file and {table}.key_file go together: set both or neither"
        )


def schema_document(type_: type, *, name: str, title: str) -> dict[str, Any]:
    """The JSON Schema (2020-12) of a config type, bounds and descriptions included."""
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://edgefleet.dev/schemas/v1/config/{name}.schema.json",
        "title": title,
        **clean_descriptions(msgspec.json.schema(type_)),
    }


def schema_text(document: dict[str, Any]) -> str:
    """A schema as committed under docs/config: stable (sorted keys, trailing newline)."""
    return json.dumps(document, indent=2, sort_keys=True) + "\n"
