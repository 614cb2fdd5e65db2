"""deploy/: the Serve configs and the KubeRay manifests, checked offline (no cluster, no image here).

Every YAML parses; every KubeRay file says how to apply it; pod templates, wrapped as Pods, and the plain
Kubernetes objects pass kubernetes-validate's strict schemas; the Ray pods agree on image, Ray version,
shared storage, hub token and MLflow; the RayJob's entrypoint runs (Ray stubbed) and fits its workers; every
Serve app's import path builds its application; each RayService embeds its Serve config file unchanged."""
from __future__ import annotations

import importlib
import importlib.util
import re
import shlex
import tomllib
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBE = ROOT / "deploy" / "kuberay"
IMAGE = "distar:0.1.0"
K8S_VERSION = "1.35.0"
SERVE_CONFIGS = ["deploy/rewards.yaml", "deploy/rewards_digits.yaml", "deploy/serve_generator.yaml",
                 "deploy/serve_generator_cluster.yaml"]


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def manifests() -> dict[str, list[dict]]:
    return {p.name: docs(p) for p in sorted(KUBE.glob("*.yaml"))}


def one(kind: str, name: str | None = None) -> dict:
    found = [d for ds in manifests().values() for d in ds
             if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, (kind, name, len(found))
    return found[0]


def ray_cluster_specs() -> dict[str, dict]:
    """'file:kind' -> the RayCluster spec inside each RayCluster, RayJob and RayService."""
    inner = {"RayCluster": None, "RayJob": "rayClusterSpec", "RayService": "rayClusterConfig"}
    return {f"{fname}:{d['kind']}": d["spec"] if inner[d["kind"]] is None else d["spec"][inner[d["kind"]]]
            for fname, ds in manifests().items() for d in ds if d["kind"] in inner}


def pod_templates() -> dict[str, dict]:
    """'where' -> pod template of every Ray head/worker group and of every Deployment."""
    out = {}
    for where, spec in ray_cluster_specs().items():
        out[f"{where}:head"] = spec["headGroupSpec"]["template"]
        for g in spec["workerGroupSpecs"]:
            out[f"{where}:{g['groupName']}"] = g["template"]
    for fname, ds in manifests().items():
        out.update({f"{fname}:{d['metadata']['name']}": d["spec"]["template"] for d in ds if d["kind"] == "Deployment"})
    return out


def as_pod(where: str, template: dict) -> dict:
    name = re.sub(r"[^a-z0-9-]+", "-", where.lower()).strip("-")[:60]
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, **template.get("metadata", {})},
            "spec": template["spec"]}


def test_every_yaml_parses_and_names_what_it_is():
    for path in [ROOT / p for p in SERVE_CONFIGS]:
        assert docs(path) and "applications" in docs(path)[0], path
    files = manifests()
    assert set(files) >= {"raycluster.yaml", "rayjob-train.yaml", "rayservice-rewards.yaml",
                          "rayservice-generator.yaml", "mlflow.yaml", "storage.yaml", "hub-token-secret.yaml"}
    for fname, ds in files.items():
        assert ds and all({"apiVersion", "kind", "metadata", "spec"} <= set(d) or d["kind"] == "Secret"
                          for d in ds), fname


def test_every_manifest_says_at_the_top_how_to_apply_it():
    for path in sorted(KUBE.glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first.startswith("# Apply: kubectl "), (path.name, first)
        assert f"-f deploy/kuberay/{path.name}" in first or "kubectl create secret" in first, first


def test_pod_templates_and_plain_objects_pass_kubernetes_validate():
    kv = pytest.importorskip("kubernetes_validate")
    objects = {w: as_pod(w, t) for w, t in pod_templates().items()}
    objects.update({f"{f}:{d['kind']}:{d['metadata']['name']}": d for f, ds in manifests().items()
                    for d in ds if not d["apiVersion"].startswith("ray.io/")})
    assert len(objects) == 14  # 8 Ray pods, the MLflow pod, 2 PVCs, Secret, Deployment, Service
    errors = {}
    for where, obj in objects.items():
        try:
            kv.validate(obj, K8S_VERSION, strict=True)
        except kv.ValidationError as err:
            errors[where] = str(err).splitlines()[0]
    assert errors == {}


def test_kubernetes_validate_rejects_a_misspelt_field():
    kv = pytest.importorskip("kubernetes_validate")
    where, template = next(iter(pod_templates().items()))
    bad = as_pod(where, template)
    bad["spec"]["containers"][0]["volumeMount"] = bad["spec"]["containers"][0].pop("volumeMounts")
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)


