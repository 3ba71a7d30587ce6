"""Shared building blocks of the typed API: camelCase models, CEL rules mirrored in Python,
and the small Kubernetes types (tolerations, env, secret references) the specs pass through.

A ``Rule`` is written once and used twice: the CRD generator emits it as an
``x-kubernetes-validations`` entry (the apiserver enforces it at admission), and the model's
validator runs the Python mirror (``check``), so the operator and unit tests reject the same specs
with the same message. Transition rules (those using ``oldSelf``) have no Python mirror: only the apiserver sees the
old object (tests/unit/test_api.py checks that every immutable field has one).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from typing import Any, Callable, ClassVar, Mapping, Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

# Every string and list in a spec carries a bound: the apiserver estimates CEL cost from them and
# rejects rules whose worst case is unbounded.
NAME_MAX = 253
URI_MAX = 2048
SHORT_MAX = 63
VALUE_MAX = 4096

# RE2 (apiserver CEL) and Python `re` agree on these: no lookaround, no backreferences.
LABEL_NAME_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]*$"
# Env names the operator sets itself (worker contract, serve app); a spec may not set them.
RESERVED_ENV_PREFIX = "TUNESERVE_"
# A `..` path segment would climb out of the claim, bucket prefix or directory a URI names.
PARENT_SEGMENT_PATTERN = r"(^|/)[.][.](/|$)"


@dataclass(frozen=True)
class Rule:
    """A cross-field validation rule: CEL for the apiserver, ``check`` for Python."""
    cel: str
    message: str
    check: Optional[Callable[[Any], bool]] = None
    field_path: Optional[str] = None
    reason: Optional[str] = None

    def as_schema(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rule": self.cel, "message": self.message}
        if self.field_path:
            out["fieldPath"] = self.field_path
        if self.reason:
            out["reason"] = self.reason
        return out


def uri_rule(field: str, pattern: str, what: str, required: bool = True) -> Rule:
    """A readable URI check (a bare `pattern` error from the apiserver would print the regex).
    Every URI also refuses `..` segments: pvc:// and local paths are joined onto a mount, object
    keys onto a prefix, and neither may climb out of what the URI names."""
    def check(model: Any) -> bool:
        value = getattr(model, _python_name(type(model), field))
        return value is None or (re.search(pattern, value) is not None
                                 and re.search(PARENT_SEGMENT_PATTERN, value) is None)
    cel = f"self.{field}.matches('{pattern}') && !self.{field}.matches('{PARENT_SEGMENT_PATTERN}')"
    if not required:
        cel = f"!has(self.{field}) || ({cel})"
    return Rule(cel=cel, message=f"{field} must be {what}, without '..' path segments",
                check=check, field_path=f".{field}")


def reserved_env_rule(field: str) -> Rule:
    """Names under TUNESERVE_ are the operator's (worker contract, serve app): rejected instead of
    silently dropped or, for Secret env, overriding the operator's own."""
    return Rule(cel=f"!self.name.startsWith('{RESERVED_ENV_PREFIX}')",
                message=f"{field} names starting with {RESERVED_ENV_PREFIX} are reserved for the operator",
                check=lambda e: not e.name.startswith(RESERVED_ENV_PREFIX), field_path=".name")


def _python_name(model_cls: type[BaseModel], alias: str) -> str:
    for name, info in model_cls.model_fields.items():
        if info.alias == alias or name == alias:
            return name
    raise KeyError(alias)


def _emit_rules(schema: dict[str, Any], cls: type) -> None:
    rules = cls.__dict__.get("rules", ())
    if rules:
        schema["x-kubernetes-validations"] = [r.as_schema() for r in rules]
    # Class docstrings say why a type exists; they become the CRD description of that object.


