"""What every Ray workload spec shares: how an accelerator is named, and the pod-level options
(tolerations, node selector, image, env, credentials) that the builders copy into every Ray pod.
"""
from __future__ import annotations

from importlib import resources
from typing import Any, ClassVar, Optional

import yaml
from pydantic import Field

from tuneserve.api.common import (
    LABEL_NAME_PATTERN, NAME_MAX, SHORT_MAX, ApiModel, EnvVar, Rule, Toleration,
)
from tuneserve.api.sources import _VENDOR_PATTERN, Credentials

_DNS_SUBDOMAIN = LABEL_NAME_PATTERN.replace("([-a-z0-9]", "([-.a-z0-9]")


def _catalog_products() -> dict[str, tuple[str, ...]]:
    """Vendor -> its product names and aliases, lowercase, from the packaged catalog's data (the
    API reads the YAML, not tuneserve.core's code: the api package depends on nothing above it).
    The CRDs are generated from these names, so admission knows what the operator knows; a
    deployment whose catalog override adds a vendor or product regenerates the CRDs to use it."""
    document = yaml.safe_load(resources.files("tuneserve").joinpath("core", "data", "catalog.yaml").read_text())
    products: dict[str, tuple[str, ...]] = {}
    for vendor, entry in (document.get("vendors") or {}).items():
        names = [n.lower() for product, fields in (entry.get("products") or {}).items()
                 for n in (product, *((fields or {}).get("aliases") or ()))]
        products[vendor] = tuple(dict.fromkeys(names))
    return products


CATALOG_PRODUCTS = _catalog_products()
CATALOG_VENDORS = tuple(CATALOG_PRODUCTS)
CATALOG_PRODUCT_NAMES = tuple(dict.fromkeys(n for names in CATALOG_PRODUCTS.values() for n in names))


def _cel_list(names: tuple[str, ...]) -> str:
    """A CEL list literal of names (catalog names are plain: no quotes to escape)."""
    return "[" + ", ".join(f"'{n}'" for n in names) + "]"


def vendor_list_rule(field: str, alias: str, what: str) -> Rule:
    """Every entry of a list, or key of a map, names a catalog vendor: a typo is refused at
    admission with the known names instead of an UnknownAccelerator condition (or an override
    silently never used) later."""
    def check(model: Any) -> bool:
        return all(v in CATALOG_VENDORS for v in getattr(model, field) or ())
    return Rule(cel=f"!has(self.{alias}) || self.{alias}.all(v, v in {_cel_list(CATALOG_VENDORS)})",
                message=f"{what} must be catalog vendors: {', '.join(CATALOG_VENDORS)}",
                check=check, field_path=f".{alias}")


def _product_of_vendor(choice: "AcceleratorSelector") -> bool:
    """A product named with its vendor must be that vendor's (an unknown vendor has its own rule)."""
    if choice.vendor is None or choice.product is None or choice.vendor not in CATALOG_PRODUCTS:
        return True
    return choice.product.lower() in CATALOG_PRODUCTS[choice.vendor]


_PRODUCTS_BY_VENDOR_CEL = "{" + ", ".join(f"'{v}': {_cel_list(p)}" for v, p in CATALOG_PRODUCTS.items()) + "}"
_CATALOG_RULES = (
    Rule(cel=f"!has(self.vendor) || self.vendor in {_cel_list(CATALOG_VENDORS)}",
         message=f"vendor must be a catalog vendor: {', '.join(CATALOG_VENDORS)}",
         check=lambda c: c.vendor is None or c.vendor in CATALOG_VENDORS, field_path=".vendor"),
    Rule(cel=f"!has(self.product) || self.product.lowerAscii() in {_cel_list(CATALOG_PRODUCT_NAMES)}",
         message=f"product must be a catalog product or alias (any case): {', '.join(CATALOG_PRODUCT_NAMES)}",
         check=lambda c: c.product is None or c.product.lower() in CATALOG_PRODUCT_NAMES, field_path=".product"),
    Rule(cel=f"!has(self.vendor) || !has(self.product) || !(self.vendor in {_cel_list(CATALOG_VENDORS)}) "
             f"|| self.product.lowerAscii() in {_PRODUCTS_BY_VENDOR_CEL}[self.vendor]",
         message="product must be one of its vendor's catalog products: "
                 + "; ".join(f"{v}: {', '.join(p)}" for v, p in CATALOG_PRODUCTS.items()),
         check=_product_of_vendor, field_path=".product"),
)


class AcceleratorSelector(ApiModel):
    """One acceptable accelerator, as vendor and/or product from the accelerator catalog."""
    vendor: Optional[str] = Field(None, max_length=SHORT_MAX, pattern=_VENDOR_PATTERN, description=f"Catalog vendor: {', '.join(CATALOG_VENDORS)}. Alone, any product of the vendor in catalog order.")
    product: Optional[str] = Field(None, max_length=SHORT_MAX, pattern=r"^[-_.A-Za-z0-9]+$", description="Catalog product or alias, case-insensitive: H100, A100, L4, A10G, MI300X, Ascend910B, Gaudi2, trn1, inf2, v5e, cpu.")

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(cel="has(self.vendor) || has(self.product)",
             message="an accelerator choice needs a vendor, a product, or both",
             check=lambda c: c.vendor is not None or c.product is not None),
        *_CATALOG_RULES,
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
    env: Optional[list[EnvVar]] = Field(None, max_length=64, json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]}, description="Extra plain env vars for the Ray containers (names starting with TUNESERVE_ are reserved for the operator and rejected).")
    credentials: Optional[Credentials] = Field(None, description="Secret references for the model hub and object store.")

    # Not emitted for this base class: each spec adds them to its own rules.
    rules: ClassVar[tuple[Rule, ...]] = (vendor_list_rule("image_overrides", "imageOverrides", "imageOverrides keys"),)

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
