"""Chaos: the operator SIGKILLed at random points, also while jobs fall back to their next choice,
must leave exactly one current attempt per job, no orphan children and no repeated Event.

The operator writes a job's status first (guarded by the resourceVersion it planned from, with the
attempt in it), then its Events, then its children; a kill between any two of those must converge
when the next operator plans again. The kills are random (the seed is printed; set
TUNESERVE_CHAOS_SEED to replay one), jobs keep arriving during the chaos, and some of them are placed
on an H100 node whose pod slots are used up, so their pods stay unschedulable and they fall back to
MI300X after ``fallbackAfterMinutes`` while the operator keeps dying.
"""
from __future__ import annotations

import copy
import json
import os
import random
import signal
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from kube import wait_for
from localcluster import build_fleet_nodes

pytestmark = pytest.mark.cluster
REPO = Path(__file__).resolve().parents[2]
FTJ = ("tuneserve.dev/v1alpha1", "FineTuneJob")
JOB_LABEL = "tuneserve.dev/finetunejob"
CHAOS_SECONDS = 210          # long enough for the first jobs' 1-minute fallbacks to happen inside it
MAX_CHAOS_SECONDS = 480
MIN_KILLS = 30
MIN_STATUS_WRITES = 100      # reconciles that moved a job's state (only the operator writes FTJ status)
CHILD_KINDS = (("ray.io/v1", "RayJob"), ("v1", "ConfigMap"), ("v1", "ServiceAccount"),
               ("rbac.authorization.k8s.io/v1", "Role"), ("rbac.authorization.k8s.io/v1", "RoleBinding"))
WRITE_VERBS = {"POST", "PUT", "PATCH", "APPLY", "DELETE"}


def job(name: str) -> dict:
    doc = yaml.safe_load((REPO / "crds" / "examples" / "finetunejob-qwen-bank.yaml").read_text())
    doc["metadata"] = {"name": name}
    doc["spec"].pop("priorityClassName", None)
    doc["spec"]["accelerators"]["fallbackAfterMinutes"] = 1
    return doc


