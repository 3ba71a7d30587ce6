"""Adapter resolution, replica reports, and derive_modelserve_status."""
from __future__ import annotations

import copy
from datetime import datetime, timedelta, timezone

from helpers import merge_patch
from test_modelserve_builders import CATALOG, INVENTORY, SUCCEEDED_FIN_V1, bank_serve
from tuneserve.modelserve.adapters import adapter_states, read_replica_reports, resolve_adapters
from tuneserve.api.modelserve_status import AdapterState, ServeConditionReason, ServeConditionType, ServePhase
from tuneserve.modelserve.placement import decide_serve_placement
from tuneserve.core.status import status_patch
import pytest

from tuneserve.modelserve.status import ServeObserved, derive_modelserve_status, service_endpoints
from tuneserve_workers.contract import ReplicaAdapterReport, ServeReplicaReport, replica_report_key

T0 = datetime(2026, 9, 1, 12, 0, tzinfo=timezone.utc)
R = ServeConditionReason


def job(**patch):
    return merge_patch(copy.deepcopy(SUCCEEDED_FIN_V1), patch)


def verdicts(serve, jobs):
    return {v.name: v for v in resolve_adapters(serve.spec, jobs).verdicts}


def test_succeeded_job_on_same_base_is_desired():
    res = resolve_adapters(bank_serve().spec, {"fin-v1": job()})
    assert [a.name for a in res.desired] == ["fin-v1", "support-v3"]


def test_running_job_is_pending_and_the_rest_keep_serving():
    res = resolve_adapters(bank_serve().spec, {"fin-v1": job(status={"phase": "Running", "progress": {"summary": "45% (450/1000)"}, "artifact": None})})
    v = {x.name: x for x in res.verdicts}
    assert v["fin-v1"].state == AdapterState.Pending and "phase Running, 45% (450/1000)" in v["fin-v1"].message
    assert [a.name for a in res.desired] == ["support-v3"]


def test_missing_failed_and_mismatched_jobs():
    serve = bank_serve()
    assert verdicts(serve, {})["fin-v1"].state == AdapterState.Pending
    failed = verdicts(serve, {"fin-v1": job(status={"phase": "Failed", "message": "OOM", "artifact": None})})["fin-v1"]
    assert failed.state == AdapterState.Failed and "OOM" in failed.message
    other = verdicts(bank_serve(baseModel={"uri": "hf://Qwen/Qwen2.5-14B-Instruct"}), {"fin-v1": job()})["fin-v1"]
    assert other.state == AdapterState.Failed and other.uri is None
    assert other.message == "adapter fin-v1 was trained on hf://Qwen/Qwen2.5-7B-Instruct but this ModelServe serves hf://Qwen/Qwen2.5-14B-Instruct"


def test_rank_above_max_lora_rank_fails():
    v = verdicts(bank_serve(), {"fin-v1": job(status={"artifact": {"rank": 64}})})["fin-v1"]
    assert v.state == AdapterState.Failed and "rank 64 but engine.maxLoraRank is 16" in v.message


def test_revision_only_matters_when_both_name_one():
    assert verdicts(bank_serve(baseModel={"uri": "hf://Qwen/Qwen2.5-7B-Instruct@main"}), {"fin-v1": job()})["fin-v1"].uri
    pinned = job(status={"artifact": {"baseModel": "hf://Qwen/Qwen2.5-7B-Instruct@v1"}})
    assert verdicts(bank_serve(baseModel={"uri": "hf://Qwen/Qwen2.5-7B-Instruct@v2"}), {"fin-v1": pinned})["fin-v1"].state == AdapterState.Failed


def report(rid, state="Ready", at=T0, message=None, **adapters):
    return ServeReplicaReport(replica_id=rid, state=state, updated_at=at, message=message,
                              adapters={k: ReplicaAdapterReport(**v) for k, v in adapters.items()}).model_dump_json()


LOADED_FIN = {"state": "Loaded", "uri": "s3://bank/adapters/fin-v1"}
LOADED_SUP = {"state": "Loaded", "uri": "s3://bank/adapters/support-v3"}


