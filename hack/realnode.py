"""One REAL node beside the kwok fleet: containerd + kubelet + kube-proxy + CoreDNS on this machine.

kwok nodes run nothing. A fleet pool with ``real: true`` (hack/fleet.yaml: real-cpu) is instead
this machine itself: LocalCluster starts a RealNode after the fleet, so pods that tolerate the
``tuneserve.dev/real-node`` taint run as real containers (logs, exec, DNS, Services, in-cluster
API), while the rest of the fleet stays simulated. Recipe and its reasons: the realnode note.

Workplace rule: every packet stays on this machine. Pods live on a bridge (10.88.0.0/24) with no
masquerade; anything toward the pod, Service or kwok ranges, or from the pod range, that would
leave by an external interface is dropped; the Service range is routed to the bridge; kwok's fake
pod range is blackholed; pods reach the loopback apiserver via 10.96.0.1:443 (DNAT).

Everything changed on the host is recorded in ``<cluster dir>/realnode/state.json`` as it is
changed, so ``stop()`` (or ``localcluster.py down``, or ``realnode.py cleanup`` after a crash)
can undo it. One real node per machine: ``start()`` holds an flock on LOCK_PATH until ``stop()``.

  python hack/realnode.py cleanup [--dir CLUSTER_DIR]   # remove leftovers of a crashed run
  python hack/realnode.py leftovers                     # list them (empty output: clean)
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable, Optional

import yaml

HACK = Path(__file__).resolve().parent
sys.path.insert(0, str(HACK))
import oci  # noqa: E402

CACHE = Path(os.environ.get("TUNESERVE_CACHE", Path.home() / ".cache" / "tuneserve"))
LOCK_PATH = Path("/tmp/tuneserve-realnode.lock")
BRIDGE = "tuneserve0"
POD_CIDR = "10.88.0.0/24"
BRIDGE_IP = "10.88.0.1"          # node IP, pod gateway, CoreDNS, and the host address pods reach
SERVICE_CIDR = "10.96.0.0/16"
API_SERVICE_IP = "10.96.0.1"
KWOK_CIDR = "10.244.0.0/16"
CLUSTER_DOMAIN = "cluster.local"
FILTER_CHAIN = "TUNESERVE-EGRESS"
NAT_CHAIN = "TUNESERVE-APISERVER"
# Sysctls the kubelet (or this module) may change; their values before start are restored.
SYSCTLS = ("vm.overcommit_memory", "vm.panic_on_oom", "kernel.panic", "kernel.panic_on_oops",
           "kernel.keys.root_maxkeys", "kernel.keys.root_maxbytes", "net.ipv4.ip_forward",
           "net.ipv4.conf.all.route_localnet", "net.bridge.bridge-nf-call-iptables",
           "net.bridge.bridge-nf-call-ip6tables", "net.netfilter.nf_conntrack_max")
PROCESS_NAMES = ("kubelet", "kube-proxy", "coredns", "containerd", "containerd-shim-runc-v2")
STOP_ORDER = ("kube-proxy", "kubelet", "coredns", "containerd")


class RealNodeError(RuntimeError):
    pass


def _run(*args: str, check: bool = True, input: Optional[str] = None) -> subprocess.CompletedProcess:
    out = subprocess.run(list(args), capture_output=True, text=True, input=input)
    if check and out.returncode != 0:
        raise RealNodeError(f"{' '.join(args)} failed ({out.returncode}): {out.stderr.strip()[-1500:]}")
    return out


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def read_sysctls() -> dict[str, str]:
    return {n: _sysctl_path(n).read_text().strip() for n in SYSCTLS if _sysctl_path(n).exists()}


def _wait(check: Callable[[], bool], timeout: float, what: str, alive: Callable[[], None] = lambda: None) -> None:
    """Polls ``check``; ``alive`` raises when the awaited process died (waiting cannot help)."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        alive()
        try:
            if check():
                return
        except Exception as exc:  # not answering yet
            last = exc
        time.sleep(0.2)
    raise RealNodeError(f"timed out after {timeout:.0f}s waiting for {what}" + (f" (last: {last})" if last else ""))


