"""derive_status: phases, conditions with stable transition times, usage, write suppression."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from helpers import load_example
from localcluster import HACK, build_fleet_nodes, load_fleet
from tuneserve.api.finetunejob import FineTuneJob
from tuneserve.api.conditions import ConditionStatus, RejectionCode
from tuneserve.api.finetunejob_status import ConditionReason, ConditionType, Phase
from tuneserve.core.catalog import load_catalog
from tuneserve.core.status import status_patch, timed_out_history
from tuneserve.finetunejob.status import Observed, derive_status, devices_held_since, money
from tuneserve.core.scheduling.inventory import build_inventory
from tuneserve.finetunejob.placement import decide_placement
from tuneserve_workers.contract import CheckpointRef, Progress

CATALOG = load_catalog()
INVENTORY = build_inventory(build_fleet_nodes(load_fleet(HACK / "fleet.yaml")), [])
T0 = datetime(2026, 9, 1, 12, 0, tzinfo=timezone.utc)


def job(**meta) -> FineTuneJob:
    body = load_example("finetunejob-qwen-bank.yaml")
    body["metadata"].update(uid="u1", generation=1, **meta)
    return FineTuneJob.from_body(body)


def ray_job(deployment: str, job_status: str = "", start: str | None = "2026-09-01T12:05:00Z", **extra) -> dict:
    status = {"jobDeploymentStatus": deployment, "jobStatus": job_status, **extra}
    if start:
        status["startTime"] = start
    return {"status": status}


def pod(node_type="worker", node="h100-0", scheduled_at="2026-09-01T12:05:00Z"):
    """One of the attempt's pods, as the pods index slims it: bound to ``node`` at ``scheduled_at``."""
    conditions = [{"type": "PodScheduled", "status": "True", "lastTransitionTime": scheduled_at}] if node else \
        [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "lastTransitionTime": scheduled_at}]
    return {"metadata": {"labels": {"ray.io/node-type": node_type}}, "spec": {"nodeName": node},
            "status": {"phase": "Running" if node else "Pending", "conditions": conditions}}


BOUND = (pod("head", node="cpu-0"), pod())   # the bank job's head and its one 8 x H100 worker, bound at 12:05


def cond(status, type_):
    return status.condition(type_)


def placed():
    j = job()
    decision = decide_placement(j.spec, CATALOG, INVENTORY)
    return j, derive_status(j, Observed(decision=decision, attempt=1), T0)


def test_first_placement_is_pending_with_estimate():
    _, status = placed()
    assert status.phase == Phase.Pending
    assert status.placement.accelerator == "NVIDIA H100 80GB x8" and status.placement.ray_job_name == "fin-v1-1"
    assert cond(status, ConditionType.Placed).reason == ConditionReason.FitsNow
    assert cond(status, ConditionType.Accepted).status == ConditionStatus.true
    assert status.estimate.cost_usd > 0 and status.progress.eta.startswith("~") and status.usage.cost.startswith("$0.00 of ~$")
    assert [c.type for c in status.conditions] == list(ConditionType)


def test_running_with_progress_and_stable_transition_times():
    j, s1 = placed()
    progress = Progress(state="Running", step=450, total_steps=1000, loss=1.23456, eta_seconds=4800,
                        last_checkpoint=CheckpointRef(uri="s3://bank/checkpoints/fin-v1/step-400", step=400, time=T0))
    s2 = derive_status(j, Observed(ray_job=ray_job("Running", "RUNNING"), progress=progress, attempt_pods=BOUND), T0 + timedelta(minutes=65), s1)
    assert s2.phase == Phase.Running
    assert s2.progress.summary == "45% (450/1000)" and s2.progress.eta == "1h20m" and s2.progress.loss == 1.2346
    assert cond(s2, ConditionType.Checkpointed).reason == ConditionReason.CheckpointSaved
    assert s2.usage.accelerator_hours == 8.0  # 8 devices x 1 hour since startTime 12:05
    assert s2.usage.cost_usd == 28.0
    assert cond(s2, ConditionType.Accepted).last_transition_time == T0  # unchanged status keeps its time
    assert cond(s2, ConditionType.Running).last_transition_time == T0 + timedelta(minutes=65)
    s3 = derive_status(j, Observed(ray_job=ray_job("Running", "RUNNING"), progress=progress), T0 + timedelta(minutes=65), s2)
    assert status_patch(s2.to_wire(), s3) is None