def test_mounts_name_declared_volumes_and_env_names_are_unique():
    """What the schemas cannot see: a mount of a volume the pod does not declare, a doubled env name."""
    for where, template in pod_templates().items():
        declared = {v["name"] for v in template["spec"].get("volumes", [])}
        for c in template["spec"]["containers"]:
            assert {m["name"] for m in c.get("volumeMounts", [])} <= declared, where
            names = [e["name"] for e in c.get("env", [])]
            assert len(names) == len(set(names)), where


def _env(container: dict) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container.get("env", [])}


def test_ray_pods_share_image_storage_token_and_mlflow():
    pvc = one("PersistentVolumeClaim", "distar-shared")
    secret, service = one("Secret"), one("Service", "distar-mlflow")
    uri = f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    ray_pods = {w: t for w, t in pod_templates().items() if ":Ray" in w}
    assert len(ray_pods) == 8
    for where, template in ray_pods.items():
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        (c,) = template["spec"]["containers"]
        mount = next(m for m in c["volumeMounts"] if m["mountPath"] == "/shared")
        assert volumes[mount["name"]]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"], where
        env = _env(c)
        assert c["image"] == IMAGE and env["HF_HOME"].startswith("/shared/"), where
        ref = env["HF_TOKEN"]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"] and ref["key"] in secret["stringData"], where
        assert env["MLFLOW_TRACKING_URI"] == uri, where
    assert one("Deployment", "distar-mlflow")["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE


def test_the_mlflow_server_answers_the_host_the_pods_call_it_by():
    from mlflow.cli import server
    from mlflow.server.security_utils import is_allowed_host_header

    (c,) = one("Deployment", "distar-mlflow")["spec"]["template"]["spec"]["containers"]
    assert c["command"][:2] == ["mlflow", "server"]
    params = server.make_context("server", list(c["command"][2:])).params  # click parses the real options
    assert params["host"] == "0.0.0.0" and params["serve_artifacts"]
    hosts = params["allowed_hosts"].split(",")
    port = c["ports"][0]["containerPort"]
    assert params["port"] == port
    called = urlparse(_env(one("RayJob")["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
                           ["containers"][0])["MLFLOW_TRACKING_URI"]).netloc
    assert is_allowed_host_header(hosts, called) and not is_allowed_host_header(hosts, "evil.example:5000")
    assert is_allowed_host_header(hosts, f"distar-mlflow.default.svc.cluster.local:{port}")


def test_ray_version_is_the_images_and_inside_pyprojects_range():
    from packaging.requirements import Requirement

    base = re.search(r"^ARG BASE_IMAGE=rayproject/ray:(\d+\.\d+\.\d+)-", (ROOT / "Dockerfile").read_text(), re.M)
    assert base, "Dockerfile: ARG BASE_IMAGE=rayproject/ray:X.Y.Z-..."
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    ray = next(Requirement(d) for d in deps if Requirement(d).name == "ray")
    assert ray.specifier.contains(base.group(1))
    assert {spec["rayVersion"] for spec in ray_cluster_specs().values()} == {base.group(1)}


def _run_entrypoint(capsys, tmp_path, entrypoint: str):
    """The RayJob's entrypoint run in-process with --print-config (nothing starts); returns the config it
    would train, read back from the printed YAML."""
    import jobs.train
    from distar.config import load_config

    argv = shlex.split(entrypoint)
    assert argv[:3] == ["python", "-m", "jobs.train"], argv
    assert importlib.util.find_spec(argv[2]) is not None
    capsys.readouterr()
    assert jobs.train.main([*argv[3:], "--print-config"]) == 0
    (tmp_path / "resolved.yaml").write_text(capsys.readouterr().out)
    return load_config(str(tmp_path / "resolved.yaml"))


def _capacity(group: dict, resource: str) -> float:
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    return group["maxReplicas"] * float(limits.get(resource, 0))


def test_the_rayjob_entrypoint_resolves_offline_and_fits_its_cluster(capsys, tmp_path):
    job = one("RayJob")
    cfg = _run_entrypoint(capsys, tmp_path, job["spec"]["entrypoint"])
    from distar.memory_plan import require_fit

    require_fit(cfg)  # the check jobs.train runs before workers start: the shipped run fits its GPUs
    assert cfg.name and str(cfg.train.out_dir).startswith("/shared/") and cfg.ray.storage_path.startswith("/shared/")
    assert cfg.mlflow.enabled and cfg.mlflow.tracking_uri is None  # taken from $MLFLOW_TRACKING_URI
    served = yaml.safe_load((ROOT / "deploy/serve_generator_cluster.yaml").read_text())
    assert served["applications"][0]["args"]["model"] == f"models:/{cfg.mlflow.registered_model}@{cfg.mlflow.alias}"
    (gpu,) = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    serve = cfg.reward.backend == "serve" and cfg.loss.uses_reward
    replicas = len(cfg.reward.terms) * (cfg.reward.max_replicas or cfg.reward.num_replicas) if serve else 0
    need_gpu = cfg.ray.num_workers * cfg.ray.gpus_per_worker + replicas * cfg.reward.replica_gpus
    need_cpu = cfg.ray.num_workers * cfg.ray.cpus_per_worker + replicas * cfg.reward.replica_cpus
    assert 0 < need_gpu <= _capacity(gpu, "nvidia.com/gpu") and need_cpu <= _capacity(gpu, "cpu"), (need_gpu, need_cpu)


def _serve_configs() -> dict[str, dict]:
    out = {p: yaml.safe_load((ROOT / p).read_text()) for p in SERVE_CONFIGS}
    for fname, ds in manifests().items():
        out.update({f"{fname}:serveConfigV2": yaml.safe_load(d["spec"]["serveConfigV2"]) for d in ds
                    if d["kind"] == "RayService"})
    return out


def test_every_serve_config_validates_and_its_apps_build(monkeypatch):
    from ray import serve
    from ray.serve.schema import ServeDeploySchema

    from distar.registry import REWARDS
    from distar.remote_reward import reward_app_name

    configs = _serve_configs()
    assert len(configs) == 6
    for where, config in configs.items():
        schema = ServeDeploySchema.model_validate(config)  # what `serve deploy` and KubeRay check first
        for app in schema.applications:
            module, attr = app.import_path.replace(":", ".").rsplit(".", 1)
            builder = getattr(importlib.import_module(module), attr)
            assert isinstance(builder(dict(app.args)), serve.Application), (where, app.name)
            if module == "services.reward_service":
                assert app.args["name"] in REWARDS and app.name == reward_app_name(app.args["name"]), where


def test_each_rayservice_embeds_its_serve_config_file_unchanged():
    from jobs.render_kuberay import EMBEDDED, embed, stale

    assert stale() == [], "run: python -m jobs.render_kuberay"
    for manifest, source in EMBEDDED.items():
        (svc,) = docs(ROOT / manifest)
        assert yaml.safe_load(svc["spec"]["serveConfigV2"]) == yaml.safe_load((ROOT / source).read_text())
        edited = (ROOT / source).read_text().replace("max_ongoing_requests:", "max_ongoing_requests: 1 #", 1)
        assert embed((ROOT / manifest).read_text(), edited) != (ROOT / manifest).read_text()


def test_the_cluster_generator_binds_every_interface_and_the_local_one_loopback():
    cluster = yaml.safe_load((ROOT / "deploy/serve_generator_cluster.yaml").read_text())
    local = yaml.safe_load((ROOT / "deploy/serve_generator.yaml").read_text())
    assert cluster["http_options"]["host"] == "0.0.0.0" and local["http_options"]["host"] == "127.0.0.1"
    assert cluster["applications"][0]["args"]["num_gpus"] > 0
    rewards = yaml.safe_load((ROOT / "deploy/rewards.yaml").read_text())["applications"]
    for app in rewards:
        (d,) = app["deployments"]
        assert 0 < d["ray_actor_options"]["num_gpus"] < 1 and d["autoscaling_config"]["max_replicas"] > 1, app["name"]
