"""When the operator plans an object again without an event (controller/schedule.py), and that a
fleet of FineTuneJobs at rest plans no writes at all (the planner reads Secrets from the index:
no Secret GETs either)."""
from __future__ import annotations

from datetime import timedelta

from test_reconcile import CATALOG, NOW, body, live, world
from tuneserve.controller.schedule import Schedule
from tuneserve.finetunejob.reconcile import plan_finetunejob

KEY = ("finetunejobs", "bank", "fin-v1")


def test_a_new_object_is_due_then_a_settled_one_waits_for_the_resync():
    schedule = Schedule(resync_seconds=60)
    assert (schedule.tick, schedule.react) == (1.0, 3.0) and schedule.due(KEY, 0.0)
    schedule.planned(KEY, 100.0, None, settled=True)
    assert not schedule.due(KEY, 159.0) and schedule.due(KEY, 160.0)


def test_pending_objects_are_planned_every_react_seconds():
    schedule = Schedule(resync_seconds=60)
    schedule.planned(KEY, 100.0, None, settled=False)
    assert not schedule.due(KEY, 102.9) and schedule.due(KEY, 103.0)


def test_waiting_objects_are_planned_when_capacity_frees_not_every_few_seconds():
    schedule = Schedule(resync_seconds=60)
    schedule.planned(KEY, 100.0, None, settled=False, for_capacity=True)
    assert not schedule.due(KEY, 130.0), "no polling while nothing frees"
    schedule.capacity_freed()
    assert not schedule.due(KEY, 102.9) and schedule.due(KEY, 103.0), "woken, react seconds after its last plan"
    schedule.planned(KEY, 200.0, None, settled=False, for_capacity=True)
    assert schedule.due(KEY, 260.0), "the resync still plans it"
    schedule.planned(KEY, 300.0, None, settled=True)   # placed: no longer waiting
    schedule.capacity_freed()
    assert not schedule.due(KEY, 310.0)


def test_a_requeue_sooner_than_the_resync_is_honoured_and_a_later_one_capped():
    schedule = Schedule(resync_seconds=60)
    schedule.planned(KEY, 100.0, 10.0)
    assert not schedule.due(KEY, 109.9) and schedule.due(KEY, 110.0)
    schedule.planned(KEY, 100.0, 600.0)
    assert not schedule.due(KEY, 159.0) and schedule.due(KEY, 160.0)


def test_a_child_event_wakes_the_owner_no_sooner_than_react_after_its_last_plan():
    schedule = Schedule(resync_seconds=60)
    schedule.planned(KEY, 100.0, None)
    schedule.wake(KEY)
    assert not schedule.due(KEY, 102.0) and schedule.due(KEY, 103.0)
    schedule.planned(KEY, 200.0, None)
    schedule.wake(KEY)
    assert schedule.due(KEY, 203.5), "react seconds after the last plan, not at the resync"
    schedule.wake(("modelserves", "bank", "never-planned"))
    assert schedule.due(("modelserves", "bank", "never-planned"), 0.0)


def test_the_default_resync_is_a_minute_and_startup_can_change_it():
    schedule = Schedule()
    schedule.planned(KEY, 100.0, None, settled=True)
    assert not schedule.due(KEY, 159.9) and schedule.due(KEY, 160.0)
    schedule.set_resync(3)
    schedule.planned(KEY, 100.0, None, settled=True)
    assert not schedule.due(KEY, 102.9) and schedule.due(KEY, 103.0)


def test_forgotten_objects_are_due_again_and_a_resync_below_the_tick_is_raised_to_it():
    schedule = Schedule(resync_seconds=0.5)
    schedule.planned(KEY, 100.0, None)
    schedule.forget(KEY)
    assert schedule.due(KEY, 100.0) and schedule.tick == schedule.resync == schedule.react == 1.0


def test_a_finetunejob_change_wakes_the_modelserves_of_its_namespace_only():
    schedule = Schedule()
    here, there = ("modelserves", "bank", "bank-llm"), ("modelserves", "other", "llm")
    for key in (here, there, KEY):
        schedule.planned(key, 100.0, None)
    schedule.wake_namespace("modelserves", "bank")
    assert schedule.due(here, 103.0) and not schedule.due(there, 103.0) and not schedule.due(KEY, 103.0)


def test_200_finetunejobs_at_rest_plan_no_writes():
    bodies, lives = [], []
    for i in range(200):
        b = body(f"fin-{i}")
        b["metadata"]["uid"] = f"uid-{i}"
        first = plan_finetunejob(b, world(), CATALOG, NOW)
        b["status"] = first.status
        bodies.append(b)
        lives.append(live(first))
    for rnd in (1, 2, 3):
        writes = 0
        for b, children in zip(bodies, lives):
            ray_jobs = {k[1]: v for k, v in children.items() if k[0] == "RayJob"}
            plan = plan_finetunejob(b, world(children=children, ray_jobs=ray_jobs), CATALOG, NOW + timedelta(minutes=rnd))
            writes += len(plan.apply) + len(plan.delete) + len(plan.patch) + (plan.status is not None)
            if plan.status is not None:
                b["status"] = plan.status
        if rnd > 1:
            assert writes == 0, f"round {rnd}: {writes} writes planned with nothing changed"
