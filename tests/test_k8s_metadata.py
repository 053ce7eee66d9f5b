"""Kubernetes metadata on spans (issue 12): a process in a pod's cgroup gets its
namespace, pod, container, node and workload from the API server's list of the node's
pods, read with the service account's token and CA.

No Kubernetes can run on this machine (no container engine runs on this kind of
machine, so neither a kubelet nor kind/k3s; /work/.library/env/machines says so), so
the API server is a stand-in: a test-local HTTPS server with its own CA that checks the
bearer token and the node's field selector and answers with a PodList of the shape a
real API server sends (ownerReferences, labels, containerStatuses with containerd ids).
The agent finds it as it would in a pod: KUBERNETES_SERVICE_HOST/PORT and NODE_NAME in
its environment, the token and ca.crt in a service account directory (set in the config
file, since /var/run/secrets is not ours to write). The traced process is real and its
cgroup is made the way the kubelet's systemd driver makes it, under the cgroup v2 root.
"""
from __future__ import annotations

import json
import os
import re
import ssl
import subprocess
import threading
import time
import urllib.parse
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sonde_testlib import PY, TESTS, Agent, Cgroup, fmt_spans, require_root, wait_listening
from tlsca import CA

NAMESPACE = "orders"
DEPLOYMENT = "shop-api"
TEMPLATE_HASH = "7d4b9c8f6d"
CONTAINER = "shop"


def pod_json(uid: str, container_id: str, node: str) -> dict:
    """One item of a PodList, as the API server writes it (fields sonde does not read
    included, to show it takes the real shape)."""
    rs = f"{DEPLOYMENT}-{TEMPLATE_HASH}"
    return {
        "metadata": {
            "name": f"{rs}-x2k9p", "generateName": f"{rs}-", "namespace": NAMESPACE,
            "uid": uid, "resourceVersion": "48213", "creationTimestamp": "2026-12-01T08:00:00Z",
            "labels": {"app": DEPLOYMENT, "pod-template-hash": TEMPLATE_HASH},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": rs,
                                 "uid": str(uuid.uuid4()), "controller": True,
                                 "blockOwnerDeletion": True}],
        },
        "spec": {"nodeName": node, "serviceAccountName": "default",
                 "containers": [{"name": CONTAINER, "image": "registry.example/shop:1.4"},
                                {"name": "envoy", "image": "envoy:1.31"}]},
        "status": {
            "phase": "Running", "podIP": "10.244.1.17", "qosClass": "Burstable",
            "containerStatuses": [
                {"name": "envoy", "ready": True, "restartCount": 0, "image": "envoy:1.31",
                 "containerID": "containerd://" + "e" * 64},
                {"name": CONTAINER, "ready": True, "restartCount": 0,
                 "image": "registry.example/shop:1.4", "containerID": f"containerd://{container_id}"},
            ],
        },
    }


