"""Desired-state hashing: an annotation on every applied child hashes what the operator rendered,
so an unchanged child is never applied again (no API write when nothing changed)."""
from __future__ import annotations

import hashlib
import json
from typing import Any, Mapping, Optional

APPLIED_HASH_ANNOTATION = "tuneserve.dev/applied-hash"


def with_applied_hash(obj: dict[str, Any]) -> dict[str, Any]:
    """The object plus an annotation hashing its desired state, so an unchanged child is never
    re-applied (no API write when nothing changed)."""
    digest = hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]
    meta = dict(obj["metadata"])
    meta["annotations"] = {**(meta.get("annotations") or {}), APPLIED_HASH_ANNOTATION: digest}
    return {**obj, "metadata": meta}


def needs_apply(desired: Mapping[str, Any], live: Optional[Mapping[str, Any]]) -> bool:
    if live is None:
        return True
    live_hash = ((live.get("metadata") or {}).get("annotations") or {}).get(APPLIED_HASH_ANNOTATION)
    return live_hash != desired["metadata"]["annotations"][APPLIED_HASH_ANNOTATION]


def to_apply(children: list[dict[str, Any]], live: Mapping[tuple[str, str], Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The rendered children, hashed, whose live copy (by kind and name) is missing or differs."""
    out = []
    for child in children:
        desired = with_applied_hash(child)
        if needs_apply(desired, live.get((child["kind"], child["metadata"]["name"]))):
            out.append(desired)
    return out
