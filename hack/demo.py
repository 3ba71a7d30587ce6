"""`make demo`: the main job, end to end, for real, on the local cluster.

1. The control plane with the simulated multi-vendor fleet (kwok) and one real node (kubelet,
   containerd) of this machine; show them.
2. Build the operator and CPU worker images here (no registry) and import them into the node.
3. Install the operator with its Helm chart: two pods on the real node, one holds the Lease.
4. Placement across vendors: a FineTuneJob preferring H100, else MI300X, else Ascend 910B lands
   on the simulated fleet, with its reasons, estimate and cost (its pods are simulated; deleted).
5. The real job: a FineTuneJob on the real node's pool. KubeRay starts real Ray pods, the
   submitter runs the operator-rendered entrypoint, the worker trains a LoRA adapter of a tiny
   model (built here) on data in MinIO and reports progress into `kubectl get ftj`.
6. A ModelServe of that adapter (by the job's name) on a real RayService with vLLM CPU; then an
   OpenAI chat completion through its Service, from the adapter and from the base model.
7. The time each stage took and the machine's peak memory use.

KEEP=1 leaves everything running (stop with `make cluster-down`).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

HACK = Path(__file__).resolve().parent
REPO = HACK.parent
sys.path.insert(0, str(HACK))
import images as image_builds  # noqa: E402
import realstory as story  # noqa: E402
from localcluster import BIN, DEFAULT_DIR, LocalCluster, fleet_table, stop_detached, wait_until  # noqa: E402
from minio_server import MinioServer  # noqa: E402

NS = "demo"
WORK = REPO / ".tuneserve" / "demo"
TIMES: list[tuple[str, float]] = []


def say(title: str) -> None:
    print(f"\n\033[1m== {title} ==\033[0m", flush=True)


@contextmanager
def stage(title: str) -> Iterator[None]:
    say(title)
    t0 = time.monotonic()
    yield
    TIMES.append((title, time.monotonic() - t0))


class PeakMemory:
    """Samples the machine's used memory (MemTotal - MemAvailable) once a second."""

    def __init__(self) -> None:
        self.peak_gib, self._stop = 0.0, threading.Event()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            info = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
            used = int(info["MemTotal"].split()[0]) - int(info["MemAvailable"].split()[0])
            self.peak_gib = max(self.peak_gib, used / 2**20)

    def stop(self) -> float:
        self._stop.set()
        return self.peak_gib


def kubectl(cluster: LocalCluster, *args: str, input: str | None = None) -> str:
    return cluster.kubectl(*args, input=input).stdout


def get(cluster: LocalCluster, *args: str) -> dict:
    out = cluster.kubectl("get", *args, "-o", "json", check=False)
    return json.loads(out.stdout) if out.returncode == 0 else {}


def apply(cluster: LocalCluster, obj: dict) -> None:
    kubectl(cluster, "apply", "--server-side", "-f", "-", input=json.dumps(obj))


def phase(cluster: LocalCluster, kind: str, name: str) -> str:
    return (get(cluster, kind, name, "-n", NS).get("status") or {}).get("phase") or ""


def show_fleet(cluster: LocalCluster) -> None:
    print(kubectl(cluster, "version"))
    print(fleet_table(cluster))
    print(f"\nreal node: {cluster.real_node.node_name} (kubelet + containerd on this machine, pool {story.REAL_POOL}, "
          f"tainted {story.REAL_TOLERATION['key']}); every other node is simulated by kwok")


def build_images(cluster: LocalCluster) -> dict:
    built = image_builds.build_all()
    for tar in story.image_tars(built):
        cluster.import_image(tar)
    for image in built["images"]:
        print(f"  {image['ref']:<40} {Path(image['tar']).stat().st_size / 2**20:5.0f} MiB  {image['tar']}")
    return built