def test_success_records_artifact_and_stays_terminal():
    j, s1 = placed()
    done = Progress(state="Succeeded", step=1000, total_steps=1000, artifact_uri="s3://bank/adapters/fin-v1", artifact_digest="sha256:ab")
    s2 = derive_status(j, Observed(ray_job=ray_job("Complete", "SUCCEEDED", endTime="2026-09-01T14:05:00Z"), progress=done), T0 + timedelta(hours=3), s1)
    assert s2.phase == Phase.Succeeded and s2.artifact.uri == "s3://bank/adapters/fin-v1" and s2.artifact.rank == 16
    assert s2.usage.accelerator_hours == 16.0 and s2.completion_time is not None
    s3 = derive_status(j, Observed(ray_job=None), T0 + timedelta(hours=4), s2)
    assert s3.phase == Phase.Succeeded and s3.completion_time == s2.completion_time


def test_failure_after_retries():
    j, s1 = placed()
    s2 = derive_status(j, Observed(ray_job=ray_job("Failed", "FAILED", failed=2, message="OOM")), T0 + timedelta(hours=1), s1)
    assert s2.phase == Phase.Failed and s2.restarts == 2
    assert cond(s2, ConditionType.Failed).reason == ConditionReason.BackoffLimitExceeded and "OOM" in s2.message


def test_suspend():
    j = job()
    body = load_example("finetunejob-qwen-bank.yaml")
    body["spec"]["suspend"] = True
    body["metadata"].update(uid="u1", generation=2)
    suspended = FineTuneJob.from_body(body)
    _, s1 = placed()
    s2 = derive_status(suspended, Observed(ray_job=ray_job("Suspended")), T0, s1)
    assert s2.phase == Phase.Suspended and cond(s2, ConditionType.Suspended).status == ConditionStatus.true
    assert s2.observed_generation == 2


def test_spec_error_fails():
    s = derive_status(job(), Observed(spec_error="cannot tell the size", spec_error_reason=ConditionReason.ModelSizeUnknown), T0)
    assert s.phase == Phase.Failed and cond(s, ConditionType.Accepted).reason == ConditionReason.ModelSizeUnknown


def test_fallback_keeps_history_and_usage():
    j, s1 = placed()
    pending = (pod("head", node="cpu-0"), pod(node=None, scheduled_at="2026-09-01T12:00:00Z"))
    s2 = derive_status(j, Observed(ray_job=ray_job("Initializing", start="2026-09-01T12:00:00Z"), attempt_pods=pending),
                       T0 + timedelta(minutes=30), s1)
    history = {"nvidia/h100-80gb 1x8": "nvidia/h100-80gb 1x8: pods unschedulable for 16m; moved on"}
    decision = decide_placement(j.spec, CATALOG, INVENTORY, timed_out=history)
    from tuneserve.api.conditions import ChoiceRejection
    timed_out = (ChoiceRejection(choice="nvidia/h100-80gb 1x8", code=RejectionCode.TimedOut, message=history["nvidia/h100-80gb 1x8"], at=T0),)
    s3 = derive_status(j, Observed(decision=decision, attempt=2, fallback_reason="H100 timed out", timed_out=timed_out),
                       T0 + timedelta(minutes=31), s2)
    assert s3.placement.attempt == 2 and s3.placement.ray_job_name == "fin-v1-2" and s3.placement.vendor == "amd"
    assert cond(s3, ConditionType.Placed).reason == ConditionReason.FellBack
    assert timed_out_history(s3) == history
    # The RayJob had a startTime for 30 minutes, but its worker never got its 8 GPUs: nothing billed.
    assert s3.usage.prior_accelerator_hours == s2.usage.accelerator_hours == 0.0 and s2.usage.cost == "$0.00 of ~$10.83"


def test_unplaceable_for_good_fails_but_missing_nodes_waits():
    body = load_example("finetunejob-qwen-bank.yaml")
    body["metadata"].update(uid="u1", generation=1)
    body["spec"]["baseModel"]["uri"] = "hf://Qwen/Qwen2.5-72B-Instruct"
    body["spec"]["accelerators"] = {"choices": [{"product": "L4"}]}
    j = FineTuneJob.from_body(body)
    s = derive_status(j, Observed(decision=decide_placement(j.spec, CATALOG, INVENTORY)), T0)
    assert s.phase == Phase.Failed and cond(s, ConditionType.Placed).reason == ConditionReason.NoAcceptableChoice
    body["spec"]["baseModel"]["uri"] = "hf://Qwen/Qwen2.5-0.5B-Instruct"
    body["spec"]["accelerators"] = {"choices": [{"vendor": "google"}]}
    j2 = FineTuneJob.from_body(body)
    s2 = derive_status(j2, Observed(decision=decide_placement(j2.spec, CATALOG, INVENTORY)), T0)
    assert s2.phase == Phase.Pending and "no schedulable node has Google TPU v5e" in s2.message