class FakeApiServer:
    """HTTPS on 127.0.0.1 with a certificate of its own CA. `pods` is what
    /api/v1/pods lists; `status` other than 200 answers that (with a Status body)."""

    def __init__(self, workdir: Path, token: str, node: str):
        ca = CA(workdir, "k8s-ca")
        cert = ca.issue(workdir / "apiserver", "kube-apiserver", ["IP:127.0.0.1", "DNS:kubernetes"])
        self.ca_cert = ca.cert
        self.token, self.node = token, node
        self.pods: list[dict] = []
        self.status = 200
        self.requests: list[tuple[str, str]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                auth = self.headers.get("Authorization", "")
                outer.requests.append((self.path, auth))
                # As the API server reads it: the query decoded.
                url = urllib.parse.urlsplit(self.path)
                query = urllib.parse.parse_qs(url.query)
                want = {"fieldSelector": [f"spec.nodeName={outer.node}"]}
                if auth != f"Bearer {outer.token}":
                    code, body = 401, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                                       "message": "Unauthorized", "reason": "Unauthorized", "code": 401}
                elif outer.status == 403:
                    code, body = 403, {
                        "kind": "Status", "apiVersion": "v1", "status": "Failure",
                        "message": 'pods is forbidden: User "system:serviceaccount:sonde:sonde" '
                                   'cannot list resource "pods" in API group "" at the cluster scope',
                        "reason": "Forbidden", "details": {"kind": "pods"}, "code": 403}
                elif url.path != "/api/v1/pods" or query != want:
                    code, body = 400, {"kind": "Status", "message": f"unexpected {self.path}", "code": 400}
                else:
                    code, body = 200, {"kind": "PodList", "apiVersion": "v1",
                                       "metadata": {"resourceVersion": "48213"},
                                       "items": list(outer.pods)}
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(cert.cert, cert.key)
        self.httpd.socket = ctx.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def cluster(tmp_path):
    """The stand-in API server, a service account directory, and a pod's cgroup."""
    require_root()
    node = f"node-{os.getpid()}"
    token = "eyJhbGciOiJSUzI1NiJ9.sonde-test-" + uuid.uuid4().hex
    api = FakeApiServer(tmp_path, token, node)
    sa = tmp_path / "serviceaccount"
    sa.mkdir()
    (sa / "token").write_text(token)
    (sa / "ca.crt").write_bytes(api.ca_cert.read_bytes())
    (sa / "namespace").write_text("sonde")
    uid = str(uuid.uuid4())
    container_id = uuid.uuid4().hex + uuid.uuid4().hex
    slice_uid = uid.replace("-", "_")
    cg = Cgroup("k8s", "kubepods.slice/kubepods-burstable.slice/"
                       f"kubepods-burstable-pod{slice_uid}.slice/cri-containerd-{container_id}.scope")
    config = tmp_path / "sonde.yaml"
    config.write_text(f"kubernetes:\n  enabled: auto\n  service_account_dir: {sa}\n")
    env = {"KUBERNETES_SERVICE_HOST": "127.0.0.1", "KUBERNETES_SERVICE_PORT": str(api.port),
           "NODE_NAME": node}
    yield dict(api=api, uid=uid, container_id=container_id, cgroup=cg, node=node,
               config=config, env=env, tmp=tmp_path)
    cg.remove()
    api.stop()


def start_app_in(cg: Cgroup, workdir: Path) -> tuple[subprocess.Popen, int]:
    """tests/servers/app.py inside the pod's cgroup."""
    log = workdir / "app.log"
    proc = subprocess.Popen([PY, str(TESTS / "servers" / "app.py"), "0"], stdout=subprocess.PIPE,
                            stderr=open(log, "wb"), stdin=subprocess.DEVNULL, text=True,
                            preexec_fn=cg.preexec())
    line = proc.stdout.readline()
    if not line.startswith("PORT "):
        proc.kill()
        pytest.fail(f"app.py did not start: {line!r}\n{log.read_text(errors='replace')}", pytrace=False)
    port = int(line.split()[1])
    wait_listening(port, proc, what="app.py", log=log)
    return proc, port


def get(port: int, order: str) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/orders/{order}", timeout=10) as r:
        assert r.status == 200


def metric(agent: Agent, name: str) -> float:
    code, text = agent.get("/metrics")
    assert code == 200, text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m, f"{name} not in /metrics:\n{text}"
    return float(m.group(1))


def server_spans(agent: Agent, pid: int, order: str):
    return [s for s in agent.spans_of([pid]) if s.kind == 2 and order in s.attrs.get("url.path", "")]


