"""The kustomize tree: every overlay renders with `kubectl kustomize`, passes
`kubernetes-validate --strict` against the oldest supported Kubernetes, and has the shape the
daemons need. Prometheus Operator kinds have no bundled schema (the validator only warns), so their
required fields are checked here, and the PrometheusRule must carry the rule file's groups."""

from __future__ import annotations

import functools
import importlib.util
import re

import pytest
import yaml
from deploy_tools import DEPLOY, kubernetes_validate_cmd, require_tool, run

K8S = DEPLOY / "k8s"
TREES = ["base", "overlays/gpu", "overlays/cpu-demo"]
OVERLAYS = ["overlays/gpu", "overlays/cpu-demo"]
# Oldest Kubernetes we support; native gRPC probes are GA since 1.27.
OLDEST_KUBERNETES = "1.30.0"
OPERATOR_KINDS = {"PodMonitor", "ServiceMonitor", "PrometheusRule"}


@functools.cache
def rendered(tree: str) -> str:
    kubectl = require_tool("kubectl")
    result = run([kubectl, "kustomize", str(K8S / tree)])
    assert result.returncode == 0, result.stderr
    return result.stdout


@functools.cache
def resources(tree: str) -> dict[tuple[str, str], dict]:
    """The rendered objects by (kind, name); cached, so tests must not modify them."""
    docs = [
        d for d in yaml.load_all(rendered(tree), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader)) if d
    ]
    by_key = {(d["kind"], d["metadata"]["name"]): d for d in docs}
    assert len(by_key) == len(docs), "duplicate resources"
    return by_key


def pod_spec(tree: str, kind: str, name: str) -> dict:
    return resources(tree)[(kind, name)]["spec"]["template"]["spec"]


def flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


@pytest.mark.parametrize("tree", TREES)
def test_renders_and_validates_strictly(tree: str) -> None:
    result = run([*kubernetes_validate_cmd(), "--strict", "-k", OLDEST_KUBERNETES, "-"], input=rendered(tree))
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "ERROR" not in output, output
    # The validator only warns about kinds it has no schema for: those must be the operator's CRDs,
    # never a core kind with a misspelt apiVersion.
    unvalidated = set(re.findall(r"Couldn't find schema for kind (\S+)", output))
    assert unvalidated <= OPERATOR_KINDS, output


def test_validator_rejects_a_misspelt_field() -> None:
    """The strict validation is live: a typo in a probe is an error, not a warning."""
    text = rendered("overlays/gpu").replace("periodSeconds: 20", "periodSecnds: 20", 1)
    assert "periodSecnds" in text
    result = run([*kubernetes_validate_cmd(), "--strict", "-k", OLDEST_KUBERNETES, "-"], input=text)
    assert result.returncode != 0
    assert "periodSecnds" in result.stdout + result.stderr


@pytest.mark.parametrize("tree", TREES)
def test_coordinator_is_a_single_replica_statefulset_with_state(tree: str) -> None:
    res = resources(tree)
    sts = res[("StatefulSet", "stanchion-coordinator")]
    service = res[("Service", sts["spec"]["serviceName"])]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["selector"].items() <= sts["spec"]["template"]["metadata"]["labels"].items()
    assert sts["spec"]["replicas"] == 1
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    state_db = flag(container["args"], "--state-db")
    assert state_db.startswith(mounts[claim["metadata"]["name"]] + "/")


@pytest.mark.parametrize("tree", TREES)
def test_probes_are_grpc_on_the_health_ports(tree: str) -> None:
    for kind, name in [("StatefulSet", "stanchion-coordinator"), ("DaemonSet", "stanchion-agent")]:
        (container,) = pod_spec(tree, kind, name)["containers"]
        health_port = int(flag(container["args"], "--health-port"))
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            assert container[probe]["grpc"]["port"] == health_port, (name, probe)
        ports = {p["name"]: p["containerPort"] for p in container["ports"]}
        assert ports["metrics"] == int(flag(container["args"], "--metrics-port"))
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        assert flag(container["args"], "--tls-dir") == "/etc/stanchion/tls"
        tls = next(
            v for v in pod_spec(tree, kind, name)["volumes"] if v["name"] == mounts["/etc/stanchion/tls"]
        )
        assert tls["secret"]["secretName"] == f"{name}-tls"


