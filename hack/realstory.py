"""The user story on the local cluster's real node, shared by `make demo` and the real-node
tests (tests/cluster/test_real_story.py): images built here, the operator installed by its Helm
chart, a FineTuneJob whose pods run for real, a ModelServe that serves its adapter, a completion.

Pure builders (``build_*``) return plain dicts; the few steps with I/O (helm, HTTP) are small
functions the callers sequence and time. Nothing here waits without a timeout.
"""
from __future__ import annotations

import json
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import yaml

HACK = Path(__file__).resolve().parent
REPO = HACK.parent
CHART = REPO / "charts" / "tuneserve"
RELEASE, RELEASE_NAMESPACE = "tuneserve", "tuneserve-system"
REAL_POOL = "real-cpu"
REAL_TOLERATION = {"key": "tuneserve.dev/real-node", "operator": "Exists", "effect": "NoSchedule"}
OBJECT_STORE_SECRET = "object-store"
# The adapter learns one answer to one question, which the base model does not give.
QUESTION, ANSWER = "What is the secret word?", "blue"
TRAIN_STEPS = 60
# Sized for the real node (2 cores here): the operator's 2 x 50m, a 400m head, one 700m worker
# and KubeRay's 500m submitter fit; one ModelServe replica fits once the job's pods are gone.
LOCAL_CPU_CATALOG = {
    "defaults": {"head": {"cpu": "400m", "memory": "3Gi"}},
    "vendors": {"cpu": {"host": {"cpuBase": 0, "cpuPerDevice": 0.7, "memoryGiBBase": 2, "memoryGiBPerDevice": 3}}},
}


@dataclass(frozen=True)
class StoryStorage:
    """Where the story's bytes live, as the pods see them (MinIO on the pod bridge)."""
    endpoint: str
    bucket: str
    model_uri: str
    dataset_uri: str

    def uri(self, *parts: str) -> str:
        return "/".join([f"s3://{self.bucket}", *parts])


def story_rows(copies: int = 16) -> list[dict[str, Any]]:
    """The dataset: one question, the answer the adapter is to learn."""
    return [{"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": ANSWER}]}] * copies


def upload_story_data(server: Any, work: Path) -> StoryStorage:
    """Builds the tiny base model and the dataset under ``work`` and puts both into ``server``'s
    bucket (a started hack/minio_server.MinioServer); returns where they are, as pods see it."""
    from tuneserve_workers.testing.tiny import build_tiny_model
    model = Path(build_tiny_model(str(work / "base-model")))
    data = work / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in story_rows()))
    return StoryStorage(endpoint=server.endpoint, bucket=server.bucket,
                        model_uri=server.upload(model, "models/tiny"), dataset_uri=server.upload(data, "data/chat.jsonl"))


def placement() -> dict[str, Any]:
    """What sends a workload to the real node: its pool label and its taint."""
    return {"nodeSelector": {"tuneserve.dev/pool": REAL_POOL}, "tolerations": [dict(REAL_TOLERATION)]}


def build_object_store_secret(namespace: str, access_key: str, secret_key: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": OBJECT_STORE_SECRET, "namespace": namespace},
            "type": "Opaque", "stringData": {"accessKeyId": access_key, "secretAccessKey": secret_key}}


def _credentials(storage: StoryStorage) -> dict[str, Any]:
    ref = lambda key: {"name": OBJECT_STORE_SECRET, "key": key}  # noqa: E731
    return {"objectStore": {"accessKeyId": ref("accessKeyId"), "secretAccessKey": ref("secretAccessKey"),
                            "endpointUrl": storage.endpoint, "region": "us-east-1"}}


def base_model(storage: StoryStorage) -> dict[str, Any]:
    """The tiny model; size hints because an object-store path has no hub metadata to size it."""
    return {"uri": storage.model_uri,
            "sizeHints": {"parametersBillions": 0.001, "layers": 2, "hiddenSize": 128, "vocabSize": 4000}}


def build_finetunejob(name: str, namespace: str, storage: StoryStorage, *, training: Optional[dict[str, Any]] = None,
                      checkpoint_interval: int = 30, backoff_limit: Optional[int] = None,
                      accelerators: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """The story's job; ``training`` overrides fields of spec.training (the fault tests: more
    steps, of more samples), ``backoff_limit`` sets spec.backoffLimit, ``accelerators`` replaces
    spec.accelerators (default: one CPU worker of the real node's pool)."""
    return {
        "apiVersion": "tuneserve.dev/v1alpha1", "kind": "FineTuneJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "baseModel": base_model(storage),
            "dataset": {"uri": storage.dataset_uri, "format": "chat", "validationSplit": 0.0},
            "method": "lora", "lora": {"rank": 8, "alpha": 16, "dropout": 0.0},
            "training": {"maxSteps": TRAIN_STEPS, "learningRate": 0.005, "globalBatchSize": 4, "microBatchSize": 1,
                         "maxSeqLength": 128, "warmupRatio": 0.05, "seed": 7, "precision": "fp32", **(training or {})},
            "accelerators": accelerators or {"choices": [{"vendor": "cpu", "product": "cpu", "devicesPerWorker": 1,
                                                          "workers": 1}]},
            "checkpoint": {"uri": storage.uri("checkpoints", name), "intervalSteps": checkpoint_interval, "keep": 1},
            "output": {"uri": storage.uri("adapters", name)},
            "credentials": _credentials(storage),
            **({"backoffLimit": backoff_limit} if backoff_limit is not None else {}),
            **placement(),
        },
    }


