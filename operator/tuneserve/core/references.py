"""The objects a spec names (a ServiceAccount, PersistentVolumeClaims, a PriorityClass), checked
against the names kopf's indexes hold (controller/indexes.py): pure, no API read. Shared by both
kinds: the fields live on the pod options both specs inherit (``api.workload.RayPodOptions``),
and the URIs are passed in by field path.

A missing object blocks the owner like a missing Secret (``core.plan.missing_secrets``): Accepted
False with the reason ``ReferenceNotFound`` (``SecretNotFound`` when only Secrets are missing), a
message naming each field and its missing object, no children, and the plan names what it waits
for (``Plan.waiting_for``) so that object's event wakes the owner (controller/schedule.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional

from tuneserve.api.workload import RayPodOptions
from tuneserve.core.plan import BLOCKED_REQUEUE_SECONDS, Plan, missing_secrets
from tuneserve_workers.contract import pvc_claim

SERVICE_ACCOUNT, CLAIM, PRIORITY_CLASS = "ServiceAccount", "PersistentVolumeClaim", "PriorityClass"
CLUSTER_SCOPED = frozenset({PRIORITY_CLASS})


@dataclass(frozen=True)
class Reference:
    """One object a spec names, and the field that names it."""
    field: str   # e.g. "spec.dataset.uri"
    kind: str
    name: str


@dataclass(frozen=True)
class KnownNames:
    """What exists, by name only (from the indexes): the namespace's ServiceAccounts and
    PersistentVolumeClaims, the cluster's PriorityClasses."""
    service_accounts: frozenset[str] = frozenset()
    claims: frozenset[str] = frozenset()
    priority_classes: frozenset[str] = frozenset()

    def has(self, kind: str, name: str) -> bool:
        names = {SERVICE_ACCOUNT: self.service_accounts, CLAIM: self.claims, PRIORITY_CLASS: self.priority_classes}
        return name in names[kind]


@dataclass(frozen=True)
class Blocked:
    """Why the children are not rendered: the Accepted reason, its message, and the objects whose
    appearance should wake the owner, as (kind, name)."""
    reason: str
    message: str
    waiting_for: tuple[tuple[str, str], ...] = ()


def spec_references(spec: RayPodOptions, uris: Mapping[str, Optional[str]]) -> list[Reference]:
    """The objects ``spec`` names: its serviceAccountName, priorityClassName, and the claims of
    the pvc:// URIs in ``uris`` (field path -> URI)."""
    refs = []
    if spec.service_account_name:
        refs.append(Reference("spec.serviceAccountName", SERVICE_ACCOUNT, spec.service_account_name))
    if spec.priority_class_name:
        refs.append(Reference("spec.priorityClassName", PRIORITY_CLASS, spec.priority_class_name))
    for field, uri in uris.items():
        claim = pvc_claim(uri) if uri else None
        if claim:
            refs.append(Reference(field, CLAIM, claim))
    return refs


def secret_fields(spec: RayPodOptions) -> dict[tuple[str, str], str]:
    """(Secret name, key) -> the spec field that names it (the first, when several do)."""
    creds, out = spec.credentials, {}
    if creds is None:
        return out
    store = creds.object_store
    named = [("spec.credentials.huggingFaceToken", creds.hugging_face_token),
             ("spec.credentials.objectStore.accessKeyId", store.access_key_id if store else None),
             ("spec.credentials.objectStore.secretAccessKey", store.secret_access_key if store else None),
             ("spec.credentials.objectStore.sessionToken", store.session_token if store else None)]
    named += [(f"spec.credentials.secretEnv[{i}].secretKeyRef", item.secret_key_ref)
              for i, item in enumerate(creds.secret_env or [])]
    for field, ref in named:
        if ref is not None:
            out.setdefault((ref.name, ref.key), field)
    return out


def missing_references(refs: Iterable[Reference], known: Optional[KnownNames]) -> list[Reference]:
    """The references whose object does not exist (none when ``known`` is None: not observed)."""
    if known is None:
        return []
    return [r for r in refs if not known.has(r.kind, r.name)]


def describe(ref: Reference) -> str:
    """e.g. "spec.dataset.uri: PersistentVolumeClaim 'data' not found"."""
    return f"{ref.field}: {ref.kind} {ref.name!r} not found"


def blocked(missing: list[Reference], secrets: Optional[str]) -> Optional[Blocked]:
    """The block for these missing references and the Secrets' problems (``missing_secrets``),
    or None when nothing is missing."""
    if not missing and not secrets:
        return None
    message = "; ".join([describe(r) for r in missing] + ([secrets] if secrets else []))
    reason = "ReferenceNotFound" if missing else "SecretNotFound"
    return Blocked(reason, message, tuple(dict.fromkeys((r.kind, r.name) for r in missing)))


def check_references(plan: Plan, children: list[dict[str, Any]], spec: RayPodOptions, uris: Mapping[str, Optional[str]],
                     known: Optional[KnownNames], secrets: Mapping[str, frozenset[str]]) -> Optional[Blocked]:
    """What blocks the rendered ``children`` of ``spec``: its missing objects (``uris``: its URIs by
    field path) and the children's missing Secrets, each named by its field. When blocked, the
    plan is requeued and names what it waits for."""
    missing = missing_references(spec_references(spec, uris), known)
    found = blocked(missing, missing_secrets(children, secrets, secret_fields(spec)))
    if found is not None:
        plan.requeue_after = BLOCKED_REQUEUE_SECONDS
        plan.waiting_for = list(found.waiting_for)
    return found
