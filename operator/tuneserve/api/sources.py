"""Where models, adapters and data come from, shared by every resource kind: URI patterns, the
base-model source with its size hints, and object-store / model-hub credentials (references only).
"""
from __future__ import annotations

from typing import ClassVar, Optional

from pydantic import Field

from tuneserve.api.common import SHORT_MAX, URI_MAX, ApiModel, Rule, SecretEnvVar, SecretKeyRef, uri_rule

# Printable ASCII without space is `[!-~]`: no backslashes, so the same text is valid Python,
# RE2 and a CEL single-quoted string.
_PATH = r"(/[!-~]*)?"
_BUCKET = r"[a-z0-9][-.a-z0-9]*[a-z0-9]"
_HF_REPO = r"hf://[A-Za-z0-9][-_.A-Za-z0-9]*/[A-Za-z0-9][-_.A-Za-z0-9]*"
_STORAGE = rf"(s3|gs)://{_BUCKET}{_PATH}|pvc://{_BUCKET}{_PATH}|file:///[!-~]*|/[!-~]*"
MODEL_URI_PATTERN = rf"^({_HF_REPO}(@[-_./A-Za-z0-9]+)?|{_STORAGE})$"
DATASET_URI_PATTERN = rf"^({_HF_REPO}{_PATH}|{_STORAGE})$"
STORAGE_URI_PATTERN = rf"^({_STORAGE})$"
_STORAGE_WHAT = "s3://bucket/path, gs://bucket/path, pvc://claim/path or an absolute local path"
_VENDOR_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"


class ModelSizeHints(ApiModel):
    """Size of the base model, for memory sizing and cost estimates. Needed only when the model
    name carries no size (names like "Qwen2.5-7B", "0.5B" or "8x7B" are parsed)."""
    parameters_billions: Optional[float] = Field(None, gt=0, le=10000, description="Total parameters in billions (e.g. 7.6).")
    layers: Optional[int] = Field(None, ge=1, le=1024, description="Transformer layers.")
    hidden_size: Optional[int] = Field(None, ge=64, le=131072, description="Hidden size (model dimension).")
    vocab_size: Optional[int] = Field(None, ge=256, le=4194304, description="Vocabulary size (logits memory).")


class BaseModelSource(ApiModel):
    """The open model to adapt."""
    uri: str = Field(max_length=URI_MAX, description="hf://org/name[@revision], s3://, gs://, pvc://claim/path, or a local path (development).")
    size_hints: Optional[ModelSizeHints] = Field(None, description="Overrides the size parsed from the name.")

    rules: ClassVar[tuple[Rule, ...]] = (
        uri_rule("uri", MODEL_URI_PATTERN, "hf://org/name[@revision], " + _STORAGE_WHAT),
    )

    def revision(self) -> Optional[str]:
        """The `@revision` of an hf:// URI, if any."""
        if self.uri.startswith("hf://") and "@" in self.uri:
            return self.uri.rsplit("@", 1)[1]
        return None

    def location(self) -> str:
        """The URI without its revision."""
        return self.uri.rsplit("@", 1)[0] if self.revision() else self.uri

    def display_name(self) -> str:
        """The last path element, e.g. "Qwen2.5-7B-Instruct"."""
        return self.location().rstrip("/").rsplit("/", 1)[-1]


class ObjectStoreCredentials(ApiModel):
    """S3-compatible credentials, passed to the workers as AWS_* env from Secret keys."""
    access_key_id: SecretKeyRef = Field(description="-> AWS_ACCESS_KEY_ID")
    secret_access_key: SecretKeyRef = Field(description="-> AWS_SECRET_ACCESS_KEY")
    session_token: Optional[SecretKeyRef] = Field(None, description="-> AWS_SESSION_TOKEN")
    endpoint_url: Optional[str] = Field(None, max_length=URI_MAX, pattern=r"^https?://[!-~]+$", description="-> AWS_ENDPOINT_URL (MinIO, Ceph, ...).")
    region: Optional[str] = Field(None, max_length=SHORT_MAX, description="-> AWS_DEFAULT_REGION")


class Credentials(ApiModel):
    """References to Secrets. Values are never read by the operator nor copied anywhere."""
    hugging_face_token: Optional[SecretKeyRef] = Field(None, description="-> HF_TOKEN")
    object_store: Optional[ObjectStoreCredentials] = Field(None, description="S3-compatible object store.")
    secret_env: Optional[list[SecretEnvVar]] = Field(
        None, max_length=16, json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
        description="More env vars from Secret keys (e.g. GOOGLE_APPLICATION_CREDENTIALS content).")