def test_reports_fold_into_adapter_states_and_stale_ones_are_pruned():
    data = {
        replica_report_key("r1"): report("r1", **{"fin-v1": LOADED_FIN, "support-v3": LOADED_SUP}),
        replica_report_key("r2"): report("r2", **{"fin-v1": LOADED_FIN, "support-v3": {"state": "Loading"}}),
        replica_report_key("old"): report("old", at=T0 - timedelta(minutes=5)),
        "replica.bad.json": "{not json",
    }
    reports = read_replica_reports(data, T0 + timedelta(seconds=5))
    assert len(reports.ready) == 2 and reports.stale_keys == ("replica.old.json",) and reports.unreadable_keys == ("replica.bad.json",)
    states = {v.name: v for v in adapter_states(resolve_adapters(bank_serve().spec, {"fin-v1": job()}), reports)}
    assert states["fin-v1"].state == AdapterState.Loaded and states["support-v3"].state == AdapterState.Loading
    failed = read_replica_reports({"replica.r1.json": report("r1", **{"support-v3": {"state": "Failed", "message": "no adapter_config.json"}})}, T0)
    states = {v.name: v for v in adapter_states(resolve_adapters(bank_serve().spec, {"fin-v1": job()}), failed)}
    assert states["support-v3"].state == AdapterState.Failed and "no adapter_config.json" in states["support-v3"].message


def ready_ray_service():
    return {"status": {"conditions": [{"type": "Ready", "status": "True"}],
                       "activeServiceStatus": {"applicationStatuses": {"tuneserve": {"status": "RUNNING"}}}}}


def observe(serve, jobs, data, ray_service, now, decision=None, endpoints=1):
    return ServeObserved(decision=decision, resolution=resolve_adapters(serve.spec, jobs),
                         reports=read_replica_reports(data, now), ray_service=ray_service, endpoints=endpoints)


def test_lifecycle_pending_deploying_ready_degraded():
    serve = bank_serve()
    decision = decide_serve_placement(serve.spec, CATALOG, INVENTORY)
    s1 = derive_modelserve_status(serve, observe(serve, {}, {}, None, T0, decision), T0)
    assert s1.phase == ServePhase.Deploying and s1.endpoint == "http://bank-llm-openai.bank.svc.cluster.local:8000/v1"
    assert s1.placement.accelerator == "NVIDIA H100 80GB x1 per replica" and s1.placement.tensor_parallel_size == 1
    assert s1.replicas.summary == "0/1" and s1.adapter_summary == "0/2" and s1.cost == "$0.00/h"
    assert s1.condition(ServeConditionType.Placed).reason == R.FitsNow

    t1 = T0 + timedelta(minutes=5)
    data = {"replica.r1.json": report("r1", at=t1, **{"fin-v1": LOADED_FIN, "support-v3": LOADED_SUP}),
            "replica.r2.json": report("r2", at=t1, **{"fin-v1": LOADED_FIN, "support-v3": LOADED_SUP})}
    s2 = derive_modelserve_status(serve, observe(serve, {"fin-v1": job()}, data, ready_ray_service(), t1), t1, s1)
    assert s2.phase == ServePhase.Ready and s2.replicas.summary == "2/2" and s2.adapter_summary == "2/2"
    assert s2.condition(ServeConditionType.AdaptersReady).reason == R.AllAdaptersLoaded
    assert s2.cost_per_hour_usd == 7.0 and s2.cost == "$7.00/h"
    assert s2.placement.since == s1.placement.since

    # fin-v1's job now fails the base-model check: it is Failed, the rest keep serving, Degraded.
    t2 = t1 + timedelta(seconds=10)
    other = job(status={"artifact": {"baseModel": "hf://Qwen/Qwen2.5-14B-Instruct"}})
    s3 = derive_modelserve_status(serve, observe(serve, {"fin-v1": other}, data, ready_ray_service(), t2), t2, s2)
    assert s3.phase == ServePhase.Degraded and s3.adapter("fin-v1").state == AdapterState.Failed
    assert s3.adapter("support-v3").state == AdapterState.Loaded and s3.adapter("support-v3").since == s2.adapter("support-v3").since
    assert s3.condition(ServeConditionType.Degraded).reason == R.AdaptersUnavailable
    assert s3.condition(ServeConditionType.Ready).last_transition_time == s2.condition(ServeConditionType.Ready).last_transition_time


