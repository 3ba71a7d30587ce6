"""Placement over the local test fleet (hack/fleet.yaml) and hand-made snapshots."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from helpers import llama_spec, load_example, merge_patch, node, pod_on
from localcluster import HACK, build_fleet_nodes, load_fleet
from tuneserve.api.finetunejob import FineTuneJob
from tuneserve.api.conditions import RejectionCode
from tuneserve.core.catalog import default_catalog_document, load_catalog
from tuneserve.core.scheduling.inventory import build_inventory, parse_quantity, pod_requests
from tuneserve.finetunejob.status import placement_status
from tuneserve.core.scheduling.fallback import fallback_verdict, unschedulable_since
from tuneserve.core.scheduling.fit import Outcome
from tuneserve.finetunejob.placement import candidate_from_status, decide_placement
from tuneserve.core.sizing.model import ModelSizeUnknown
from tuneserve_workers.contract import DataParallel

CATALOG = load_catalog()
FLEET = build_fleet_nodes(load_fleet(HACK / "fleet.yaml"))
NOW = datetime(2026, 9, 1, 12, 0, tzinfo=timezone.utc)


def bank_spec(**patch):
    return FineTuneJob.from_body(merge_patch(load_example("finetunejob-qwen-bank.yaml"), {"spec": patch} if patch else {})).spec


def busy(prefix: str, resource: str, per_node: int = 8):
    return [pod_on(n["metadata"]["name"], resource, per_node) for n in FLEET if n["metadata"]["name"].startswith(prefix)]


def test_quantities():
    assert parse_quantity("500m") == parse_quantity("0.5")
    assert parse_quantity("16Gi") == 16 * 2 ** 30 and parse_quantity("1e3") == 1000
    pod = {"spec": {"containers": [{"resources": {"requests": {"cpu": "1"}}}, {"resources": {"requests": {"cpu": "500m"}}}],
                    "initContainers": [{"resources": {"requests": {"cpu": "2"}}}], "overhead": {"cpu": "100m"}}}
    assert pod_requests(pod)["cpu"] == parse_quantity("2.1")


def test_inventory_subtracts_running_pods_only():
    inv = build_inventory(FLEET, [pod_on("h100-0", "nvidia.com/gpu", 4), pod_on("h100-1", "nvidia.com/gpu", 8, phase="Succeeded")])
    free = {n.name: n.free.get("nvidia.com/gpu") for n in inv.nodes if n.pool == "h100"}
    assert free == {"h100-0": 4, "h100-1": 8}


def test_h100_fits_now():
    decision = decide_placement(bank_spec(), CATALOG, build_inventory(FLEET, []))
    assert decision.outcome == Outcome.Placed
    assert decision.candidate.key == "nvidia/h100-80gb 1x8" and decision.pool == "h100"
    assert decision.rejections == ()
    assert decision.reason.startswith("choice 1: NVIDIA H100 80GB x8 fits now in pool h100")


def test_busy_h100_falls_to_mi300x_with_reason():
    inv = build_inventory(FLEET, busy("h100", "nvidia.com/gpu", 4))
    decision = decide_placement(bank_spec(), CATALOG, inv)
    assert decision.candidate.profile.key == "amd/mi300x" and decision.pool == "mi300x"
    (rej,) = decision.rejections
    assert rej.code == RejectionCode.Busy
    assert "needs 1 worker x 8 nvidia.com/gpu, free per node: [4, 4]" in rej.message


def test_everything_busy_waits_on_first_that_could():
    pods = busy("h100", "nvidia.com/gpu") + busy("mi300x", "amd.com/gpu") + busy("ascend", "huawei.com/Ascend910")
    decision = decide_placement(bank_spec(), CATALOG, build_inventory(FLEET, pods))
    assert decision.outcome == Outcome.Waiting and decision.candidate.profile.key == "nvidia/h100-80gb"
    assert "waiting for capacity in pool h100" in decision.reason
    assert [r.choice for r in decision.rejections] == ["amd/mi300x 1x8", "huawei/ascend910b 1x8"]


def test_multi_worker_needs_two_nodes():
    spec = bank_spec(accelerators={"choices": [{"vendor": "nvidia", "product": "H100", "devicesPerWorker": 8, "workers": 2}]})
    inv = build_inventory(FLEET, [pod_on("h100-1", "nvidia.com/gpu", 4)])
    decision = decide_placement(spec, CATALOG, inv)
    assert decision.outcome == Outcome.Waiting
    assert "needs 2 workers x 8 nvidia.com/gpu, free per node: [8, 4]" in decision.reason
    spec3 = bank_spec(accelerators={"choices": [{"vendor": "nvidia", "product": "H100", "devicesPerWorker": 8, "workers": 3}]})
    d3 = decide_placement(spec3, CATALOG, build_inventory(FLEET, []))
    assert d3.outcome == Outcome.Unplaceable and d3.rejections[0].code == RejectionCode.InsufficientCapacity


def test_72b_rejections_carry_the_arithmetic():
    spec = bank_spec(baseModel={"uri": "hf://Qwen/Qwen2.5-72B-Instruct"},
                     accelerators={"choices": [{"product": "L4"}, {"vendor": "nvidia", "product": "H100", "devicesPerWorker": 8},
                                               {"vendor": "amd", "devicesPerWorker": 8}]})
    decision = decide_placement(spec, CATALOG, build_inventory(FLEET, []))
    # 8 H100s hold it sharded (a copy needs more than 80 GiB); the L4 (one device) cannot.
    assert decision.candidate.profile.key == "nvidia/h100-80gb" and decision.candidate.data_parallel == DataParallel.sharded
    (l4,) = decision.rejections
    assert l4.code == RejectionCode.InsufficientMemory
    assert "choice 1: Qwen2.5-72B-Instruct needs" in l4.message and "(weights 134.1 + LoRA states" in l4.message


NV = {"nvidia.com/gpu.present": "true"}
H100_NODE = node("h100-a", "h100", "p5.48xlarge", {**NV, "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}, "nvidia.com/gpu", 8)
L4_NODE = node("l4-a", "l4", "g6.48xlarge", {**NV, "nvidia.com/gpu.product": "NVIDIA-L4"}, "nvidia.com/gpu", 8)


@pytest.mark.parametrize("size,product,devices,outcome,mode,reason", [
    ("70B", "H100", 8, Outcome.Placed, DataParallel.sharded,
     "choice 1: NVIDIA H100 80GB x8 fits now in pool h100, sharded over 8 devices (FSDP2): needs 31.5 of 80 GiB per device "
     "(decoder weights 126.1 / 8 = 15.8 + embedding and head 4.3 + all-gather of 2 layers 3.6 + LoRA states 0.4 + "
     "activations 5.0 + overhead 2.5); replicated would need 146.7 GiB per device; gradient checkpointing on (automatic): "
     "without it 72.3 GiB > 72.0 GiB (80 GiB less the 10% margin); est. 18m, $8.53"),
    ("70B", "L4", 8, Outcome.Unplaceable, None,
     "no accelerator choice can run this job: choice 1: Llama-3.1-70B needs 146.7 GiB per device replicated "
     "(weights 130.4 + LoRA states 3.3 + activations 5.0 + overhead 7.9) or 31.5 GiB per device sharded over 8 devices "
     "(decoder weights 126.1 / 8 = 15.8 + embedding and head 4.3 + all-gather of 2 layers 3.6 + LoRA states 0.4 + "
     "activations 5.0 + overhead 2.5) but NVIDIA L4 24GB has 24 GiB"),
    ("8B", "H100", 1, Outcome.Placed, DataParallel.replicated,
     "choice 1: NVIDIA H100 80GB x1 fits now in pool h100, replicated (one rank): needs 29.9 of 80 GiB per device; "
     "gradient checkpointing off (automatic): 29.9 GiB fits 72.0 GiB (80 GiB less the 10% margin); est. 15m, $0.88"),
])
def test_the_placement_message_says_which_mode_and_why(size, product, devices, outcome, mode, reason):
    decision = decide_placement(llama_spec(size, {"vendor": "nvidia", "product": product, "devicesPerWorker": devices}), CATALOG, build_inventory([H100_NODE, L4_NODE], []))
    assert decision.outcome == outcome and decision.reason == reason
    if mode is not None:
        assert decision.candidate.data_parallel == mode
    else:
        assert decision.rejections[0].code == RejectionCode.InsufficientMemory


def test_the_mode_survives_an_operator_restart():
    """The decision is recorded in status.placement and the candidate rebuilt from it carries it."""
    decision = decide_placement(llama_spec("70B", {"vendor": "nvidia", "product": "H100", "devicesPerWorker": 8}), CATALOG, build_inventory([H100_NODE], []))
    recorded = placement_status(decision, 1, "llama", NOW)
    assert (recorded.data_parallel, recorded.world_size, recorded.gradient_checkpointing) == (DataParallel.sharded, 8, True)
    wire = type(recorded).model_validate(recorded.to_wire())
    assert wire.to_wire()["dataParallel"] == "sharded" and wire.to_wire()["worldSize"] == 8
    assert wire.to_wire()["gradientCheckpointing"] is True
    assert candidate_from_status(wire, CATALOG) == decision.candidate.__class__(
        decision.candidate.profile, 8, 1, "recorded placement", DataParallel.sharded, True)
    # The 8B fits one H100 without recompute: recorded off, rebuilt off.
    fast = decide_placement(llama_spec("8B", {"vendor": "nvidia", "product": "H100"}), CATALOG, build_inventory([H100_NODE], []))
    fast_wire = type(recorded).model_validate(placement_status(fast, 1, "llama", NOW).to_wire())
    assert fast_wire.gradient_checkpointing is False and candidate_from_status(fast_wire, CATALOG).gradient_checkpointing is False
    # A placement recorded before the field existed was sized and rendered with recompute on.
    old = {k: v for k, v in fast_wire.to_wire().items() if k != "gradientCheckpointing"}
    assert type(recorded).model_validate(old).gradient_checkpointing is True


def test_unknown_product_and_missing_nodes():
    """Admission knows the packaged catalog's products; a catalog override that drops one (here
    the A10G) leaves placement to refuse it by name."""
    document = default_catalog_document()
    del document["vendors"]["nvidia"]["products"]["a10g"]
    spec = bank_spec(baseModel={"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct"},
                     accelerators={"choices": [{"vendor": "nvidia", "product": "A10G"}, {"vendor": "google"}, {"product": "L4"}]})
    decision = decide_placement(spec, load_catalog(base=document), build_inventory(FLEET, []))
    codes = [(r.choice, r.code) for r in decision.rejections]
    assert codes == [("nvidia/A10G", RejectionCode.UnknownAccelerator), ("google/tpu-v5e 1x1", RejectionCode.NoMatchingNodes)]
    assert decision.candidate.profile.key == "nvidia/l4" and decision.pool == "l4"


def test_qlora_skips_accelerators_without_4bit():
    spec = bank_spec(method="qlora", accelerators={"choices": [{"vendor": "intel", "devicesPerWorker": 8}, {"vendor": "amd", "devicesPerWorker": 8}]})
    decision = decide_placement(spec, CATALOG, build_inventory(FLEET, []))
    assert decision.rejections[0].code == RejectionCode.Unsupported and decision.candidate.profile.key == "amd/mi300x"


A100_NODE = node("a100-a", "a100", "p4de.24xlarge", {**NV, "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}, "nvidia.com/gpu", 8)
FP8 = {"maxSteps": 100, "basePrecision": "fp8"}


def test_fp8_base_is_refused_where_the_catalog_has_no_fp8():
    """An A100 choice is refused naming the field and the product; the H100 after it is taken."""
    spec = llama_spec("8B", training=FP8, accelerators={"choices": [{"vendor": "nvidia", "product": "A100"},
                                                                   {"vendor": "nvidia", "product": "H100"}]})
    decision = decide_placement(spec, CATALOG, build_inventory([A100_NODE, H100_NODE], []))
    assert decision.outcome == Outcome.Placed and decision.candidate.profile.key == "nvidia/h100-80gb"
    (a100,) = decision.rejections
    assert a100.code == RejectionCode.Unsupported and a100.choice == "nvidia/a100-80gb 1x1"
    assert a100.message == ("choice 1: NVIDIA A100 80GB has no FP8 matmuls (catalog fp8: false), which training.basePrecision "
                            "fp8 needs; unset training.basePrecision or choose an accelerator with fp8")
    alone = decide_placement(llama_spec("8B", {"vendor": "nvidia", "product": "A100"}, training=FP8), CATALOG,
                             build_inventory([A100_NODE], []))
    assert alone.outcome == Outcome.Unplaceable and "training.basePrecision fp8" in alone.reason


def test_auto_skips_accelerators_without_fp8_and_says_so_when_none_remain():
    auto = {"auto": {"devices": 8}}
    spec = llama_spec("8B", training=FP8, accelerators=auto)
    decision = decide_placement(spec, CATALOG, build_inventory(FLEET, []))
    assert decision.outcome == Outcome.Placed and decision.candidate.profile.fp8
    skipped = {r.choice for r in decision.rejections if r.code == RejectionCode.Excluded}
    assert {"nvidia/a100-80gb", "nvidia/a10g", "huawei/ascend910b", "intel/gaudi2", "aws/trn1"} <= skipped
    none_left = decide_placement(llama_spec("8B", training=FP8, accelerators={"auto": {"devices": 8, "vendors": ["intel", "huawei"]}}),
                                 CATALOG, build_inventory(FLEET, []))
    assert none_left.outcome == Outcome.Unplaceable
    assert "auto: skipped, Intel Gaudi2 96GB has no FP8 matmuls (catalog fp8: false), which training.basePrecision fp8 needs" in none_left.reason


def test_timed_out_choice_is_skipped_with_recorded_reason():
    decision = decide_placement(bank_spec(), CATALOG, build_inventory(FLEET, []),
                                timed_out={"nvidia/h100-80gb 1x8": "pods unschedulable for 16m"})
    assert decision.candidate.profile.key == "amd/mi300x"
    assert decision.rejections[0].code == RejectionCode.TimedOut


def test_user_node_selector_and_tolerations_apply():
    spec = bank_spec(nodeSelector={"topology.kubernetes.io/zone": "zone-c"})
    decision = decide_placement(spec, CATALOG, build_inventory(FLEET, []))
    assert decision.candidate.profile.key == "huawei/ascend910b"
    cpu_only = bank_spec(baseModel={"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct"}, accelerators={"choices": [{"vendor": "cpu", "devicesPerWorker": 8}]},
                         training={"maxSeqLength": 512, "microBatchSize": 1, "globalBatchSize": 8})
    inv = build_inventory([node("tainted", "p", "m7i", taint="dedicated", cpu="64", memory="256Gi")], [])
    assert decide_placement(cpu_only, CATALOG, inv).rejections[0].code == RejectionCode.NoMatchingNodes


def test_cpu_choice_lands_on_cpu_pool():
    spec = bank_spec(baseModel={"uri": "hf://Qwen/Qwen2.5-0.5B-Instruct"}, accelerators={"choices": [{"vendor": "cpu", "devicesPerWorker": 4}]},
                     training={"maxSeqLength": 512, "microBatchSize": 1, "globalBatchSize": 8})
    decision = decide_placement(spec, CATALOG, build_inventory(FLEET, []))
    assert decision.outcome == Outcome.Placed and decision.pool == "cpu"


def test_auto_orders_by_cost_per_token_and_filters_memory():
    spec = FineTuneJob.from_body(load_example("finetunejob-auto.yaml")).spec
    decision = decide_placement(spec, CATALOG, build_inventory(FLEET, []))
    assert decision.outcome == Outcome.Placed
    assert decision.candidate.devices == 8 and decision.candidate.label == "auto"
    excluded = {r.choice for r in decision.rejections if r.code == RejectionCode.Excluded}
    assert {"nvidia/l4", "nvidia/a10g", "aws/trn1", "google/tpu-v5e"} <= excluded
    # QLoRA: only 4-bit capable accelerators remain; the cheapest per token among them wins.
    assert decision.candidate.profile.supports_4bit


def test_unknown_model_size_raises():
    with pytest.raises(ModelSizeUnknown):
        decide_placement(bank_spec(baseModel={"uri": "hf://microsoft/phi-4"}), CATALOG, build_inventory(FLEET, []))


def test_fallback_verdict():
    since = NOW - timedelta(minutes=16)
    assert fallback_verdict("k", None, timedelta(minutes=15), NOW).move_on is False
    wait = fallback_verdict("k", NOW - timedelta(minutes=5), timedelta(minutes=15), NOW)
    assert not wait.move_on and wait.deadline == NOW + timedelta(minutes=10)
    verdict = fallback_verdict("nvidia/h100-80gb 1x8", since, timedelta(minutes=15), NOW)
    assert verdict.move_on and "pods unschedulable for 16m" in verdict.reason and "timeout 15m" in verdict.reason


def test_unschedulable_since_reads_pod_conditions():
    pending = {"status": {"phase": "Pending", "conditions": [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "lastTransitionTime": "2026-09-01T11:40:00Z"}]}}
    running = {"status": {"phase": "Running", "conditions": [{"type": "PodScheduled", "status": "True"}]}}
    assert unschedulable_since([running, pending]) == datetime(2026, 9, 1, 11, 40, tzinfo=timezone.utc)
    assert unschedulable_since([running]) is None


H100_POOL = "choice 1: NVIDIA H100 80GB: spec.nodeSelector tuneserve.dev/pool=mi300x matches no node that has NVIDIA H100 80GB (pool h100 has tuneserve.dev/pool=h100)"
A100_LABEL = ("choice 1: NVIDIA H100 80GB: spec.nodeSelector nvidia.com/gpu.product=NVIDIA-A100-SXM4-80GB contradicts the "
              "catalog's node label nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3")


@pytest.mark.parametrize("selector, chosen, rejected", [
    # spec.nodeSelector, the choice placed (None: none fits), the rejections in order (code, message)
    ({"tuneserve.dev/pool": "h100"}, "nvidia/h100-80gb 1x8", []),
    ({"tuneserve.dev/pool": "mi300x"}, "amd/mi300x 1x8", [("NoMatchingNodes", H100_POOL)]),
    ({"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}, None, [
        ("Unsupported", A100_LABEL),
        ("NoMatchingNodes", "choice 2: AMD Instinct MI300X 192GB: spec.nodeSelector nvidia.com/gpu.product=NVIDIA-A100-SXM4-80GB "
                            "matches no node that has AMD Instinct MI300X 192GB (pool mi300x has nvidia.com/gpu.product=unset)"),
        ("NoMatchingNodes", "choice 3: Huawei Ascend 910B 64GB: spec.nodeSelector nvidia.com/gpu.product=NVIDIA-A100-SXM4-80GB "
                            "matches no node that has Huawei Ascend 910B 64GB (pool ascend910b has nvidia.com/gpu.product=unset)"),
    ]),
], ids=["selector-agrees", "pool-contradicted", "catalog-label-contradicted"])
def test_a_node_selector_contradicting_a_choice_rejects_it_naming_the_label(selector, chosen, rejected):
    decision = decide_placement(bank_spec(nodeSelector=selector), CATALOG, build_inventory(FLEET, []))
    assert (decision.candidate.key if decision.candidate else None) == chosen
    assert [(r.code.value, r.message) for r in decision.rejections] == rejected
    if chosen is None:
        assert decision.outcome == Outcome.Unplaceable
        assert decision.reason == "no accelerator choice can run this job: " + "; ".join(m for _, m in rejected)


def test_a_serve_node_selector_contradicting_its_first_choice_takes_the_next():
    from tuneserve.api.modelserve import ModelServe
    from tuneserve.modelserve.placement import decide_serve_placement
    body = merge_patch(load_example("modelserve-qwen-bank.yaml"), {"spec": {"nodeSelector": {"tuneserve.dev/pool": "mi300x"}}})
    decision = decide_serve_placement(ModelServe.from_body(body).spec, CATALOG, build_inventory(FLEET, []))
    assert (decision.candidate.key, decision.pool) == ("amd/mi300x 1x1", "mi300x")
    assert [(r.code.value, r.message) for r in decision.rejections] == [("NoMatchingNodes", H100_POOL)]