def ghost_h100_node() -> dict:
    """An H100 node that advertises 8 free devices but takes no pods: jobs placed there stay
    unschedulable and fall back (what the inventory cannot see)."""
    node = build_fleet_nodes({"pools": [{
        "name": "h100-chaos", "count": 1, "instanceType": "p5.48xlarge", "cpu": "192", "memory": "2048Gi",
        "accelerator": {"resource": "nvidia.com/gpu", "count": 8},
        "labels": {"nvidia.com/gpu.present": "true", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        "taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]}]})[0]
    node["status"]["capacity"]["pods"] = node["status"]["allocatable"]["pods"] = "0"
    return node


def api_writes(cluster) -> Counter:
    """The API server's own count of writes so far, per resource (its /metrics)."""
    out: Counter = Counter()
    for line in cluster.kubectl("get", "--raw", "/metrics").stdout.splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(part.split("=", 1) for part in line[line.index("{") + 1:line.index("}")].replace('"', "").split(","))
        if labels.get("verb") in WRITE_VERBS:
            out[(labels.get("resource"), labels.get("subresource", ""))] += float(line.rsplit(" ", 1)[1])
    return out


def snapshot(kube, namespace) -> dict:
    """resourceVersions of the jobs and their children: equal twice in a row means nothing moves."""
    objs = kube.list(*FTJ, namespace) + [o for kind in CHILD_KINDS for o in kube.list(*kind, namespace)]
    return {(o["kind"], o["metadata"]["name"]): o["metadata"]["resourceVersion"] for o in objs}


def settled(kube, namespace, last: dict, looks: int = 3) -> bool:
    """Every job has a phase and nothing moved over the last ``looks`` looks (spaced more than a
    fallback timeout apart in all, so a job waiting out its timer is not taken for settled)."""
    jobs = kube.list(*FTJ, namespace)
    now = snapshot(kube, namespace)
    last["same"] = last.get("same", 0) + 1 if now == last.get("seen") else 0
    last["seen"] = now
    return last["same"] >= looks - 1 and all((j.get("status") or {}).get("phase") for j in jobs)


def chaos(kube, namespace, operator, cluster, rng: random.Random) -> tuple[int, int, float]:
    """Create a job, kill the operator at a random moment, start it again: for CHAOS_SECONDS, and
    on until MIN_KILLS kills and MIN_STATUS_WRITES status writes (a slow machine does fewer a
    second), within MAX_CHAOS_SECONDS. Returns (kills, jobs created, status writes)."""
    kills = created = 0
    start, before = time.monotonic(), api_writes(cluster)
    while True:
        writes = (api_writes(cluster) - before)[("finetunejobs", "status")]
        elapsed = time.monotonic() - start
        if elapsed > MAX_CHAOS_SECONDS or (elapsed > CHAOS_SECONDS and kills >= MIN_KILLS
                                           and writes >= MIN_STATUS_WRITES):
            return kills, created, writes
        kube.apply(job(f"chaos-{created:03d}"), namespace)
        created += 1
        time.sleep(rng.uniform(0.05, 2.5))      # the kill lands at a random point of its work
        operator.stop(signal.SIGKILL)
        kills += 1
        operator.start()


def attempt_of(obj: dict) -> int:
    return int(obj["metadata"]["labels"].get("tuneserve.dev/attempt", 0))


def check_children(kube, namespace, jobs: dict) -> list[str]:
    """Problems: a job with other than one RayJob of its current attempt, or a child whose owner
    is gone or whose attempt is not its owner's current one."""
    problems = []
    rayjobs = Counter()
    for kind in CHILD_KINDS:
        for child in kube.list(*kind, namespace):
            owner = (child["metadata"].get("labels") or {}).get(JOB_LABEL)
            if owner is None:
                continue
            if owner not in jobs:
                problems.append(f"orphan {child['kind']} {child['metadata']['name']}: no FineTuneJob {owner}")
                continue
            current = ((jobs[owner].get("status") or {}).get("placement") or {}).get("attempt")
            if child["kind"] == "RayJob":
                rayjobs[owner] += 1
                if attempt_of(child) != current:
                    problems.append(f"RayJob {child['metadata']['name']} of attempt {attempt_of(child)}, "
                                    f"{owner} is at attempt {current}")
    for name, doc in jobs.items():
        placed = (doc.get("status") or {}).get("placement")
        wants_rayjob = placed is not None and doc["status"].get("phase") in ("Starting", "Running")
        if rayjobs[name] > 1 or (wants_rayjob and rayjobs[name] != 1):
            problems.append(f"{name} ({doc['status'].get('phase')}, attempt {placed and placed.get('attempt')}) "
                            f"has {rayjobs[name]} RayJobs")
    return problems


def fell_back_once(status: dict) -> bool:
    """A later attempt is current, or a choice timed out (a job whose every choice timed out ends
    Failed with no placement: its rejected choices are the record of its fallbacks)."""
    return ((status.get("placement") or {}).get("attempt") or 0) > 1 or \
        any(r.get("code") == "TimedOut" for r in status.get("rejectedChoices") or [])


PLACED_REASONS = {"FitsNow", "FellBack"}   # a (new) attempt begins: its transitions may repeat the last one's


def repeated_events(kube, namespace) -> list[str]:
    """An Event posted twice for one transition: same object, reason and message within one
    attempt (Events in the order etcd stored them; a placement Event starts a new attempt)."""
    mine = [ev for ev in kube.list("v1", "Event", namespace)
            if (ev.get("source") or {}).get("component") == "tuneserve-operator"]
    by_object: dict[str, list[dict]] = {}
    for ev in sorted(mine, key=lambda e: int(e["metadata"]["resourceVersion"])):
        by_object.setdefault(ev["involvedObject"]["name"], []).append(ev)
    repeats = []
    for name, events in by_object.items():
        seen: set = set()
        for ev in events:
            if ev["reason"] in PLACED_REASONS:
                seen = set()
            key = (ev["reason"], ev["message"])
            if key in seen or (ev.get("count") or 1) > 1:
                repeats.append(f"{name}: {ev['reason']}: {ev['message']}")
            seen.add(key)
    return repeats


def test_operator_killed_at_random_points_converges_to_one_attempt_per_job(kube, namespace, cluster, operator):
    seed = int(os.environ.get("TUNESERVE_CHAOS_SEED", time.time_ns() % 2**32))
    print(f"chaos seed {seed} (TUNESERVE_CHAOS_SEED={seed} replays it)")
    rng = random.Random(seed)
    kube.apply([{"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf-token"}, "stringData": {"token": "x"}},
                {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "bank-s3"},
                 "stringData": {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"}}], namespace)
    ghost = ghost_h100_node()
    cluster.kubectl("apply", "--server-side", "-f", "-", input=json.dumps(ghost))
    try:
        wait_for(lambda: any(c["type"] == "Ready" and c["status"] == "True" for c in
                             ((kube.get("v1", "Node", ghost["metadata"]["name"]) or {}).get("status") or {}).get("conditions") or []),
                 60, "the ghost H100 node to be Ready")
        kills, created, status_writes = chaos(kube, namespace, operator, cluster, rng)
        print(f"{kills} SIGKILLs, {created} jobs, {status_writes:.0f} FineTuneJob status writes during the chaos")
        assert kills >= MIN_KILLS and status_writes >= MIN_STATUS_WRITES, (kills, status_writes)

        last: dict = {}
        wait_for(lambda: settled(kube, namespace, last), 420, "every job and child to stop changing", interval=35)
        jobs = {j["metadata"]["name"]: j for j in kube.list(*FTJ, namespace)}
        assert len(jobs) == created
        fell_back = [n for n, j in jobs.items() if fell_back_once(j["status"])]
        print(f"{len(fell_back)} jobs fell back during or after the chaos; phases "
              f"{dict(Counter(j['status']['phase'] for j in jobs.values()))}")
        assert fell_back, "no job fell back: the chaos never hit a fallback"
        assert check_children(kube, namespace, jobs) == []
        assert repeated_events(kube, namespace) == []
    finally:
        kube.delete("v1", "Node", ghost["metadata"]["name"])
