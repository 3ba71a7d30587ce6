"""`make demo`: the main job, end to end, on the local control plane.

1. Start the control plane with the simulated multi-vendor fleet; show it.
2. Start the tuneserve operator against it.
3. Apply a FineTuneJob ("prefer NVIDIA H100, else AMD MI300X, else Ascend 910B") for a tiny model
   built here from a config with a locally trained tokenizer (nothing is downloaded).
4. Show where it was placed and why, and the RayJob KubeRay runs on the simulated H100 node.
5. The fleet's pods are simulated, so run the real training worker here on CPU with the config
   the operator rendered, reporting progress through the channel a pod would use: the job's
   progress ConfigMap, with a token of the narrowly scoped ServiceAccount the operator created.
6. The Ray job ends (the dashboard stand-in says so): the FineTuneJob Succeeds with its artifact.
7. Apply a ModelServe that serves the fine-tuned adapter: the adapter is resolved from the job.

KEEP=1 leaves the control plane and operator running (stop with `make cluster-down`).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

HACK = Path(__file__).resolve().parent
REPO = HACK.parent
sys.path.insert(0, str(HACK))
sys.path.insert(0, str(REPO / "tests"))
from fake_dashboard import DashboardClient  # noqa: E402
from localcluster import ACCELERATOR_RESOURCES, DEFAULT_DIR, LocalCluster, fleet_table, stop_detached, wait_until  # noqa: E402
from operator_process import OperatorProcess  # noqa: E402

NS = "demo"
WORK = REPO / ".tuneserve" / "demo"


def say(title: str) -> None:
    print(f"\n\033[1m== {title} ==\033[0m", flush=True)


def kubectl(cluster: LocalCluster, *args: str, input: str | None = None) -> str:
    return cluster.kubectl(*args, input=input).stdout


def get(cluster: LocalCluster, *args: str) -> dict:
    return json.loads(kubectl(cluster, "get", *args, "-o", "json"))


def accelerator_totals(cluster: LocalCluster) -> str:
    totals: dict[str, int] = {}
    for n in get(cluster, "nodes")["items"]:
        for res in ACCELERATOR_RESOURCES:
            if res in n["status"]["allocatable"]:
                totals[res] = totals.get(res, 0) + int(n["status"]["allocatable"][res])
    return "\n".join(f"  {res:<24} {count:>4} allocatable" for res, count in sorted(totals.items()))


def tiny_base_model(model: Path) -> dict:
    """The tiny model's source; size hints because a local path has no hub metadata to size it."""
    return {"uri": str(model),
            "sizeHints": {"parametersBillions": 0.001, "layers": 2, "hiddenSize": 128, "vocabSize": 4000}}


def finetunejob(model: Path, dataset: Path) -> dict:
    return {
        "apiVersion": "tuneserve.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": "tiny-assistant", "namespace": NS},
        "spec": {
            "baseModel": tiny_base_model(model),
            "dataset": {"uri": str(dataset), "format": "chat", "validationSplit": 0.125},
            "method": "lora", "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
            "training": {"maxSteps": 40, "learningRate": 0.005, "globalBatchSize": 4, "microBatchSize": 1,
                         "maxSeqLength": 128, "warmupRatio": 0.05, "seed": 7, "precision": "fp32"},
            "accelerators": {"choices": [
                {"vendor": "nvidia", "product": "H100", "devicesPerWorker": 8, "workers": 1},
                {"vendor": "amd", "product": "MI300X", "devicesPerWorker": 8, "workers": 1},
                {"vendor": "huawei", "product": "Ascend910B", "devicesPerWorker": 8, "workers": 1}],
                "fallbackAfterMinutes": 15},
            "checkpoint": {"uri": str(WORK / "checkpoints"), "intervalSteps": 10, "keep": 2},
            "output": {"uri": str(WORK / "adapters" / "tiny-assistant")},
        },
    }


def modelserve(model: Path) -> dict:
    return {
        "apiVersion": "tuneserve.dev/v1alpha1", "kind": "ModelServe",
        "metadata": {"name": "tiny-llm", "namespace": NS},
        "spec": {
            "baseModel": tiny_base_model(model),
            "adapters": [{"name": "assistant-v1", "fineTuneJobRef": {"name": "tiny-assistant"}}],
            "accelerators": {"choices": [{"vendor": "nvidia", "product": "L4"}, {"vendor": "nvidia", "product": "A10G"}]},
            "engine": {"maxLoraRank": 8, "maxLoras": 2},
            "replicas": {"min": 1, "max": 2},
        },
    }