class RealNode:
    """This machine as the node ``<pool>-0`` of the local cluster. Public API for callers:

    start(detach) / stop(), node_name, pool, bridge_ip (the host address pods reach, e.g. MinIO
    bound on it), ctr_socket, import_image(tar), ctr(*args), leftovers (after stop).
    """

    def __init__(self, cluster_dir: Path, pool: dict, *, bin_dir: Path, apiserver_port: int,
                 python: str = sys.executable):
        self.cluster_dir = Path(cluster_dir).resolve()
        self.dir = self.cluster_dir / "realnode"
        self.pool = pool
        self.node_name = f"{pool['name']}-0"
        self.bin = Path(bin_dir)
        self.apiserver_port = apiserver_port
        self.bridge_ip = BRIDGE_IP
        self.state: dict = {}
        self.procs: dict[str, subprocess.Popen] = {}
        self.leftovers: list[str] = []
        self.start_seconds = 0.0
        self._lock_fd: Optional[int] = None

    # ------------------------------------------------------------------ paths and small helpers
    @property
    def ctr_socket(self) -> Path:
        return self.dir / "containerd" / "containerd.sock"

    @property
    def logs(self) -> Path:
        return self.cluster_dir / "logs"

    @property
    def state_file(self) -> Path:
        return self.dir / "state.json"

    @property
    def admin_kubeconfig(self) -> Path:
        return self.cluster_dir / "kubeconfig"

    def _binary(self, name: str) -> str:
        path = self.bin / name
        if not path.exists():
            raise RealNodeError(f"{path} is missing: run hack/build-binaries.sh (make binaries) first")
        return str(path)

    def _save(self) -> None:
        self.state_file.write_text(json.dumps(self.state, indent=1))

    def kubectl(self, *args: str, check: bool = True, input: Optional[str] = None) -> subprocess.CompletedProcess:
        return _run(str(self.bin / "kubectl"), "--kubeconfig", str(self.admin_kubeconfig), "--request-timeout=20s",
                    *args, check=check, input=input)

    def ctr(self, *args: str) -> str:
        """``ctr`` against this node's containerd, namespace k8s.io (the one the kubelet uses)."""
        return _run("ctr", "--address", str(self.ctr_socket), "-n", "k8s.io", *args).stdout

    def import_image(self, tar: Path) -> None:
        """Makes a docker-archive tar (hack/oci.py build_image) available to pods on this node;
        pods should use ``imagePullPolicy: Never`` (nothing can be pulled here)."""
        self.ctr("images", "import", str(tar))

    # ---------------------------------------------------------------------------- the lock
    def _take_lock(self) -> None:
        """One real node per machine (port 10250, bridge, CIDRs): an flock held until stop(),
        also by containerd (it inherits the descriptor), so a detached node keeps holding it."""
        fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Path(LOCK_PATH).read_text().strip() or "?"
            os.close(fd)
            raise RealNodeError(f"another real node holds {LOCK_PATH} (cluster dir {holder}); only one "
                                f"can run per machine: stop it, or `python hack/realnode.py cleanup`")
        os.ftruncate(fd, 0)
        os.write(fd, str(self.cluster_dir).encode())
        self._lock_fd = fd

    def _release_lock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    # ----------------------------------------------------------------------------- lifecycle
    def start(self, *, detach: bool = False, timeout: float = 120.0) -> "RealNode":
        t0 = time.monotonic()
        self._take_lock()
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            self.logs.mkdir(parents=True, exist_ok=True)
            self.state = {"node": self.node_name, "sysctls": read_sysctls(), "pids": {}, "iptables": [],
                          "routes": [], "bridge": None, "dir": str(self.dir)}
            self._save()
            self._setup_network()
            self._write_credentials()
            self._start_containerd(detach, timeout)
            self._import_pause()
            self._start_coredns(detach, timeout)
            self._start_kubelet(detach, timeout)
            self._start_kube_proxy(detach, timeout)
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0
        print(f"real node {self.node_name} Ready in {self.start_seconds:.1f}s "
              f"({self.rss_mib():.0f} MiB RSS)", file=sys.stderr)
        return self

    def rss_mib(self) -> float:
        total = 0
        for pid in self.state.get("pids", {}).values():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
                total += int(re.search(r"VmRSS:\s+(\d+)", status).group(1))
            except (OSError, AttributeError):
                pass
        return total / 1024

    # ------------------------------------------------------------------------------ network
    def _iptables(self, family: str, table: str, *rule: str) -> None:
        """Adds one rule and records its undo (-D of the same spec, or -X of a chain)."""
        _run(family, "-w", "-t", table, *rule)
        self.state["iptables"].append([family, table, *rule])
        self._save()

    def _setup_network(self) -> None:
        """Bridge first (the kubelet's node IP must exist and not be loopback), then routes,
        sysctls and the rules that keep every packet on this machine."""
        if Path(f"/sys/class/net/{BRIDGE}").exists():
            raise RealNodeError(f"bridge {BRIDGE} exists: leftovers of an earlier run? "
                                f"`python hack/realnode.py cleanup`")
        _run("ip", "link", "add", BRIDGE, "type", "bridge")
        self.state["bridge"] = BRIDGE
        self._save()
        _run("ip", "addr", "add", f"{BRIDGE_IP}/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        _sysctl_path(f"net.ipv4.conf.{BRIDGE}.route_localnet").write_text("1")
        for name, value in (("net.ipv4.ip_forward", "1"), ("net.bridge.bridge-nf-call-iptables", "1")):
            if _sysctl_path(name).exists():
                _sysctl_path(name).write_text(value)
        for route in ([SERVICE_CIDR, "dev", BRIDGE], ["blackhole", KWOK_CIDR]):
            self.state["routes"].append(route)
            self._save()
            _run("ip", "route", "replace", *route)
        ipt = "iptables"
        self._iptables(ipt, "filter", "-N", FILTER_CHAIN)
        for rule in (["-o", "lo", "-j", "RETURN"], ["-o", BRIDGE, "-j", "RETURN"],
                     ["-d", POD_CIDR, "-j", "DROP"], ["-d", SERVICE_CIDR, "-j", "DROP"],
                     ["-d", KWOK_CIDR, "-j", "DROP"], ["-s", POD_CIDR, "-j", "DROP"]):
            _run(ipt, "-w", "-A", FILTER_CHAIN, *rule)
        for hook in ("OUTPUT", "FORWARD"):
            self._iptables(ipt, "filter", "-I", hook, "1", "-j", FILTER_CHAIN)
        self._iptables(ipt, "nat", "-N", NAT_CHAIN)
        _run(ipt, "-w", "-t", "nat", "-A", NAT_CHAIN, "-d", f"{API_SERVICE_IP}/32", "-p", "tcp", "--dport", "443",
             "-j", "DNAT", "--to-destination", f"127.0.0.1:{self.apiserver_port}")
        for hook in ("PREROUTING", "OUTPUT"):
            self._iptables(ipt, "nat", "-I", hook, "1", "-j", NAT_CHAIN)

    # -------------------------------------------------------------------------- credentials
    def _write_credentials(self) -> None:
        """Client certs from the cluster CA: the Node authorizer needs system:node:<name> in
        system:nodes; kube-proxy's default binding is for system:kube-proxy."""
        pki = self.cluster_dir / "pki"
        certs = self.dir / "pki"
        certs.mkdir(exist_ok=True)
        for name, subj in (("kubelet", f"/O=system:nodes/CN=system:node:{self.node_name}"),
                           ("kube-proxy", "/CN=system:kube-proxy")):
            _run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(certs / f"{name}.key"),
                 "-out", str(certs / f"{name}.csr"), "-subj", subj)
            _run("openssl", "x509", "-req", "-in", str(certs / f"{name}.csr"), "-CA", str(pki / "ca.crt"),
                 "-CAkey", str(pki / "ca.key"), "-CAcreateserial", "-out", str(certs / f"{name}.crt"), "-days", "365")
            kubeconfig = {
                "apiVersion": "v1", "kind": "Config", "current-context": "c",
                "clusters": [{"name": "c", "cluster": {"server": f"https://127.0.0.1:{self.apiserver_port}",
                                                       "certificate-authority": str(pki / "ca.crt")}}],
                "users": [{"name": name, "user": {"client-certificate": str(certs / f"{name}.crt"),
                                                  "client-key": str(certs / f"{name}.key")}}],
                "contexts": [{"name": "c", "context": {"cluster": "c", "user": name}}]}
            (self.dir / f"{name}.kubeconfig").write_text(yaml.safe_dump(kubeconfig))
        # webhook authn/authz on the kubelet: it must create TokenReviews and SubjectAccessReviews
        binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
                   "metadata": {"name": "tuneserve:real-node-auth-delegator"},
                   "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                               "name": "system:auth-delegator"},
                   "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User",
                                 "name": f"system:node:{self.node_name}"}]}
        self.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(binding))

    # ---------------------------------------------------------------------------- processes
    def _spawn(self, name: str, args: list[str], detach: bool, pass_fds: tuple = ()) -> subprocess.Popen:
        log = open(self.logs / f"realnode-{name}.log", "ab")
        preexec = None if detach else _set_pdeathsig
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                cwd=self.dir, start_new_session=True, preexec_fn=preexec, pass_fds=pass_fds)
        log.close()
        self.procs[name] = proc
        self.state["pids"][name] = proc.pid
        self._save()
        return proc

    def _alive(self, name: str) -> Callable[[], None]:
        def check() -> None:
            proc = self.procs[name]
            if proc.poll() is not None:
                tail = (self.logs / f"realnode-{name}.log").read_text(errors="replace")[-3000:]
                raise RealNodeError(f"{name} exited with {proc.returncode}; end of its log:\n{tail}")
        return check

    def _wait_http(self, name: str, url: str, timeout: float) -> None:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        _wait(lambda: opener.open(url, timeout=2).status == 200, timeout, f"{name} at {url}", self._alive(name))

    def _start_containerd(self, detach: bool, timeout: float) -> None:
        cd = self.dir / "containerd"
        (cd / "certs.d" / "_default").mkdir(parents=True, exist_ok=True)
        closed_port = _closed_port()
        # every pull goes to a closed loopback port: a missing image fails at once, locally
        (cd / "certs.d" / "_default" / "hosts.toml").write_text(
            f'server = "http://127.0.0.1:{closed_port}"\n[host."http://127.0.0.1:{closed_port}"]\n'
            f'  capabilities = ["pull", "resolve"]\n')
        cni = self.dir / "cni"
        (cni / "net.d").mkdir(parents=True, exist_ok=True)
        (cni / "net.d" / "10-tuneserve.conflist").write_text(json.dumps(self._cni_config(cni)))
        (cd / "config.toml").write_text(self._containerd_config(cd, cni))
        self._spawn("containerd", ["containerd", "--config", str(cd / "config.toml")], detach,
                    pass_fds=(self._lock_fd,))
        _wait(lambda: _run("ctr", "--address", str(self.ctr_socket), "version").returncode == 0,
              timeout, "containerd", self._alive("containerd"))

    @staticmethod
    def _cni_config(cni: Path) -> dict:
        return {"cniVersion": "1.0.0", "name": "tuneserve", "plugins": [{
            "type": "bridge", "bridge": BRIDGE, "isGateway": True, "ipMasq": False, "hairpinMode": True,
            "ipam": {"type": "host-local", "ranges": [[{"subnet": POD_CIDR, "gateway": BRIDGE_IP}]],
                     "routes": [{"dst": "0.0.0.0/0"}], "dataDir": str(cni / "ipam")}}]}

    def _containerd_config(self, cd: Path, cni: Path) -> str:
        """containerd 1.6 (config version 2). restrict_oom_score_adj: root here lacks
        CAP_SYS_RESOURCE, and without it every sandbox fails in runc create."""
        cri = 'plugins."io.containerd.grpc.v1.cri"'
        return "\n".join([
            "version = 2", f'root = "{cd / "root"}"', f'state = "{cd / "state"}"',
            "[grpc]", f'  address = "{self.ctr_socket}"',
            "[ttrpc]", f'  address = "{cd / "ttrpc.sock"}"',
            f"[{cri}]", f'  sandbox_image = "{self.pause_image}"', "  restrict_oom_score_adj = true",
            "  enable_selinux = false",
            f"[{cri}.containerd]", '  snapshotter = "overlayfs"', '  default_runtime_name = "runc"',
            f"[{cri}.containerd.runtimes.runc]", '  runtime_type = "io.containerd.runc.v2"',
            f"[{cri}.containerd.runtimes.runc.options]", "  SystemdCgroup = false", f'  Root = "{cd / "runc"}"',
            f"[{cri}.cni]", '  bin_dir = "/usr/lib/cni"', f'  conf_dir = "{cni / "net.d"}"',
            f"[{cri}.registry]", f'  config_path = "{cd / "certs.d"}"', ""])

    @property
    def pause_image(self) -> str:
        return "tuneserve.local/pause:3.10"

    def _import_pause(self) -> None:
        """The sandbox image, from the locally built pause binary; the tar is cached by its hash."""
        pause = Path(self._binary("pause")).resolve()
        digest = hashlib.sha256(pause.read_bytes()).hexdigest()[:12]
        tar = CACHE / "images" / f"pause-{digest}.tar"
        if not tar.exists():
            with tempfile.TemporaryDirectory() as tmp:
                shutil.copy2(pause, Path(tmp) / "pause")
                oci.build_image(Path(tmp), self.pause_image, tar, {"entrypoint": ["/pause"]})
        self.import_image(tar)

    def _start_coredns(self, detach: bool, timeout: float) -> None:
        """Cluster DNS as a host process on the bridge IP; names outside the cluster get NXDOMAIN
        (no upstream: nothing may leave the machine)."""
        ready = _free_port()
        # Two server blocks: CoreDNS orders plugins by its build, not the Corefile, so a template
        # in the cluster block would answer before the kubernetes plugin.
        (self.dir / "Corefile").write_text(
            f"{CLUSTER_DOMAIN}:53 in-addr.arpa:53 ip6.arpa:53 {{\n  bind {BRIDGE_IP}\n  errors\n"
            f"  ready 127.0.0.1:{ready}\n  kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{\n"
            f"    kubeconfig {self.admin_kubeconfig} tuneserve-local\n    pods insecure\n  }}\n  cache 5\n}}\n"
            f".:53 {{\n  bind {BRIDGE_IP}\n  errors\n  template ANY ANY {{\n    rcode NXDOMAIN\n  }}\n}}\n")
        self._spawn("coredns", [self._binary("coredns"), "-conf", str(self.dir / "Corefile")], detach)
        self._wait_http("coredns", f"http://127.0.0.1:{ready}/ready", timeout)

    def _kubelet_config(self, healthz: int) -> dict:
        pool = self.pool
        (self.dir / "resolv.conf").write_text(f"nameserver {BRIDGE_IP}\n")
        return {
            "apiVersion": "kubelet.config.k8s.io/v1beta1", "kind": "KubeletConfiguration",
            "address": BRIDGE_IP, "port": 10250, "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1", "healthzPort": healthz,
            "authentication": {"anonymous": {"enabled": False}, "webhook": {"enabled": True},
                               "x509": {"clientCAFile": str(self.cluster_dir / "pki" / "ca.crt")}},
            "authorization": {"mode": "Webhook"},
            "cgroupDriver": "cgroupfs", "failCgroupV1": False, "failSwapOn": False,
            "containerRuntimeEndpoint": f"unix://{self.ctr_socket}",
            "clusterDNS": [BRIDGE_IP], "clusterDomain": CLUSTER_DOMAIN,
            "resolvConf": str(self.dir / "resolv.conf"),
            "podLogsDir": str(self.dir / "pod-logs"),
            "registerWithTaints": list(pool.get("taints") or []),
            # a busy CI machine must not evict test pods or GC the imported images
            "evictionHard": {"memory.available": "50Mi", "nodefs.available": "1%", "imagefs.available": "1%",
                             "nodefs.inodesFree": "1%", "imagefs.inodesFree": "1%"},
            "imageGCHighThresholdPercent": 100, "imageGCLowThresholdPercent": 99,
            "serializeImagePulls": False, "nodeStatusUpdateFrequency": "5s",
            "rotateCertificates": False, "serverTLSBootstrap": False, "protectKernelDefaults": False,
        }

    def _node_labels(self) -> str:
        labels = {"tuneserve.dev/pool": self.pool["name"], "tuneserve.dev/real-node": "true",
                  **(self.pool.get("labels") or {})}
        if self.pool.get("instanceType"):
            labels["node.kubernetes.io/instance-type"] = self.pool["instanceType"]
        if self.pool.get("zone"):
            labels["topology.kubernetes.io/zone"] = self.pool["zone"]
        return ",".join(f"{k}={v}" for k, v in labels.items())

    def _start_kubelet(self, detach: bool, timeout: float) -> None:
        healthz = _free_port()
        (self.dir / "kubelet.yaml").write_text(yaml.safe_dump(self._kubelet_config(healthz)))
        self._spawn("kubelet", [
            self._binary("kubelet"), f"--config={self.dir / 'kubelet.yaml'}",
            f"--kubeconfig={self.dir / 'kubelet.kubeconfig'}", f"--root-dir={self.dir / 'kubelet'}",
            f"--node-ip={BRIDGE_IP}", f"--hostname-override={self.node_name}",
            f"--node-labels={self._node_labels()}", "--v=1"], detach)

        def ready() -> bool:
            node = json.loads(self.kubectl("get", "node", self.node_name, "-o", "json").stdout)
            return any(c["type"] == "Ready" and c["status"] == "True" for c in node["status"]["conditions"])

        _wait(ready, timeout, f"node {self.node_name} Ready", self._alive("kubelet"))

    def _start_kube_proxy(self, detach: bool, timeout: float) -> None:
        healthz, metrics = _free_port(), _free_port()
        cfg = {"apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration",
               "clientConnection": {"kubeconfig": str(self.dir / "kube-proxy.kubeconfig")},
               "mode": "iptables", "clusterCIDR": POD_CIDR, "hostnameOverride": self.node_name,
               "bindAddress": BRIDGE_IP, "healthzBindAddress": f"127.0.0.1:{healthz}",
               "metricsBindAddress": f"127.0.0.1:{metrics}", "nodePortAddresses": [f"{BRIDGE_IP}/32"],
               # leave the host's conntrack sysctls and route_localnet alone
               "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s", "tcpCloseWaitTimeout": "0s"},
               "iptables": {"localhostNodePorts": False, "masqueradeAll": False}}
        (self.dir / "kube-proxy.yaml").write_text(yaml.safe_dump(cfg))
        self._spawn("kube-proxy", [self._binary("kube-proxy"), f"--config={self.dir / 'kube-proxy.yaml'}"], detach)
        self._wait_http("kube-proxy", f"http://127.0.0.1:{healthz}/healthz", timeout)

    # ------------------------------------------------------------------------------ teardown
    def stop(self) -> list[str]:
        """Undoes everything start() did (idempotent; also after a partial start); returns and
        keeps in ``self.leftovers`` what is still left on the machine (should be empty)."""
        if not self.state and self.state_file.exists():
            self.state = json.loads(self.state_file.read_text())
        if not self.state:
            self._release_lock()
            return []
        errors = []
        for step in (self._delete_pods, self._stop_processes, cleanup_host):
            try:
                step()
            except Exception as exc:  # keep undoing the rest
                errors.append(f"{step.__name__}: {exc}")
        _restore_sysctls(self.state.get("sysctls", {}))
        self.leftovers = leftovers(self.state.get("sysctls")) + errors
        self.state_file.unlink(missing_ok=True)
        self.state = {}
        self._release_lock()
        if self.leftovers:
            print("real node teardown left:\n  " + "\n  ".join(self.leftovers), file=sys.stderr)
        return self.leftovers

    def _delete_pods(self) -> None:
        """Pods first, while the kubelet runs: it tears down their sandboxes (CNI DEL, unmounts)."""
        if self.kubectl("get", "node", self.node_name, check=False).returncode != 0:
            return   # apiserver gone or node never registered
        self.kubectl("delete", "pods", "--all-namespaces", f"--field-selector=spec.nodeName={self.node_name}",
                     "--grace-period=1", "--wait=true", "--timeout=60s", check=False)
        self.kubectl("delete", "node", self.node_name, "--wait=false", check=False)

    def _stop_processes(self) -> None:
        pids = self.state.get("pids", {})
        for name in STOP_ORDER:
            if name in pids:
                _terminate(pids[name], self.procs.get(name))
                if name == "kube-proxy" and (self.bin / "kube-proxy").exists():
                    _run(str(self.bin / "kube-proxy"), "--cleanup", check=False)

    @classmethod
    def from_state(cls, cluster_dir: Path) -> Optional["RealNode"]:
        """A handle on a node started by another process (``localcluster.py down``, attach)."""
        state_file = Path(cluster_dir).resolve() / "realnode" / "state.json"
        if not state_file.exists():
            return None
        state = json.loads(state_file.read_text())
        self = cls(cluster_dir, {"name": state["node"].rsplit("-", 1)[0]},
                   bin_dir=Path(os.environ.get("TUNESERVE_BIN", CACHE / "current")), apiserver_port=0)
        self.state = state
        return self


