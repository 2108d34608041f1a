"""Controller config: strict TOML, defaults, environment and command-line overrides."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from controller.config import load_config, parse_config
from controller.errors import ConfigError, DatabaseError

FULL = """
config_version = 1
data_dir = "state"
log_level = "debug"

[database]
url = "postgresql+psycopg://edgefleet@db/edgefleet"
pool_size = 3

[broker]
url = "mqtts://broker.example:8883"
username = "controller"
shared_group = "controllers"
session_expiry_s = 600

[ingest]
batch_size = 500
flush_interval_s = 0.5

[retention]
telemetry_raw_s = 3600
telemetry_downsample_s = 0

[api]
bind = "0.0.0.0"
port = 9000
"""


def test_every_documented_section_parses() -> None:
    cfg = parse_config(FULL)
    assert cfg.broker.shared_group == "controllers"
    assert cfg.ingest.batch_size == 500 and cfg.retention.telemetry_downsample_s == 0
    assert cfg.api.port == 9000 and cfg.database.pool_size == 3


@pytest.mark.parametrize(
    ("text", "key", "section"),
    [
        ("bogus = 1\n", "bogus", "top level"),
        ("[ingest]\nbatchsize = 10\n", "batchsize", "ingest"),
        ("[embedded_broker]\nhost = 'x'\npasword = 'x'\n", "pasword", "embedded_broker"),
    ],
)
def test_unknown_keys_are_rejected_with_their_name(text: str, key: str, section: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="c.toml")
    assert f"unknown key {key!r} in {section}" in str(info.value)
    assert "c.toml" in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[broker]\nurl = 'http://x'\n", "use mqtt://host:port"),
        ("[database]\nurl = 'mysql://x'\n", "use sqlite:///PATH or postgresql+psycopg://"),
        ("[broker]\nshared_group = 'a/b'\n", "shared_group"),
        ("[ingest]\nflush_interval_s = 0\n", "flush_interval_s must be > 0"),
        ("[api]\nport = 'x'\n", "Expected `int`"),
    ],
)
def test_invalid_values_say_what_to_fix(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    assert message in str(info.value)


def test_defaults_put_sqlite_under_the_data_dir_next_to_the_config(tmp_path: Path) -> None:
    path = tmp_path / "controller.toml"
    path.write_text('data_dir = "state"\n')
    loaded = load_config(path, env={})
    assert loaded.data_dir == tmp_path / "state"
    assert loaded.database_url == f"sqlite:///{tmp_path / 'state' / 'controller.db'}"
    assert loaded.config.broker.url is None  # -> embedded broker


def test_environment_overrides_secrets_and_command_line_overrides_win(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[broker]\nurl = "mqtt://b:1883"\npassword = "from-file"\n')
    env = {
        "EDGEFLEET_DB_URL": "postgresql+psycopg://u:secret@db/x",
        "EDGEFLEET_BROKER_PASSWORD": "from-env",
    }
    loaded = load_config(path, env=env, overrides={"api.port": 0, "database.url": None})
    assert loaded.config.broker.password == "from-env"
    assert loaded.database_url == "postgresql+psycopg://u:secret@db/x"
    assert loaded.config.api.port == 0
    with pytest.raises(ConfigError, match=r"api\.port must be in 0-65535"):
        load_config(path, env={}, overrides={"api.port": 70000})


def test_missing_config_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found; copy the example"):
        load_config(tmp_path / "nope.toml")


def test_the_documented_config_parses_and_names_every_key() -> None:
    import re

    import msgspec

    from controller.config import ControllerConfig

    doc = (Path(__file__).resolve().parents[2] / "docs" / "controller.md").read_text()
    block = re.search(r"```toml\n(.*?)```", doc, re.S)
    assert block is not None
    assert parse_config(block.group(1)) == ControllerConfig()
    documented = set(re.findall(r"^#?\s*(\w+) =", block.group(1), re.M))
    documented |= set(re.findall(r"^\[(?:\w+\.)*(\w+)\]", block.group(1), re.M))
    for name, section in msgspec.structs.asdict(ControllerConfig()).items():
        assert name in documented, name
        if isinstance(section, msgspec.Struct):
            missing = set(section.__struct_fields__) - documented
            assert not missing, f"[{name}] keys missing from docs/controller.md: {missing}"


def test_passwords_in_urls_never_reach_error_messages() -> None:
    from controller.config import hide_password
    from controller.db.session import make_engine, redact

    assert (
        hide_password("postgresql://u:p@ss@db:5432/x?a=b@c") == "postgresql://u:***@db:5432/x?a=b@c"
    )
    assert hide_password("sqlite:////var/lib/x.db") == "sqlite:////var/lib/x.db"
    assert redact("postgresql+psycopg://u:s3cret@db:bad/x") == "postgresql+psycopg://u:***@db:bad/x"
    with pytest.raises(ConfigError) as wrong_scheme:
        parse_config('[database]\nurl = "mysql://u:s3cret@db/x"\n')
    with pytest.raises(ConfigError) as in_url:
        parse_config('[broker]\nurl = "mqtt://ctl:s3cret@broker:1883"\n')
    assert "put no credentials in the URL" in str(in_url.value)
    with pytest.raises(DatabaseError) as bad_port:
        make_engine("postgresql+psycopg://u:s3cret@db:notaport/x")
    for err in (wrong_scheme, in_url, bad_port):
        assert "s3cret" not in str(err.value) and "***" in str(err.value)


def test_a_value_out_of_bounds_names_the_file_line_key_and_bound(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('data_dir = "state"\n\n[api]\nbind = "0.0.0.0"\nport = 70000\n')
    with pytest.raises(ConfigError) as info:
        load_config(path, env={})
    assert str(info.value).startswith(
        f"{path}:5: api.port must be in 0-65535 (TCP port; 0 = any free port), got 70000"
    )


# (table, key, the least and the largest good values, a bad value below and above)
EDGES = [
    ("api", "port", 0, 65535, -1, 65536),  # ListenPort
    ("embedded_broker", "port", 0, 65535, -1, 65536),  # ListenPort
    ("ingest", "flush_interval_s", 0.001, 3600, 0, None),  # PositiveSeconds
    ("ingest", "enqueue_timeout_s", 0, 3600, -0.5, None),  # Seconds
    ("ingest", "batch_size", 1, 10**6, 0, None),  # PositiveInt
    ("api", "auth_max_failures", 0, 10**6, -1, None),  # Count
    ("retention", "telemetry_downsample_s", 0, 86400, -1, None),  # WholeSeconds
    ("broker", "keepalive_s", 5, 3600, 4, None),
    ("broker", "session_expiry_s", 0, 10**9, -1, None),
    ("database", "pool_size", 1, 100, 0, None),
    ("models", "max_bundle_bytes", 1, 2**40, 0, None),
    ("rollouts", "tick_interval_s", 0.01, 60, 0, None),
]


@pytest.mark.parametrize(("table", "key", "low", "high", "below", "above"), EDGES)
def test_bounds_accept_their_edges_and_refuse_just_past_them(
    table: str, key: str, low: float, high: float, below: float, above: float | None
) -> None:
    for good in (low, high):
        cfg = parse_config(f"[{table}]\n{key} = {good}\n")
        assert getattr(getattr(cfg, table), key) == good
    for bad in (below, above):
        if bad is not None:
            with pytest.raises(ConfigError, match=rf"c.toml:2: {table}\.{key} must be .*, got"):
                parse_config(f"[{table}]\n{key} = {bad}\n", source="c.toml")


@pytest.mark.parametrize(
    "table",
    ["database", "broker", "embedded_broker", "ingest", "retention", "api", "models", "rollouts"],
)
def test_unknown_keys_are_still_rejected_in_every_table_with_their_line(table: str) -> None:
    with pytest.raises(
        ConfigError, match=rf"^c.toml:3: unknown key 'no_such_key' in {table}; check the spelling"
    ):
        parse_config(f"\n[{table}]\nno_such_key = 1\n", source="c.toml")


def test_broker_url_and_shared_group_rules_name_the_key() -> None:
    assert parse_config("[broker]\nurl = 'mqtt://b'\nshared_group = 'ctl-1'\n").broker.url
    for url in ("mqtt://b/x", "mqtt://b:0", "tcp://b:1883"):
        with pytest.raises(ConfigError, match=r"^c.toml:2: broker.url: broker URL"):
            parse_config(f"[broker]\nurl = '{url}'\n", source="c.toml")
    for group in ("", "a/b", "a+", "#"):
        with pytest.raises(ConfigError, match=r"broker\.shared_group must be a plain name"):
            parse_config(f"[broker]\nshared_group = '{group}'\n")
    with pytest.raises(ConfigError, match=r"^c.toml:2: broker.cert_file and broker.key_file"):
        parse_config("[broker]\ncert_file = 'c.pem'\n", source="c.toml")


def test_committed_schema_is_current_and_carries_the_bounds() -> None:
    import json

    import jsonschema

    from controller.config import config_schema
    from protocol.config_file import ConfigSource, parse_toml, schema_text

    repo = Path(__file__).resolve().parents[2]
    committed = repo / "docs" / "config" / "controller.schema.json"
    assert committed.read_text(encoding="utf-8") == schema_text(config_schema()), (
        "docs/config/controller.schema.json is stale: run `make schemas` and commit it"
    )
    doc = json.loads(committed.read_text(encoding="utf-8"))
    port = doc["$defs"]["ApiConfig"]["properties"]["port"]
    assert (port["minimum"], port["maximum"]) == (0, 65535)
    assert doc["$defs"]["BrokerConfig"]["properties"]["keepalive_s"]["minimum"] == 5
    assert doc["$defs"]["IngestConfig"]["properties"]["flush_interval_s"]["exclusiveMinimum"] == 0
    block = re.search(r"```toml\n(.*?)```", (repo / "docs" / "controller.md").read_text(), re.S)
    assert block is not None
    documented = parse_toml(ConfigSource("docs/controller.md", block.group(1)))
    jsonschema.Draft202012Validator(doc).validate(documented)