def run_worker_locally(cluster: LocalCluster, ftj: dict) -> None:
    """What the RayJob's pods would run: the training entrypoint, with the operator's config."""
    placement = ftj["status"]["placement"]
    cm = get(cluster, "configmap", f"{placement['rayJobName']}-config", "-n", NS)
    config = json.loads(next(iter(cm["data"].values())))
    # The pods would have 8 H100s; here the same code trains on CPU with 2 Ray workers over gloo.
    config["accelerator"].update(workers=2, devices_per_worker=0, torch_device="cpu", distributed_backend="gloo",
                                 ray_resource=None, ray_resources_per_worker=0)
    (WORK / "config.json").write_text(json.dumps(config, indent=2))
    sa_dir = WORK / "serviceaccount"
    sa_dir.mkdir(parents=True, exist_ok=True)
    token = kubectl(cluster, "create", "token", "tiny-assistant-worker", "-n", NS, "--duration", "1h").strip()
    (sa_dir / "token").write_text(token)
    (sa_dir / "ca.crt").write_text((cluster.dir / "pki" / "ca.crt").read_text())
    os.makedirs("/tmp/tuneserve-demo-ray", exist_ok=True)
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "PYTHONPATH": f"{REPO / 'workers'}", "HF_HUB_OFFLINE": "1",
           "TUNESERVE_PROGRESS_CONFIGMAP": f"{NS}/tiny-assistant-progress", "TUNESERVE_PROGRESS_INTERVAL_S": "2",
           "TUNESERVE_SERVICEACCOUNT_DIR": str(sa_dir), "KUBERNETES_SERVICE_HOST": "127.0.0.1",
           "KUBERNETES_SERVICE_PORT": str(cluster.ports["apiserver"]), "TUNESERVE_RAY_STORAGE": str(WORK / "ray"),
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_DEFAULT_OBJECT_STORE_MEMORY_PROPORTION": "0.02",
           "NO_PROXY": "127.0.0.1,localhost", "RAY_TMPDIR": "/tmp/tuneserve-demo-ray",   # a Ray of its own
           "TUNESERVE_FORWARD_ENV": "1"}   # in a pod the env is on every Ray pod; here the driver passes it on
    log = WORK / "worker.log"
    print(f"training worker log: {log}")
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tuneserve_workers.train", "--config", str(WORK / "config.json")],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
        last = None
        while proc.poll() is None:
            row = kubectl(cluster, "get", "ftj", "tiny-assistant", "-n", NS, "--no-headers", "-o",
                          "custom-columns=PHASE:.status.phase,PROGRESS:.status.progress.summary,"
                          "LOSS:.status.progress.loss,ETA:.status.progress.eta,COST:.status.usage.cost")
            if row != last:
                print("  " + row.strip(), flush=True)
                last = row
            time.sleep(2)   # a progress display, not a synchronisation
    if proc.returncode != 0:
        print(log.read_text()[-3000:])
        raise SystemExit(f"the training worker failed ({proc.returncode}); see {log}")


