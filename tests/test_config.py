"""Agent config: strict TOML validation with the key's name and line."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest

from agent.config import OtaConfig, config_schema, deprecations, load_config, parse_config
from agent.errors import ConfigError
from protocol.config_file import ConfigSource, key_path, locate, parse_toml, schema_text

GOOD = """\
device_id = "cam-01"
state_dir = "state"

[broker]
url = "mqtt://127.0.0.1:1883"

[[streams]]
name = "front"
source = "video.mp4"
model = "builtin:blazeface-short-int8"
"""


def test_minimal_config_gets_defaults() -> None:
    cfg = parse_config(GOOD)
    assert cfg.device_id == "cam-01"
    assert cfg.streams[0].backend is None
    assert cfg.spool.max_bytes > 0
    assert cfg.metrics.enabled is False
    assert cfg.broker.port == 1883
    assert cfg.broker.tls is False


def test_unknown_top_level_key_names_key_and_line() -> None:
    text = GOOD.replace('state_dir = "state"', 'state_dir = "state"\nstate_dri = "x"')
    with pytest.raises(ConfigError, match=r"agent.toml:3: unknown key 'state_dri' in top level"):
        parse_config(text, source="agent.toml")


def test_unknown_key_in_second_stream_points_at_that_stream() -> None:
    text = GOOD + '\n[[streams]]\nname = "back"\nsource = "0"\nmodel = "m.json"\nfsp = 5\n'
    with pytest.raises(ConfigError, match=r"agent.toml:16: unknown key 'fsp' in streams\[1\]"):
        parse_config(text, source="agent.toml")


def test_unknown_key_in_table_is_located() -> None:
    text = GOOD.replace(
        'url = "mqtt://127.0.0.1:1883"', 'url = "mqtt://127.0.0.1:1883"\npasword = "x"'
    )
    with pytest.raises(ConfigError, match=r"agent.toml:6: unknown key 'pasword' in broker"):
        parse_config(text, source="agent.toml")


@pytest.mark.parametrize(
    ("old", "new", "fragment"),
    [
        ('device_id = "cam-01"', 'device_id = "Cam 01"', "invalid device id"),
        ('url = "mqtt://127.0.0.1:1883"', 'url = "http://x"', "mqtt://host:port"),
        ('url = "mqtt://127.0.0.1:1883"', 'url = "mqtt://h:99999"', "port"),
        ('name = "front"', 'name = "Front Door"', "invalid stream name"),
        ('state_dir = "state"', "state_dir = 5", "Expected `str`"),
        ('device_id = "cam-01"', "", "missing required field `device_id`"),
    ],
)
def test_invalid_values_give_clear_errors(old: str, new: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        parse_config(GOOD.replace(old, new))


def test_invalid_toml_says_so() -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        parse_config("device_id = ")


def test_duplicate_stream_names_are_rejected() -> None:
    text = GOOD + '\n[[streams]]\nname = "front"\nsource = "0"\nmodel = "m.json"\n'
    with pytest.raises(ConfigError, match="unique"):
        parse_config(text)


def test_load_config_resolves_paths_and_checks_model(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(GOOD, encoding="utf-8")
    loaded = load_config(path)
    assert loaded.resolve("video.mp4") == tmp_path / "video.mp4"
    path.write_text(
        GOOD.replace("builtin:blazeface-short-int8", "models/missing.json"), encoding="utf-8"
    )
    with pytest.raises(ConfigError, match=r"model manifest .*missing.json does not exist"):
        load_config(path)
    path.write_text(GOOD.replace("builtin:blazeface-short-int8", "builtin:nope"), encoding="utf-8")
    with pytest.raises(ConfigError, match="no built-in model 'nope'; shipped models: blazeface"):
        load_config(path)


def test_missing_config_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"not found; copy packaging/agent\.example\.toml"):
        load_config(tmp_path / "nope.toml")


def test_password_comes_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(GOOD, encoding="utf-8")
    monkeypatch.setenv("EDGEFLEET_BROKER_PASSWORD", "s3cret")
    assert load_config(path).config.broker.password == "s3cret"


def test_shipped_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parent.parent / "packaging" / "agent.example.toml"
    cfg = parse_config(example.read_text(encoding="utf-8"), source=str(example))
    assert cfg.streams[0].model == "builtin:blazeface-short-int8"
    assert cfg.ota == OtaConfig()  # the example spells out the defaults


def test_ota_section_defaults_and_validation() -> None:
    ota = parse_config(GOOD).ota
    assert ota.enabled is True and ota.trusted_keys == [] and ota.probation_s == 60.0
    assert (ota.min_agreement, ota.max_latency_ratio, ota.confidence) == (0.8, 2.0, 0.95)
    assert (ota.undecided, ota.shadow_max_s, ota.shadow_interval_s) == ("rollback", 120.0, 0.2)
    assert (ota.shadow_cpu_share, ota.fps_factor, ota.max_errors) == (0.25, 0.5, 0)
    assert ota.download_retries == 5
    with pytest.raises(ConfigError, match=r"agent.toml:13: unknown key 'probation' in ota"):
        parse_config(GOOD + "\n[ota]\nprobation = 5\n", source="agent.toml")
    for bad, fragment in [
        ("min_agreement = 1.2", r"Expected `float` <= 1.0 - at `\$.ota.min_agreement`"),
        ("max_latency_ratio = 0", r"Expected `float` > 0.0 - at `\$.ota.max_latency_ratio`"),
        ("shadow_cpu_share = 0", r"Expected `float` > 0.0 - at `\$.ota.shadow_cpu_share`"),
        ("max_errors = -1", r"Expected `int` >= 0 - at `\$.ota.max_errors`"),
        ('undecided = "maybe"', r"Invalid enum value 'maybe' - at `\$.ota.undecided`"),
        ("fps_factor = 1.5", r"ota.fps_factor must be in 0..1"),
        ("probation_s = -1", "ota.probation_s must be >= 0"),
    ]:
        with pytest.raises(ConfigError, match=fragment):
            parse_config(GOOD + f"\n[ota]\n{bad}\n")


def test_removed_gate_keys_are_accepted_with_a_warning_that_says_what_replaces_them() -> None:
    old = parse_config(GOOD + "\n[ota]\npsi_limit = 0.5\nlatency_factor = 2.0\n")
    warnings = deprecations(old)
    assert len(warnings) == 2
    assert (
        "ota.latency_factor is no longer used" in warnings[0] and "max_latency_ratio" in warnings[0]
    )
    assert "ota.psi_limit" in warnings[1] and "[drift]" in warnings[1]
    assert deprecations(parse_config(GOOD)) == []


def test_trusted_keys_resolve_against_the_config_and_must_exist(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(GOOD + '\n[ota]\ntrusted_keys = ["keys/signing.pub"]\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"ota.trusted_keys: .*keys/signing.pub does not exist"):
        load_config(path)
    (tmp_path / "keys").mkdir()
    (tmp_path / "keys" / "signing.pub").write_text("not checked here")
    loaded = load_config(path)
    assert loaded.resolve(loaded.config.ota.trusted_keys[0]) == tmp_path / "keys" / "signing.pub"


def test_check_config_loads_the_trusted_keys(tmp_path: Path) -> None:
    from click.testing import CliRunner
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    from agent.cli import main
    from tests.bundle_factory import write_public_key

    write_public_key(Ed25519PrivateKey.generate(), tmp_path / "signing.pub")
    (tmp_path / "bad.pub").write_text("not a key")
    (tmp_path / "video.mp4").write_bytes(b"")  # GOOD's source: check-config checks it exists
    path = tmp_path / "agent.toml"
    for keys, code, fragment in [
        ('["signing.pub"]', 0, "ota: trusted keys "),
        ("[]", 0, "every model update will be refused"),
        ('["bad.pub"]', 2, "is not a PEM ed25519 public key"),
    ]:
        path.write_text(GOOD + f"\n[ota]\ntrusted_keys = {keys}\n", encoding="utf-8")
        result = CliRunner().invoke(main, ["check-config", str(path)])
        assert result.exit_code == code, result.output
        assert fragment in result.output


def test_a_value_out_of_bounds_names_the_file_line_key_and_bound() -> None:
    text = GOOD + "\n[metrics]\nenabled = true\nport = 0\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, source="agent.toml")
    assert str(info.value).startswith(
        "agent.toml:14: metrics.port must be in 1-65535 (TCP port), got 0"
    )
    text = GOOD + '\n[[streams]]\nname = "back"\nsource = "0"\nmodel = "m.json"\nfps = -1\n'
    with pytest.raises(ConfigError, match=r"agent.toml:16: streams\[1\]\.fps must be >= 0"):
        parse_config(text, source="agent.toml")


# (table, key, the least and the largest good values, a bad value below and above)
EDGES = [
    ("metrics", "port", 1, 65535, 0, 65536),  # Port
    ("ota", "fps_factor", 0, 1, -0.01, 1.01),  # Fraction
    ("ota", "min_agreement", 0.0, 1.0, -0.5, 1.5),  # Fraction
    ("ota", "probation_s", 0, 1e9, -0.001, None),  # Seconds
    ("telemetry", "interval_s", 0.001, 1e9, 0, None),  # PositiveSeconds
    ("ota", "golden_latency_runs", 1, 10**6, 0, None),  # PositiveInt
    ("ota", "download_retries", 0, 10**6, -1, None),  # Count
    ("homeassistant", "off_delay_s", 0, 86400, -1, None),  # WholeSeconds
    ("broker", "keepalive_s", 5, 3600, 4, None),
    ("spool", "max_bytes", 4096, 2**40, 4095, None),
    ("drift", "window", 10, 10**6, 9, None),
    ("ota", "confidence", 0.5, 0.999, 0.49, 1.0),
]


@pytest.mark.parametrize(("table", "key", "low", "high", "below", "above"), EDGES)
def test_bounds_accept_their_edges_and_refuse_just_past_them(
    table: str, key: str, low: float, high: float, below: float, above: float | None
) -> None:
    def with_value(value: float) -> str:
        if table == "broker":
            return GOOD.replace('url = "mqtt', f'{key} = {value}\nurl = "mqtt')
        return GOOD + f"\n[{table}]\n{key} = {value}\n"

    for good in (low, high):
        assert getattr(getattr(parse_config(with_value(good)), table), key) == good
    for bad in (below, above):
        if bad is not None:
            with pytest.raises(ConfigError, match=rf"{table}\.{key} must be .*, got {bad!r}"):
                parse_config(with_value(bad))


def test_stream_bounds_and_the_reconnect_order_are_checked() -> None:
    stream = (
        GOOD + "threads = 1\nfps = 0\nmin_score = 1\nreconnect_min_s = 2\nreconnect_max_s = 2\n"
    )
    cfg = parse_config(stream).streams[0]
    assert (cfg.threads, cfg.fps, cfg.min_score, cfg.reconnect_min_s) == (1, 0, 1, 2)
    for line, fragment in [
        ("threads = 0", r"streams\[0\]\.threads must be >= 1"),
        ("min_score = 1.5", r"streams\[0\]\.min_score must be in 0\.\.1"),
        ("reconnect_min_s = 0", r"streams\[0\]\.reconnect_min_s must be > 0"),
        ("reconnect_min_s = 31", r"agent.toml:11: streams\[0\] \(front\): need reconnect_min_s <="),
    ]:
        with pytest.raises(ConfigError, match=fragment):
            parse_config(GOOD + line + "\n", source="agent.toml")


def test_plain_topic_prefix_and_broker_url_rules() -> None:
    assert parse_config(GOOD + '\n[homeassistant]\nprefix = "ha/home-1"\n').homeassistant
    for prefix in ("ha home", "ha//x", "ha\\n", ""):
        with pytest.raises(
            ConfigError, match=r"homeassistant\.prefix must be a plain topic prefix"
        ):
            parse_config(GOOD + f'\n[homeassistant]\nprefix = "{prefix}"\n')
    tls = parse_config(GOOD.replace("mqtt://127.0.0.1:1883", "mqtts://broker.example"))
    assert (tls.broker.tls, tls.broker.host, tls.broker.port) == (True, "broker.example", 8883)
    for url in ("mqtt://h/topic", "mqtt://h:0", "mqtt://h:x"):
        with pytest.raises(ConfigError, match=r"agent.toml:5: broker.url: broker URL"):
            parse_config(GOOD.replace("mqtt://127.0.0.1:1883", url), source="agent.toml")
    text = GOOD.replace('url = "mqtt', 'cert_file = "c.pem"\nurl = "mqtt')
    with pytest.raises(ConfigError, match=r"agent.toml:5: broker.cert_file and broker.key_file"):
        parse_config(text, source="agent.toml")


@pytest.mark.parametrize(
    "table",
    ["broker", "spool", "telemetry", "metrics", "ota", "drift", "watchdog", "homeassistant"],
)
def test_unknown_keys_are_still_rejected_in_every_table(table: str) -> None:
    text = GOOD + f"\n[{table}]\nno_such_key = 1\n"
    if table == "broker":
        text = GOOD.replace('url = "mqtt', 'no_such_key = 1\nurl = "mqtt')
    line = 5 if table == "broker" else 13
    with pytest.raises(
        ConfigError, match=rf"agent.toml:{line}: unknown key 'no_such_key' in {table}; check"
    ):
        parse_config(text, source="agent.toml")


def test_type_errors_and_missing_keys_name_the_key() -> None:
    with pytest.raises(ConfigError, match=r"^agent.toml:2: state_dir: Expected `str`, got `int`"):
        parse_config(GOOD.replace('"state"', "5"), source="agent.toml")
    text = GOOD.replace('model = "builtin:blazeface-short-int8"\n', "")
    with pytest.raises(ConfigError, match=r"^a.toml:7: streams\[0\]: .*required field `model`"):
        parse_config(text, source="a.toml")


def test_committed_schema_is_current_and_carries_the_bounds() -> None:
    committed = Path(__file__).resolve().parent.parent / "docs" / "config" / "agent.schema.json"
    assert committed.read_text(encoding="utf-8") == schema_text(config_schema()), (
        "docs/config/agent.schema.json is stale: run `make schemas` and commit it"
    )
    doc = json.loads(committed.read_text(encoding="utf-8"))
    port = doc["$defs"]["MetricsConfig"]["properties"]["port"]
    assert (port["minimum"], port["maximum"]) == (1, 65535)
    assert doc["$defs"]["OtaConfig"]["properties"]["fps_factor"]["maximum"] == 1
    assert doc["$defs"]["TelemetryConfig"]["properties"]["interval_s"]["exclusiveMinimum"] == 0
    assert doc["$defs"]["OtaConfig"]["additionalProperties"] is False
    example = Path(__file__).resolve().parent.parent / "packaging" / "agent.example.toml"
    raw = parse_toml(ConfigSource(str(example), example.read_text(encoding="utf-8")))
    jsonschema.Draft202012Validator(doc).validate(raw)


@pytest.mark.parametrize(
    ("edit", "line"),
    [
        (('state_dir = "state"', 'state_dir = "state"\nota.probation_s = -1'), 3),
        (('state_dir = "state"', 'state_dir = "state"\nota = { probation_s = -1 }'), 3),
        (("[broker]", "[ ota ]  # gate\nprobation_s = -1\n\n[broker]"), 5),
    ],
)
def test_the_line_is_found_for_dotted_keys_inline_tables_and_spaced_headers(
    edit: tuple[str, str], line: int
) -> None:
    with pytest.raises(ConfigError, match=rf"^a.toml:{line}: ota\.probation_s must be >= 0"):
        parse_config(GOOD.replace(*edit), source="a.toml")


def test_key_path_and_locate_follow_arrays_of_tables() -> None:
    text = GOOD + '\n[[streams]]\nname = "b"\n\n[[streams]]\nname = "c"\nfps = 1\n'
    assert key_path(("streams", 2, "fps")) == "streams[2].fps"
    assert locate(text, ("streams", 2, "fps")) == 17
    assert locate(text, ("streams", 2)) == 15
    assert locate(text, ("streams", 1, "fps")) == 12  # not written: its table
    assert locate(text, ("nowhere", "x")) is None


def test_more_streams_than_the_protocol_carries_are_refused_and_the_cap_is_accepted() -> None:
    head = GOOD.split("[[streams]]", maxsplit=1)[0]

    def streams(n: int) -> str:
        return head + "".join(
            f'[[streams]]\nname = "s{i}"\nsource = "video.mp4"\n'
            'model = "builtin:blazeface-short-int8"\n'
            for i in range(n)
        )

    assert len(parse_config(streams(64)).streams) == 64
    with pytest.raises(ConfigError, match="65 \\[\\[streams\\]\\] configured; the protocol"):
        parse_config(streams(65))
