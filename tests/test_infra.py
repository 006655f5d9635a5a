"""infra/ parses and agrees with the code: the deployments of infra/prefect.yaml are flows/deployments.py's, the
compose file, its .env.example and the Kubernetes manifests name only environment variables something reads, the
images and commands they run exist, and the multi-node job runs the command vitflow's launcher builds."""

from __future__ import annotations

import json
import re
import shlex
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
CODE_DIRS = ("vit", "tasks", "flows")
# Variables documented by the images that read them (postgres, minio/minio).
IMAGE_VARIABLES = {"POSTGRES_USER", "POSTGRES_PASSWORD", "POSTGRES_DB", "MINIO_ROOT_USER", "MINIO_ROOT_PASSWORD"}


def load_yaml_docs(path: Path) -> list[Any]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@pytest.fixture(scope="module")
def code_text() -> str:
    """Every Python source of the package, and infra/prefect.yaml (its ``{{ $VAR }}`` are read by `prefect`)."""
    files = [p for d in CODE_DIRS for p in sorted((REPO / d).rglob("*.py"))] + [INFRA / "prefect.yaml"]
    return "\n".join(p.read_text() for p in files)


def read_by_tools(name: str, code_text: str) -> bool:
    """Whether vitflow's code, Prefect, MLflow, boto3, an image or NCCL reads the environment variable ``name``."""
    import botocore.configprovider
    import botocore.credentials
    import mlflow.environment_variables
    import prefect.settings

    if re.search(rf"""["'$]{name}\b""", code_text):
        return True
    if name.startswith("PREFECT_"):
        return hasattr(prefect.settings, name)
    if name.startswith("MLFLOW_"):
        known = {getattr(v, "name", None) for v in vars(mlflow.environment_variables).values()}
        return name in known
    if name.startswith("AWS_"):
        env = botocore.credentials.EnvProvider
        config = {v[1] for v in botocore.configprovider.BOTOCORE_DEFAUT_SESSION_VARIABLES.values()}
        return name in {env.ACCESS_KEY, env.SECRET_KEY, *env.TOKENS} | config
    return name in IMAGE_VARIABLES or name.startswith("NCCL_")


# --------------------------------------------------------------------------------------------------------------
# infra/prefect.yaml == flows/deployments.py


def test_prefect_yaml_declares_exactly_the_deployments_in_code(monkeypatch):
    from flows.deployments import NIGHTLY_CRON, NIGHTLY_TIMEZONE, definitions, prefect_yaml, runner_deployments

    monkeypatch.delenv("VITFLOW_NIGHTLY_MODEL", raising=False)  # the defaults are what prefect.yaml declares
    monkeypatch.delenv("VITFLOW_NIGHTLY_CRON", raising=False)
    for preset_setting in ("VITFLOW_DATA", "VITFLOW_INIT"):  # the presets' defaults are what prefect.yaml declares
        monkeypatch.delenv(preset_setting, raising=False)
    text = (INFRA / "prefect.yaml").read_text()
    assert text == prefect_yaml(), "infra/prefect.yaml is stale: python -m flows.deployments > infra/prefect.yaml"
    project = yaml.safe_load(text)
    key = {d.entrypoint: d.flow.name for d in definitions()}
    declared = {(key[d["entrypoint"]], d["name"]): d for d in project["deployments"]}
    defs = {(d.flow.name, d.name): d for d in definitions()}
    assert list(declared) == list(defs)
    assert ("benchmark", "demo") in defs and ("prepare-datasets", "paper-b16-i1k") in defs  # one per preset
    served = {(r.flow_name, r.name): r.entrypoint for r in runner_deployments()}  # what `vitflow deploy` registers
    for name, d in defs.items():
        y = declared[name]
        assert y["entrypoint"] == d.entrypoint == served[name], name
        assert y["description"] == d.description, name
        assert y["parameters"] == d.parameters, name
        assert tuple(y["tags"]) == d.tags, name
        assert y["schedules"] == ([{"cron": d.cron, "timezone": NIGHTLY_TIMEZONE}] if d.cron else []), name
        assert y["work_pool"]["name"] == "{{ $VITFLOW_WORK_POOL }}", name
        if d.parameters:  # the defaults pass the flow's own validation (what the UI form submits)
            d.flow.validate_parameters(d.parameters)
    assert declared["transfer-eval", "transfer-eval-nightly"]["schedules"] == [{"cron": "0 2 * * *", "timezone": "UTC"}]
    assert NIGHTLY_CRON == "0 2 * * *"
    assert project["prefect-version"] == __import__("prefect").__version__


