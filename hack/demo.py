"""`make demo`: start the local control plane with the simulated fleet and show what it offers.

Set KEEP=1 to leave the control plane running afterwards (stop it with `make cluster-down`).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from localcluster import DEFAULT_DIR, LocalCluster, fleet_table, stop_detached  # noqa: E402


def accelerator_totals(cluster: LocalCluster) -> str:
    import json
    from localcluster import ACCELERATOR_RESOURCES
    nodes = json.loads(cluster.kubectl("get", "nodes", "-o", "json").stdout)["items"]
    totals: dict[str, int] = {}
    for n in nodes:
        for res in ACCELERATOR_RESOURCES:
            if res in n["status"]["allocatable"]:
                totals[res] = totals.get(res, 0) + int(n["status"]["allocatable"][res])
    return "\n".join(f"  {res:<24} {count:>4} allocatable" for res, count in sorted(totals.items()))


def main() -> int:
    keep = os.environ.get("KEEP") == "1"
    if (DEFAULT_DIR / "state.json").exists():
        stop_detached(DEFAULT_DIR)
    cluster = LocalCluster(DEFAULT_DIR).start(detach=True)
    try:
        print(f"\n== tuneserve local control plane ({cluster.server}) ==")
        print(cluster.kubectl("version").stdout)
        print("== simulated fleet: nodes and their accelerators ==")
        print(fleet_table(cluster))
        print("\n== accelerator capacity by vendor resource ==")
        print(accelerator_totals(cluster))
        print("\n== KubeRay CRDs ==")
        print(cluster.kubectl("get", "crd", "-o", "custom-columns=NAME:.metadata.name").stdout)
    finally:
        if keep:
            print(f"left running: export KUBECONFIG={cluster.kubeconfig}; stop with `make cluster-down`")
        else:
            stop_detached(DEFAULT_DIR)
    return 0


if __name__ == "__main__":
    sys.exit(main())
