"""One training process per device: the Ray resources of each, and how a global batch is split."""
from __future__ import annotations

import pytest

from tuneserve_workers.contract import AcceleratorRuntime
from tuneserve_workers.train.data import rank_positions, step_layout
from tuneserve_workers.train.main import rank_resources


@pytest.mark.parametrize("runtime,world,resources", [
    # 8 H100s per pod, 2 pods: 16 processes of one GPU each.
    (AcceleratorRuntime(workers=2, devices_per_worker=8, torch_device="cuda", ray_resource="GPU",
                        ray_resources_per_worker=8), 16, {"CPU": 1, "GPU": 1}),
    # Trainium: 2 neuron cores per device, so a process holds 2 of the pod's 32.
    (AcceleratorRuntime(workers=1, devices_per_worker=16, torch_device="xla", ray_resource="neuron_cores",
                        ray_resources_per_worker=32), 16, {"CPU": 1, "neuron_cores": 2}),
    (AcceleratorRuntime(workers=1, devices_per_worker=8, torch_device="npu", ray_resource="NPU",
                        ray_resources_per_worker=8), 8, {"CPU": 1, "NPU": 1}),
    # CPU pools: a device is a core, one process each; a worker without devices runs one.
    (AcceleratorRuntime(workers=2, devices_per_worker=2), 4, {"CPU": 1}),
    (AcceleratorRuntime(workers=3, devices_per_worker=0), 3, {"CPU": 1}),
])
def test_every_device_gets_its_own_process(runtime, world, resources):
    assert runtime.world_size == world
    assert rank_resources(runtime) == resources


@pytest.mark.parametrize("global_batch,micro,world,accum", [
    (16, 1, 1, 16), (16, 1, 8, 2), (16, 2, 8, 1), (16, 1, 16, 1),
    (4, 1, 8, 1),      # more processes than samples: 4 of 8 pad
    (10, 1, 4, 3),     # 12 slots for 10 samples: 2 pad
])
def test_the_global_batch_is_held_whatever_the_world_size(global_batch, micro, world, accum):
    assert step_layout(global_batch, micro, world) == accum
    start = 40
    slots = [p for rank in range(world) for mb in rank_positions(start, global_batch, micro, accum, rank, world)
             for p in mb]
    real = sorted(p for p in slots if p is not None)
    assert real == list(range(start, start + global_batch))      # every sample once, no other
    assert len(slots) == world * accum * micro                    # every rank runs accum passes
    assert all(len(rank_positions(start, global_batch, micro, accum, r, world)) == accum for r in range(world))
