"""deploy/k8s validated offline against the Kubernetes schemas (kubernetes-validate,
strict: unknown fields are errors), the kustomizations' references checked, and
the settings that must agree with layerd itself cross-checked: env vars are real
flags, probes and annotations name the container's ports, the termination grace
period covers the drain."""
import re
import subprocess

import kubernetes_validate
import pytest
import yaml

from layerd_server import BINARY, REPO, Server
from test_memory_budget import budget_mib

K8S = REPO / "deploy" / "k8s"
VERSION = "1.33.0"
#: The oldest Kubernetes docs/kubernetes.md promises (preStop's sleep action, on by default).
MINIMUM = "1.30.0"


def documents(path):
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def kustomizations():
    return sorted(K8S.rglob("kustomization.yaml"))


def resources():
    """Every manifest a kustomization lists (directories are other kustomizations)."""
    out = []
    for k in kustomizations():
        for entry in yaml.safe_load(k.read_text()).get("resources", []):
            path = (k.parent / entry).resolve()
            assert path.exists(), f"{k}: {entry} does not exist"
            if path.is_file():
                out.append(path)
    return out


@pytest.mark.parametrize("version", [MINIMUM, VERSION])
@pytest.mark.parametrize("path", resources(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_manifest_is_valid_kubernetes(path, version):
    for doc in documents(path):
        kubernetes_validate.validate(doc, version, strict=True)


def test_the_guide_states_the_minimum_version():
    guide = (REPO / "docs" / "kubernetes.md").read_text()
    assert f"**Kubernetes {MINIMUM.rsplit('.', 1)[0]} or newer.**" in guide


def test_validation_would_catch_a_mistake():
    deployment = documents(K8S / "base" / "deployment.yaml")[0]
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpcc"] = {"port": 1}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSION, strict=True)


def by_kind(directory):
    out = {}
    for k in kustomizations():
        if k.parent == directory:
            for path in resources():
                if path.parent == directory:
                    for doc in documents(path):
                        out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def test_overlay_patches_and_replica_counts_target_base_objects():
    base = by_kind(K8S / "base")
    overlay = yaml.safe_load((K8S / "overlays" / "example" / "kustomization.yaml").read_text())
    for patch in overlay.get("patches", []):
        doc = documents(K8S / "overlays" / "example" / patch["path"])[0]
        assert (doc["kind"], doc["metadata"]["name"]) in base, patch
    for r in overlay.get("replicas", []):
        assert ("Deployment", r["name"]) in base
    assert base[("Deployment", "layerd")]["spec"]["template"]["spec"]["containers"][0]["image"].split(":")[0] == \
        overlay["images"][0]["name"]


def mib(size):
    """A Kubernetes quantity or a layerd size ("2Gi", "16MiB", "1GiB") in MiB."""
    number, unit = re.fullmatch(r"(\d+)([MG])iB?", size).groups()
    return int(number) * (1024 if unit == "G" else 1)


def test_deployment_agrees_with_layerd():
    base = by_kind(K8S / "base")
    pod = base[("Deployment", "layerd")]["spec"]["template"]
    [container] = pod["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    help_text = subprocess.run([str(BINARY), "--help"], capture_output=True, text=True, check=True).stdout
    flags = set(re.findall(r"env: (LAYERD_[A-Z_]+)", help_text))
    assert set(env) <= flags, f"not layerd variables: {set(env) - flags}"

    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert env["LAYERD_ADDR"].endswith(f":{ports['grpc']}") and env["LAYERD_METRICS_ADDR"].endswith(f":{ports['metrics']}")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == ports["grpc"], probe
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(ports["metrics"])

    grace = int(env["LAYERD_SHUTDOWN_GRACE"].rstrip("s"))
    pre_stop = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["spec"]["terminationGracePeriodSeconds"] > grace + pre_stop

    # The memory formula of docs/kubernetes.md (measured in test_memory_budget.py) fits the limit.
    need = budget_mib(mib(env["LAYERD_MAX_TOTAL_KEPT_BYTES"]), int(env["LAYERD_MAX_CONCURRENT_CALLS"]),
                      mib(env["LAYERD_MAX_MESSAGE_BYTES"]), int(env["LAYERD_MAX_CONNECTIONS"]),
                      work_mib=mib(env["LAYERD_MAX_WORK_BYTES"]))
    assert need <= mib(container["resources"]["limits"]["memory"]), need
    ingress = base[("Ingress", "layerd")]["metadata"]["annotations"]
    assert int(ingress["nginx.ingress.kubernetes.io/proxy-body-size"].rstrip("m")) > mib(env["LAYERD_MAX_MESSAGE_BYTES"])

    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"] and pod["spec"]["securityContext"]["runAsNonRoot"]


def test_ingress_pins_sessions_by_header_and_speaks_grpc():
    ingress = by_kind(K8S / "base")[("Ingress", "layerd")]
    notes = ingress["metadata"]["annotations"]
    assert notes["nginx.ingress.kubernetes.io/backend-protocol"] == "GRPC"
    assert notes["nginx.ingress.kubernetes.io/upstream-hash-by"] == "$http_x_session_id"
    service = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    assert ("Service", service["name"]) in by_kind(K8S / "base")


def test_compose_runs_the_replicas_nginx_routes_to():
    """deploy/compose.yaml (not run here: no registry for the nginx image) names the
    replicas deploy/nginx/nginx.conf routes to, and mounts that file."""
    compose = yaml.safe_load((REPO / "deploy" / "compose.yaml").read_text())
    upstreams = set(re.findall(r"server (layerd-\d):50051", (REPO / "deploy" / "nginx" / "nginx.conf").read_text()))
    replicas = {name for name in compose["services"] if name.startswith("layerd-")}
    assert replicas == upstreams == {"layerd-0", "layerd-1", "layerd-2"}
    assert "./nginx/nginx.conf:/etc/nginx/nginx.conf:ro" in compose["services"]["nginx"]["volumes"]
    # One image name that docker and podman both resolve to the local build, and the build itself.
    replica = compose["services"]["layerd-0"]
    assert replica["image"] == "layerd:0.1.0"
    build = (REPO / "deploy" / replica["build"]["context"]).resolve()
    assert build == REPO and (build / replica["build"]["dockerfile"]).exists()
    health = compose["services"]["layerd-0"]["healthcheck"]["test"]
    assert health[1] == "/usr/local/bin/layerd-cli" and health[-1] == "health"


def test_the_stateful_overlay_is_the_deployment_with_a_state_directory():
    base = by_kind(K8S / "base")
    overlay_dir = K8S / "overlays" / "stateful"
    overlay = yaml.safe_load((overlay_dir / "kustomization.yaml").read_text())
    [stateful] = documents(overlay_dir / "statefulset.yaml")
    deployment = base[("Deployment", "layerd")]
    # The delete patch and the autoscaler patch name base objects.
    deleted = yaml.safe_load(overlay["patches"][0]["patch"])
    assert deleted["$patch"] == "delete" and ("Deployment", deleted["metadata"]["name"]) in base
    hpa = documents(overlay_dir / overlay["patches"][1]["path"])[0]
    assert ("HorizontalPodAutoscaler", hpa["metadata"]["name"]) in base
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "StatefulSet",
                                             "name": stateful["metadata"]["name"]}
    assert ("Service", stateful["spec"]["serviceName"]) in base
    # Equal to the Deployment but for the state directory.
    spec = {k: v for k, v in stateful["spec"].items() if k not in ("serviceName", "podManagementPolicy", "volumeClaimTemplates")}
    pod = spec["template"]["spec"]
    assert pod["securityContext"].pop("fsGroup") == pod["securityContext"]["runAsGroup"]
    [container] = pod["containers"]
    [mount] = container.pop("volumeMounts")
    [claim] = stateful["spec"]["volumeClaimTemplates"]
    assert mount["name"] == claim["metadata"]["name"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["LAYERD_STATE_DIR"] == mount["mountPath"] and env["LAYERD_SNAPSHOT_INTERVAL"] == "30s"
    container["env"] = [e for e in container["env"] if e["name"] not in ("LAYERD_STATE_DIR", "LAYERD_SNAPSHOT_INTERVAL")]
    assert spec == deployment["spec"]
    help_text = subprocess.run([str(BINARY), "--help"], capture_output=True, text=True, check=True).stdout
    assert {"LAYERD_STATE_DIR", "LAYERD_SNAPSHOT_INTERVAL"} <= set(re.findall(r"env: (LAYERD_[A-Z_]+)", help_text))


def test_the_redis_overlay_points_layerd_at_its_redis_with_the_secret(tmp_path):
    """The patch names the base Deployment's container; its variables are layerd's flags; the
    URL's host and port are the Redis Service's; both read the same Secret key; and layerd
    started with those variables (the password expanded as Kubernetes does) serves sessions
    through a real redis-server that requires that password."""
    from redis_store import REDIS_CLI, Redis
    overlay_dir = K8S / "overlays" / "redis"
    base = by_kind(K8S / "base")
    [patch] = documents(overlay_dir / "session-store.yaml")
    assert ("Deployment", patch["metadata"]["name"]) in base
    [container] = patch["spec"]["template"]["spec"]["containers"]
    base_container = base[("Deployment", "layerd")]["spec"]["template"]["spec"]["containers"][0]
    assert container["name"] == base_container["name"]
    env = {e["name"]: e for e in container["env"]}
    help_text = subprocess.run([str(BINARY), "--help"], capture_output=True, text=True, check=True).stdout
    flags = set(re.findall(r"env: (LAYERD_[A-Z_]+)", help_text))
    assert {n for n in env if n.startswith("LAYERD_")} <= flags
    docs = {(d["kind"], d["metadata"]["name"]): d for d in documents(overlay_dir / "redis.yaml")}
    service, redis_set = docs[("Service", "layerd-redis")], docs[("StatefulSet", "layerd-redis")]
    url = env["LAYERD_SESSION_STORE"]["value"]
    assert url == f"redis://:$(REDIS_PASSWORD)@{service['metadata']['name']}:{service['spec']['ports'][0]['port']}"
    [redis_container] = redis_set["spec"]["template"]["spec"]["containers"]
    redis_env = {e["name"]: e for e in redis_container["env"]}
    assert env["REDIS_PASSWORD"]["valueFrom"] == redis_env["REDIS_PASSWORD"]["valueFrom"]
    assert "--appendonly" in redis_container["args"] and "--requirepass" in redis_container["args"]
    # The same settings against real processes: Redis with a password, layerd with the URL.
    redis = Redis.start_or_skip()
    try:
        password = "s3cret-for-the-test"
        redis.cli("CONFIG", "SET", "requirepass", password)
        real_url = url.replace("$(REDIS_PASSWORD)", password).replace(
            f"{service['metadata']['name']}:6379", f"127.0.0.1:{redis.port}")
        server = Server("--session-store", real_url, "--durability", env["LAYERD_DURABILITY"]["value"])
        try:
            import grpc
            from conftest import compile_proto
            pb2, pb2_grpc = compile_proto()
            with server.channel() as channel:
                stub = pb2_grpc.LayerServiceStub(channel)
                sid = stub.CreateSession(pb2.CreateSessionRequest()).session_id
                assert stub.DescribeSession(pb2.DescribeSessionRequest(session_id=sid)).session_id == sid
            keys = subprocess.run([REDIS_CLI, "-p", str(redis.port), "-a", password, "--no-auth-warning",
                                   "--scan", "--pattern", "layerd:session:*"], capture_output=True, text=True,
                                  check=True).stdout.split()
            assert len(keys) == 1 and keys[0].endswith(f":{sid}}}")
        finally:
            server.stop()
        # A wrong password: layerd does not start, and says why.
        with pytest.raises(AssertionError, match="session-store"):
            Server("--session-store", real_url.replace(password, "wrong"))
        # The password from a file (a Secret mounted as one) instead of the URL.
        secret = tmp_path / "password"
        secret.write_text(password + "\n")
        plain_url = f"redis://127.0.0.1:{redis.port}"
        server = Server("--session-store", plain_url, "--session-store-password-file", str(secret))
        assert server.stop() == 0
        secret.write_text("wrong\n")
        with pytest.raises(AssertionError, match="session-store"):
            Server("--session-store", plain_url, "--session-store-password-file", str(secret))
    finally:
        redis.stop()