class ApiModel(BaseModel):
    """Base of every API type: camelCase on the wire, unknown fields rejected, rules mirrored."""
    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        json_schema_extra=_emit_rules,
    )
    rules: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules(self):  # noqa: ANN202 - pydantic hook
        for rule in type(self).__dict__.get("rules", ()):
            if rule.check is not None and not rule.check(self):
                raise ValueError(rule.message)
        return self

    def to_wire(self) -> dict[str, Any]:
        """The JSON-ready dict the apiserver stores (camelCase, unset optionals left out)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class TolerationOperator(str, Enum):
    Exists = "Exists"
    Equal = "Equal"


class TaintEffect(str, Enum):
    NoSchedule = "NoSchedule"
    PreferNoSchedule = "PreferNoSchedule"
    NoExecute = "NoExecute"


class Toleration(ApiModel):
    """A Kubernetes toleration added to every Ray pod (after the accelerator's own)."""
    key: Optional[str] = Field(None, max_length=NAME_MAX, description="Taint key; empty with operator Exists matches all taints.")
    operator: TolerationOperator = Field(TolerationOperator.Equal, description="Exists or Equal.")
    value: Optional[str] = Field(None, max_length=SHORT_MAX, description="Taint value for operator Equal.")
    effect: Optional[TaintEffect] = Field(None, description="Taint effect to match; empty matches all effects.")
    toleration_seconds: Optional[int] = Field(None, ge=0, description="For NoExecute: how long the pod stays bound after the taint appears.")

    rules: ClassVar[tuple[Rule, ...]] = (
        Rule(cel="self.operator != 'Exists' || !has(self.value)",
             message="a toleration with operator Exists must not set value",
             check=lambda t: t.operator != TolerationOperator.Exists or t.value is None),
    )


class EnvVar(ApiModel):
    """A plain environment variable for the training containers. Secrets go in `credentials`."""
    name: str = Field(min_length=1, max_length=SHORT_MAX * 2, pattern=ENV_NAME_PATTERN, description="Variable name.")
    value: str = Field("", max_length=VALUE_MAX, description="Literal value (never a secret: it is visible in the RayJob).")

    rules: ClassVar[tuple[Rule, ...]] = (reserved_env_rule("spec.env"),)


class SecretKeyRef(ApiModel):
    """A key of a Secret in the job's namespace. Only the reference is copied into the Ray pods
    (as env valueFrom); the value never appears in status, events or logs."""
    name: str = Field(min_length=1, max_length=NAME_MAX, pattern=LABEL_NAME_PATTERN.replace("([-a-z0-9]", "([-.a-z0-9]"), description="Secret name.")
    key: str = Field(min_length=1, max_length=NAME_MAX, pattern=r"^[-._a-zA-Z0-9]+$", description="Key inside the Secret.")


class SecretEnvVar(ApiModel):
    """An environment variable whose value comes from a Secret key."""
    name: str = Field(min_length=1, max_length=SHORT_MAX * 2, pattern=ENV_NAME_PATTERN, description="Variable name.")
    secret_key_ref: SecretKeyRef = Field(description="Where the value comes from.")

    rules: ClassVar[tuple[Rule, ...]] = (reserved_env_rule("spec.credentials.secretEnv"),)


class ObjectMeta(BaseModel):
    """The parts of metadata the operator reads; the rest is ignored."""
    model_config = ConfigDict(extra="ignore", populate_by_name=True, alias_generator=None)
    name: str
    namespace: str = "default"
    uid: str = ""
    generation: int = 0
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class CustomResource(BaseModel):
    """A tuneserve custom resource parsed once from an API body (kopf's or the client's)."""
    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    @classmethod
    def from_body(cls, body: Mapping[str, Any]):
        """Parse (raises pydantic.ValidationError on an invalid spec); an empty status is no status."""
        data = {k: body[k] for k in ("apiVersion", "kind", "metadata", "spec", "status") if body.get(k)}
        return cls.model_validate(data)


def name_rule(max_length: int, named_after_it: str) -> Rule:
    """metadata.name as a DNS-1035 label short enough for the child objects named after it."""
    return Rule(
        cel=f"self.metadata.name.size() <= {max_length} && self.metadata.name.matches('^[a-z]([-a-z0-9]*[a-z0-9])?$')",
        message=f"metadata.name must be a DNS-1035 label (lowercase letters, digits, '-', starting with a letter) "
                f"of at most {max_length} characters: {named_after_it} named after it",
        check=lambda name: len(name) <= max_length and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name) is not None,
    )