def install_operator(cluster: LocalCluster, built: dict) -> None:
    story.install_operator(BIN / "helm", cluster.kubeconfig, story.build_operator_values(built), WORK / "helm")
    print(kubectl(cluster, "-n", story.RELEASE_NAMESPACE, "get", "pods", "-o", "wide"))
    lease = get(cluster, "lease", f"{story.RELEASE}-operator", "-n", story.RELEASE_NAMESPACE)
    print("leader:", (lease.get("spec") or {}).get("holderIdentity"))


def simulated_placement(cluster: LocalCluster, where: story.StoryStorage) -> None:
    """The multi-vendor choice on the simulated pools: where, why, estimate; then deleted."""
    doc = story.build_finetunejob("vendor-choice", NS, where)
    for key in ("nodeSelector", "tolerations"):
        doc["spec"].pop(key)
    doc["spec"]["accelerators"] = {"choices": [
        {"vendor": "nvidia", "product": "H100", "devicesPerWorker": 8, "workers": 1},
        {"vendor": "amd", "product": "MI300X", "devicesPerWorker": 8, "workers": 1},
        {"vendor": "huawei", "product": "Ascend910B", "devicesPerWorker": 8, "workers": 1}], "fallbackAfterMinutes": 15}
    print(json.dumps(doc["spec"]["accelerators"], indent=1))
    apply(cluster, doc)
    wait_until(lambda: (get(cluster, "ftj", "vendor-choice", "-n", NS).get("status") or {}).get("placement"), 60,
               "the placement")
    print(kubectl(cluster, "get", "ftj", "vendor-choice", "-n", NS, "-o", "wide"))
    status = get(cluster, "ftj", "vendor-choice", "-n", NS)["status"]
    print("placement:", status["placement"].get("reason"))
    print("estimate: ", json.dumps(status.get("estimate")))
    wait_until(lambda: get(cluster, "pods", "-n", NS, "-l", "tuneserve.dev/finetunejob=vendor-choice").get("items"), 60,
               "the simulated Ray pods")
    print(kubectl(cluster, "get", "pods", "-n", NS, "-l", "tuneserve.dev/finetunejob=vendor-choice", "-o", "wide"))
    kubectl(cluster, "delete", "ftj", "vendor-choice", "-n", NS, "--wait=true")


def prepare_storage(cluster: LocalCluster) -> tuple[MinioServer, story.StoryStorage]:
    server = MinioServer(WORK / "minio", host=cluster.real_node.bridge_ip, bucket="demo").start()
    where = story.upload_story_data(server, WORK)
    apply(cluster, story.build_object_store_secret(NS, server.access_key, server.secret_key))
    print(f"MinIO at {server.endpoint} (the pod bridge): {where.model_uri}, {where.dataset_uri}")
    return server, where


def train(cluster: LocalCluster, where: story.StoryStorage) -> dict:
    apply(cluster, story.build_finetunejob("assistant", NS, where))
    wait_until(lambda: (get(cluster, "ftj", "assistant", "-n", NS).get("status") or {}).get("placement"), 60, "the placement")
    print(kubectl(cluster, "get", "ftj", "-n", NS, "-o", "wide"))
    print("placement:", get(cluster, "ftj", "assistant", "-n", NS)["status"]["placement"].get("reason"))
    shown, last = False, None
    deadline = time.monotonic() + 900
    while phase(cluster, "ftj", "assistant") not in ("Succeeded", "Failed"):
        if time.monotonic() > deadline:
            raise SystemExit("the FineTuneJob did not finish in 15 minutes")
        pods = get(cluster, "pods", "-n", NS, "-l", "tuneserve.dev/finetunejob=assistant").get("items", [])
        if not shown and pods and all(p["status"].get("phase") == "Running" for p in pods):
            print(kubectl(cluster, "get", "rayjob,raycluster,pods", "-n", NS, "-o", "wide"))
            shown = True
        row = kubectl(cluster, "get", "ftj", "assistant", "-n", NS, "--no-headers", "-o",
                      "custom-columns=PHASE:.status.phase,PROGRESS:.status.progress.summary,"
                      "LOSS:.status.progress.loss,ETA:.status.progress.eta,COST:.status.usage.cost")
        if row != last:
            print("  " + row.strip(), flush=True)
            last = row
        time.sleep(2)   # a progress display, not a synchronisation
    ftj = get(cluster, "ftj", "assistant", "-n", NS)
    print(kubectl(cluster, "get", "ftj", "-n", NS, "-o", "wide"))
    if ftj["status"]["phase"] != "Succeeded":
        raise SystemExit(f"the FineTuneJob failed: {json.dumps(ftj['status'], indent=1)}")
    print("artifact:", json.dumps(ftj["status"]["artifact"]))
    return ftj


