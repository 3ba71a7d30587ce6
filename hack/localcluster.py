"""A real Kubernetes control plane on loopback, with a simulated multi-vendor GPU fleet.

etcd -> kube-apiserver -> kube-controller-manager -> kube-scheduler -> kwok -> Ray dashboard
stand-in -> KubeRay operator, each a local process on free loopback ports with one log file,
started in that order and each checked for readiness (health endpoints, CRDs Established,
fleet nodes Ready) rather than slept on. Binaries come from hack/build-binaries.sh.

  python hack/localcluster.py up   [--dir DIR] [--fleet FILE]   # start, detached; writes DIR/kubeconfig
  python hack/localcluster.py down [--dir DIR]                  # stop everything it started
  python hack/localcluster.py nodes [--dir DIR]                 # the fleet and its accelerators

Tests use ``LocalCluster`` directly (tests/conftest.py), one per session.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import secrets
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import yaml

HACK = Path(__file__).resolve().parent
REPO = HACK.parent
sys.path.insert(0, str(REPO / "tests"))   # tests/waiting.py: the one polling loop, shared with the tests
from waiting import wait_for  # noqa: E402

DEFAULT_DIR = REPO / ".tuneserve" / "cluster"
CACHE = Path(os.environ.get("TUNESERVE_CACHE", Path.home() / ".cache" / "tuneserve"))
BIN = CACHE / "current"
ADMIN_TOKEN_USER = "tuneserve-admin"
FAKE_NODE_ANNOTATION = ("kwok.x-k8s.io/node", "fake")
# Resource names of accelerators, for printing the fleet (the operator has its own catalog).
ACCELERATOR_RESOURCES = ("nvidia.com/gpu", "amd.com/gpu", "huawei.com/Ascend910", "habana.ai/gaudi",
                         "aws.amazon.com/neuron", "google.com/tpu")


class ClusterError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# The one polling loop (tests/waiting.py): a component that exited (ClusterError) ends the wait at
# once; anything else it raises means "not answering yet".
wait_until = partial(wait_for, interval=0.2, retry=(Exception,), fatal=(ClusterError,), error=ClusterError)


def _set_pdeathsig() -> None:
    """Children die with the process that started them (tests), so none outlives a crash."""
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG


# --------------------------------------------------------------------------------------- fleet

def build_fleet_nodes(fleet: dict) -> list[dict]:
    """Node objects (with status) for every pool of a fleet description (see hack/fleet.yaml)."""
    nodes = []
    for pool in fleet["pools"]:
        if pool.get("real"):
            continue   # this machine itself (hack/realnode.py), registered by its kubelet
        accel = pool.get("accelerator")
        for i in range(pool["count"]):
            name = f"{pool['name']}-{i}"
            resources = {"cpu": str(pool["cpu"]), "memory": pool["memory"], "pods": "110",
                         "ephemeral-storage": "1Ti"}
            if accel:
                resources[accel["resource"]] = str(accel["count"])
            labels = {
                "type": "kwok", "kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64", "node.kubernetes.io/instance-type": pool["instanceType"],
                "topology.kubernetes.io/zone": pool.get("zone", "zone-a"),
                "tuneserve.dev/pool": pool["name"], **(pool.get("labels") or {}),
            }
            nodes.append({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": name, "labels": labels,
                             "annotations": {FAKE_NODE_ANNOTATION[0]: FAKE_NODE_ANNOTATION[1],
                                             "node.alpha.kubernetes.io/ttl": "0"}},
                "spec": {"taints": list(pool.get("taints") or [])},
                "status": {"capacity": resources, "allocatable": dict(resources)},   # kwok fills the rest
            })
    return nodes


def load_fleet(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


# ------------------------------------------------------------------------------------ plumbing

@dataclass
class Component:
    name: str
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)
    proc: Optional[subprocess.Popen] = None


class LocalCluster:
    """Starts and stops the whole control plane under ``state_dir``."""

    def __init__(self, state_dir: Path, fleet: Optional[dict] = None, *, bin_dir: Path = BIN,
                 python: str = sys.executable):
        self.dir = Path(state_dir).resolve()
        self.bin = bin_dir
        self.python = python
        self.fleet = fleet if fleet is not None else load_fleet(HACK / "fleet.yaml")
        self.components: list[Component] = []
        self.ports: dict[str, int] = {}
        self.token = ""
        self.real_node = None   # hack/realnode.py RealNode when the fleet has a `real: true` pool

    # paths
    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    @property
    def logs(self) -> Path:
        return self.dir / "logs"

    @property
    def dashboard_url(self) -> str:
        return f"http://127.0.0.1:{self.ports['dashboard']}"

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports['apiserver']}"

    def _binary(self, name: str) -> str:
        path = self.bin / name
        if not path.exists():
            raise ClusterError(f"{path} is missing: run hack/build-binaries.sh (make binaries) first")
        return str(path)

    # ------------------------------------------------------------------ PKI, tokens, kubeconfig
    def _write_pki(self) -> None:
        pki = self.dir / "pki"
        pki.mkdir(parents=True, exist_ok=True)

        def ossl(*args: str) -> None:
            subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=pki)

        ossl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
             "-days", "3650", "-subj", "/CN=tuneserve-local-ca")
        ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "apiserver.key", "-out", "apiserver.csr",
             "-subj", "/CN=kube-apiserver")
        (pki / "san.ext").write_text(
            "subjectAltName=IP:127.0.0.1,IP:10.96.0.1,DNS:localhost,DNS:kubernetes,"
            "DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local\n"
            "extendedKeyUsage=serverAuth\n")
        ossl("x509", "-req", "-in", "apiserver.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "apiserver.crt", "-days", "3650", "-extfile", "san.ext")
        # the apiserver's client cert towards kubelets (webhook authn/authz on the real node)
        ossl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "kubelet-client.key", "-out",
             "kubelet-client.csr", "-subj", "/O=system:masters/CN=kube-apiserver-kubelet-client")
        ossl("x509", "-req", "-in", "kubelet-client.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "kubelet-client.crt", "-days", "3650")
        ossl("genrsa", "-out", "sa.key", "2048")
        ossl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub")
        self.token = secrets.token_hex(16)
        (pki / "tokens.csv").write_text(f'{self.token},{ADMIN_TOKEN_USER},{ADMIN_TOKEN_USER},"system:masters"\n')

    def _write_kubeconfig(self) -> None:
        cfg = {
            "apiVersion": "v1", "kind": "Config", "current-context": "tuneserve-local",
            "clusters": [{"name": "tuneserve-local", "cluster": {
                "server": self.server, "certificate-authority": str(self.dir / "pki" / "ca.crt")}}],
            "users": [{"name": ADMIN_TOKEN_USER, "user": {"token": self.token}}],
            "contexts": [{"name": "tuneserve-local", "context": {
                "cluster": "tuneserve-local", "user": ADMIN_TOKEN_USER, "namespace": "default"}}],
        }
        self.kubeconfig.write_text(yaml.safe_dump(cfg))

    # ------------------------------------------------------------------------------- processes
    def _start(self, comp: Component, detach: bool) -> None:
        log = open(self.logs / f"{comp.name}.log", "ab")
        env = {**os.environ, **comp.env}
        comp.proc = subprocess.Popen(
            comp.args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
            cwd=self.dir, start_new_session=True, preexec_fn=None if detach else _set_pdeathsig)
        log.close()
        self.components.append(comp)
        self._save_state()

    def _save_state(self) -> None:
        state = {"ports": self.ports, "token": self.token,
                 "pids": {c.name: c.proc.pid for c in self.components if c.proc}}
        (self.dir / "state.json").write_text(json.dumps(state, indent=1))

    def _check_alive(self, comp: Component) -> None:
        if comp.proc and comp.proc.poll() is not None:
            tail = (self.logs / f"{comp.name}.log").read_text(errors="replace")[-3000:]
            raise ClusterError(f"{comp.name} exited with {comp.proc.returncode}; end of its log:\n{tail}")

    def _wait_http(self, comp: Component, url: str, timeout: float, *, tls: bool = False,
                   expect: Callable[[bytes], bool] = lambda body: True) -> None:
        ctx = ssl.create_default_context(cafile=str(self.dir / "pki" / "ca.crt")) if tls else None
        if tls and "127.0.0.1:%d" % self.ports["apiserver"] not in url:
            ctx = ssl._create_unverified_context()   # KCM/scheduler serve self-signed certs
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}),
                                             urllib.request.HTTPSHandler(context=ctx))

        def ready() -> bool:
            self._check_alive(comp)
            req = urllib.request.Request(url)
            if "apiserver" == comp.name:
                req.add_header("Authorization", f"Bearer {self.token}")
            with opener.open(req, timeout=2) as resp:
                return resp.status == 200 and expect(resp.read())

        wait_until(ready, timeout, f"{comp.name} at {url}", on_timeout=lambda: self._log_tail(comp))

    def _log_tail(self, comp: Component) -> str:
        path = self.logs / f"{comp.name}.log"
        return "\n--- end of %s ---\n%s" % (path, path.read_text(errors="replace")[-2000:]) if path.exists() else ""

    def kubectl(self, *args: str, input: Optional[str] = None, check: bool = True) -> subprocess.CompletedProcess:
        out = subprocess.run([self._binary("kubectl"), "--kubeconfig", str(self.kubeconfig), *args],
                             input=input, text=True, capture_output=True)
        if check and out.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args[:3])} failed: {out.stderr.strip()}")
        return out

    # ------------------------------------------------------------------------------ lifecycle
    def start(self, *, detach: bool = False, timeout: float = 120.0) -> "LocalCluster":
        t0 = time.monotonic()
        if self.dir.exists():
            shutil.rmtree(self.dir)
        self.logs.mkdir(parents=True)
        for name in ("etcd", "etcd-peer", "apiserver", "kcm", "scheduler", "kwok", "dashboard",
                     "kuberay-metrics", "kuberay-probe"):
            self.ports[name] = free_port()
        self._write_pki()
        self._write_kubeconfig()
        p, d, kc = self.ports, self.dir, str(self.kubeconfig)
        pki = d / "pki"
        try:
            etcd = Component("etcd", [
                self._binary("etcd"), "--name=node0", f"--data-dir={d / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{p['etcd']}",
                f"--advertise-client-urls=http://127.0.0.1:{p['etcd']}",
                f"--listen-peer-urls=http://127.0.0.1:{p['etcd-peer']}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{p['etcd-peer']}",
                f"--initial-cluster=node0=http://127.0.0.1:{p['etcd-peer']}",
                "--unsafe-no-fsync=true", "--auto-compaction-retention=1",
                "--quota-backend-bytes=8589934592", "--max-request-bytes=4194304", "--log-level=warn"])
            self._start(etcd, detach)
            self._wait_http(etcd, f"http://127.0.0.1:{p['etcd']}/health", timeout,
                            expect=lambda b: json.loads(b).get("health") == "true")

            apiserver = Component("apiserver", [
                self._binary("kube-apiserver"), f"--etcd-servers=http://127.0.0.1:{p['etcd']}",
                "--bind-address=127.0.0.1", "--advertise-address=127.0.0.1", f"--secure-port={p['apiserver']}",
                f"--tls-cert-file={pki / 'apiserver.crt'}", f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}", f"--token-auth-file={pki / 'tokens.csv'}",
                "--authorization-mode=Node,RBAC", "--service-cluster-ip-range=10.96.0.0/16",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--allow-privileged=true", "--endpoint-reconciler-type=none",
                "--enable-priority-and-fairness=false", "--max-requests-inflight=0",
                "--max-mutating-requests-inflight=0", f"--cert-dir={d / 'apiserver-certs'}",
                "--kubelet-preferred-address-types=InternalIP,Hostname",
                f"--kubelet-client-certificate={pki / 'kubelet-client.crt'}",
                f"--kubelet-client-key={pki / 'kubelet-client.key'}"])
            self._start(apiserver, detach)
            self._wait_http(apiserver, f"{self.server}/readyz", timeout, tls=True)

            kcm = Component("kube-controller-manager", [
                self._binary("kube-controller-manager"), f"--kubeconfig={kc}",
                f"--authentication-kubeconfig={kc}", f"--authorization-kubeconfig={kc}",
                "--leader-elect=false", "--bind-address=127.0.0.1", f"--secure-port={p['kcm']}",
                f"--service-account-private-key-file={pki / 'sa.key'}", f"--root-ca-file={pki / 'ca.crt'}",
                "--use-service-account-credentials=false", "--controllers=*",
                "--kube-api-qps=200", "--kube-api-burst=400", f"--cert-dir={d / 'kcm-certs'}"])
            self._start(kcm, detach)
            self._wait_http(kcm, f"https://127.0.0.1:{p['kcm']}/healthz", timeout, tls=True)

            scheduler = Component("kube-scheduler", [
                self._binary("kube-scheduler"), f"--kubeconfig={kc}",
                f"--authentication-kubeconfig={kc}", f"--authorization-kubeconfig={kc}",
                "--leader-elect=false", "--bind-address=127.0.0.1", f"--secure-port={p['scheduler']}",
                "--kube-api-qps=200", "--kube-api-burst=400", f"--cert-dir={d / 'scheduler-certs'}"])
            self._start(scheduler, detach)
            self._wait_http(scheduler, f"https://127.0.0.1:{p['scheduler']}/readyz", timeout, tls=True)

            (d / "kwok.yaml").write_text(self._kwok_config())
            kwok = Component("kwok", [
                self._binary("kwok"), f"--kubeconfig={kc}", f"--config={d / 'kwok.yaml'}",
                "--manage-all-nodes=false",
                f"--manage-nodes-with-annotation-selector={'='.join(FAKE_NODE_ANNOTATION)}",
                "--cidr=10.244.0.0/16", "--node-lease-duration-seconds=40",
                f"--server-address=127.0.0.1:{p['kwok']}"])
            self._start(kwok, detach)
            self._wait_http(kwok, f"http://127.0.0.1:{p['kwok']}/healthz", timeout)
            self.apply_fleet(timeout)
            self._start_real_node(detach, timeout)

            dashboard = Component("ray-dashboard-stand-in", [
                self.python, str(HACK / "fake_dashboard.py"), f"--port={p['dashboard']}",
                f"--kubeconfig={kc}"])
            self._start(dashboard, detach)
            self._wait_http(dashboard, f"{self.dashboard_url}/healthz", timeout)

            crds = sorted((self.bin / "kuberay-crds").glob("*.yaml"))
            self.kubectl("apply", "--server-side", "--force-conflicts",
                         *[a for f in crds for a in ("-f", str(f))])
            self.wait_crds_established(["rayclusters.ray.io", "rayjobs.ray.io", "rayservices.ray.io"], timeout)
            kuberay = Component("kuberay-operator", [
                self._binary("ray-operator"), "--enable-leader-election=false",
                f"--metrics-addr=127.0.0.1:{p['kuberay-metrics']}",
                f"--health-probe-bind-address=127.0.0.1:{p['kuberay-probe']}",
                "--log-stdout-encoder=console"],
                env={"KUBECONFIG": kc, "HTTP_PROXY": self.dashboard_url, "http_proxy": self.dashboard_url,
                     "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"})
            self._start(kuberay, detach)
            self._wait_http(kuberay, f"http://127.0.0.1:{p['kuberay-probe']}/readyz", timeout)
        except BaseException:
            self.stop()
            raise
        print(f"local control plane up in {time.monotonic() - t0:.1f}s; kubeconfig: {self.kubeconfig}",
              file=sys.stderr)
        return self

    def _start_real_node(self, detach: bool, timeout: float) -> None:
        """This machine as the fleet's `real: true` pool, if it has one (see hack/realnode.py)."""
        pool = next((p for p in self.fleet["pools"] if p.get("real")), None)
        if pool is None:
            return
        from realnode import RealNode
        self.real_node = RealNode(self.dir, pool, bin_dir=self.bin, apiserver_port=self.ports["apiserver"],
                                  python=self.python)
        self.real_node.start(detach=detach, timeout=timeout)

    def import_image(self, tar: Path) -> None:
        """Imports a docker-archive image tar (hack/oci.py) into the real node's containerd."""
        if self.real_node is None:
            raise ClusterError("this cluster has no real node (no `real: true` pool in its fleet)")
        self.real_node.import_image(tar)

    def _kwok_config(self) -> str:
        """KwokConfiguration plus the Stages kwok v0.8 needs (it has no built-in ones)."""
        stages = self.bin / "kwok-stages"
        docs = []   # no KwokConfiguration document: a partial one zeroes kwok's defaults
        for rel in ("node/fast/node-initialize.yaml",
                    "node/heartbeat-with-lease/node-heartbeat-with-lease.yaml",
                    "pod/fast/pod-ready.yaml", "pod/fast/pod-complete.yaml", "pod/fast/pod-delete.yaml"):
            stage = yaml.safe_load((stages / rel).read_text())
            if stage["metadata"]["name"] == "pod-complete":
                # KubeRay's submitter pods run `ray job submit`, which exits only when the Ray job
                # ends: leave them running; the dashboard stand-in finishes them (fake_dashboard.py).
                stage["spec"]["selector"]["matchExpressions"].append(
                    {"key": ".spec.containers.[].name", "operator": "NotIn", "values": ["ray-job-submitter"]})
            docs.append(stage)
        return yaml.safe_dump_all(docs)

    def apply_fleet(self, timeout: float = 60.0, fleet: Optional[dict] = None) -> list[str]:
        nodes = build_fleet_nodes(fleet or self.fleet)
        self.kubectl("apply", "--server-side", "-f", "-",
                     input=yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": nodes}))
        names = [n["metadata"]["name"] for n in nodes]

        def all_ready() -> bool:
            out = json.loads(self.kubectl("get", "nodes", "-o", "json").stdout)
            ready = {n["metadata"]["name"] for n in out["items"]
                     if any(c["type"] == "Ready" and c["status"] == "True"
                            for c in n.get("status", {}).get("conditions", []))}
            return set(names) <= ready

        wait_until(all_ready, timeout, f"{len(names)} fleet nodes to become Ready", interval=0.5)
        return names

    def wait_crds_established(self, names: list[str], timeout: float) -> None:
        def established() -> bool:
            for name in names:
                crd = json.loads(self.kubectl("get", "crd", name, "-o", "json", check=False).stdout or "{}")
                conds = crd.get("status", {}).get("conditions", [])
                if not any(c["type"] == "Established" and c["status"] == "True" for c in conds):
                    return False
            return True

        wait_until(established, timeout, f"CRDs {names} to be Established")

    def stop(self, timeout: float = 15.0) -> None:
        """Stops components in reverse order: SIGTERM to each process group, then SIGKILL.
        The real node goes first, while the apiserver can still tell its kubelet to delete pods."""
        if self.real_node is not None:
            self.real_node.stop()
        for comp in reversed(self.components):
            if comp.proc and comp.proc.poll() is None:
                _terminate_group(comp.proc.pid, timeout, comp.proc)
        self.components.clear()
        state = self.dir / "state.json"
        if state.exists():
            state.unlink()

    @classmethod
    def attach(cls, state_dir: Path) -> "LocalCluster":
        """A handle on a cluster started (detached) by another process."""
        self = cls(state_dir)
        state = json.loads((self.dir / "state.json").read_text())
        self.ports, self.token = state["ports"], state["token"]
        from realnode import RealNode
        self.real_node = RealNode.from_state(self.dir)
        return self


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def _terminate_group(pid: int, timeout: float, proc: Optional[subprocess.Popen] = None) -> None:
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None:
            if proc.poll() is not None:
                break
        elif not _pid_alive(pid):
            break
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)   # whatever is left of the group
    except ProcessLookupError:
        pass
    if proc is not None:
        proc.wait()