@pytest.mark.parametrize("tree", TREES)
def test_agent_daemonset(tree: str) -> None:
    res = resources(tree)
    ds = res[("DaemonSet", "stanchion-agent")]
    assert ds["spec"]["updateStrategy"]["type"] == "OnDelete"
    spec = ds["spec"]["template"]["spec"]
    # Time for the emergency checkpoint (~120 s) on SIGTERM.
    minimum_grace_s = 60 if tree.endswith("cpu-demo") else 150
    assert spec["terminationGracePeriodSeconds"] >= minimum_grace_s
    (container,) = spec["containers"]
    assert "IPC_LOCK" in container["securityContext"]["capabilities"]["add"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"
    run_root = flag(container["args"], "--run-root")
    checkpoint_mount = next(path for path in mounts if run_root.startswith(path + "/"))
    claim = volumes[mounts[checkpoint_mount]]["persistentVolumeClaim"]["claimName"]
    assert claim == "stanchion-checkpoints"
    assert ("PersistentVolumeClaim", claim) in res


@pytest.mark.parametrize("tree", ["base", "overlays/gpu"])
def test_gpu_layout(tree: str) -> None:
    res = resources(tree)
    spec = pod_spec(tree, "DaemonSet", "stanchion-agent")
    (container,) = spec["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == int(flag(container["args"], "--workers"))
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    assert res[("PersistentVolumeClaim", "stanchion-checkpoints")]["spec"]["accessModes"] == ["ReadWriteMany"]


def test_cpu_demo_has_nothing_gpu_specific() -> None:
    text = rendered("overlays/cpu-demo")
    assert "nvidia" not in text.lower()
    spec = pod_spec("overlays/cpu-demo", "DaemonSet", "stanchion-agent")
    assert "nodeSelector" not in spec and "tolerations" not in spec
    (container,) = spec["containers"]
    assert container["resources"]["requests"] == {"cpu": "500m", "memory": "1Gi"}
    kinds = {kind for kind, _ in resources("overlays/cpu-demo")}
    assert not kinds & OPERATOR_KINDS


@pytest.mark.parametrize("tree", ["base", "overlays/gpu"])
def test_pod_monitors(tree: str) -> None:
    res = resources(tree)
    workloads = {
        "stanchion-agent": res[("DaemonSet", "stanchion-agent")],
        "stanchion-coordinator": res[("StatefulSet", "stanchion-coordinator")],
    }
    for name, workload in workloads.items():
        monitor = res[("PodMonitor", name)]
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
        template = workload["spec"]["template"]
        assert monitor["spec"]["selector"]["matchLabels"].items() <= template["metadata"]["labels"].items()
        endpoints = monitor["spec"]["podMetricsEndpoints"]
        assert endpoints, name
        port_names = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
        for endpoint in endpoints:
            assert endpoint["port"] in port_names
            # The alert rules and the dashboard select on these job names.
            assert {"targetLabel": "job", "replacement": name} in endpoint["relabelings"]


@pytest.mark.parametrize("tree", ["base", "overlays/gpu"])
def test_prometheus_rule_carries_the_rule_file(tree: str) -> None:
    rule = resources(tree)[("PrometheusRule", "stanchion")]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    for group in rule["spec"]["groups"]:
        assert group["name"] and group["rules"]
    rule_file = yaml.safe_load((DEPLOY / "prometheus" / "stanchion.rules.yml").read_text())
    assert rule["spec"]["groups"] == rule_file["groups"], "run: python deploy/k8s/gen_prometheusrule.py"


def test_generated_prometheus_rule_is_up_to_date() -> None:
    spec = importlib.util.spec_from_file_location("gen_prometheusrule", K8S / "gen_prometheusrule.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.OUTPUT.read_text() == module.render(), "run: python deploy/k8s/gen_prometheusrule.py"
