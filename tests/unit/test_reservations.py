"""Burst overcommit (issue 15): capacity promised to placed objects whose worker pods are not bound
yet counts as taken when the next object is placed, for both kinds, without counting it twice once
the pods are bound and without an object blocking itself."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest

from helpers import fleet, load_example, merge_patch
from tuneserve.core.catalog import load_catalog
from tuneserve.core.scheduling.inventory import build_inventory
from tuneserve.core.scheduling.reservations import Reservation, pending_workers, placement_inventory, reserve
from tuneserve.finetunejob.placement import job_reservation
from tuneserve.finetunejob.reconcile import World, plan_finetunejob
from tuneserve.modelserve.placement import serve_reservation
from tuneserve.modelserve.reconcile import ServeWorld, plan_modelserve

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=timezone.utc)
CATALOG = load_catalog()
SECRETS = {"hf-token": frozenset({"token"}), "bank-s3": frozenset({"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"})}
# One 8-device H100 node and one 8-device MI300X node: room for exactly one 1x8 job on each.
SMALL = [n for n in fleet() if n["metadata"]["name"] in ("h100-a", "mi300x-a")]
H100 = "nvidia/h100-80gb"


def held(owner_name: str, workers: int = 1, attempt: int = 1, pool: str = "h100", kind: str = "FineTuneJob",
         devices: int = 8) -> Reservation:
    """A reservation as a placed FineTuneJob (or ModelServe) in namespace bank records it."""
    label = {"FineTuneJob": "tuneserve.dev/finetunejob", "ModelServe": "tuneserve.dev/modelserve"}[kind]
    selector = {label: owner_name, **({"tuneserve.dev/attempt": str(attempt)} if kind == "FineTuneJob" else {})}
    return Reservation((kind, "bank", owner_name), pool, H100 if pool == "h100" else "amd/mi300x", workers, devices, selector)


def worker_pod(owner_name: str, node: str | None = "h100-a", attempt: int = 1, phase: str = "Running",
               node_type: str = "worker") -> dict:
    """A Ray pod (worker: 8 GPUs) of FineTuneJob ``owner_name`` in bank, bound to ``node`` (None: not yet)."""
    labels = {"tuneserve.dev/finetunejob": owner_name, "tuneserve.dev/attempt": str(attempt), "ray.io/node-type": node_type}
    limits = {"nvidia.com/gpu": "8", "cpu": "8"} if node_type == "worker" else {"cpu": "2"}
    return {"metadata": {"name": f"{owner_name}-{node_type}", "namespace": "bank", "labels": labels},
            "spec": {"nodeName": node, "containers": [{"resources": {"limits": limits}}]},
            "status": {"phase": phase}}


def h100_free(inventory) -> list[int]:
    return [int(n.free.get("nvidia.com/gpu", 0)) for n in inventory.nodes if n.pool == "h100"]


@pytest.mark.parametrize("reservations, pods, planning, free, reserved", [
    ((), (), None, [8, 8], 0),
    ((held("a"),), (), None, [0, 8], 8),                                   # placed, no pod yet
    ((held("a"),), (worker_pod("a", node=None, phase="Pending"),), None, [0, 8], 8),   # pod created, not bound
    ((held("a"),), (worker_pod("a"),), None, [0, 8], 0),                   # bound: counted once, as usage
    ((held("a"),), (worker_pod("a", node_type="head"),), None, [0, 8], 8),  # a bound head is not a worker
    ((held("a"),), (worker_pod("a", attempt=2),), None, [0, 0], 8),        # another attempt's pod holds none of it
    ((held("a"),), (worker_pod("a", phase="Succeeded"),), None, [0, 8], 8),  # a finished pod holds none of it
    ((held("a"),), (), ("FineTuneJob", "bank", "a"), [8, 8], 0),           # re-planned: not blocked by itself
    ((held("a", workers=2),), (worker_pod("a", node="h100-b"),), None, [0, 0], 8),  # one of two bound, one pending
    ((held("a"), held("b"), held("c")), (), None, [0, 0], 16),             # more promised than the pool holds
    ((held("a", pool="mi300x"),), (), None, [8, 8], 0),                    # another pool's reservation
    ((held("a"), held("b", devices=4), held("c"), held("d", devices=4)), (), None, [0, 0], 16),  # c finds no room, d does
])
def test_reserve_subtracts_pending_workers_per_pool(reservations, pods, planning, free, reserved):
    h100_pool = [n for n in fleet() if n["metadata"]["name"].startswith("h100")]
    inventory = reserve(build_inventory(h100_pool, pods), reservations, pods, CATALOG, planning)
    assert h100_free(inventory) == free
    assert inventory.reserved.get("h100", 0) == reserved


def test_pending_workers_never_goes_below_zero():
    pods = [worker_pod("a"), {**worker_pod("a"), "metadata": {**worker_pod("a")["metadata"], "name": "a-worker-2"}}]
    assert pending_workers([held("a")], pods) == {("FineTuneJob", "bank", "a"): 0}


def job_body(name: str, status: dict | None = None, **spec_patch) -> dict:
    doc = merge_patch(load_example("finetunejob-qwen-bank.yaml"), {"spec": spec_patch} if spec_patch else {})
    doc["metadata"].update(name=name, namespace="bank", uid=f"uid-{name}", generation=1)
    if status:
        doc["status"] = status
    return doc


def job_world(reservations=(), pods=(), secrets=SECRETS) -> World:
    return World(nodes=SMALL, pods=list(pods), job_pods=[], ray_jobs={}, children={}, progress_configmap=None,
                 secrets=secrets, reservations=tuple(reservations))


def place_job(name: str, reservations=(), pods=(), secrets=SECRETS, **spec_patch) -> dict:
    """The job's body after its first reconcile (the status the plan writes)."""
    body = job_body(name, **spec_patch)
    plan = plan_finetunejob(body, job_world(reservations, pods, secrets), CATALOG, NOW)
    return {**body, "status": plan.status}