def test_status_shows_how_many_ranks_trained_and_how():
    j, s1 = placed()
    assert (s1.placement.data_parallel.value, s1.placement.world_size) == ("replicated", 8)
    progress = Progress(state="Running", step=10, total_steps=100, world_size=8, data_parallel="replicated")
    s2 = derive_status(j, Observed(ray_job=ray_job("Running", "RUNNING"), progress=progress), T0 + timedelta(minutes=6), s1)
    wire = s2.to_wire()
    assert wire["progress"]["worldSize"] == 8 and wire["progress"]["dataParallel"] == "replicated"
    assert wire["placement"]["dataParallel"] == "replicated" and wire["placement"]["worldSize"] == 8


@pytest.mark.parametrize("usd,shown", [
    (0, "$0.00"), (0.459, "$0.46"), (0.0042, "$0.0042"), (0.000061, "$0.000061"), (0.05, "$0.050"),
    (1, "$1.00"), (4.6667, "$4.67"), (1234.567, "$1,234.57"),
])
def test_money_never_shows_zero_for_a_positive_cost(usd, shown):
    assert money(usd) == shown


START = "2026-09-01T12:05:00Z"
STARTED = datetime(2026, 9, 1, 12, 5, tzinfo=timezone.utc)
DONE = Progress(state="Succeeded", step=1, total_steps=1, artifact_uri="s3://bank/adapters/fin-v1",
                tokens_trained=64 * 4096, tokens_per_second=9000.0, updated_at=STARTED + timedelta(seconds=59))


def short_job():
    """The bank job cut to one step on 8 H100s: the estimate is mostly the 10 minute startup."""
    body = load_example("finetunejob-qwen-bank.yaml")
    body["metadata"].update(uid="u1", generation=1)
    body["spec"]["training"]["maxSteps"] = 1
    j = FineTuneJob.from_body(body)
    return j, derive_status(j, Observed(decision=decide_placement(j.spec, CATALOG, INVENTORY), attempt=1), T0)


# A 59 s job on 8x H100 ($3.50 per device-hour): 8 x 59 s = 472 device-seconds = $0.46, however
# the operator sees the end. It used to show "$0.00 of ~$4.70": minute-floored, or 0 once the
# RayJob was deleted by its TTL.
@pytest.mark.parametrize("case,rayjob,seen_at", [
    ("progress says done, the RayJob has no endTime yet", ray_job("Running", "RUNNING", start=START), 59),
    ("the RayJob's endTime, seen minutes later", ray_job("Complete", "SUCCEEDED", start=START, endTime="2026-09-01T12:05:59Z"), 400),
])
def test_a_59_second_job_on_8_h100_costs_what_it_ran(case, rayjob, seen_at):
    j, s1 = short_job()
    assert s1.usage.cost == "$0.00 of ~$4.69"
    s2 = derive_status(j, Observed(ray_job=rayjob, progress=DONE), STARTED + timedelta(seconds=seen_at), s1)
    assert s2.phase == Phase.Succeeded
    assert (s2.usage.accelerator_seconds, s2.usage.cost_usd, s2.usage.cost) == (472.0, 0.458889, "$0.46 (est. ~$4.69)")


def test_usage_persists_after_the_rayjob_is_deleted():
    j, s1 = short_job()
    report = Progress(state="Running", updated_at=STARTED + timedelta(seconds=60))
    running = derive_status(j, Observed(ray_job=ray_job("Running", "RUNNING", start=START), progress=report, attempt_pods=BOUND),
                            STARTED + timedelta(minutes=1, seconds=20), s1)
    assert running.usage.attempt_seconds == 60 and running.usage.attempt_start_time == STARTED  # to the last report
    gone = derive_status(j, Observed(ray_job=None, progress=Progress(state="Running")), STARTED + timedelta(minutes=3), running)
    assert gone.usage.accelerator_seconds == 480 and gone.usage.cost == running.usage.cost   # never goes down
    done = derive_status(j, Observed(ray_job=None, progress=DONE.model_copy(update={"updated_at": STARTED + timedelta(seconds=95)})),
                         STARTED + timedelta(minutes=4), gone)
    assert done.phase == Phase.Succeeded and done.usage.accelerator_seconds == 8 * 95   # to the worker's last word
    assert done.usage.cost == "$0.74 (est. ~$4.69)"