def test_prefect_yaml_entrypoints_load_the_flows_the_code_deploys():
    from prefect.flows import load_flow_from_entrypoint

    from flows.deployments import definitions, runner_deployments
    from tasks.dispatch import FEWSHOT_DEPLOYMENT, TRAIN_DEPLOYMENT

    defs = definitions()
    for d in defs:
        path, _ = d.entrypoint.split(":")
        assert (REPO / path).is_file(), d.entrypoint
        assert load_flow_from_entrypoint(str(REPO / d.entrypoint)).name == d.flow.name
    # on a work pool (`vitflow deploy --work-pool`) the entrypoints are module paths into the installed package
    modules = {(r.flow_name, r.name): r.entrypoint for r in runner_deployments(work_pool="gpu")}
    assert modules == {(d.flow.name, d.name): f"{d.flow.__module__}.{d.flow.fn.__name__}" for d in defs}
    # the deployments the benchmark flow dispatches to with dispatch=deployments exist
    assert {TRAIN_DEPLOYMENT, FEWSHOT_DEPLOYMENT} <= {f"{d.flow.name}/{d.name}" for d in defs}


def test_prefect_yaml_pull_step_finds_the_code_where_the_image_puts_it():
    project = yaml.safe_load((INFRA / "prefect.yaml").read_text())
    (step,) = project["pull"]
    assert step == {"prefect.deployments.steps.set_working_directory": {"directory": "{{ $VITFLOW_CODE_DIR }}"}}
    dockerfile = (INFRA / "Dockerfile").read_text()
    assert "VITFLOW_CODE_DIR=/opt/vitflow" in dockerfile and "WORKDIR /opt/vitflow" in dockerfile


# --------------------------------------------------------------------------------------------------------------
# Dockerfile


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n(\s*#.*\n)*", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_installs_the_package_and_checks_its_entry_points():
    import tomllib

    steps = dockerfile_instructions((INFRA / "Dockerfile").read_text())
    known = {"FROM", "ARG", "ENV", "RUN", "WORKDIR", "COPY", "USER", "ENTRYPOINT", "CMD", "LABEL", "EXPOSE"}
    assert {k for k, _ in steps} <= known and steps[0][0] in ("FROM", "ARG")
    (base,) = [a for k, a in steps if k == "FROM"]
    assert base.startswith(f"python:{sys.version_info.major}.{sys.version_info.minor}")
    copied = {shlex.split(a)[0] for k, a in steps if k == "COPY"}
    packages = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]["find"]
    assert {p.rstrip("*") for p in packages["include"]} <= copied  # vit, tasks, flows
    assert {"pyproject.toml", "infra"} <= copied
    runs = " && ".join(a for k, a in steps if k == "RUN")
    assert "pip install --no-deps ." in runs
    # the image checks the console script and the trainer's module entry point at build time
    assert "vitflow --help" in runs and "python -m vit.engine --help" in runs
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["vitflow"] == "flows.cli:app"
    ignore = (INFRA / "Dockerfile.dockerignore").read_text().split()
    assert {f"!{p}" for p in ("pyproject.toml", "README.md", "vit/", "tasks/", "flows/", "infra/")} <= set(ignore)


def test_console_script_and_trainer_entry_points_answer(capsys):
    from typer.testing import CliRunner

    from flows.cli import app
    from vit.engine.__main__ import main

    result = CliRunner().invoke(app, ["deploy", "--help"])
    assert result.exit_code == 0 and "--work-pool" in result.output
    with pytest.raises(SystemExit) as exited:  # `python -m vit.engine --help`
        main(["--help"])
    assert exited.value.code == 0 and "--metrics" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------------