def test_spans_of_a_pod_carry_its_namespace_pod_container_and_deployment(cluster, tmp_path):
    api: FakeApiServer = cluster["api"]
    # At first the node's list does not have the pod yet (it was just scheduled).
    api.pods = [pod_json(str(uuid.uuid4()), "c" * 64, cluster["node"])]
    agent = Agent(tmp_path / "agent", args=["--config", str(cluster["config"])],
                  env=cluster["env"]).start()
    proc = None
    try:
        proc, port = start_app_in(cluster["cgroup"], tmp_path)
        first = f"k8s-early-{os.getpid()}"
        get(port, first)
        spans = agent.wait_spans([proc.pid], 1, what="of the first request")
        early = [s for s in spans if s.kind == 2]
        assert early, fmt_spans(spans)
        # Left without the pod's metadata (counted), the cgroup's uid and id on it.
        assert early[0].resource.get("k8s.pod.uid") == cluster["uid"], early[0].resource
        assert early[0].resource.get("container.id") == cluster["container_id"]
        assert "k8s.pod.name" not in early[0].resource, early[0].resource
        assert metric(agent, "sonde_k8s_spans_without_pod_metadata_total") >= 1

        # The pod shows up in the list: the process's next spans get it, without
        # waiting for the 60 s refresh (a missing pod asks for a read).
        api.pods.append(pod_json(cluster["uid"], cluster["container_id"], cluster["node"]))
        deadline = time.monotonic() + 20
        n = 0
        found = []
        while time.monotonic() < deadline and not found:
            n += 1
            order = f"k8s-late-{os.getpid()}-{n}"
            get(port, order)
            time.sleep(1)
            found = [s for s in server_spans(agent, proc.pid, f"k8s-late-{os.getpid()}-")
                     if "k8s.pod.name" in s.resource]
        assert found, ("no span got the pod's metadata within 20 s:\n"
                       + fmt_spans(agent.spans_of([proc.pid])) + "\n" + agent.stderr_tail(3000))
        r = found[0].resource
        assert r["k8s.namespace.name"] == NAMESPACE, r
        assert r["k8s.pod.name"] == f"{DEPLOYMENT}-{TEMPLATE_HASH}-x2k9p", r
        assert r["k8s.pod.uid"] == cluster["uid"], r
        assert r["k8s.container.name"] == CONTAINER, r
        assert r["k8s.deployment.name"] == DEPLOYMENT, r
        assert r["k8s.replicaset.name"] == f"{DEPLOYMENT}-{TEMPLATE_HASH}", r
        assert r["k8s.node.name"] == cluster["node"], r
        # app.py would be "app": the workload names the service instead.
        assert r["service.name"] == DEPLOYMENT, r
        assert early[0].resource["service.name"] == "app", early[0].resource

        # The agent asked as a pod would: its token, this node's pods only.
        paths = {p for p, _ in api.requests}
        assert paths == {f"/api/v1/pods?fieldSelector=spec.nodeName%3D{cluster['node']}"}, paths
        assert "WARN" not in "".join(l for l in agent.stderr_tail(200_000).splitlines()
                                     if "kubernetes" in l), agent.stderr_tail()
        assert all(a == f"Bearer {api.token}" for _, a in api.requests)
        assert metric(agent, "sonde_k8s_metadata_refreshes_total") >= 2
        assert metric(agent, "sonde_k8s_pods") == 2
        assert 'sonde_k8s_metadata_errors_total{reason="forbidden"} 0' in agent.get("/metrics")[1]
    finally:
        if proc:
            proc.kill()
            proc.wait()
        assert agent.stop() == 0, agent.stderr_tail()