def test_ready_waits_for_a_ready_pod_behind_the_service():
    """Replicas report ready before kubelet's readiness probe passes: until a pod backs the Service,
    connections to it are refused, so the ModelServe is not Ready yet."""
    serve = bank_serve()
    decision = decide_serve_placement(serve.spec, CATALOG, INVENTORY)
    data = {"replica.r1.json": report("r1", **{"fin-v1": LOADED_FIN, "support-v3": LOADED_SUP})}
    s1 = derive_modelserve_status(serve, observe(serve, {"fin-v1": job()}, data, ready_ray_service(), T0, decision, endpoints=0), T0)
    assert s1.phase == ServePhase.Deploying
    ready = s1.condition(ServeConditionType.Ready)
    assert ready.status == "False" and ready.reason == R.NotInService and "bank-llm-openai" in ready.message
    t1 = T0 + timedelta(seconds=5)
    s2 = derive_modelserve_status(serve, observe(serve, {"fin-v1": job()}, data, ready_ray_service(), t1), t1, s1)
    assert s2.phase == ServePhase.Ready and s2.condition(ServeConditionType.Ready).reason == R.Serving


def serve_pod(cluster="bank-llm-raycluster-a", serve="true", ready="True", node_type="worker"):
    return {"metadata": {"labels": {"ray.io/cluster": cluster, "ray.io/serve": serve, "ray.io/node-type": node_type}},
            "status": {"conditions": [{"type": "Ready", "status": ready}]}}


ACTIVE_A = {"status": {"activeServiceStatus": {"rayClusterName": "bank-llm-raycluster-a"}}}


@pytest.mark.parametrize("pods, ray_service, expected", [
    ([], ACTIVE_A, 0),
    ([serve_pod()], ACTIVE_A, 1),
    ([serve_pod(ready="False")], ACTIVE_A, 0),                           # readiness probe not passed yet
    ([serve_pod(serve="false", node_type="head")], ACTIVE_A, 0),        # head kept out (Direct ingress)
    ([serve_pod(cluster="bank-llm-raycluster-b")], ACTIVE_A, 0),        # the upgrade's new cluster: not switched yet
    ([serve_pod(), serve_pod(), serve_pod(ready="False")], ACTIVE_A, 2),
    ([serve_pod(cluster="any")], None, 1),                              # no active cluster named yet
    ([{"metadata": {"labels": {"ray.io/serve": "true"}}, "status": {}}], None, 0),
])
def test_service_endpoints(pods, ray_service, expected):
    assert service_endpoints(pods, ray_service) == expected


def test_unsupported_everywhere_fails():
    serve = bank_serve(engine={"quantization": "gptq"}, accelerators={"choices": [{"product": "Ascend910B"}, {"product": "Gaudi2"}]})
    decision = decide_serve_placement(serve.spec, CATALOG, INVENTORY)
    s = derive_modelserve_status(serve, ServeObserved(decision=decision), T0)
    assert s.phase == ServePhase.Failed and s.condition(ServeConditionType.Placed).reason == R.NoAcceptableChoice
    assert "does not support gptq" in s.message and s.endpoint is None


def test_upgrading_and_write_suppression():
    serve = bank_serve()
    decision = decide_serve_placement(serve.spec, CATALOG, INVENTORY)
    rs = ready_ray_service()
    rs["status"]["conditions"].append({"type": "UpgradeInProgress", "status": "True"})
    data = {"replica.r1.json": report("r1", **{"support-v3": LOADED_SUP})}
    s1 = derive_modelserve_status(serve, observe(serve, {}, data, rs, T0, decision), T0)
    assert s1.condition(ServeConditionType.Upgrading).status.value == "True"
    assert s1.adapter("fin-v1").state == AdapterState.Pending
    wire = s1.to_wire()
    again = derive_modelserve_status(serve, observe(serve, {}, data, rs, T0 + timedelta(seconds=30)), T0 + timedelta(seconds=30), s1)
    assert status_patch(wire, again) is None
    assert status_patch(None, again) == again.to_wire()


SIGILL = ("engine failed to start: VllmWorker-0 died: Fatal Python error: Illegal instruction (SIGILL) "
          "at vllm/v1/attention/backends/cpu_attn.py:411 in forward")


def deploying_ray_service(status="DEPLOYING", message=""):
    return {"status": {"conditions": [{"type": "Ready", "status": "False"}],
                       "activeServiceStatus": {"applicationStatuses": {"tuneserve": {"status": status, "message": message}}}}}


def test_failed_reports_outlive_the_heartbeat_window_then_age_out():
    data = {"replica.a.json": report("a", "Failed", T0, SIGILL), "replica.b.json": report("b", "Failed", T0 - timedelta(minutes=3), SIGILL),
            "replica.c.json": report("c", "Failed", T0 - timedelta(minutes=20), SIGILL)}
    reports = read_replica_reports(data, T0 + timedelta(minutes=2))      # a and b: older than 60 s, still counted
    assert [r.replica_id for r in reports.failed] == ["a", "b"] and reports.stale_keys == ("replica.c.json",)
    assert reports.fresh == () and reports.ready == ()