def stop_detached(state_dir: Path) -> None:
    state_file = Path(state_dir) / "state.json"
    if not state_file.exists():
        print(f"no cluster state in {state_dir}; nothing to stop", file=sys.stderr)
        return
    from realnode import RealNode
    node = RealNode.from_state(Path(state_dir))
    if node is not None:
        node.stop()
    pids = json.loads(state_file.read_text())["pids"]
    order = ["kuberay-operator", "ray-dashboard-stand-in", "kwok", "kube-scheduler",
             "kube-controller-manager", "apiserver", "etcd"]
    for name in sorted(pids, key=lambda n: order.index(n) if n in order else -1):
        _terminate_group(pids[name], 15.0)
    state_file.unlink(missing_ok=True)
    print("local control plane stopped", file=sys.stderr)


def fleet_table(cluster: LocalCluster) -> str:
    """One line per node: pool, instance type, product, accelerator capacity, allocatable."""
    nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    rows = [("NODE", "POOL", "INSTANCE-TYPE", "ACCELERATOR", "PRODUCT", "CAPACITY", "READY", "TAINTS")]
    for n in sorted(nodes, key=lambda n: n["metadata"]["name"]):
        labels, cap = n["metadata"].get("labels", {}), n["status"].get("capacity", {})
        res = next((r for r in ACCELERATOR_RESOURCES if r in cap), None)
        product = next((labels[k] for k in ("nvidia.com/gpu.product", "amd.com/gpu.product-name",
                                            "accelerator", "habana.ai/gaudi.product",
                                            "aws.amazon.com/neuron.product") if k in labels), "-")
        ready = next((c["status"] for c in n["status"].get("conditions", []) if c["type"] == "Ready"), "?")
        taints = ",".join(f"{t['key']}:{t['effect']}" for t in n.get("spec", {}).get("taints", [])) or "-"
        rows.append((n["metadata"]["name"], labels.get("tuneserve.dev/pool", "-"),
                     labels.get("node.kubernetes.io/instance-type", "-"), res or "cpu-only", product,
                     cap.get(res, "0") if res else f"cpu={cap.get('cpu')}", ready, taints))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="local Kubernetes control plane for tuneserve")
    ap.add_argument("command", choices=["up", "down", "nodes"])
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--fleet", type=Path, default=HACK / "fleet.yaml")
    args = ap.parse_args(argv)
    if args.command == "up":
        if (args.dir / "state.json").exists():
            stop_detached(args.dir)
        cluster = LocalCluster(args.dir, load_fleet(args.fleet)).start(detach=True)
        print(f"export KUBECONFIG={cluster.kubeconfig}")
    elif args.command == "down":
        stop_detached(args.dir)
    else:
        print(fleet_table(LocalCluster.attach(args.dir)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
