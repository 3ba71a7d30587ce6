#!/usr/bin/env python3
"""What the operator costs the API server when nothing changes: N FineTuneJobs at rest.

Starts the local control plane (hack/localcluster.py; the simulated fleet without the real node,
so it can run beside anything), KubeRay, tuneserve's CRDs and the operator as a host process (as
the tests run it), creates ``--jobs`` FineTuneJobs that reference a Secret (the bank example:
8 x H100, else MI300X, else Ascend; most of them wait for capacity), waits until every status
stopped changing, then reads the API server's ``apiserver_request_total`` before and after a quiet
window of ``--quiet-s`` seconds. Prints, per resource and verb, the requests made in that window:
writes (POST, PUT, PATCH, APPLY, DELETE) to the kinds the operator owns or writes, and GETs of
Secrets (only the operator reads Secrets here), plus the operator's RSS and CPU.

Only the operator writes FineTuneJobs and reads Secrets; KubeRay writes RayJob status
(subresource ``status``), which is reported apart.

  python bench/control_loop_at_rest.py --jobs 200 --quiet-s 60
"""
from __future__ import annotations

import argparse
import copy
import re
import sys
import tempfile
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "hack"), str(REPO / "tests")]

import yaml  # noqa: E402

from kube import Kube, wait_for  # noqa: E402
from localcluster import LocalCluster, load_fleet  # noqa: E402
from operator_process import OperatorProcess  # noqa: E402

WRITES = {"POST", "PUT", "PATCH", "APPLY", "DELETE"}
OPERATOR_KINDS = {"finetunejobs", "modelserves", "rayjobs", "rayservices", "configmaps", "serviceaccounts",
                  "roles", "rolebindings", "events", "leases"}
_SAMPLE = re.compile(r'^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>[0-9.e+]+)$')


def request_counts(cluster: LocalCluster) -> Counter:
    """(resource, subresource, verb) -> requests served so far (the API server's own counter)."""
    text = cluster.kubectl("get", "--raw", "/metrics").stdout
    out: Counter = Counter()
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group("labels")))
        out[(labels.get("resource", ""), labels.get("subresource", ""), labels.get("verb", ""))] += float(m.group("value"))
    return out


def fleet_without_real_node() -> dict:
    fleet = load_fleet(REPO / "hack" / "fleet.yaml")
    fleet["pools"] = [p for p in fleet["pools"] if not p.get("real")]
    return fleet


def start_cluster(prefix: str, fleet: dict) -> LocalCluster:
    """A local control plane in a fresh temporary directory with tuneserve's CRDs established."""
    cluster = LocalCluster(Path(tempfile.mkdtemp(prefix=prefix)) / "cluster", fleet=fleet).start()
    files = sorted((REPO / "crds").glob("tuneserve.dev_*.yaml"))
    cluster.kubectl("apply", "--server-side", *[a for f in files for a in ("-f", str(f))])
    cluster.wait_crds_established([f.name.removeprefix("tuneserve.dev_").removesuffix(".yaml") + ".tuneserve.dev"
                                   for f in files], 60)
    return cluster


def create_namespace(kube: Kube, name: str) -> None:
    """The namespace, once its default ServiceAccount exists (pods need it)."""
    kube.core.create_namespace({"metadata": {"name": name}})
    wait_for(lambda: kube.get("v1", "ServiceAccount", "default", name), 60, "the default ServiceAccount")


def jobs(n: int, namespace: str) -> list[dict]:
    base = yaml.safe_load((REPO / "crds" / "examples" / "finetunejob-qwen-bank.yaml").read_text())
    base["metadata"]["namespace"] = namespace
    base["spec"].pop("priorityClassName", None)
    out = []
    for i in range(n):
        job = copy.deepcopy(base)
        job["metadata"]["name"] = f"fin-{i:04d}"
        out.append(job)
    return out


def settled(kube: Kube, namespace: str, n: int, last: dict) -> bool:
    """Every job has a status, no job's resourceVersion moved since the previous look, and KubeRay
    is done too: the same RayClusters and pods as at the previous look (else the "quiet" minute
    would measure KubeRay still starting clusters for the last jobs)."""
    items = kube.list("tuneserve.dev/v1alpha1", "FineTuneJob", namespace)
    now = {j["metadata"]["name"]: j["metadata"]["resourceVersion"] for j in items if j.get("status", {}).get("phase")}
    ray = sorted(c["metadata"]["name"] for c in kube.list("ray.io/v1", "RayCluster", namespace)) + \
        sorted(p["metadata"]["name"] for p in kube.list("v1", "Pod", namespace))
    same = len(now) == n and now == last.get("versions") and ray == last.get("ray")
    last.update(versions=now, ray=ray)
    return same


def statuses(kube: Kube, namespace: str) -> dict:
    return {j["metadata"]["name"]: j.get("status") or {} for j in kube.list("tuneserve.dev/v1alpha1", "FineTuneJob", namespace)}


