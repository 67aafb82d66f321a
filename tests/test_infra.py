"""infra/: the files parse, KubeRay manifests have what KubeRay v1 requires, and images, versions,
paths, commands and services agree with each other and with the repository. No Ray, Docker or network.

Each check collects problems as strings; the tests also feed them broken copies, so a manifest
someone breaks (replica bounds, a missing spec, a CPU image on a GPU group) fails here.
"""

from __future__ import annotations

import copy
import fnmatch
import functools
import importlib.util
import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
KUBERAY = INFRA / "kuberay"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
DOCKERIGNORE = INFRA / "docker" / "Dockerfile.dockerignore"
RAY_UP = INFRA / "ray-up" / "cluster.yaml"
COMPOSE = INFRA / "mlflow" / "docker-compose.yaml"
MLFLOW_DOCKERFILE = INFRA / "mlflow" / "Dockerfile"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
EARTHRAY_IMAGE = re.compile(r"^(?:\S+/)?earthray:(?P<version>[^-\s]+)-(?P<variant>[a-z0-9]+)$")
RAY_KINDS = ("RayCluster", "RayJob", "RayService")
GPU = "nvidia.com/gpu"


def load_docs(path: Path) -> list:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


# The loaders below are cached; tests change only deep copies of what they return.
@functools.cache
def kuberay_docs() -> list[tuple[Path, dict]]:
    return [(p, d) for p in sorted(KUBERAY.glob("*.yaml")) for d in load_docs(p)]


def ray_resources(kind: str | None = None) -> list[tuple[Path, dict]]:
    return [(p, d) for p, d in kuberay_docs() if d.get("kind") in RAY_KINDS and kind in (None, d["kind"])]


def cluster_of(doc: dict) -> dict:
    spec = doc["spec"]
    return {"RayCluster": spec, "RayJob": spec.get("rayClusterSpec"), "RayService": spec.get("rayClusterConfig")}[
        doc["kind"]]


def groups(cluster: dict) -> list[tuple[str, dict]]:
    return [("head", cluster["headGroupSpec"])] + [(g.get("groupName", "?"), g) for g in cluster["workerGroupSpecs"]]


def pod_spec(group: dict) -> dict:
    return group["template"]["spec"]


def cpus(quantity) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def gpus(container: dict) -> int:
    return int(container.get("resources", {}).get("limits", {}).get(GPU, 0))


