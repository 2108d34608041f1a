"""Controller container image, compose stack and Kubernetes manifests (packaging/).

No container engine runs here: the Containerfile and compose.yaml are checked as text
and YAML (offline only: the image is never built here); the Kubernetes manifests are
validated offline against the Kubernetes JSON schemas shipped in the kubernetes-validate wheel.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import click
import kubernetes_validate  # type: ignore[import-untyped]  # ships no py.typed
import pytest
import yaml

from controller import config as controller_config
from controller.cli import main as cli_main
from tests.scripts import load

REPO = Path(__file__).resolve().parent.parent
CONTAINER = REPO / "packaging" / "container"
K8S = REPO / "packaging" / "k8s"
K8S_VERSION = "1.30.0"


def _containerfile() -> list[str]:
    """Instructions of the Containerfile, continuation lines joined, comments dropped."""
    text = (CONTAINER / "Containerfile").read_text(encoding="utf-8")
    lines = [ln for ln in text.splitlines() if not ln.lstrip().startswith("#")]
    return [ln.strip() for ln in re.sub(r"\\\n", " ", "\n".join(lines)).splitlines() if ln.strip()]


def _final_stage() -> list[str]:
    instructions = _containerfile()
    last_from = max(i for i, ln in enumerate(instructions) if ln.upper().startswith("FROM "))
    return instructions[last_from:]


def _instruction(stage: list[str], name: str) -> list[str]:
    return [ln[len(name) :].strip() for ln in stage if ln.upper().startswith(name + " ")]


def _compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((CONTAINER / "compose.yaml").read_text(encoding="utf-8"))
    return data


def _manifests() -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def _kind(kind: str) -> dict[str, Any]:
    (doc,) = [d for _, d in _manifests() if d["kind"] == kind]
    return doc


def _serve_options() -> set[str]:
    serve = cli_main.commands["controller"].commands["serve"]  # type: ignore[attr-defined]
    return {opt for p in serve.params if isinstance(p, click.Option) for opt in p.opts}


def _check_serve_args(args: list[str]) -> None:
    assert args[:2] == ["controller", "serve"]
    options = _serve_options()
    for arg in args[2:]:
        if arg.startswith("--"):
            assert arg in options, f"`edgefleet controller serve` has no option {arg}"


# --- Containerfile -------------------------------------------------------------------------


def _controller_lock() -> Any:
    (lock,) = [
        lock for lock in load("requirements/check.py").LOCKS if lock.name == "controller.txt"
    ]
    return lock


def test_image_base_is_python_slim_pinned_to_the_locks_python_and_debian_release() -> None:
    instructions = _containerfile()
    (arg,) = _instruction(instructions, "ARG")
    name, _, image = arg.partition("=")
    assert name == "PYTHON_IMAGE"
    # Every stage builds on that image, the final one included.
    froms = _instruction(instructions, "FROM")
    assert len(froms) == 2 and all(f.split()[0] == "${PYTHON_IMAGE}" for f in froms)
    ref, _, digest = image.partition("@")
    repo, _, tag = ref.partition(":")
    assert repo == "python"
    # A digest pins the image bit for bit; the tag must name the Python minor and the Debian
    # release either way (a bare python:3.11-slim moves to the next Debian release).
    assert digest == "" or re.fullmatch(r"sha256:[0-9a-f]{64}", digest)
    assert re.fullmatch(r"3\.\d+(\.\d+)?-slim-(bookworm|trixie)", tag), tag
    pythons = {target.python for target in _controller_lock().targets}
    assert pythons == {re.sub(r"^(3\.\d+).*", r"\1", tag)}, "the lock is for another Python"


def test_image_installs_the_controller_lock_with_hashes_then_the_project_without_deps() -> None:
    stage = _final_stage()
    lock = _controller_lock()
    # PostgreSQL is how the image runs; s3 for bundles in an S3-compatible bucket (docs/controller.md)
    assert lock.extras == ("controller", "postgres", "s3")
    copies = [c.split() for c in _instruction(stage, "COPY")]
    (dest,) = [c[-1] for c in copies if c[0] == f"requirements/{lock.name}"]
    runs = [part.strip() for run in _instruction(stage, "RUN") for part in run.split(";")]
    installs = [r for r in runs if r.startswith("pip install")]
    assert installs == [
        f"pip install --require-hashes --no-deps -r {dest}",
        "pip install --no-deps /tmp/wheels/edgefleet-*.whl",
    ]
    after = runs[runs.index(installs[-1]) + 1 :]
    assert after[0] == "pip check"
    assert any(r.startswith("rm -rf") and dest in r.split() for r in after)


def test_image_runs_as_a_numeric_non_root_user() -> None:
    (user,) = _instruction(_final_stage(), "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0


def test_image_healthcheck_probes_healthz_on_the_exposed_port() -> None:
    stage = _final_stage()
    (health,) = _instruction(stage, "HEALTHCHECK")
    assert "/healthz" in health and "CMD" in health
    assert _instruction(stage, "EXPOSE") == ["8080"]
    assert "127.0.0.1:8080/healthz" in health


def test_image_default_command_is_a_valid_serve_invocation() -> None:
    stage = _final_stage()
    assert json.loads(_instruction(stage, "ENTRYPOINT")[0]) == ["edgefleet"]
    cmd = json.loads(_instruction(stage, "CMD")[0])
    _check_serve_args(cmd)
    assert cmd[cmd.index("--port") + 1] == "8080"
    assert cmd[cmd.index("--bind") + 1] == "0.0.0.0"


# --- compose ---------------------------------------------------------------------------------


def test_compose_runs_controller_broker_and_postgres_each_with_a_healthcheck() -> None:
    services = _compose()["services"]
    assert set(services) == {"controller", "mosquitto", "postgres"}
    assert services["mosquitto"]["image"].startswith("eclipse-mosquitto:")
    assert services["postgres"]["image"].startswith("postgres:")
    for name, svc in services.items():
        test = svc["healthcheck"]["test"]
        assert test[0] in ("CMD", "CMD-SHELL"), name
    assert "pg_isready" in services["postgres"]["healthcheck"]["test"][1]
    assert "/healthz" in " ".join(services["controller"]["healthcheck"]["test"])


def test_compose_controller_waits_for_healthy_dependencies_and_uses_postgres() -> None:
    services = _compose()["services"]
    ctl = services["controller"]
    assert ctl["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "mosquitto": {"condition": "service_healthy"},
    }
    url = ctl["environment"][controller_config.DB_URL_ENV]
    pg = services["postgres"]["environment"]
    assert url.startswith("postgresql+psycopg://")
    assert f"{pg['POSTGRES_USER']}:" in url and url.endswith(f"@postgres:5432/{pg['POSTGRES_DB']}")
    assert ctl["build"]["dockerfile"] == "packaging/container/Containerfile"
    assert (CONTAINER / ctl["build"]["context"] / ctl["build"]["dockerfile"]).is_file()
    _check_serve_args(ctl["command"])
    assert ctl["command"][ctl["command"].index("--broker-url") + 1] == "mqtt://mosquitto:1883"


def test_compose_broker_healthcheck_escapes_the_dollar_of_sys_topics() -> None:
    test = _compose()["services"]["mosquitto"]["healthcheck"]["test"]
    # compose interpolates $VAR; $$ is a literal $ so the check subscribes to $SYS/...
    assert "$$SYS/broker/uptime" in test


# --- Kubernetes --------------------------------------------------------------------------------


def test_k8s_manifests_validate_against_the_kubernetes_schemas() -> None:
    docs = _manifests()
    assert {d["kind"] for _, d in docs} == {
        "Deployment",
        "Service",
        "ConfigMap",
        "Secret",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "Job",
    }
    for name, doc in docs:
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{name}: {err}")


def test_k8s_validator_rejects_a_misspelled_field() -> None:
    deployment = _kind("Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["containers"][0]["livenessProbe"] = {
        "httpGet": {"paht": "/healthz", "port": "http"}
    }
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_deployment_probes_liveness_and_readiness_on_the_named_port_and_runs_non_root() -> None:
    spec = _kind("Deployment")["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    (port,) = container["ports"]
    assert port == {"name": "http", "containerPort": 8080, "protocol": "TCP"}
    for probe in ("livenessProbe", "startupProbe"):  # cheap: the process and its database
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "http"}, probe
    # traffic only to replicas with the database AND the broker
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] != 0
    assert container["securityContext"]["allowPrivilegeEscalation"] is False
    _check_serve_args(container["args"])


def test_deployment_wires_the_configmap_and_the_secret() -> None:
    deployment = _kind("Deployment")
    spec = deployment["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    config_path = Path(env[controller_config.CONFIG_ENV])
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert str(config_path.parent) == mounts["config"]
    configmap = _kind("ConfigMap")
    assert volumes["config"]["configMap"]["name"] == configmap["metadata"]["name"]
    assert config_path.name in configmap["data"]
    secret = _kind("Secret")
    assert container["envFrom"] == [{"secretRef": {"name": secret["metadata"]["name"]}}]
    assert {controller_config.DB_URL_ENV, controller_config.BROKER_PASSWORD_ENV} <= set(
        secret["stringData"]
    )
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    service = _kind("Service")
    assert service["spec"]["selector"] == selector
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_configmap_holds_a_controller_config_the_controller_accepts() -> None:
    text = _kind("ConfigMap")["data"]["controller.toml"]
    parsed = controller_config.parse_config(text, source="configmap")
    assert parsed.api.bind == "0.0.0.0" and parsed.api.port == 8080
    assert parsed.broker.url is not None  # the image has no embedded broker
    assert parsed.database.url is None  # comes from the Secret's EDGEFLEET_DB_URL
    data_mount = {
        m["name"]: m["mountPath"]
        for m in _kind("Deployment")["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    }["data"]
    assert parsed.data_dir == data_mount


def test_build_context_filter_keeps_every_file_the_image_copies() -> None:
    ignore = (CONTAINER / "Containerfile.dockerignore").read_text(encoding="utf-8").splitlines()
    kept = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    assert "*" in ignore  # everything else (.venv, build outputs) stays out of the context
    copied = set()
    for args in _instruction(_containerfile(), "COPY"):
        if args.startswith("--from"):
            continue
        *sources, _dest = args.split()
        copied.update(sources)
    assert copied
    assert copied <= kept, f"COPY sources filtered out of the build context: {copied - kept}"


def _app_paths() -> set[str]:
    from controller.api import create_app
    from controller.db.session import Database

    db = Database.from_url("sqlite://")
    try:
        return {getattr(r, "path", "") for r in create_app(db=db).routes}
    finally:
        db.dispose()


def test_the_probed_paths_exist_in_the_api() -> None:
    container = _kind("Deployment")["spec"]["template"]["spec"]["containers"][0]
    probed = {container[p]["httpGet"]["path"] for p in ("livenessProbe", "readinessProbe")}
    assert probed == {"/healthz", "/readyz"} and probed <= _app_paths()


def test_three_replicas_split_ingestion_in_a_shared_group_and_roll_without_downtime() -> None:
    deployment = _kind("Deployment")
    assert deployment["spec"]["replicas"] == 3
    rolling = deployment["spec"]["strategy"]
    assert rolling["type"] == "RollingUpdate" and rolling["rollingUpdate"]["maxUnavailable"] == 0
    parsed = controller_config.parse_config(
        _kind("ConfigMap")["data"]["controller.toml"], source="configmap"
    )
    assert parsed.broker.shared_group == "controllers"
    assert parsed.broker.client_id is None  # each pod: edgefleet-controller-{pod name}


def test_the_disruption_budget_and_the_autoscaler_cover_the_deployment() -> None:
    deployment = _kind("Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    pdb = _kind("PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    assert 1 <= pdb["minAvailable"] < deployment["spec"]["replicas"]
    hpa = _kind("HorizontalPodAutoscaler")["spec"]
    target = hpa["scaleTargetRef"]
    assert (target["kind"], target["name"]) == ("Deployment", deployment["metadata"]["name"])
    assert hpa["minReplicas"] == deployment["spec"]["replicas"] <= hpa["maxReplicas"]
    (metric,) = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu"
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"]["cpu"]  # utilization is relative to it


def test_the_migration_job_runs_db_upgrade_with_the_controllers_config_and_secret() -> None:
    job = _kind("Job")["spec"]["template"]["spec"]
    (container,) = job["containers"]
    ctl = _kind("Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == ["db", "upgrade"]
    upgrade = cli_main.commands["db"].commands["upgrade"]  # type: ignore[attr-defined]
    assert upgrade.name == "upgrade"
    assert container["image"] == ctl["image"]
    assert container["env"] == ctl["env"] and container["envFrom"] == ctl["envFrom"]
    assert job["restartPolicy"] in ("OnFailure", "Never")
    config_mount = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}["config"]
    assert config_mount == {m["name"]: m["mountPath"] for m in ctl["volumeMounts"]}["config"]


def test_the_replicas_compose_example_runs_three_controllers_behind_one_address() -> None:
    data = yaml.safe_load((CONTAINER / "compose.replicas.yaml").read_text(encoding="utf-8"))
    services = data["services"]
    ctl = services["controller"]
    assert ctl["deploy"]["replicas"] == 3
    assert "ports" not in ctl  # three containers cannot share a host port: the proxy has it
    assert "/readyz" in " ".join(ctl["healthcheck"]["test"])
    _check_serve_args(ctl["command"])
    env = ctl["environment"]
    assert env["EDGEFLEET_DB_URL"].startswith("postgresql+psycopg://")
    assert services["migrate"]["command"] == ["db", "upgrade"]
    assert ctl["depends_on"]["migrate"] == {"condition": "service_completed_successfully"}
    assert services["proxy"]["ports"] == ["8080:8080"]
    config = data["configs"]["controller-toml"]["content"]
    parsed = controller_config.parse_config(config, source="compose.replicas.yaml")
    assert parsed.broker.shared_group is not None
