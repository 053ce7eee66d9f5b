"""The install manifests (issue 12, item 1): deploy/helm/sonde lints with helm
(helm.sh/helm/v3 from the Go module proxy, .tools/helm), renders the same objects as
deploy/kubernetes/sonde-daemonset.yaml, and its capability set follows its values; both
decode strictly into the Kubernetes API's Go types (.tools/kubecheck, k8s.io/api), which
refuse a misspelt field. Built by scripts/build-helm.sh. No cluster runs here, so the
objects are checked, not applied. Needs no root.

The RBAC for the Kubernetes metadata on spans (issue 12): a ClusterRole that reads pods
and nothing else, bound to the DaemonSet's ServiceAccount, whose token is mounted, and
the node's name from the downward API; none of it when the chart turns the metadata off.
"""
import subprocess

import pytest
import yaml

from sonde_testlib import REPO

HELM = REPO / ".tools" / "helm"
KUBECHECK = REPO / ".tools" / "kubecheck"
CHART = REPO / "deploy" / "helm" / "sonde"
MANIFEST = REPO / "deploy" / "kubernetes" / "sonde-daemonset.yaml"


def tool(path):
    if not path.is_file():
        pytest.fail(f"{path} is missing: run scripts/build-helm.sh (scripts/setup-tests.sh does)",
                    pytrace=False)
    return str(path)


def render(*sets: str) -> str:
    cmd = [tool(HELM), "template", "sonde", str(CHART), "--namespace", "sonde"]
    for s in sets:
        cmd += ["--set", s]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def objects(text: str) -> dict:
    """(kind, name) -> object, without the Namespace (helm install creates it) and the
    config checksum annotation (a Helm-only restart trigger)."""
    out = {}
    for doc in yaml.safe_load_all(text):
        if not doc or doc["kind"] == "Namespace":
            continue
        if doc["kind"] == "DaemonSet":
            doc["spec"]["template"]["metadata"]["annotations"].pop("checksum/config", None)
        out[(doc["kind"], doc["metadata"]["name"])] = doc
    return out


def caps(text: str) -> list[str]:
    ds = next(o for (k, _), o in objects(text).items() if k == "DaemonSet")
    sc = ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]
    assert sc["privileged"] is False and sc["capabilities"]["drop"] == ["ALL"], sc
    return sc["capabilities"]["add"]


def test_the_chart_lints():
    r = subprocess.run([tool(HELM), "lint", "--strict", str(CHART)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_chart_renders_what_the_plain_manifest_says():
    chart, plain = objects(render()), objects(MANIFEST.read_text())
    assert set(chart) == set(plain), (sorted(chart), sorted(plain))
    for key in plain:
        assert chart[key] == plain[key], f"{key} differs:\nchart: {chart[key]}\nplain: {plain[key]}"


def test_the_capabilities_follow_the_features():
    assert caps(render()) == ["BPF", "PERFMON", "SYS_ADMIN", "SYS_PTRACE", "DAC_READ_SEARCH"]
    assert "SYS_ADMIN" not in caps(render("tlsCapture=false"))
    assert caps(render("traceparentInjection=true"))[-1] == "NET_ADMIN"


@pytest.mark.parametrize("what", ["plain manifest", "rendered chart"])
def test_the_objects_decode_strictly_into_the_kubernetes_types(what):
    text = MANIFEST.read_text() if what == "plain manifest" else render()
    r = subprocess.run([tool(KUBECHECK)], input=text, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "ok apps/v1/DaemonSet sonde" in r.stdout, r.stdout


def test_the_schema_check_refuses_a_misspelt_field():
    text = MANIFEST.read_text().replace("hostPID: true", "hostPid: true")
    r = subprocess.run([tool(KUBECHECK)], input=text, capture_output=True, text=True, timeout=60)
    assert r.returncode != 0 and 'unknown field "spec.template.spec.hostPid"' in r.stderr, r.stderr


def rbac_of(objs: dict) -> tuple[dict, dict, dict]:
    role = objs[("ClusterRole", "sonde")]
    binding = objs[("ClusterRoleBinding", "sonde")]
    ds = objs[("DaemonSet", "sonde")]
    return role, binding, ds


@pytest.mark.parametrize("what", ["plain manifest", "rendered chart"])
def test_the_service_account_may_read_pods_and_nothing_else(what):
    objs = objects(MANIFEST.read_text() if what == "plain manifest" else render())
    role, binding, ds = rbac_of(objs)
    assert role["rules"] == [{"apiGroups": [""], "resources": ["pods"],
                              "verbs": ["get", "list", "watch"]}], role
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                  "kind": "ClusterRole", "name": "sonde"}, binding
    pod = ds["spec"]["template"]["spec"]
    sa = objs[("ServiceAccount", pod["serviceAccountName"])]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": sa["metadata"]["name"],
                                    "namespace": sa["metadata"]["namespace"]}], binding
    assert sa["automountServiceAccountToken"] is True and pod["automountServiceAccountToken"] is True
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}, env
    config = yaml.safe_load(objs[("ConfigMap", "sonde-config")]["data"]["sonde.yaml"])
    assert config["kubernetes"] == {"enabled": "auto", "source": "apiserver",
                                    "refresh_interval": "60s"}, config


def test_the_chart_without_kubernetes_metadata_has_no_rbac_and_no_token():
    objs = objects(render("kubernetes.enabled=false"))
    assert not [k for k in objs if k[0].startswith("ClusterRole")], sorted(objs)
    pod = objs[("DaemonSet", "sonde")]["spec"]["template"]["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert objs[("ServiceAccount", "sonde")]["automountServiceAccountToken"] is False
    assert "NODE_NAME" not in {e["name"] for e in pod["containers"][0]["env"]}
    config = yaml.safe_load(objs[("ConfigMap", "sonde-config")]["data"]["sonde.yaml"])
    assert config["kubernetes"]["enabled"] is False, config


def test_the_kubelet_source_may_also_get_nodes_proxy():
    objs = objects(render("kubernetes.source=kubelet"))
    role, _, _ = rbac_of(objs)
    assert role["rules"][1:] == [{"apiGroups": [""], "resources": ["nodes/proxy"],
                                  "verbs": ["get"]}], role
    config = yaml.safe_load(objs[("ConfigMap", "sonde-config")]["data"]["sonde.yaml"])
    assert config["kubernetes"]["source"] == "kubelet"
    r = subprocess.run([tool(KUBECHECK)], input=render("kubernetes.source=kubelet"),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "ok rbac.authorization.k8s.io/v1/ClusterRole sonde" in r.stdout, r.stderr