def test_a_403_is_one_warning_and_a_counter_and_spans_still_flow(cluster, tmp_path):
    api: FakeApiServer = cluster["api"]
    api.status = 403
    api.pods = [pod_json(cluster["uid"], cluster["container_id"], cluster["node"])]
    agent = Agent(tmp_path / "agent", args=["--config", str(cluster["config"])],
                  env=cluster["env"]).start()
    proc = None
    try:
        proc, port = start_app_in(cluster["cgroup"], tmp_path)
        order = f"k8s-403-{os.getpid()}"
        get(port, order)
        spans = agent.wait_spans([proc.pid], 1, what="while the API refuses")
        server = [s for s in spans if s.kind == 2]
        assert server and server[0].resource.get("k8s.pod.uid") == cluster["uid"], fmt_spans(spans)
        assert "k8s.pod.name" not in server[0].resource
        # Tried again with backoff (1 s, 2 s, ...): several refusals, one warning.
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            text = agent.get("/metrics")[1]
            m = re.search(r'^sonde_k8s_metadata_errors_total\{reason="forbidden"\} (\d+)$', text, re.M)
            if m and int(m.group(1)) >= 2:
                break
            time.sleep(0.5)
        assert m and int(m.group(1)) >= 2, text
        err = agent.stderr_tail(200_000)
        warnings = [l for l in err.splitlines() if "WARN" in l and "403 Forbidden" in l]
        assert len(warnings) == 1, err[-4000:]
        assert "forbids sonde's service account to list pods" in warnings[0], warnings[0]
        assert "ClusterRole" in warnings[0] and "cannot list resource" in warnings[0], warnings[0]
        assert "reason=\"forbidden\"" in warnings[0] or "reason=forbidden" in warnings[0], warnings[0]
        # Tracing goes on.
        order2 = f"k8s-403b-{os.getpid()}"
        get(port, order2)
        later = agent.wait_spans([proc.pid], len(agent.spans_of([proc.pid])) + 1,
                                 what="after the refusals")
        assert [s for s in later if order2 in s.attrs.get("url.path", "")], fmt_spans(later)
    finally:
        if proc:
            proc.kill()
            proc.wait()
        assert agent.stop() == 0, agent.stderr_tail()


def test_a_server_certificate_of_another_ca_is_a_tls_warning_and_spans_still_flow(cluster, tmp_path):
    api: FakeApiServer = cluster["api"]
    api.pods = [pod_json(cluster["uid"], cluster["container_id"], cluster["node"])]
    other = CA(tmp_path, "not-the-cluster-ca")
    ca_file = tmp_path / "serviceaccount" / "ca.crt"
    ca_file.write_bytes(other.cert.read_bytes())
    agent = Agent(tmp_path / "agent", args=["--config", str(cluster["config"])],
                  env=cluster["env"]).start()
    proc = None
    try:
        proc, port = start_app_in(cluster["cgroup"], tmp_path)
        get(port, f"k8s-tls-{os.getpid()}")
        spans = agent.wait_spans([proc.pid], 1, what="while TLS with the API fails")
        server = [s for s in spans if s.kind == 2]
        assert server and "k8s.pod.name" not in server[0].resource, fmt_spans(spans)
        assert metric(agent, 'sonde_k8s_metadata_errors_total{reason="tls"}') >= 1
        err = agent.stderr_tail(200_000)
        warnings = [l for l in err.splitlines() if "WARN" in l and "TLS with the Kubernetes API failed" in l]
        assert len(warnings) == 1 and str(ca_file) in warnings[0], err[-4000:]
        assert not api.requests, "no request may pass a handshake the agent refused"
    finally:
        if proc:
            proc.kill()
            proc.wait()
        assert agent.stop() == 0, agent.stderr_tail()


def test_outside_a_cluster_it_is_off_with_one_info_line(tmp_path):
    require_root()
    config = tmp_path / "sonde.yaml"
    config.write_text(f"kubernetes:\n  service_account_dir: {tmp_path / 'none'}\n")
    agent = Agent(tmp_path / "agent", args=["--config", str(config)]).start()
    try:
        err = agent.stderr_tail(200_000)
        lines = [l for l in err.splitlines() if "not in a Kubernetes cluster" in l]
        assert len(lines) == 1 and "INFO" in lines[0], err[-3000:]
        assert "no service account token" in lines[0], lines[0]
        assert 'sonde_k8s_metadata_errors_total{reason="config"} 0' in agent.get("/metrics")[1]
    finally:
        assert agent.stop() == 0, agent.stderr_tail()
