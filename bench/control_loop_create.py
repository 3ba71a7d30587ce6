#!/usr/bin/env python3
"""How fast the operator turns a burst of new FineTuneJobs into RayJobs.

Starts the local control plane without the real node (as bench/control_loop_at_rest.py), with the
H100 pool grown so every job fits (``--jobs`` x 1 device), KubeRay, tuneserve's CRDs and the
operator as a host process. Creates ``--jobs`` FineTuneJobs at once from ``--threads`` client
threads and records, through a watch, when each job's RayJob appears: latency = RayJob ADDED seen
- the job's create call returned.

Baseline in the same run, same client, same watch: ``--jobs`` ConfigMaps created the same way,
latency = ADDED seen - create returned (what the API server and the watch alone cost: a controller
cannot beat it). The ratio of the two p99s is printed.

  python bench/control_loop_create.py --jobs 500
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "hack"), str(REPO / "tests"), str(REPO / "bench")]

from kubernetes import client, watch  # noqa: E402

from control_loop_at_rest import (  # noqa: E402
    create_namespace, fleet_without_real_node, operator_usage, request_counts, start_cluster,
)
from kube import Kube, wait_for  # noqa: E402
from operator_process import OperatorProcess  # noqa: E402

NAMESPACE = "burst"


def fleet_for(n_jobs: int) -> dict:
    """The simulated fleet with enough H100 nodes for one device per job."""
    fleet = fleet_without_real_node()
    for pool in fleet["pools"]:
        if pool["name"] == "h100":
            pool["count"] = max(pool["count"], -(-n_jobs // pool["accelerator"]["count"]))
    return fleet


def job(i: int) -> dict:
    return {"apiVersion": "tuneserve.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": f"burst-{i:04d}"},
            "spec": {"baseModel": {"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct"}, "dataset": {"uri": "s3://demo/chat.jsonl"},
                     "training": {"maxSteps": 100},
                     "accelerators": {"choices": [{"vendor": "nvidia", "product": "H100", "devicesPerWorker": 1}]},
                     "output": {"uri": f"s3://demo/adapters/burst-{i:04d}"}}}


class Arrivals:
    """When each object of a kind was first seen ADDED by a watch on the namespace."""

    def __init__(self, kube: Kube, list_fn, key):
        self.seen: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(kube, list_fn, key), daemon=True)
        self._thread.start()

    def _run(self, kube, list_fn, key) -> None:
        while not self._stop.is_set():
            for ev in watch.Watch().stream(list_fn, NAMESPACE, timeout_seconds=5):
                if ev["type"] == "ADDED":
                    self.seen.setdefault(key(ev["object"]), time.monotonic())

    def stop(self) -> None:
        self._stop.set()


def burst(create, items: list[dict], threads: int) -> dict[str, float]:
    """Create every item from ``threads`` threads at once; name -> when its create returned."""
    done: dict[str, float] = {}

    def one(obj):
        create(obj)
        done[obj["metadata"]["name"]] = time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, items))
    return done


def percentiles(latencies: list[float]) -> dict[str, float]:
    qs = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"p50": qs[49], "p90": qs[89], "p99": qs[98], "max": max(latencies)}


def line(what: str, stats: dict[str, float]) -> str:
    return f"{what:<44} " + "  ".join(f"{k} {v:6.2f}s" for k, v in stats.items())


def measure_configmaps(kube: Kube, n: int, threads: int) -> dict[str, float]:
    arrivals = Arrivals(kube, kube.core.list_namespaced_config_map, lambda o: o.metadata.name)
    items = [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": f"base-{i:04d}"}, "data": {"k": "v"}}
             for i in range(n)]
    created = burst(lambda o: kube.core.create_namespaced_config_map(NAMESPACE, o), items, threads)
    wait_for(lambda: all(name in arrivals.seen for name in created), 120, "every ConfigMap seen by the watch")
    arrivals.stop()
    return percentiles([max(0.0, arrivals.seen[name] - t) for name, t in created.items()])


def measure_jobs(kube: Kube, n: int, threads: int, timeout: float) -> tuple[dict[str, float], float]:
    custom = client.CustomObjectsApi(kube.api_client)
    arrivals = Arrivals(kube, lambda ns, **kw: custom.list_namespaced_custom_object("ray.io", "v1", ns, "rayjobs", **kw),
                        lambda o: o["metadata"]["labels"].get("tuneserve.dev/finetunejob"))
    t0 = time.monotonic()
    created = burst(lambda o: custom.create_namespaced_custom_object("tuneserve.dev", "v1alpha1", NAMESPACE,
                                                                     "finetunejobs", o), [job(i) for i in range(n)], threads)
    wait_for(lambda: all(name in arrivals.seen for name in created), timeout, "every job's RayJob", interval=1)
    arrivals.stop()
    return percentiles([max(0.0, arrivals.seen[name] - t) for name, t in created.items()]), \
        max(arrivals.seen.values()) - t0


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """CPU seconds each process has used so far (user + system)."""
    out = {}
    for name, pid in pids.items():
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        out[name] = (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")
    return out


def where_the_time_went(cpu_before: dict[str, float], cpu_after: dict[str, float], span: float,
                        calls_before, calls_after) -> list[str]:
    """The burst's CPU per component and its API writes per resource: what bounds the latency."""
    cpu = "  ".join(f"{name} {cpu_after[name] - cpu_before[name]:.1f}s" for name in cpu_after)
    writes = calls_after - calls_before
    by_resource = sorted(((v, f"{res}{'/' + sub if sub else ''} {verb}") for (res, sub, verb), v in writes.items()
                          if verb in ("POST", "PATCH", "PUT", "DELETE", "APPLY") and v > 0), reverse=True)
    total = sum(v for v, _ in by_resource)
    return [f"CPU during the burst ({span:.1f}s, 2 cores = {2 * span:.0f} core-seconds): {cpu}",
            f"API writes during the burst: {total:.0f} ({total / max(span, 1e-3):.0f}/s): "
            + ", ".join(f"{what} {v:.0f}" for v, what in by_resource[:8])]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=500)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = ap.parse_args()
    cluster = start_cluster("tuneserve-burst-", fleet_for(args.jobs))
    op = None
    try:
        kube = Kube(cluster.kubeconfig)
        create_namespace(kube, NAMESPACE)
        op = OperatorProcess(cluster.kubeconfig, cluster.logs)
        op.start()
        base = measure_configmaps(kube, args.jobs, args.threads)
        pids = {c.name: c.proc.pid for c in cluster.components if c.proc} | {"operator": op.proc.pid}
        cpu_before, calls_before = cpu_seconds(pids), request_counts(cluster)
        jobs, span = measure_jobs(kube, args.jobs, args.threads, args.timeout)
        breakdown = where_the_time_went(cpu_before, cpu_seconds(pids), span, calls_before, request_counts(cluster))
        rss, _ = operator_usage(op.proc.pid)
        text = "\n".join([
            f"{args.jobs} FineTuneJobs created at once from {args.threads} client threads; all RayJobs "
            f"{span:.1f}s after the first create; operator RSS {rss:.0f} MiB",
            line("baseline: ConfigMap create -> watch ADDED", base),
            line("FineTuneJob create -> its RayJob ADDED", jobs),
            *breakdown,
            f"p99 ratio (jobs / baseline): {jobs['p99'] / max(base['p99'], 1e-3):.1f}x; target p99 <= 1 s: "
            f"{'met' if jobs['p99'] <= 1.0 else 'NOT met'}"])
        print(text)
        if args.out:
            args.out.write_text(text + "\n")
    finally:
        if op:
            op.stop()
        cluster.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