# docker-compose.yml and .env.example


def env_example() -> dict[str, str]:
    pairs = [line.split("=", 1) for line in (INFRA / ".env.example").read_text().splitlines()]
    return {k: v for k, v in (p for p in pairs if len(p) == 2 and not p[0].startswith("#"))}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((INFRA / "docker-compose.yml").read_text())


def test_compose_services_and_their_wiring(compose):
    import prefect

    services = compose["services"]
    assert {"postgres", "prefect-server", "mlflow", "minio", "minio-init", "deploy", "gpu-worker"} <= set(services)
    for name, service in services.items():
        assert "image" in service or "build" in service, name
        assert set(service.get("depends_on", {})) <= set(services), name
    worker = services["gpu-worker"]
    assert worker["build"] == {"context": "..", "dockerfile": "infra/Dockerfile"}
    assert (INFRA / worker["build"]["context"] / worker["build"]["dockerfile"]).resolve() == INFRA / "Dockerfile"
    (gpus,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert gpus["driver"] == "nvidia" and "gpu" in gpus["capabilities"]
    assert worker["command"][:3] == ["prefect", "worker", "start"] and "process" in worker["command"]
    assert services["prefect-server"]["image"] == f"prefecthq/prefect:{prefect.__version__}-python3.11"
    assert "postgresql+asyncpg://" in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    mlflow_cmd = services["mlflow"]["command"]
    assert mlflow_cmd[:2] == ["mlflow", "server"]
    assert mlflow_cmd[mlflow_cmd.index("--backend-store-uri") + 1].startswith("postgresql://")
    assert mlflow_cmd[mlflow_cmd.index("--artifacts-destination") + 1].startswith("s3://")
    deploy = " ".join(services["deploy"]["command"])
    assert "deploy --all --prefect-file infra/prefect.yaml" in deploy
    assert "global-concurrency-limit create gpu" in deploy  # compute.gpu_slots_limit=gpu: one slot per GPU
    init_sql = services["postgres"]["volumes"][1].split(":")[0]
    assert "CREATE DATABASE mlflow" in (INFRA / init_sql).read_text()


def test_compose_variables_are_defined_and_read(compose, code_text):
    text = (INFRA / "docker-compose.yml").read_text()
    interpolated = set(re.findall(r"(?<!\$)\$\{(\w+)\}", text))
    defined = env_example()
    assert interpolated == set(defined), "compose and .env.example disagree"
    assert defined["VITFLOW_WORK_POOL"] in (INFRA / "prefect.yaml").read_text()
    assert all(v for v in defined.values())
    for name, service in compose["services"].items():
        own_command = json.dumps(service.get("command", ""))
        for variable in service.get("environment", {}):
            assert read_by_tools(variable, code_text) or f"$${variable}" in own_command, (name, variable)


def test_settings_the_code_reads_from_the_environment_are_spelled_as_in_infra(compose):
    """The settings every vitflow process needs come from the same names in compose and the Kubernetes secret."""
    (secret,) = load_yaml_docs(INFRA / "k8s" / "vitflow-env.example.yaml")
    needed = {"PREFECT_API_URL", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
              "AWS_SECRET_ACCESS_KEY", "VITFLOW_ARTIFACT_ROOT"}  # fmt: skip
    assert needed <= set(compose["services"]["gpu-worker"]["environment"])
    assert needed <= set(secret["stringData"])
    assert compose["services"]["gpu-worker"]["environment"]["VITFLOW_ARTIFACT_ROOT"].startswith("s3://")


# --------------------------------------------------------------------------------------------------------------
# Kubernetes


def test_k8s_variables_are_read(code_text):
    names = set()
    for path in sorted((INFRA / "k8s").glob("*.yaml")):
        for doc in load_yaml_docs(path):
            names |= set(doc.get("stringData", {}))
            for container in doc.get("spec", {}).get("template", {}).get("spec", {}).get("containers", []):
                names |= {e["name"] for e in container.get("env", [])}
    assert names
    assert all(read_by_tools(n, code_text) for n in names), sorted(n for n in names if not read_by_tools(n, code_text))


def test_gpu_pool_base_job_template_renders_a_valid_gpu_job():
    from prefect.utilities.templating import apply_values, find_placeholders

    template = json.loads((INFRA / "k8s" / "base-job-template.json").read_text())
    variables = template["variables"]["properties"]
    used = {p.name for p in find_placeholders(template["job_configuration"])}
    assert used == set(variables)  # every placeholder is a variable of the pool, every variable is used
    values = {k: v["default"] for k, v in variables.items() if "default" in v}
    values |= {"name": "benchmark-run", "command": "prefect flow-run execute", "env": {}, "labels": {}}
    config = apply_values(template["job_configuration"], values)
    job = config["job_manifest"]
    pod = job["spec"]["template"]["spec"]
    # what the Kubernetes worker requires of a job manifest (prefect_kubernetes' base manifest)
    assert job["apiVersion"] == "batch/v1" and job["kind"] == "Job" and "labels" in job["metadata"]
    assert (pod["parallelism"], pod["completions"], pod["restartPolicy"]) == (1, 1, "Never")
    (container,) = pod["containers"]
    assert container["name"] == "prefect-job" and container["image"] == "vitflow:latest"
    assert container["args"] == "prefect flow-run execute"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["envFrom"] == [{"secretRef": {"name": "vitflow-env"}}]
    assert {"/dev/shm", "/var/lib/vitflow"} <= {m["mountPath"] for m in container["volumeMounts"]}
    assert {v["name"] for v in pod["volumes"]} == {m["name"] for m in container["volumeMounts"]}
    assert config["namespace"] == job["metadata"]["namespace"] == "vitflow"


def test_multi_node_torchrun_job_runs_the_launchers_command_on_a_valid_config():
    from tasks.launch import Launch, command
    from vit.engine.config import TrainConfig

    docs = {d["kind"]: d for d in load_yaml_docs(INFRA / "k8s" / "torchrun-job.yaml")}
    service, config_map, job = docs["Service"], docs["ConfigMap"], docs["Job"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    argv = container["command"] + container.get("args", [])
    flags = dict(a.removeprefix("--").split("=", 1) for a in argv if a.startswith("--") and "=" in a)
    nnodes, nproc = int(flags["nnodes"]), int(flags["nproc_per_node"])

    # one pod per node, stable names, pod 0 reachable through the headless service before it is ready
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == nnodes
    assert pod["subdomain"] == service["metadata"]["name"] and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    host, port = flags["rdzv_endpoint"].rsplit(":", 1)
    assert host == f"{job['metadata']['name']}-0.{service['metadata']['name']}"
    assert int(port) in {p["port"] for p in service["spec"]["ports"]}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == nproc

    # exactly what tasks/launch.py runs for compute.nnodes / nproc_per_node / rdzv_endpoint
    config = argv[argv.index("vit.engine") + 1]
    events, result = argv[argv.index("--metrics") + 1], argv[argv.index("--result") + 1]
    expected = command(Path(config), Path(events), Path(result), Launch(nproc, nnodes, flags["rdzv_endpoint"]))
    assert argv == ["python", *expected[1:]]
    assert flags["rdzv_backend"] == "c10d"

    # the config it trains on is a valid TrainConfig for that world size, mounted where the command reads it
    mount = next(m for m in container["volumeMounts"] if config.startswith(m["mountPath"]))
    volume = next(v for v in pod["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    cfg = TrainConfig.from_dict(yaml.safe_load(config_map["data"][Path(config).name]))
    cfg.validate(world_size=nnodes * nproc)
    assert cfg.checkpoint.dir and cfg.checkpoint.dir.startswith("s3://")  # resumable across pod restarts
    assert container["envFrom"] == [{"secretRef": {"name": "vitflow-env"}}]