def test_the_projection_uses_the_measured_rate():
    """Spent so far + remaining tokens / measured tokens/s x devices x price, billed to the minute."""
    j, s1 = placed()
    tokens_per_step = 64 * 4096
    progress = Progress(state="Running", step=100, total_steps=1000, tokens_trained=100 * tokens_per_step,
                        tokens_per_second=tokens_per_step / 6.0)   # 6 s a step: 900 steps left = 1.5 h
    at = STARTED + timedelta(hours=1, seconds=30)
    s2 = derive_status(j, Observed(ray_job=ray_job("Running", "RUNNING", start=START), progress=progress, attempt_pods=BOUND), at, s1)
    # spent: 8 x 1 h x $3.50 = $28; remaining: 8 x 1.5 h x $3.50 = $42
    assert (s2.usage.cost_usd, s2.usage.projected_cost_usd, s2.usage.cost) == (28.0, 70.0, "$28.00 of ~$70.00")
    assert s2.progress.eta == "1h30m"   # the worker sent no eta_seconds: the same measured rate
    again = derive_status(j, Observed(ray_job=ray_job("Running", "RUNNING", start=START), progress=progress, attempt_pods=BOUND), at + timedelta(seconds=20), s2)
    assert status_patch(s2.to_wire(), again) is None   # no new report, same 10 minutes: nothing to write


def test_billing_starts_when_the_worker_pods_hold_their_devices_and_moves_with_reports():
    """A job waiting for capacity costs nothing although its RayJob has a startTime; once bound, a
    job at rest writes its usage once per 10 minutes; a progress report moves it at once."""
    j, s1 = placed()
    waiting = (pod("head", node="cpu-0"), pod(node=None))
    rj = ray_job("Initializing", start=START)
    s2 = derive_status(j, Observed(ray_job=rj, attempt_pods=waiting), STARTED + timedelta(hours=2), s1)
    assert s2.usage.accelerator_seconds == 0 and s2.usage.attempt_start_time is None
    s3 = derive_status(j, Observed(ray_job=rj, attempt_pods=BOUND), STARTED + timedelta(minutes=9, seconds=59), s2)
    assert s3.usage.attempt_start_time == STARTED and s3.usage.accelerator_seconds == 0
    quiet = [derive_status(j, Observed(ray_job=rj, attempt_pods=BOUND), STARTED + timedelta(minutes=m), s3) for m in (10, 15, 19)]
    assert [q.usage.attempt_seconds for q in quiet] == [600, 600, 600]
    assert status_patch(quiet[0].to_wire(), quiet[2]) is None   # minutes 10 to 19: no write
    report = Progress(state="Running", step=3, total_steps=100, updated_at=STARTED + timedelta(minutes=12, seconds=7))
    moved = derive_status(j, Observed(ray_job=rj, progress=report, attempt_pods=BOUND), STARTED + timedelta(minutes=12, seconds=9), quiet[0])
    assert moved.usage.attempt_seconds == 727 and moved.usage.accelerator_seconds == 8 * 727


@pytest.mark.parametrize("pods, workers, expected", [
    ((), 1, None),                                                                  # no pods yet
    ((pod("head", node="cpu-0"),), 1, None),                                        # the head holds no devices
    ((pod("head", node="cpu-0"), pod(node=None)), 1, None),                         # the worker is pending
    (BOUND, 1, STARTED),
    ((pod(), pod(scheduled_at="2026-09-01T12:07:00Z")), 2, STARTED + timedelta(minutes=2)),   # the last one bound
    ((pod(), pod(node=None)), 2, None),                                              # one of two still pending
    ((pod(),), 2, None),                                                             # the second not created yet
    (({"metadata": {"labels": {"ray.io/node-type": "worker"}}, "spec": {"nodeName": "n"}, "status": {}},), 1, T0),
])
def test_devices_held_since(pods, workers, expected):
    assert devices_held_since(pods, workers, T0) == expected