# ------------------------------------------------------------------ host-wide cleanup / checks

def _set_pdeathsig() -> None:
    import ctypes
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _closed_port() -> int:
    return _free_port()   # bound and released at once: nothing listens there


def _terminate(pid: int, proc: Optional[subprocess.Popen] = None, timeout: float = 15.0) -> None:
    """SIGTERM to the process group, SIGKILL after ``timeout``; waits for the pid to go."""
    try:
        os.killpg(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and _pid_alive(pid, proc):
        time.sleep(0.1)
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    if proc is not None:
        proc.wait()


def _pid_alive(pid: int, proc: Optional[subprocess.Popen] = None) -> bool:
    if proc is not None:
        return proc.poll() is None
    try:
        os.kill(pid, 0)
        return not Path(f"/proc/{pid}/stat").read_text().split(") ")[1].startswith("Z")
    except (ProcessLookupError, FileNotFoundError):
        return False


def our_processes() -> list[tuple[int, str]]:
    """Processes of the real node's kinds (by executable name), machine-wide: the flock means
    only one real node may exist, so any of these is ours or a leftover."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            exe = os.path.basename(os.readlink(entry / "exe"))
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if exe in PROCESS_NAMES and _pid_alive(int(entry.name)):
            found.append((int(entry.name), cmd[:200]))
    return found


def _kubepods_cgroups() -> list[Path]:
    return sorted(p for p in Path("/sys/fs/cgroup").glob("*/kubepods") if p.is_dir())


def _kill_cgroups() -> None:
    """Pod processes live in /kubepods cgroups, outside any session's own: kill, then rmdir."""
    for root in _kubepods_cgroups():
        for procs in root.rglob("cgroup.procs"):
            for pid in procs.read_text().split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except ProcessLookupError:
                    pass
    for root in _kubepods_cgroups():
        _wait(lambda: not any(p.read_text().strip() for p in root.rglob("cgroup.procs")), 10,
              f"processes in {root} to die")
        for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [root]:
            try:
                d.rmdir()
            except OSError:
                pass


def _our_mounts() -> list[str]:
    """Mount points of the real node: under a realnode dir, netns of CNI, /var/lib/kubelet."""
    points = []
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        point = line.split()[4].encode().decode("unicode_escape")
        if ("/realnode/" in point or point.endswith("/realnode") or re.match(r"^/(var/)?run/netns/cni-", point)
                or point.startswith("/var/lib/kubelet")):
            points.append(point)
    return points


def _unmount_all() -> None:
    for _ in range(5):   # bind mounts may stack; repeat until none is left
        points = sorted(set(_our_mounts()), key=lambda p: -len(p))
        if not points:
            return
        for point in points:
            if _run("umount", point, check=False).returncode != 0:
                _run("umount", "-l", point, check=False)
    for netns in Path("/run/netns").glob("cni-*"):
        netns.unlink(missing_ok=True)


def _iptables_rules(family: str) -> dict[str, list[str]]:
    """``-S`` output per table."""
    out = {}
    for table in ("filter", "nat", "mangle", "raw"):
        res = _run(family, "-w", "-t", table, "-S", check=False)
        out[table] = res.stdout.splitlines() if res.returncode == 0 else []
    return out


_OURS = re.compile(r"\b(KUBE-[A-Z0-9-]+|TUNESERVE-[A-Z0-9-]+|CNI-[A-Za-z0-9-]+)\b")


def _remove_iptables() -> None:
    """Jumps from built-in chains to KUBE-*/TUNESERVE-*/CNI-* chains, then those chains (v4, v6)."""
    for family in ("iptables", "ip6tables"):
        for table, lines in _iptables_rules(family).items():
            for line in lines:
                if line.startswith("-A ") and _OURS.search(line) and not _OURS.match(line.split()[1]):
                    _run(family, "-w", "-t", table, "-D", *shlex.split(line)[1:], check=False)
            chains = [line.split()[1] for line in lines if line.startswith("-N ") and _OURS.match(line.split()[1])]
            for chain in chains:
                _run(family, "-w", "-t", table, "-F", chain, check=False)
            for chain in chains:
                _run(family, "-w", "-t", table, "-X", chain, check=False)


def _remove_links_and_routes() -> None:
    _run("ip", "route", "del", "blackhole", KWOK_CIDR, check=False)
    _run("ip", "route", "del", SERVICE_CIDR, check=False)
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        _run("ip", "link", "del", BRIDGE, check=False)


def _restore_sysctls(saved: dict[str, str]) -> None:
    for name, value in saved.items():
        path = _sysctl_path(name)
        if path.exists() and path.read_text().strip() != value:
            try:
                path.write_text(value)
            except OSError as exc:
                print(f"could not restore {name}={value}: {exc}", file=sys.stderr)


def cleanup_host() -> None:
    """Removes whatever a real node leaves (idempotent): processes, pod cgroups, mounts, iptables,
    routes, the bridge, CNI caches. Sysctls are restored by the caller, from its state file."""
    for pid, _ in our_processes():
        _terminate(pid, timeout=5.0)
    _kill_cgroups()
    _unmount_all()
    _remove_iptables()
    _remove_links_and_routes()
    for cache in Path("/var/lib/cni/results").glob("tuneserve-*"):
        cache.unlink(missing_ok=True)


def leftovers(sysctls_before: Optional[dict[str, str]] = None) -> list[str]:
    """Everything of a real node still on this machine; empty when teardown was complete."""
    found = [f"process {pid}: {cmd}" for pid, cmd in our_processes()]
    found += [f"cgroup {p}" for p in _kubepods_cgroups()]
    found += [f"mount {p}" for p in _our_mounts()]
    for family in ("iptables", "ip6tables"):
        for table, lines in _iptables_rules(family).items():
            found += [f"{family} -t {table} {line}" for line in lines if _OURS.search(line)]
    routes = _run("ip", "route", "show", check=False).stdout.splitlines()
    found += [f"route {r}" for r in routes if any(c in r for c in (SERVICE_CIDR, KWOK_CIDR, "10.88.0."))]
    if Path(f"/sys/class/net/{BRIDGE}").exists():
        found.append(f"link {BRIDGE}")
    now = read_sysctls()
    for name, value in (sysctls_before or {}).items():
        if now.get(name) != value:
            found.append(f"sysctl {name}={now.get(name)} (was {value})")
    return found


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description="the real node of the local cluster: cleanup and checks")
    ap.add_argument("command", choices=["cleanup", "leftovers"])
    ap.add_argument("--dir", type=Path, help="cluster dir (default: the one named in the lock file)")
    args = ap.parse_args(argv)
    if args.command == "leftovers":
        print("\n".join(leftovers()))
        return 0
    fd = os.open(LOCK_PATH, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        print(f"{LOCK_PATH} is held: a real node is running; stop it instead", file=sys.stderr)
        return 1
    cluster_dir = args.dir or Path(LOCK_PATH.read_text().strip() or ".")
    state_file = Path(cluster_dir) / "realnode" / "state.json"
    saved = json.loads(state_file.read_text()).get("sysctls", {}) if state_file.exists() else {}
    cleanup_host()
    _restore_sysctls(saved)
    state_file.unlink(missing_ok=True)
    left = leftovers(saved)
    print("\n".join(left) if left else "clean", file=sys.stderr)
    return 1 if left else 0


if __name__ == "__main__":
    sys.exit(main())
