"""The whole user story for real, on the local cluster's real node (hack/realstory.py):

images built here -> the operator installed by Helm, running as two pods (one leader) -> a
FineTuneJob whose RayJob runs the operator-rendered entrypoint in real Ray pods, dataset,
checkpoints and adapter on MinIO -> a ModelServe serving that adapter from a real RayService on
vLLM CPU -> an OpenAI chat completion through the ModelServe's Service answers with what the
adapter learned, the base model does not -> a second adapter becomes servable in the same pod.

The stages are module-scoped fixtures (the shared ones in conftest.py), so a failure names the
stage that broke.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from kube import condition, wait_for

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "hack"))
import realstory as story  # noqa: E402

pytestmark = pytest.mark.cluster
NS = "real-story"
FTJ, MS = "assistant", "assistant-llm"


def _ftj(kube) -> dict:
    return kube.get("tuneserve.dev/v1alpha1", "FineTuneJob", FTJ, NS) or {}


def _ms(kube) -> dict:
    return kube.get("tuneserve.dev/v1alpha1", "ModelServe", MS, NS) or {}


def _pods(kube, namespace: str, selector: str) -> list[dict]:
    return kube.list("v1", "Pod", namespace, label_selector=selector)


@pytest.fixture(scope="module")
def trained(kube, helm_operator, storage, story_namespace) -> dict:
    """The FineTuneJob, run to the end by real Ray pods."""
    _, where = storage
    kube.apply(story.build_finetunejob(FTJ, NS, where))
    seen_running = wait_for(lambda: [p for p in _pods(kube, NS, f"tuneserve.dev/finetunejob={FTJ}")
                                     if p["status"].get("phase") == "Running"], 300, "the RayJob's pods to run")
    for pod in seen_running:
        node = kube.get("v1", "Node", pod["spec"]["nodeName"])
        assert node["metadata"]["labels"]["tuneserve.dev/pool"] == story.REAL_POOL
    job = wait_for(lambda: (_ftj(kube).get("status") or {}).get("phase") in ("Succeeded", "Failed") and _ftj(kube),
                   900, "the FineTuneJob to finish")
    assert job["status"]["phase"] == "Succeeded", json.dumps(job["status"], indent=1)
    return job


def test_the_operator_runs_from_the_chart_on_the_real_node(kube, helm_operator, cluster):
    pods = _pods(kube, story.RELEASE_NAMESPACE, "app.kubernetes.io/name=tuneserve")
    assert len(pods) == 2
    for pod in pods:
        assert pod["status"]["phase"] == "Running"
        assert kube.get("v1", "Node", pod["spec"]["nodeName"])["metadata"]["labels"]["tuneserve.dev/pool"] == story.REAL_POOL
        assert pod["spec"]["serviceAccountName"] == f"{story.RELEASE}-operator"


def test_finetunejob_trains_for_real_and_publishes_its_adapter(kube, trained, storage):
    server, _ = storage
    status = trained["status"]
    assert status["progress"]["step"] == story.TRAIN_STEPS
    assert status["artifact"]["uri"].startswith("s3://story/adapters/")
    fs = server.filesystem()
    manifest = json.loads(fs.cat(status["artifact"]["uri"].removeprefix("s3://") + "/tuneserve-manifest.json"))
    assert manifest["base_model"]["uri"] == trained["spec"]["baseModel"]["uri"]


@pytest.fixture(scope="module")
def serving(kube, trained, storage) -> dict:
    _, where = storage
    adapters = [{"name": "assistant-v1", "fineTuneJobRef": {"name": FTJ}}]
    kube.apply(story.build_modelserve(MS, NS, where, adapters))
    ms = wait_for(lambda: (condition(_ms(kube), "Ready") or {}).get("status") == "True" and _ms(kube),
                  900, "the ModelServe to be Ready")
    url = story.service_url(kube.get("v1", "Service", f"{MS}-openai", NS))
    assert url, "the ModelServe's Service has a ClusterIP"
    return {"ms": ms, "url": url}


def _answering(url: str) -> list[str]:
    try:
        return story.served_models(url)
    except OSError:
        return []


def test_modelserve_answers_with_the_adapters_learned_answer(serving):
    url = serving["url"]
    # Ready counts a Ready pod behind the Service; kube-proxy then programs the rule (its own sync).
    models = wait_for(lambda: _answering(url), 20, "the Service to answer once the ModelServe is Ready")
    assert "assistant-v1" in models
    base = next(m for m in models if not m.startswith("assistant-"))
    tuned, plain = story.chat(url, "assistant-v1"), story.chat(url, base)
    assert story.ANSWER in tuned.lower(), tuned
    assert story.ANSWER not in plain.lower(), f"the base model should not know the answer: {plain!r}"


def test_a_second_adapter_is_served_by_the_same_pod(kube, serving, storage):
    _, where = storage
    selector = f"tuneserve.dev/modelserve={MS},ray.io/node-type=worker"
    before = {p["metadata"]["uid"] for p in _pods(kube, NS, selector)}
    artifact = _ftj(kube)["status"]["artifact"]["uri"]
    adapters = [{"name": "assistant-v1", "fineTuneJobRef": {"name": FTJ}}, {"name": "assistant-v2", "uri": artifact}]
    kube.apply(story.build_modelserve(MS, NS, where, adapters))
    wait_for(lambda: "assistant-v2" in _answering(serving["url"]), 300, "assistant-v2 to be served")
    assert story.ANSWER in story.chat(serving["url"], "assistant-v2").lower()
    assert {p["metadata"]["uid"] for p in _pods(kube, NS, selector)} == before, "the replica pod was replaced"


def test_deleting_the_active_operator_pod_hands_over_within_30s(kube, helm_operator, serving):
    lease = lambda: kube.get("coordination.k8s.io/v1", "Lease", f"{story.RELEASE}-operator", story.RELEASE_NAMESPACE)  # noqa: E731
    leader = wait_for(lambda: (lease() or {}).get("spec", {}).get("holderIdentity"), 30, "a leader")
    t0 = time.monotonic()
    kube.core.delete_namespaced_pod(leader, story.RELEASE_NAMESPACE)
    new = wait_for(lambda: (h := (lease() or {}).get("spec", {}).get("holderIdentity")) and h != leader and h, 30,
                   "another replica to take the Lease")
    took = time.monotonic() - t0
    assert took < 30, f"handover took {took:.1f}s"
    # The new holder writes the Lease, then logs it: wait for the line, not just the Lease.
    wait_for(lambda: "acquired leadership" in kube.core.read_namespaced_pod_log(
        new, story.RELEASE_NAMESPACE, container="operator"), 15, f"{new} to log its leadership")
    assert (condition(_ms(kube), "Ready") or {}).get("status") == "True"


def _running_replica_pods(kube) -> list[dict]:
    return [p for p in _pods(kube, NS, f"tuneserve.dev/modelserve={MS},ray.io/node-type=worker")
            if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]


def _serves_every_adapter(kube, url: str, adapters: set[str]) -> bool:
    ms = _ms(kube)
    return (condition(ms, "Ready") or {}).get("status") == "True" and \
        (ms.get("status") or {}).get("adapterSummary") == f"{len(adapters)}/{len(adapters)}" and \
        adapters <= set(_answering(url))


def test_a_killed_replica_pod_comes_back_with_every_adapter_and_serves(kube, cluster, serving):
    """Every process of the serving pod SIGKILLed (the OOM killer, a crashed node): the container
    restarts (or KubeRay starts a new pod), its replica loads the whole adapter set before it takes
    traffic, and the ModelServe is Ready again with both adapters answering what they learned."""
    adapters = {"assistant-v1", "assistant-v2"}
    pods = _running_replica_pods(kube)
    assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
    killed = pods[0]
    container = next(c for c in killed["status"]["containerStatuses"] if c["name"] == "ray-worker")
    t0 = time.monotonic()
    cluster.real_node.ctr("tasks", "kill", "--all", "--signal", "SIGKILL", container["containerID"].split("://", 1)[1])
    wait_for(lambda: (condition(_ms(kube), "Ready") or {}).get("status") != "True", 120,
             "the ModelServe to stop being Ready once its only replica is gone")
    down = _ms(kube)["status"]
    wait_for(lambda: _serves_every_adapter(kube, serving["url"], adapters), 900,
             "a new replica serving every adapter and the ModelServe Ready again")
    took = time.monotonic() - t0
    print(f"\nreplica pod killed; not Ready: {down.get('phase')}: {down.get('message')}; "
          f"serving both adapters again after {took:.0f}s")
    (now,) = _running_replica_pods(kube)
    restarts = lambda pod: sum(c.get("restartCount", 0) for c in pod["status"]["containerStatuses"])  # noqa: E731
    assert now["metadata"]["uid"] != killed["metadata"]["uid"] or restarts(now) > restarts(killed), \
        "the replica came back in a new pod or a restarted container"
    assert down["phase"] != "Waiting", "a replica that served once and died is restarting, not waiting for capacity"
    for name in sorted(adapters):
        assert story.ANSWER in story.chat(serving["url"], name).lower(), name