@functools.cache
def dockerfile(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        instruction, _, args = pending.strip().partition(" ")
        out.append((instruction.upper(), " ".join(args.split())))
        pending = ""
    return out


@functools.cache
def dockerfile_args(path: Path = DOCKERFILE) -> dict[str, str]:
    return dict(a.partition("=")[::2] for i, a in dockerfile(path) if i == "ARG" and "=" in a)


@functools.cache
def allowed_variants() -> list[str]:
    """The shell ``case`` patterns the Dockerfile accepts for VARIANT (glob syntax, as fnmatch takes)."""
    run = " ".join(a for i, a in dockerfile() if i == "RUN")
    found = re.search(r'case "\$\{VARIANT\}" in ([^)]+)\)', run)
    assert found, "the Dockerfile validates VARIANT with a `case` statement"
    return found.group(1).split("|")


@functools.cache
def workdir() -> str:
    return [a for i, a in dockerfile() if i == "WORKDIR"][-1]


@functools.cache
def shared_claim() -> str:
    claims = [d for _, d in kuberay_docs() if d.get("kind") == "PersistentVolumeClaim"
              and "ReadWriteMany" in d["spec"]["accessModes"]]
    assert len(claims) == 1, "one ReadWriteMany PVC shared by the Ray pods"
    return claims[0]["metadata"]["name"]


@functools.cache
def mlflow_service_uri() -> str:
    services = [d for _, d in kuberay_docs() if d.get("kind") == "Service"]
    assert len(services) == 1
    return f"http://{services[0]['metadata']['name']}:{services[0]['spec']['ports'][0]['port']}"


def image_problems(image: str, needs_gpu: bool, where: str) -> list[str]:
    m = EARTHRAY_IMAGE.match(image or "")
    if not m:
        return [f"{where}: image {image!r} is not earthray:<version>-<variant>"]
    problems = []
    if m["version"] != PYPROJECT["project"]["version"]:
        problems.append(f"{where}: image version {m['version']} is not the package's {PYPROJECT['project']['version']}")
    if not any(fnmatch.fnmatchcase(m["variant"], p) for p in allowed_variants()):
        problems.append(f"{where}: variant {m['variant']} is not one the Dockerfile builds")
    if needs_gpu != m["variant"].startswith("cu"):
        problems.append(f"{where}: {'GPU' if needs_gpu else 'CPU'} pods need the {'CUDA' if needs_gpu else 'cpu'} "
                        f"image, got {image}")
    return problems


def cluster_problems(cluster: dict, where: str) -> list[str]:
    """What KubeRay v1 requires of a cluster spec, plus this project's conventions."""
    problems = []
    if str(cluster.get("rayVersion")) != dockerfile_args()["RAY_VERSION"]:
        problems.append(f"{where}: rayVersion {cluster.get('rayVersion')} is not the image's "
                        f"{dockerfile_args()['RAY_VERSION']}")
    if not isinstance(cluster.get("workerGroupSpecs"), list) or not cluster["workerGroupSpecs"]:
        problems.append(f"{where}: no workerGroupSpecs")
        cluster = {**cluster, "workerGroupSpecs": []}
    head_params = cluster["headGroupSpec"].get("rayStartParams", {})
    if head_params.get("dashboard-host") != "0.0.0.0":
        problems.append(f"{where}: head rayStartParams.dashboard-host is not 0.0.0.0")
    names = [g.get("groupName") for g in cluster["workerGroupSpecs"]]
    if len(set(names)) != len(names):
        problems.append(f"{where}: duplicate groupName in {names}")
    mounts = set()
    for name, group in groups(cluster):
        at = f"{where}: {name}"
        params = group.get("rayStartParams")
        if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
            problems.append(f"{at}: rayStartParams must be a map of strings, got {params!r}")
        if name != "head":
            if not group.get("groupName"):
                problems.append(f"{at}: no groupName")
            bounds = [group.get(k) for k in ("minReplicas", "replicas", "maxReplicas")]
            if not all(isinstance(b, int) for b in bounds):
                problems.append(f"{at}: minReplicas/replicas/maxReplicas must be integers, got {bounds}")
            elif not 0 <= bounds[0] <= bounds[1] <= bounds[2]:
                problems.append(f"{at}: needs 0 <= minReplicas <= replicas <= maxReplicas, got {bounds}")
        containers = pod_spec(group).get("containers") or []
        if not containers:
            problems.append(f"{at}: template.spec.containers is empty")
            continue
        ray = containers[0]
        problems += image_problems(ray.get("image"), gpus(ray) > 0, at)
        if ray.get("workingDir") != workdir():
            problems.append(f"{at}: workingDir {ray.get('workingDir')} is not the image's WORKDIR {workdir()}")
        env = {e["name"]: e.get("value") for e in ray.get("env", [])}
        if env.get("MLFLOW_TRACKING_URI") != mlflow_service_uri():
            problems.append(f"{at}: MLFLOW_TRACKING_URI is {env.get('MLFLOW_TRACKING_URI')}, not the MLflow "
                            f"Service {mlflow_service_uri()}")
        volumes = {v["name"]: v.get("persistentVolumeClaim", {}).get("claimName")
                   for v in pod_spec(group).get("volumes", [])}
        shared = [m["mountPath"] for m in ray.get("volumeMounts", []) if volumes.get(m["name"]) == shared_claim()]
        if not shared:
            problems.append(f"{at}: the shared PVC {shared_claim()} is not mounted")
        mounts.update(shared)
    if len(mounts) > 1:
        problems.append(f"{where}: the shared PVC is mounted at different paths {sorted(mounts)}")
    return problems


@functools.cache
def cli_commands() -> set[str]:
    import typer.main

    from earthray.cli import app

    return set(typer.main.get_command(app).commands)


def entrypoint_problems(command: str, commands: set[str]) -> list[str]:
    """Every ``earthray <cmd> ...`` in a shell line names a CLI command, and every spec it names exists."""
    problems = []
    for part in re.split(r"&&|\|\||;", command):
        words = shlex.split(part)
        while words and re.match(r"^[A-Za-z_]\w*=", words[0]):
            words.pop(0)
        if not words or words[0] != "earthray":
            continue
        if len(words) > 1 and not words[1].startswith("-") and words[1] not in commands:
            problems.append(f"{part.strip()!r}: the earthray CLI has no command {words[1]!r} "
                            f"(has {', '.join(sorted(commands))})")
        for word in words[2:]:
            if word.endswith((".yaml", ".yml")) and not (ROOT / word).is_file():
                problems.append(f"{part.strip()!r}: spec {word} does not exist in the repository")
    return problems


def entrypoints() -> list[tuple[str, str]]:
    found = [(f"{p.name}: {d['metadata']['name']}", d["spec"]["entrypoint"]) for p, d in ray_resources("RayJob")]
    up = yaml.safe_load(RAY_UP.read_text())
    for key in ("setup_commands", "head_setup_commands", "worker_setup_commands", "head_start_ray_commands",
                "worker_start_ray_commands"):
        found += [(f"{RAY_UP.name}: {key}", c) for c in up.get(key, [])]
    found += [(f"{DOCKERFILE.name}: CMD", " ".join(json.loads(a))) for i, a in dockerfile() if i == "CMD"]
    return found


def pretrain_spec_of(entrypoint: str):
    from earthray.config import load_yaml
    from earthray.train.spec import PretrainSpec

    words = shlex.split(entrypoint)
    spec_path = ROOT / words[words.index("pretrain") + 1]
    return load_yaml(spec_path, PretrainSpec)


def fit_problems(cluster: dict, spec, where: str) -> list[str]:
    """The cluster can host the spec's Ray Train workers, and its paths lie on the shared volume."""
    problems = []
    w = spec.workers
    workers = cluster["workerGroupSpecs"]
    if w.use_gpu:
        gpu_groups = [g for g in workers if gpus(pod_spec(g)["containers"][0])]
        total = sum(g["maxReplicas"] * gpus(pod_spec(g)["containers"][0]) for g in gpu_groups)
        if total < w.num_workers:
            problems.append(f"{where}: {w.num_workers} GPU workers need {w.num_workers} GPUs, the cluster has {total}")
        for g in gpu_groups:
            c = pod_spec(g)["containers"][0]
            per_worker = cpus(c["resources"]["limits"]["cpu"]) / gpus(c)
            if per_worker < w.cpus_per_worker:
                problems.append(f"{where}: {g['groupName']} has {per_worker:g} CPUs per GPU, the spec asks "
                                f"{w.cpus_per_worker:g} per worker")
    else:
        total = sum(g["maxReplicas"] * cpus(pod_spec(g)["containers"][0]["resources"]["limits"]["cpu"])
                    for g in workers)
        if total < w.num_workers * w.cpus_per_worker:
            problems.append(f"{where}: {w.num_workers} workers x {w.cpus_per_worker:g} CPUs do not fit in {total:g}")
    for name, group in groups(cluster):
        ray = pod_spec(group)["containers"][0]
        roots = [m["mountPath"] for m in ray.get("volumeMounts", [])]
        for label, path in (("workdir", spec.workdir), ("data.root", spec.data.root)):
            if "://" in path:
                continue
            if not any(Path(path).is_relative_to(r) for r in roots):
                problems.append(f"{where}: {name}: the spec's {label} {path} is on no volume of the pod")
    return problems


def serve_config(doc: dict) -> dict:
    return yaml.safe_load(doc["spec"]["serveConfigV2"])


def serve_problems(config: dict, cluster: dict, where: str) -> list[str]:
    problems = []
    apps = config.get("applications") or []
    if not apps:
        return [f"{where}: serveConfigV2 has no applications"]
    capacity = sum(g["maxReplicas"] * cpus(pod_spec(g)["containers"][0]["resources"]["limits"]["cpu"])
                   for g in cluster["workerGroupSpecs"])
    for app in apps:
        at = f"{where}: application {app.get('name')}"
        if not app.get("name") or not str(app.get("route_prefix", "")).startswith("/"):
            problems.append(f"{at}: needs a name and a route_prefix starting with /")
        if not re.fullmatch(r"earthray(\.\w+)+:\w+", str(app.get("import_path"))):
            problems.append(f"{at}: import_path {app.get('import_path')!r} is not earthray.<module>:<attr>")
        models = (app.get("args") or {}).get("models") or {}
        if not models:
            problems.append(f"{at}: args.models is empty")
        for name, source in models.items():
            if source.startswith("models:/") and not re.fullmatch(r"models:/[\w.-]+(@[\w.-]+|/\d+)", source):
                problems.append(f"{at}: model {name}: {source} is not models:/NAME@ALIAS or models:/NAME/VERSION")
        for d in app.get("deployments") or []:
            auto, actor = d.get("autoscaling_config") or {}, d.get("ray_actor_options") or {}
            if not d.get("name"):
                problems.append(f"{at}: a deployment without a name")
            if auto and not 0 <= auto.get("min_replicas", 1) <= auto.get("max_replicas", 1):
                problems.append(f"{at}: {d.get('name')}: needs min_replicas <= max_replicas, got {auto}")
            if d.get("max_ongoing_requests", 5) < 1 or actor.get("num_cpus", 1) <= 0:
                problems.append(f"{at}: {d.get('name')}: max_ongoing_requests and num_cpus must be positive")
            need = auto.get("max_replicas", d.get("num_replicas", 1)) * actor.get("num_cpus", 1)
            if need > capacity:
                problems.append(f"{at}: {d.get('name')}: {need:g} CPUs at max replicas, the workers have {capacity:g}")
    return problems


def compose_value(text: str) -> str:
    """Compose interpolation with the defaults: ``${VAR:-default}`` -> default, ``$$`` -> ``$``."""
    text = re.sub(r"\$\{\w+:-([^}]*)\}", r"\1", str(text))
    return text.replace("$$", "$")


def mlflow_flags(command: list[str]) -> dict[str, str]:
    flags: dict[str, str] = {}
    for word in command:
        key, _, value = word.partition("=")
        if key.startswith("--"):
            flags[key] = value
    return flags


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule for a context path: the last pattern matching it or a folder above it decides."""
    parts = Path(path).parts
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in patterns:
        negate, pat = pattern.startswith("!"), pattern.lstrip("!").rstrip("/")
        anywhere = pat.startswith("**/")
        pat = pat.removeprefix("**/")
        if any(fnmatch.fnmatchcase(Path(c).name if anywhere else c, pat) for c in candidates):
            result = not negate
    return result


# ---------------------------------------------------------------------------------------------- parsing


def test_every_yaml_under_infra_parses():
    paths = sorted(INFRA.rglob("*.yaml")) + sorted(INFRA.rglob("*.yml"))
    assert {p.relative_to(INFRA).as_posix() for p in paths} >= {
        "kuberay/raycluster.yaml", "kuberay/rayjob-pretrain.yaml", "kuberay/rayservice.yaml", "kuberay/pvc.yaml",
        "kuberay/mlflow.yaml", "ray-up/cluster.yaml", "mlflow/docker-compose.yaml"}
    for path in paths:
        docs = load_docs(path)
        assert docs and all(isinstance(d, dict) for d in docs), path


def test_kubernetes_objects_have_api_version_kind_and_name():
    for path, doc in kuberay_docs():
        assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), (path, doc)
    kinds = [d["kind"] for _, d in ray_resources()]
    assert sorted(kinds) == sorted(RAY_KINDS)
    assert {d["apiVersion"] for _, d in ray_resources()} == {"ray.io/v1"}


# ---------------------------------------------------------------------------------------------- KubeRay


@pytest.mark.parametrize("kind", RAY_KINDS)
def test_ray_clusters_are_complete_and_consistent(kind):
    [(path, doc)] = ray_resources(kind)
    cluster = cluster_of(doc)
    assert cluster, f"{path}: {kind} has no cluster spec"
    assert cluster_problems(cluster, path.name) == []


def test_raycluster_has_cpu_and_gpu_worker_groups():
    [(_, doc)] = ray_resources("RayCluster")
    by_gpu = {gpus(pod_spec(g)["containers"][0]) > 0 for g in doc["spec"]["workerGroupSpecs"]}
    assert by_gpu == {True, False}


BREAKAGES = {
    "replicas above maxReplicas": (lambda c: c["workerGroupSpecs"][0].update(replicas=9, maxReplicas=8),
                                   "minReplicas <= replicas <= maxReplicas"),
    "minReplicas above replicas": (lambda c: c["workerGroupSpecs"][0].update(minReplicas=3, replicas=2),
                                   "minReplicas <= replicas <= maxReplicas"),
    "no groupName": (lambda c: c["workerGroupSpecs"][0].pop("groupName"), "no groupName"),
    "integer rayStartParams": (lambda c: c["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}),
                               "map of strings"),
    "no containers": (lambda c: pod_spec(c["workerGroupSpecs"][0]).update(containers=[]), "containers is empty"),
    "CPU image on a GPU group": (lambda c: pod_spec(c["workerGroupSpecs"][1])["containers"][0].update(
        image="earthray:0.1.0-cpu"), "need the CUDA image"),
    "foreign image": (lambda c: pod_spec(c["workerGroupSpecs"][0])["containers"][0].update(
        image="rayproject/ray:2.60.0"), "is not earthray:"),
    "stale image version": (lambda c: pod_spec(c["workerGroupSpecs"][0])["containers"][0].update(
        image="earthray:0.0.9-cpu"), "not the package's"),
    "other rayVersion": (lambda c: c.update(rayVersion="2.59.0"), "rayVersion"),
    "dashboard on localhost": (lambda c: c["headGroupSpec"]["rayStartParams"].update({"dashboard-host": "127.0.0.1"}),
                               "dashboard-host"),
    "shared volume unmounted": (lambda c: pod_spec(c["workerGroupSpecs"][0])["containers"][0].update(volumeMounts=[]),
                                "is not mounted"),
    "wrong working dir": (lambda c: pod_spec(c["headGroupSpec"])["containers"][0].update(workingDir="/tmp"),
                          "workingDir"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_cluster_check_catches(breakage):
    [(_, doc)] = ray_resources("RayCluster")
    cluster = copy.deepcopy(cluster_of(doc))
    mutate, expected = BREAKAGES[breakage]
    mutate(cluster)
    problems = cluster_problems(cluster, "broken")
    assert any(expected in p for p in problems), problems


def test_entrypoints_name_existing_commands_and_specs():
    found = entrypoints()
    assert any("earthray pretrain" in e for _, e in found), "the RayJob runs earthray pretrain"
    commands = cli_commands()
    assert {"ingest", "pretrain"} <= commands
    for where, entrypoint in found:
        assert entrypoint_problems(entrypoint, commands) == [], where


def test_entrypoint_check_catches_missing_commands_and_specs():
    commands = cli_commands()
    assert entrypoint_problems("earthray pretrain jobs/pretrain-ofa-base.yaml --address auto", commands) == []
    assert entrypoint_problems("cd x && RAY_AUTH_MODE=token earthray pretrain jobs/nope.yaml", commands)
    assert "no command" in entrypoint_problems("earthray no-such-command jobs/pretrain-ofa-base.yaml", commands)[0]


def test_rayjob_cluster_fits_its_spec_and_holds_its_paths():
    [(path, doc)] = ray_resources("RayJob")
    spec = pretrain_spec_of(doc["spec"]["entrypoint"])
    assert doc["spec"]["shutdownAfterJobFinishes"] is True and doc["spec"]["ttlSecondsAfterFinished"] >= 0
    assert "--address auto" in doc["spec"]["entrypoint"]
    cluster = cluster_of(doc)
    assert fit_problems(cluster, spec, path.name) == []

    small = copy.deepcopy(cluster)
    small["workerGroupSpecs"][0].update(replicas=2, maxReplicas=2)
    assert any("GPUs" in p for p in fit_problems(small, spec, "small"))
    moved = copy.deepcopy(cluster)
    for _, group in groups(moved):
        for mount in pod_spec(group)["containers"][0]["volumeMounts"]:
            mount["mountPath"] = "/mnt/elsewhere"
    assert any("on no volume" in p for p in fit_problems(moved, spec, "moved"))


def test_specs_without_tracking_uri_use_the_environment(monkeypatch):
    [(_, doc)] = ray_resources("RayJob")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_service_uri())
    spec = pretrain_spec_of(doc["spec"]["entrypoint"])
    assert spec.tracking.tracking_uri is None
    assert spec.tracking_uri == mlflow_service_uri()


def test_rayservice_serve_config():
    [(path, doc)] = ray_resources("RayService")
    config = serve_config(doc)
    assert serve_problems(config, cluster_of(doc), path.name) == []
    [app] = config["applications"]
    assert app["import_path"] == "earthray.serve.app:build_app" and app["route_prefix"] == "/"
    [deployment] = app["deployments"]
    assert {"autoscaling_config", "max_ongoing_requests", "ray_actor_options"} <= set(deployment)

    broken = copy.deepcopy(config)
    broken["applications"][0].update(import_path="serve_app:build")
    d = broken["applications"][0]["deployments"][0]
    d["autoscaling_config"].update(min_replicas=5, max_replicas=2)
    broken["applications"][0]["args"]["models"]["landcover"] = "models:/landcover"
    problems = " | ".join(serve_problems(broken, cluster_of(doc), "broken"))
    assert "import_path" in problems and "min_replicas <= max_replicas" in problems and "models:/NAME" in problems
    greedy = copy.deepcopy(config)
    greedy["applications"][0]["deployments"][0]["ray_actor_options"]["num_cpus"] = 64
    assert any("CPUs at max replicas" in p for p in serve_problems(greedy, cluster_of(doc), "greedy"))


def test_serve_config_names_the_apps_deployments():
    if importlib.util.find_spec("earthray.serve") is None or importlib.util.find_spec("earthray.serve.app") is None:
        pytest.skip("earthray.serve.app is not written yet")
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve._private.build_app import build_app
    from ray.serve._private.utils import import_attr

    [(_, doc)] = ray_resources("RayService")
    for app in serve_config(doc)["applications"]:
        built = build_app(call_user_app_builder_with_args_if_necessary(import_attr(app["import_path"]), app["args"]),
                          name=app["name"])
        names = {d.name for d in built.deployments}
        assert {d["name"] for d in app.get("deployments", [])} <= names, names


def test_pvcs_and_mlflow_service_are_wired():
    docs = [d for _, d in kuberay_docs()]
    claims = {d["metadata"]["name"] for d in docs if d["kind"] == "PersistentVolumeClaim"}
    [deployment] = [d for d in docs if d["kind"] == "Deployment"]
    [service] = [d for d in docs if d["kind"] == "Service"]
    pod = deployment["spec"]["template"]
    used = {v["persistentVolumeClaim"]["claimName"] for v in pod["spec"]["volumes"] if "persistentVolumeClaim" in v}
    assert used <= claims
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    [container] = pod["spec"]["containers"]
    assert service["spec"]["ports"][0]["targetPort"] in {p["name"] for p in container["ports"]}
    flags = mlflow_flags(container["args"])
    assert flags["--port"] == str(container["ports"][0]["containerPort"]) and "--serve-artifacts" in flags
    assert container["image"].endswith(f"earthray-mlflow:{dockerfile_args(MLFLOW_DOCKERFILE)['MLFLOW_VERSION']}")


# ---------------------------------------------------------------------------------------------- Dockerfile


def test_dockerfile_builds_cpu_and_cuda_variants_from_ray():
    from packaging.requirements import Requirement
    from packaging.specifiers import SpecifierSet

    steps = dockerfile()
    args = dockerfile_args()
    froms = [(n, a) for n, (i, a) in enumerate(steps) if i == "FROM"]
    assert len(froms) == 1
    at, base = froms[0]
    assert base == "rayproject/ray:${RAY_VERSION}-${PYTHON_TAG}-${VARIANT}"
    assert {"RAY_VERSION", "PYTHON_TAG", "VARIANT"} <= {a.partition("=")[0] for i, a in steps[:at] if i == "ARG"}
    for name in ("RAY_VERSION", "PYTHON_TAG", "VARIANT"):  # build args reach steps only if declared after FROM
        used_after = any(f"${{{name}}}" in a for _, a in steps[at + 1:])
        declared_after = any(i == "ARG" and a.partition("=")[0] == name for i, a in steps[at + 1:])
        assert declared_after or not used_after, f"{name} is used after FROM but not declared there"

    assert args["VARIANT"] == "cpu" and any(fnmatch.fnmatchcase("cu128", p) for p in allowed_variants())
    used = {EARTHRAY_IMAGE.match(i)["variant"] for i in all_earthray_images()}
    assert "cpu" in used and any(v.startswith("cu") for v in used)
    assert any("download.pytorch.org/whl/${VARIANT}" in a for i, a in steps if i == "RUN")

    deps = {Requirement(r).name: Requirement(r).specifier for r in PYPROJECT["project"]["dependencies"]}
    assert args["RAY_VERSION"] in deps["ray"] and args["TORCH_VERSION"] in deps["torch"]
    assert args["TORCHVISION_VERSION"] in deps["torchvision"]
    python = re.fullmatch(r"py3(\d+)", args["PYTHON_TAG"])
    assert python and f"3.{python[1]}" in SpecifierSet(PYPROJECT["project"]["requires-python"])


def test_dockerfile_installs_compilers_runs_as_non_root_and_has_a_command():
    steps = dockerfile()
    runs = " ".join(a for i, a in steps if i == "RUN")
    assert re.search(r"apt-get install [^&]*\bg\+\+", runs) and re.search(r"apt-get install [^&]*\bninja-build", runs)
    assert re.search(r"pip install [^&]*\s\.(\s|$)", runs), "installs earthray from the repository"
    users = [a for i, a in steps if i == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert [i for i, _ in steps].count("CMD") == 1
    assert workdir().startswith("/")


def test_dockerfile_copies_only_what_exists_and_the_context_admits():
    patterns = [line.strip() for line in DOCKERIGNORE.read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    sources = []
    for instruction, args in dockerfile():
        if instruction == "COPY":
            words = [w for w in args.split() if not w.startswith("--")]
            sources += words[:-1]
    assert {"pyproject.toml", "platform/", "jobs/", "serve/", "tune/", "data/sample/"} <= set(sources)
    for source in sources:
        assert (ROOT / source).exists(), f"COPY {source}: not in the repository"
        assert not ignored(source.rstrip("/"), patterns), f"COPY {source}: excluded by {DOCKERIGNORE.name}"
    for bulky in (".venv", ".git", "work", "tests", "platform/earthray/__pycache__"):
        assert ignored(bulky, patterns), f"{bulky} would be sent to the builder"


def test_docker_readme_builds_every_image_the_manifests_use():
    readme = (INFRA / "docker" / "README.md").read_text()
    builds = [line for line in readme.splitlines() if line.startswith("docker build -f infra/docker/Dockerfile")]
    tags = {}
    for line in builds:
        variant = re.search(r"--build-arg VARIANT=(\S+)", line)
        tag = re.search(r"\s-t\s+(\S+)", line)[1]
        tags[tag] = variant[1] if variant else dockerfile_args()["VARIANT"]
    for image in all_earthray_images():
        local = image.rsplit("/", 1)[-1]
        assert local in tags, f"{image}: no docker build line in infra/docker/README.md"
        assert EARTHRAY_IMAGE.match(local)["variant"] == tags[local]


def all_earthray_images() -> list[str]:
    images = [c["image"] for _, d in ray_resources() for _, g in groups(cluster_of(d)) for c in pod_spec(g)["containers"]]
    up = yaml.safe_load(RAY_UP.read_text())
    images += [v for k, v in up["docker"].items() if k.endswith("image")]
    images += [t["docker"]["worker_image"] for t in up["available_node_types"].values() if "docker" in t]
    return images


# ---------------------------------------------------------------------------------------------- ray up


def test_ray_up_cluster_matches_ray_schema_and_the_image():
    import jsonschema

    ray_dir = Path(importlib.util.find_spec("ray").submodule_search_locations[0])
    config = yaml.safe_load(RAY_UP.read_text())
    jsonschema.validate(config, json.loads((ray_dir / "autoscaler" / "ray-schema.json").read_text()))

    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = {k: t for k, t in types.items() if k != config["head_node_type"]}
    assert all(0 <= t["min_workers"] <= t["max_workers"] for t in workers.values())
    assert sum(t["min_workers"] for t in workers.values()) <= config["max_workers"]
    for name, t in types.items():
        image = t.get("docker", {}).get("worker_image") or config["docker"][
            "head_image" if name == config["head_node_type"] else "worker_image"]
        needs_gpu = t["node_config"]["InstanceType"][0] in "gp"
        assert image_problems(image, needs_gpu, f"{RAY_UP.name}: {name}") == []

    assert config["file_mounts"][workdir()] == "."
    head, worker = " ".join(config["head_start_ray_commands"]), " ".join(config["worker_start_ray_commands"])
    port = re.search(r"ray start --head [^;&]*--port=(\d+)", head)[1]
    assert f"--address=$RAY_HEAD_IP:{port}" in worker
    assert "--dashboard-host=0.0.0.0" in head
    assert ("RAY_AUTH_MODE=token" in head) == ("RAY_AUTH_MODE=token" in worker)


# ---------------------------------------------------------------------------------------------- MLflow


def test_compose_runs_mlflow_on_postgres_and_s3():
    compose = yaml.safe_load(COMPOSE.read_text())
    services = compose["services"]
    by_image = {name: compose_value(s.get("image", "")) for name, s in services.items()}
    [pg] = [n for n, i in by_image.items() if i.startswith("postgres")]
    [s3] = [n for n, i in by_image.items() if "minio/minio" in i]
    [init] = [n for n, i in by_image.items() if "minio/mc" in i]
    [mlflow] = [n for n, s in services.items() if "mlflow" in s.get("command", [])[:1]]

    depends = services[mlflow]["depends_on"]
    assert depends[pg]["condition"] == depends[s3]["condition"] == "service_healthy"
    assert depends[init]["condition"] == "service_completed_successfully"
    assert services[init]["depends_on"][s3]["condition"] == "service_healthy"
    for name in (pg, s3, mlflow):
        assert services[name]["healthcheck"]["test"], f"{name} has no healthcheck"

    env = {k: compose_value(v) for k, v in services[mlflow]["environment"].items()}
    pg_env = {k: compose_value(v) for k, v in services[pg]["environment"].items()}
    s3_env = {k: compose_value(v) for k, v in services[s3]["environment"].items()}
    init_env = {k: compose_value(v) for k, v in services[init]["environment"].items()}
    flags = {k: compose_value(v) for k, v in mlflow_flags(services[mlflow]["command"]).items()}

    assert flags["--backend-store-uri"] == (f"postgresql://{pg_env['POSTGRES_USER']}:{pg_env['POSTGRES_PASSWORD']}"
                                            f"@{pg}:5432/{pg_env['POSTGRES_DB']}")
    assert "--serve-artifacts" in flags
    bucket = re.fullmatch(r"s3://([^/]+)(/.*)?", flags.get("--artifacts-destination") or flags.get("--default-artifact-root", ""))
    assert bucket and bucket[1] == init_env["MLFLOW_BUCKET"]
    assert "mc mb" in compose_value(services[init]["command"][0])
    assert env["MLFLOW_S3_ENDPOINT_URL"] == f"http://{s3}:9000"
    assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == (s3_env["MINIO_ROOT_USER"],
                                                                        s3_env["MINIO_ROOT_PASSWORD"])
    assert "5000:5000" in services[mlflow]["ports"]


def test_mlflow_server_image_is_the_clients_mlflow():
    import importlib.metadata

    from packaging.requirements import Requirement

    version = dockerfile_args(MLFLOW_DOCKERFILE)["MLFLOW_VERSION"]
    compose = yaml.safe_load(COMPOSE.read_text())
    assert compose["services"]["mlflow"]["image"] == f"earthray-mlflow:{version}"
    [mlflow_req] = [Requirement(r) for r in PYPROJECT["project"]["dependencies"] if r.startswith("mlflow")]
    assert version in mlflow_req.specifier
    assert version.split(".")[0] == importlib.metadata.version("mlflow").split(".")[0]


@pytest.mark.parametrize("where", ["compose", "kuberay"])
def test_mlflow_accepts_the_host_names_clients_use(where):
    from mlflow.server.security_utils import is_allowed_host_header

    if where == "compose":
        command = yaml.safe_load(COMPOSE.read_text())["services"]["mlflow"]["command"]
        clients = ["mlflow:5000", "localhost:5000", "127.0.0.1:5000", "172.18.0.4:5000", "10.0.3.7:5000"]
    else:
        [deployment] = [d for _, d in kuberay_docs() if d["kind"] == "Deployment"]
        command = deployment["spec"]["template"]["spec"]["containers"][0]["args"]
        host = mlflow_service_uri().removeprefix("http://")
        clients = [host, f"mlflow.default.svc.cluster.local:{host.rsplit(':')[1]}", "localhost:5000", "10.42.1.9:5000"]
    allowed = compose_value(mlflow_flags(command)["--allowed-hosts"]).split(",")
    assert all(is_allowed_host_header(allowed, h) for h in clients), (allowed, clients)
    assert not is_allowed_host_header(allowed, "attacker.example.com")