def test_a_burst_places_the_second_job_on_its_next_choice():
    first = place_job("a")
    assert first["status"]["placement"]["pool"] == "h100"
    second = place_job("b", [job_reservation(first)])
    placement = second["status"]["placement"]
    assert placement["pool"] == "mi300x" and not placement["waiting"]
    (rejected,) = second["status"]["rejectedChoices"]
    assert "8 devices reserved by placed jobs not yet running" in rejected["message"]


def test_with_no_other_choice_the_second_job_waits_and_says_why():
    only_h100 = {"choices": [{"vendor": "nvidia", "product": "H100", "devicesPerWorker": 8, "workers": 1}]}
    first = place_job("a", accelerators=only_h100)
    second = place_job("b", [job_reservation(first)], accelerators=only_h100)
    assert second["status"]["phase"] == "Waiting" and second["status"]["placement"]["waiting"]
    assert "8 devices reserved by placed jobs not yet running" in second["status"]["placement"]["reason"]


def test_once_the_first_jobs_pods_are_bound_its_capacity_is_counted_once():
    first = place_job("a")
    pods = [worker_pod("a")]
    inventory = placement_inventory(SMALL, pods, [job_reservation(first)], CATALOG, ("FineTuneJob", "bank", "b"))
    assert h100_free(inventory) == [0] and inventory.reserved == {}
    second = place_job("b", [job_reservation(first)], pods)
    (rejected,) = second["status"]["rejectedChoices"]
    assert "free per node: [0]" in rejected["message"] and "reserved" not in rejected["message"]


def test_a_waiting_job_replanned_is_not_blocked_by_its_own_reservation():
    """A job waits on h100 (full: a bound pod of another job); that job finishes and its pod goes:
    the waiting job, re-planned with its own reservation in the world, now fits there."""
    only_h100 = {"choices": [{"vendor": "nvidia", "product": "H100", "devicesPerWorker": 8, "workers": 1}]}
    waiting = place_job("b", pods=[worker_pod("a")], accelerators=only_h100)
    assert waiting["status"]["placement"]["waiting"]
    plan = plan_finetunejob(waiting, job_world([job_reservation(waiting)]), CATALOG, NOW)
    assert plan.status["placement"]["pool"] == "h100" and not plan.status["placement"]["waiting"]