def main() -> int:
    keep = os.environ.get("KEEP") == "1"
    shutil.rmtree(WORK, ignore_errors=True)   # a fresh run: no checkpoints from a previous demo to resume
    WORK.mkdir(parents=True)
    if (DEFAULT_DIR / "state.json").exists():
        stop_detached(DEFAULT_DIR)
    cluster = LocalCluster(DEFAULT_DIR).start(detach=True)
    op = None
    try:
        say(f"local control plane ({cluster.server})")
        print(kubectl(cluster, "version"))
        say("simulated fleet: nodes and their accelerators")
        print(fleet_table(cluster))
        say("accelerator capacity by vendor resource")
        print(accelerator_totals(cluster))

        say("tuneserve operator")
        files = sorted((REPO / "crds").glob("tuneserve.dev_*.yaml"))
        kubectl(cluster, "apply", "--server-side", *[a for f in files for a in ("-f", str(f))])
        cluster.wait_crds_established(["finetunejobs.tuneserve.dev", "modelserves.tuneserve.dev"], 60)
        op = OperatorProcess(cluster.kubeconfig, cluster.logs, env={"TUNESERVE_RESYNC_SECONDS": "1"})
        op.start()
        state = json.loads((cluster.dir / "state.json").read_text())   # so `make cluster-down` stops it too
        state["pids"]["tuneserve-operator"] = op.proc.pid
        (cluster.dir / "state.json").write_text(json.dumps(state, indent=1))
        print(f"running; log: {cluster.logs / 'tuneserve-operator.log'}")

        say("a tiny model and data, built here (no downloads)")
        from tuneserve_workers.testing.tiny import build_tiny_model, write_toy_dataset
        model = Path(build_tiny_model(str(WORK / "base-model")))
        dataset = Path(write_toy_dataset(str(WORK / "data" / "chat.jsonl")))
        print(f"model: {model}\ndata:  {dataset}")

        say("FineTuneJob: prefer H100, else MI300X, else Ascend 910B")
        kubectl(cluster, "create", "namespace", NS)
        doc = finetunejob(model, dataset)
        print(yaml.safe_dump(doc["spec"]["accelerators"], sort_keys=False))
        kubectl(cluster, "apply", "--server-side", "-f", "-", input=json.dumps(doc))
        wait_until(lambda: get(cluster, "ftj", "tiny-assistant", "-n", NS).get("status", {}).get("phase") == "Starting",
                   60, "the FineTuneJob to start")
        ftj = get(cluster, "ftj", "tiny-assistant", "-n", NS)
        print(kubectl(cluster, "get", "ftj", "-n", NS, "-o", "wide"))
        print("placement:", ftj["status"]["placement"]["reason"])
        print("estimate: ", json.dumps(ftj["status"].get("estimate")))
        wait_until(lambda: all(p["spec"].get("nodeName") for p in get(cluster, "pods", "-n", NS, "-l",
                                                                           "tuneserve.dev/finetunejob=tiny-assistant")["items"]),
                   60, "the Ray pods to be scheduled")
        print(kubectl(cluster, "get", "rayjob,raycluster", "-n", NS))
        print(kubectl(cluster, "get", "pods", "-n", NS, "-o", "wide"))

        say("the training worker (real: Ray Train + PEFT on CPU), progress into the FineTuneJob")
        run_worker_locally(cluster, ftj)
        job_id = get(cluster, "rayjob", ftj["status"]["placement"]["rayJobName"], "-n", NS)["status"]["jobId"]
        DashboardClient(cluster.dashboard_url).set_job(job_id, "SUCCEEDED", "training finished")
        wait_until(lambda: get(cluster, "ftj", "tiny-assistant", "-n", NS)["status"]["phase"] == "Succeeded",
                   90, "the FineTuneJob to succeed")
        print(kubectl(cluster, "get", "ftj", "-n", NS, "-o", "wide"))
        ftj = get(cluster, "ftj", "tiny-assistant", "-n", NS)
        print("artifact:", json.dumps(ftj["status"]["artifact"]))
        manifest = Path(ftj["status"]["artifact"]["uri"]) / "tuneserve-manifest.json"
        if manifest.exists():
            print(f"manifest ({manifest}):\n{manifest.read_text()}")
        print(kubectl(cluster, "get", "events", "-n", NS, "--field-selector", "involvedObject.name=tiny-assistant",
                      "--sort-by", ".lastTimestamp"))

        say("ModelServe: serve the base model with the fine-tuned adapter")
        kubectl(cluster, "apply", "--server-side", "-f", "-", input=json.dumps(modelserve(model)))
        wait_until(lambda: get(cluster, "configmap", "tiny-llm-adapters", "-n", NS), 60, "the adapters ConfigMap")
        wait_until(lambda: get(cluster, "ms", "tiny-llm", "-n", NS).get("status", {}).get("endpoint"), 60, "the endpoint")
        print(kubectl(cluster, "get", "ms", "-n", NS, "-o", "wide"))
        cm = get(cluster, "configmap", "tiny-llm-adapters", "-n", NS)
        print("desired adapters:", next(iter(cm["data"].values())))
    finally:
        if keep:
            print(f"\nleft running: export KUBECONFIG={cluster.kubeconfig}; stop with `make cluster-down`")
        else:
            if op is not None:
                op.stop()
            stop_detached(DEFAULT_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