def test_engine_failure_is_the_ready_reason_with_its_cause():
    serve = bank_serve()
    decision = decide_serve_placement(serve.spec, CATALOG, INVENTORY)
    s0 = derive_modelserve_status(serve, observe(serve, {}, {}, deploying_ray_service(), T0, decision), T0)
    assert s0.phase == ServePhase.Deploying and s0.condition(ServeConditionType.Ready).reason == R.ApplicationDeploying

    # the first replica's engine died at start-up; Ray Serve starts another, which reports Starting
    t1 = T0 + timedelta(minutes=1)
    data = {"replica.a.json": report("a", "Failed", t1, SIGILL)}
    s1 = derive_modelserve_status(serve, observe(serve, {}, data, deploying_ray_service(), t1), t1, s0)
    ready = s1.condition(ServeConditionType.Ready)
    assert s1.phase == ServePhase.Failed and ready.reason == R.ReplicaFailed
    assert ready.message == f"replica a failed: {SIGILL}" and s1.message == ready.message

    t2 = t1 + timedelta(minutes=2)
    data["replica.b.json"] = report("b", "Starting", t2)
    s2 = derive_modelserve_status(serve, observe(serve, {}, data, deploying_ray_service(), t2), t2, s1)
    assert s2.condition(ServeConditionType.Ready).message == f"replica a failed: {SIGILL}; Ray Serve is starting another"
    assert s2.condition(ServeConditionType.Ready).last_transition_time == ready.last_transition_time

    # b fails too; then Ray Serve gives up: DEPLOY_FAILED says why, not just Ray's message
    t3 = t2 + timedelta(minutes=1)
    data["replica.b.json"] = report("b", "Failed", t3, SIGILL)
    s3 = derive_modelserve_status(serve, observe(serve, {}, data, deploying_ray_service(), t3), t3, s2)
    assert s3.condition(ServeConditionType.Ready).message == f"replica b failed (2 replicas in the last 15m): {SIGILL}"
    rs = deploying_ray_service("DEPLOY_FAILED", "Failed to update the deployments ['tuneserve'].")
    s4 = derive_modelserve_status(serve, observe(serve, {}, data, rs, t3), t3, s3)
    assert s4.phase == ServePhase.Failed and s4.condition(ServeConditionType.Ready).reason == R.ApplicationFailed
    assert s4.message == f"the serve application failed to deploy: replica b failed (2 replicas in the last 15m): {SIGILL}"

    # a replica that serves ends it: Ready, whatever failed before
    t4 = t3 + timedelta(minutes=1)
    data["replica.c.json"] = report("c", "Ready", t4, **{"support-v3": LOADED_SUP})
    s5 = derive_modelserve_status(serve, observe(serve, {}, data, ready_ray_service(), t4), t4, s4)
    assert s5.condition(ServeConditionType.Ready).reason == R.Serving and s5.phase in (ServePhase.Ready, ServePhase.Degraded)


@pytest.mark.parametrize("ready_reason, phase", [
    ("Initializing", ServePhase.Waiting),             # never served: still waiting for the busy pool
    (None, ServePhase.Waiting),                       # KubeRay has not written the condition yet
    ("ZeroServeEndpoints", ServePhase.Deploying),     # served once, its replica died: a restart
])
def test_a_placement_made_while_busy_says_waiting_only_until_it_first_served(ready_reason, phase):
    serve = bank_serve()
    placed = derive_modelserve_status(serve, observe(serve, {}, {}, None, T0, decide_serve_placement(serve.spec, CATALOG, INVENTORY)), T0)
    waiting = placed.model_copy(update={"placement": placed.placement.model_copy(update={"waiting": True})})
    cond = {"type": "Ready", "status": "False", "message": "Number of serve endpoints dropped to 0"}
    ray_service = {"status": {"conditions": [{**cond, "reason": ready_reason}] if ready_reason else []}}
    t1 = T0 + timedelta(minutes=30)
    status = derive_modelserve_status(serve, observe(serve, {}, {}, ray_service, t1, endpoints=0), t1, waiting)
    assert status.phase == phase and status.condition(ServeConditionType.Ready).status == "False"
