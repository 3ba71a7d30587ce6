"""The accelerator catalog: vendor/product -> how to request, schedule, run and price it.

The data lives in ``tuneserve/core/data/catalog.yaml`` (package data); a deployment overrides it with a
YAML document (the Helm chart's ConfigMap) merged on top by ``load_catalog``. Code asks the
catalog instead of branching on vendors.
"""
from __future__ import annotations

import math
from importlib import resources
from typing import Any, Mapping, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from tuneserve_workers.contract import EngineDtype

DEFAULT_CATALOG_RESOURCE = "catalog.yaml"


class _CatalogModel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True)


class HostResources(_CatalogModel):
    """CPU and memory of one Ray worker pod: base + per device x devices."""
    cpu_base: float = 1
    cpu_per_device: float = 2
    memory_gib_base: float = Field(4, alias="memoryGiBBase")
    memory_gib_per_device: float = Field(8, alias="memoryGiBPerDevice")

    def cpu(self, devices: int) -> float:
        return self.cpu_base + self.cpu_per_device * devices

    def memory_gib(self, devices: int) -> float:
        return self.memory_gib_base + self.memory_gib_per_device * devices


class Images(_CatalogModel):
    train: str
    serve: str


class CatalogToleration(_CatalogModel):
    key: str
    operator: str = "Exists"
    value: Optional[str] = None
    effect: Optional[str] = None


class PodVolume(_CatalogModel):
    """A host directory mounted into every Ray pod of a profile (e.g. a local pool's worker venv)."""
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", max_length=63)
    host_path: str = Field(pattern=r"^/")
    mount_path: str = Field(pattern=r"^/")
    read_only: bool = True


class AcceleratorProfile(_CatalogModel):
    """One product with its vendor's defaults merged in."""
    vendor: str
    product: str
    display_name: str
    vendor_display_name: str = ""
    aliases: tuple[str, ...] = ()
    resource_name: Optional[str] = None
    node_labels: dict[str, str] = Field(default_factory=dict)
    node_labels_any_of: dict[str, tuple[str, ...]] = Field(default_factory=dict)
    tolerations: tuple[CatalogToleration, ...] = ()
    ray_resource: Optional[str] = None
    ray_resources_per_device: int = 1
    ray_resource_auto_mapped: bool = False
    images: Images
    visible_devices_env: Optional[str] = None
    torch_device: str = "cpu"
    distributed_backend: str = "gloo"
    supports_4bit: bool = Field(False, alias="supports4bit")
    # FP8 matmuls (torch._scaled_mm, CUDA/ROCm only): FineTuneJob training.basePrecision fp8.
    fp8: bool = False
    serving_quantizations: tuple[str, ...] = ()
    vllm_platform: str = "cpu"
    vllm_plugin: Optional[str] = None
    vllm_general_plugins: tuple[str, ...] = ()
    vllm_plugin_package: Optional[str] = None
    serving_dtype: EngineDtype = "auto"
    serving_memory_utilization: float = Field(0.9, gt=0, le=1)
    serve_env: dict[str, str] = Field(default_factory=dict)
    memory_gib: float = Field(alias="memoryGiB")
    memory_scope: str = Field("device", pattern="^(device|worker)$")
    bf16_tflops: float
    mfu: Optional[float] = None
    price_per_device_hour: float = 0.0
    runtime_overhead_gib: float = Field(1.0, alias="runtimeOverheadGiB")
    host: HostResources = Field(default_factory=HostResources)
    pod_volumes: tuple[PodVolume, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.vendor}/{self.product}"

    def engine_dtype(self, requested: Optional[EngineDtype]) -> EngineDtype:
        """The dtype a replica runs with: ModelServe spec.engine.dtype, else this accelerator's."""
        return requested or self.serving_dtype

    def memory_utilization(self, requested: Optional[float]) -> float:
        """vLLM's --gpu-memory-utilization: ModelServe spec.engine.gpuMemoryUtilization, else this
        accelerator's. On CPU it is a share of the pod's memory, which also holds Ray's processes."""
        return requested if requested is not None else self.serving_memory_utilization

    def vllm_plugins(self) -> Optional[str]:
        """VLLM_PLUGINS: the platform plugin and its package's general plugins, by entry-point
        name. vLLM applies the filter to every plugin group, so naming the platform plugin alone
        would drop the vendor's custom ops and models. None: load whatever the image carries."""
        if not self.vllm_plugin:
            return None
        return ",".join((self.vllm_plugin, *self.vllm_general_plugins))

    def memory_for_model_gib(self, devices_per_worker: int) -> float:
        """Memory one copy of the model may use: a device's, or for worker-scoped memory (CPU)
        the worker's."""
        if self.memory_scope == "worker":
            return self.memory_gib * devices_per_worker
        return self.memory_gib

    def worker_resources(self, devices_per_worker: int) -> dict[str, str]:
        """Requests (= limits) of one Ray worker pod: host cpu/memory plus the devices. Placement
        fits exactly these, the RayJob builder renders exactly these."""
        out = {
            "cpu": format_cpu(self.host.cpu(devices_per_worker)),
            "memory": format_quantity_gib(self.host.memory_gib(devices_per_worker)),
        }
        if self.resource_name:
            out[self.resource_name] = str(devices_per_worker)
        return out

    def matches_name(self, name: str) -> bool:
        wanted = name.lower()
        return wanted == self.product.lower() or wanted in (a.lower() for a in self.aliases)