@pytest.mark.parametrize("phase, reserves", [
    ("Pending", True), ("Waiting", True), ("Starting", True), ("Running", True),
    ("Suspended", False), ("Succeeded", False), ("Failed", False),
])
def test_only_live_placed_jobs_reserve(phase, reserves):
    placed = place_job("a")
    placed["status"]["phase"] = phase
    assert (job_reservation(placed) is not None) == reserves
    assert job_reservation(job_body("unplaced")) is None


def test_a_job_blocked_on_a_missing_secret_renders_no_pods_and_reserves_nothing():
    blocked = place_job("a", secrets={})
    assert blocked["status"]["placement"]["pool"] == "h100"
    assert job_reservation(blocked) is None


def test_a_job_reservation_selects_the_workers_of_its_recorded_attempt():
    placed = place_job("a")
    assert job_reservation(placed) == Reservation(("FineTuneJob", "bank", "a"), "h100", H100, 1, 8, {
        "tuneserve.dev/finetunejob": "a", "tuneserve.dev/attempt": "1"})


def serve_body(name: str, status: dict | None = None) -> dict:
    doc = merge_patch(load_example("modelserve-qwen-bank.yaml"), {"spec": {"engine": {"tensorParallelSize": 8}}})
    doc["metadata"].update(name=name, namespace="bank", uid=f"uid-{name}", generation=1)
    if status:
        doc["status"] = status
    return doc


def serve_world(reservations=(), children=None) -> ServeWorld:
    return ServeWorld(nodes=SMALL, pods=[], serve_pods=[], children=children or {}, jobs={"fin-v1": None},
                      secrets=SECRETS, reservations=tuple(reservations))


def place_serve(name: str, reservations=()) -> dict:
    body = serve_body(name)
    return {**body, "status": plan_modelserve(body, serve_world(reservations), CATALOG, NOW).status}


def test_modelserves_reserve_and_respect_reservations_like_jobs():
    first = place_serve("llm-a")
    assert first["status"]["placement"]["pool"] == "h100"
    reservation = serve_reservation(first)
    assert reservation == Reservation(("ModelServe", "bank", "llm-a"), "h100", H100, 1, 8,
                                      {"tuneserve.dev/modelserve": "llm-a"})
    second = place_serve("llm-b", [reservation])
    assert second["status"]["placement"]["pool"] == "mi300x"
    assert "8 devices reserved by placed jobs not yet running" in second["status"]["rejectedChoices"][0]["message"]


def test_a_modelserve_placed_again_after_a_spec_change_is_not_blocked_by_itself():
    """A rollout field changed before its replicas were bound: it is placed again, with its own
    reservation on h100 in the world, and stays there (same choice, same attempt)."""
    body = serve_body("llm")
    plan = plan_modelserve(body, serve_world(), CATALOG, NOW)
    children = {(o["kind"], o["metadata"]["name"]): o for o in plan.apply}
    placed = {**body, "status": plan.status}
    changed = merge_patch(placed, {"spec": {"engine": {"maxModelLen": 8192}}})
    again = plan_modelserve(changed, serve_world([serve_reservation(placed)], children), CATALOG, NOW)
    assert again.status["placement"]["pool"] == "h100" and again.status["placement"]["attempt"] == 1
    assert not again.status["placement"]["waiting"]


def test_one_kind_respects_the_others_reservation():
    job = place_job("a")
    assert place_serve("llm", [job_reservation(job)])["status"]["placement"]["pool"] == "mi300x"
    serve = place_serve("llm")
    assert place_job("b", [serve_reservation(serve)])["status"]["placement"]["pool"] == "mi300x"


def test_a_failed_modelserve_reserves_nothing():
    failed = place_serve("llm")
    failed["status"]["phase"] = "Failed"
    assert serve_reservation(failed) is None and serve_reservation(serve_body("unplaced")) is None