def status_changes(before: dict, after: dict) -> str:
    """Which status fields moved in the window, over all jobs (the cause of the writes), with one
    example per field."""
    def flat(d, prefix=""):
        if isinstance(d, dict):
            return {k2: v2 for k, v in d.items() for k2, v2 in flat(v, f"{prefix}.{k}" if prefix else k).items()}
        if isinstance(d, list):
            return {k2: v2 for i, v in enumerate(d) for k2, v2 in flat(v, f"{prefix}[{i}]").items()}
        return {prefix: d}
    fields: Counter = Counter()
    example: dict = {}
    for name in sorted(after):
        a, b = flat(before.get(name, {})), flat(after[name])
        for key in sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k)):
            fields[key] += 1
            example.setdefault(key, f"{name}: {a.get(key)!r} -> {b.get(key)!r}")
    if not fields:
        return "no status changed"
    return "; ".join(f"{key} in {n} jobs (e.g. {example[key]})" for key, n in fields.most_common(8))


def operator_usage(pid: int) -> tuple[float, float]:
    """(RSS MiB, CPU seconds) of the operator process."""
    stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    rss = int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * 4096 / 2**20
    import os
    return rss, (int(stat[11]) + int(stat[12])) / os.sysconf("SC_CLK_TCK")


def events_since(kube: Kube, since: datetime) -> str:
    """Who posted the Events of the window: (reporting component, involved kind, reason) -> Events
    created or repeated since ``since``, over every namespace."""
    groups: Counter = Counter()
    for ev in kube.core.list_event_for_all_namespaces().items:
        when = ev.last_timestamp or ev.event_time or ev.metadata.creation_timestamp
        if when and when >= since:
            who = ev.reporting_component or (ev.source.component if ev.source else None) or "?"
            groups[(who, ev.involved_object.kind, ev.reason)] += 1
    if not groups:
        return "none"
    return "; ".join(f"{who} {kind} {reason}: {n}" for (who, kind, reason), n in groups.most_common(10))


def report(delta: Counter, quiet_s: float, n: int, rss: float, cpu_s: float) -> str:
    lines = [f"{n} FineTuneJobs at rest, quiet window {quiet_s:.0f}s; operator RSS {rss:.0f} MiB, "
             f"CPU {cpu_s:.1f}s in the window ({100 * cpu_s / quiet_s:.1f}% of a core)",
             f"{'resource':<22} {'subresource':<12} {'verb':<7} {'requests':>9}"]
    writes = secret_gets = 0
    for (res, sub, verb), v in sorted(delta.items()):
        if v <= 0:
            continue
        if (verb in WRITES and res in OPERATOR_KINDS) or (res == "secrets" and verb == "GET"):
            lines.append(f"{res:<22} {sub:<12} {verb:<7} {int(v):>9}")
            if res == "secrets":
                secret_gets += int(v)
            elif not (res in ("rayjobs", "rayservices") and sub == "status") and res != "leases":
                writes += int(v)
    lines.append(f"writes by the operator's kinds (RayJob/RayService status and Leases apart): {writes}; "
                 f"Secret GETs: {secret_gets}")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--quiet-s", type=float, default=60)
    ap.add_argument("--settle-timeout", type=float, default=600)
    ap.add_argument("--out", type=Path, default=None, help="also write the report here")
    args = ap.parse_args()
    cluster = start_cluster("tuneserve-rest-", fleet_without_real_node())
    op = None
    try:
        kube = Kube(cluster.kubeconfig)
        create_namespace(kube, "bank")
        for name, keys in (("bank-s3", ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")), ("hf-token", ("token",))):
            kube.apply({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
                        "stringData": {k: "x" for k in keys}}, "bank")
        op = OperatorProcess(cluster.kubeconfig, cluster.logs)
        op.start()
        t0 = time.monotonic()
        kube.apply(jobs(args.jobs, "bank"))
        last: dict = {}
        wait_for(lambda: settled(kube, "bank", args.jobs, last), args.settle_timeout,
                 "every FineTuneJob's status to stop changing", interval=10)
        print(f"settled {time.monotonic() - t0:.0f}s after creating {args.jobs} jobs", flush=True)
        window_start = datetime.now(timezone.utc).replace(microsecond=0)
        before, (_, cpu0), seen = request_counts(cluster), operator_usage(op.proc.pid), statuses(kube, "bank")
        time.sleep(args.quiet_s)     # the measurement window itself: nothing is changed in it
        after, (rss, cpu1) = request_counts(cluster), operator_usage(op.proc.pid)
        text = report(after - before, args.quiet_s, args.jobs, rss, cpu1 - cpu0)
        text += "\nstatus fields that moved in the window: " + status_changes(seen, statuses(kube, "bank"))
        text += "\nEvents of the window by who posted them: " + events_since(kube, window_start)
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