def serve(cluster: LocalCluster, where: story.StoryStorage) -> str:
    adapters = [{"name": "assistant-v1", "fineTuneJobRef": {"name": "assistant"}}]
    apply(cluster, story.build_modelserve("assistant-llm", NS, where, adapters))
    last = None
    deadline = time.monotonic() + 900
    while phase(cluster, "ms", "assistant-llm") not in ("Ready", "Failed"):
        if time.monotonic() > deadline:
            raise SystemExit("the ModelServe was not Ready in 15 minutes")
        row = kubectl(cluster, "get", "ms", "assistant-llm", "-n", NS, "--no-headers")
        if row != last:
            print("  " + row.strip(), flush=True)
            last = row
        time.sleep(2)   # a progress display, not a synchronisation
    print(kubectl(cluster, "get", "ms", "-n", NS, "-o", "wide"))
    print(kubectl(cluster, "get", "rayservice,pods,svc", "-n", NS, "-o", "wide"))
    if phase(cluster, "ms", "assistant-llm") != "Ready":
        raise SystemExit("the ModelServe failed")
    return story.service_url(get(cluster, "svc", "assistant-llm-openai", "-n", NS))


def complete(url: str) -> None:
    models = story.served_models(url)
    base = next(m for m in models if not m.startswith("assistant-"))
    print(f"POST {url}/v1/chat/completions  (the ModelServe's Service, through kube-proxy)")
    print(f"  question:           {story.QUESTION}")
    print(f"  adapter assistant-v1: {story.chat(url, 'assistant-v1')!r}")
    print(f"  base model {base}: {story.chat(url, base)!r}")


def run(cluster: LocalCluster) -> None:
    with stage("local cluster: simulated fleet and the real node"):
        show_fleet(cluster)
    with stage("images built here (no registry), imported into the real node"):
        built = build_images(cluster)
    kubectl(cluster, "create", "namespace", NS)
    with stage("tuneserve operator, installed by its Helm chart"):
        install_operator(cluster, built)
    with stage("data and the tiny base model into MinIO"):
        server, where = prepare_storage(cluster)
    try:
        with stage("placement across vendors (simulated pools): prefer H100, else MI300X, else Ascend 910B"):
            simulated_placement(cluster, where)
        with stage("FineTuneJob on the real node: real Ray pods, LoRA training, progress"):
            train(cluster, where)
        with stage("ModelServe of the adapter: real RayService, vLLM CPU"):
            url = serve(cluster, where)
        with stage("OpenAI chat completion through the ModelServe's Service"):
            complete(url)
    finally:
        if os.environ.get("KEEP") != "1":
            server.stop()


def main() -> int:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir(parents=True)
    if (DEFAULT_DIR / "state.json").exists():
        stop_detached(DEFAULT_DIR)
    memory = PeakMemory()
    t0 = time.monotonic()
    with stage("starting the local cluster"):
        cluster = LocalCluster(DEFAULT_DIR).start(detach=True)
    try:
        run(cluster)
    finally:
        if os.environ.get("KEEP") == "1":
            print(f"\nleft running: export KUBECONFIG={cluster.kubeconfig}; stop with `make cluster-down`")
        else:
            with stage("stopping the local cluster"):
                cluster.stop()   # this process started it: it reaps its own children
    say("time per stage")
    for title, seconds in TIMES:
        print(f"  {seconds:7.1f}s  {title}")
    print(f"  {time.monotonic() - t0:7.1f}s  in all; peak memory in use on this machine: {memory.stop():.1f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