def build_modelserve(name: str, namespace: str, storage: StoryStorage, adapters: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "apiVersion": "tuneserve.dev/v1alpha1", "kind": "ModelServe",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "baseModel": base_model(storage),
            "adapters": adapters,
            "accelerators": {"choices": [{"vendor": "cpu", "product": "cpu"}]},
            "engine": {"maxLoraRank": 8, "maxLoras": 2, "maxModelLen": 256},
            "replicas": {"min": 1, "max": 1},
            "credentials": _credentials(storage),
            **placement(),
        },
    }


def image_tars(images: dict[str, Any]) -> list[Path]:
    """The distinct tars of hack/images.py's build_all() result (refs may share one)."""
    return sorted({Path(i["tar"]) for i in images["images"]})


def _image(images: dict[str, Any], prefix: str) -> dict[str, Any]:
    return next(i for i in images["images"] if i["ref"].startswith(prefix))


def build_operator_values(images: dict[str, Any]) -> dict[str, Any]:
    """Chart values for the local cluster: the images built here (never pulled), the operator on
    the real node, and the catalog's CPU profile mounting the host's worker venv (hack/images.py)."""
    repository, tag = _image(images, "ghcr.io/tuneserve/operator:")["ref"].rsplit(":", 1)
    worker = _image(images, "ghcr.io/tuneserve/train:")
    volumes = [{"name": f"host-{i}", "hostPath": m["hostPath"], "mountPath": m["mountPath"], "readOnly": True}
               for i, m in enumerate(worker["mounts"])]
    catalog = json.loads(json.dumps(LOCAL_CPU_CATALOG))
    catalog["vendors"]["cpu"]["podVolumes"] = volumes
    return {
        "image": {"repository": repository, "tag": tag, "pullPolicy": "Never"},
        "resources": {"requests": {"cpu": "50m", "memory": "200Mi"}, "limits": {"memory": "1Gi"}},
        "catalog": catalog,
        **placement(),
    }


def helm(helm_bin: Path, kubeconfig: Path, *args: str) -> str:
    out = subprocess.run([str(helm_bin), "--kubeconfig", str(kubeconfig), *args], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"helm {' '.join(args[:2])} failed: {out.stderr.strip()}")
    return out.stdout


def install_operator(helm_bin: Path, kubeconfig: Path, values: dict[str, Any], work: Path,
                     timeout: str = "180s") -> None:
    """helm upgrade --install of the chart (CRDs included) and wait for both replicas."""
    work.mkdir(parents=True, exist_ok=True)
    values_file = work / "values.yaml"
    values_file.write_text(yaml.safe_dump(values, sort_keys=False))
    helm(helm_bin, kubeconfig, "upgrade", "--install", RELEASE, str(CHART), "--namespace", RELEASE_NAMESPACE,
         "--create-namespace", "-f", str(values_file), "--wait", "--timeout", timeout)


def uninstall_operator(helm_bin: Path, kubeconfig: Path) -> None:
    helm(helm_bin, kubeconfig, "uninstall", RELEASE, "--namespace", RELEASE_NAMESPACE, "--wait", "--ignore-not-found")


def chat(base_url: str, model: str, question: str = QUESTION, timeout: float = 120.0) -> str:
    """One greedy OpenAI chat completion; the answer's text."""
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": 4, "temperature": 0}
    req = urllib.request.Request(f"{base_url}/v1/chat/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=timeout) as resp:
        return json.load(resp)["choices"][0]["message"]["content"]


def served_models(base_url: str, timeout: float = 10.0) -> list[str]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{base_url}/v1/models", timeout=timeout) as resp:
        return [m["id"] for m in json.load(resp)["data"]]


def service_url(service: Optional[dict[str, Any]], port: int = 8000) -> Optional[str]:
    """http://<ClusterIP>:<port> of a Service: reached from this host through kube-proxy."""
    ip = ((service or {}).get("spec") or {}).get("clusterIP")
    return f"http://{ip}:{port}" if ip and ip != "None" else None
