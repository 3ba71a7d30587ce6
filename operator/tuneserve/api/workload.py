"""What every Ray workload spec shares: how an accelerator is named, and the pod-level options
(tolerations, node selector, image, env, credentials) that the builders copy into every Ray pod.
"""
from __future__ import annotations

from typing import Any, ClassVar, Optional

from pydantic import Field

from tuneserve.api.common import (
    LABEL_NAME_PATTERN, NAME_MAX, SHORT_MAX, ApiModel, EnvVar, Rule, Toleration,
)
from tuneserve.api.sources import _VENDOR_PATTERN, Credentials

_DNS_SUBDOMAIN = LABEL_NAME_PATTERN.replace("([-a-z0-9]", "([-.a-z0-9]")


class AcceleratorSelector(ApiModel):
    """One acceptable accelerator, as vendor and/or product from the accelerator catalog."""
    vendor: Optional[str] = Field(None, max_length=SHORT_MAX, pattern=_VENDOR_PATTERN, description="Catalog vendor: nvidia, amd, huawei, intel, aws, google, cpu. Alone, any product of the vendor in catalog order.")
    product: Optional[str] = Field(None, max_length=SHORT_MAX, pattern=r"^[-_.A-Za-z0-9]+$", description="Catalog product or alias, case-insensitive: H100, A100, L4, A10G, MI300X, Ascend910B, Gaudi2, trn1, inf2, v5e, cpu.")

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(cel="has(self.vendor) || has(self.product)",
             message="an accelerator choice needs a vendor, a product, or both",
             check=lambda c: c.vendor is not None or c.product is not None),
    )

    def label(self) -> str:
        """e.g. "nvidia/H100", "*/MI300X"."""
        return f"{self.vendor or '*'}/{self.product or '*'}"


class RayPodOptions(ApiModel):
    """Options copied into every Ray pod of the workload (head and workers)."""
    tolerations: Optional[list[Toleration]] = Field(None, max_length=32, json_schema_extra={"x-kubernetes-list-type": "atomic"}, description="Added to the accelerator's own tolerations on every Ray pod.")
    node_selector: Optional[dict[str, str]] = Field(
        None, max_length=32, json_schema_extra={"additionalProperties": {"type": "string", "maxLength": SHORT_MAX}},
        description="Added to the accelerator's node labels on every Ray pod.")
    priority_class_name: Optional[str] = Field(None, max_length=NAME_MAX, pattern=_DNS_SUBDOMAIN, description="PriorityClass of the Ray pods.")
    service_account_name: Optional[str] = Field(None, max_length=NAME_MAX, pattern=_DNS_SUBDOMAIN, description="Service account of the Ray pods (e.g. for workload identity); default: one the operator creates.")
    image_overrides: Optional[dict[str, str]] = Field(
        None, max_length=16, json_schema_extra={"additionalProperties": {"type": "string", "minLength": 1, "maxLength": 512}},
        description="Container image per catalog vendor, e.g. {nvidia: registry/serve:cu128}.")
    env: Optional[list[EnvVar]] = Field(None, max_length=64, json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]}, description="Extra plain env vars for the Ray containers (names starting with TUNESERVE_ are reserved).")
    credentials: Optional[Credentials] = Field(None, description="Secret references for the model hub and object store.")

    # A workload may word these fields for itself (field name -> description); the CRD shows it.
    pod_option_descriptions: ClassVar[dict[str, str]] = {}

    @classmethod
    def __pydantic_init_subclass__(cls, **kwargs: Any) -> None:
        super().__pydantic_init_subclass__(**kwargs)
        worded = cls.__dict__.get("pod_option_descriptions") or {}
        for name, description in worded.items():
            cls.model_fields[name].description = description
        if worded:
            cls.model_rebuild(force=True)