class CatalogDefaults(_CatalogModel):
    mfu: float = 0.35
    qlora_speed_factor: float = 0.6
    fp8_speed_factor: float = 1.3
    recompute_margin: float = Field(0.10, ge=0, lt=1)
    precision_speed_factor: dict[str, float] = Field(default_factory=lambda: {"bf16": 1.0, "fp16": 1.0, "fp32": 0.25})
    startup_minutes: float = 10
    memory_fragmentation: float = 0.05
    head: dict[str, str] = Field(default_factory=lambda: {"cpu": "2", "memory": "8Gi"})


class Catalog(_CatalogModel):
    """All accelerator profiles in catalog order (vendor order, then product order)."""
    defaults: CatalogDefaults = Field(default_factory=CatalogDefaults)
    profiles: tuple[AcceleratorProfile, ...]

    def vendors(self) -> list[str]:
        return list(dict.fromkeys(p.vendor for p in self.profiles))

    def find(self, vendor: Optional[str], product: Optional[str]) -> list[AcceleratorProfile]:
        """Profiles matching a choice: vendor alone = all its products in order; product alone =
        that product under any vendor."""
        return [
            p for p in self.profiles
            if (vendor is None or p.vendor == vendor.lower()) and (product is None or p.matches_name(product))
        ]

    def get(self, key: str) -> AcceleratorProfile:
        for p in self.profiles:
            if p.key == key:
                return p
        raise KeyError(key)

    def mfu(self, profile: AcceleratorProfile) -> float:
        return profile.mfu if profile.mfu is not None else self.defaults.mfu


def deep_merge(base: Any, override: Any) -> Any:
    """Maps merge key by key; null removes a map-valued key; lists and scalars are replaced."""
    if isinstance(base, Mapping) and isinstance(override, Mapping):
        merged = dict(base)
        for key, value in override.items():
            if value is None and isinstance(merged.get(key), Mapping):
                merged.pop(key)  # e.g. `products: {l4: null}` removes a product
            elif key in merged:
                merged[key] = deep_merge(merged[key], value)
            else:
                merged[key] = value
        return merged
    return override


def _profiles(document: Mapping[str, Any]) -> tuple[AcceleratorProfile, ...]:
    profiles = []
    for vendor, entry in (document.get("vendors") or {}).items():
        if entry is None:
            continue
        vendor_fields = {k: v for k, v in entry.items() if k not in ("products", "displayName")}
        for product, fields in (entry.get("products") or {}).items():
            if fields is None:
                continue
            merged = deep_merge(vendor_fields, fields)
            profiles.append(AcceleratorProfile.model_validate({
                **merged, "vendor": vendor, "product": product,
                "vendorDisplayName": entry.get("displayName", vendor),
            }))
    return tuple(profiles)


def default_catalog_document() -> dict[str, Any]:
    text = resources.files("tuneserve.core").joinpath("data", DEFAULT_CATALOG_RESOURCE).read_text()
    return yaml.safe_load(text)


def load_catalog(override: Union[str, Mapping[str, Any], None] = None,
                 base: Optional[Mapping[str, Any]] = None) -> Catalog:
    """The packaged catalog with ``override`` (YAML text or a parsed document) merged on top.

    Raises pydantic.ValidationError when the result is not a valid catalog (e.g. a typo in an
    override key), so a bad ConfigMap fails the operator's start, not a job later.
    """
    document = dict(base) if base is not None else default_catalog_document()
    if isinstance(override, str):
        override = yaml.safe_load(override) or {}
    if override:
        document = deep_merge(document, override)
    return Catalog(defaults=CatalogDefaults.model_validate(document.get("defaults") or {}),
                   profiles=_profiles(document))


def format_quantity_gib(gib: float) -> str:
    """Kubernetes memory quantity for a GiB amount (whole Mi, deterministic)."""
    mib = int(math.ceil(gib * 1024))
    return f"{mib // 1024}Gi" if mib % 1024 == 0 else f"{mib}Mi"


def format_cpu(cores: float) -> str:
    millis = int(math.ceil(cores * 1000))
    return str(millis // 1000) if millis % 1000 == 0 else f"{millis}m"
