"""Every kind a builder returns has an index (controller.indexes.CHILD_KINDS): a child without one
is never seen live, so its hash check always fails and it is re-applied on every reconcile."""
from __future__ import annotations

from helpers import load_example
from tuneserve.api.finetunejob import FineTuneJob
from tuneserve.api.modelserve import ModelServe
from tuneserve.core.catalog import load_catalog
from tuneserve.controller.indexes import CHILD_KINDS
from tuneserve.core.scheduling.fit import Candidate
from tuneserve.finetunejob.builders.children import build_finetune_children
from tuneserve.modelserve.builders.children import build_modelserve_children
from tuneserve_workers.contract import ServeAdapter

CATALOG = load_catalog()
REGISTERED = {(c.api_version, c.kind) for c in CHILD_KINDS}


def _rendered() -> list[dict]:
    job = FineTuneJob.model_validate(load_example("finetunejob-qwen-bank.yaml"))
    serve = ModelServe.model_validate(load_example("modelserve-qwen-bank.yaml"))
    gpu = Candidate(CATALOG.get("nvidia/h100-80gb"), 1, 1, "choice 1")
    adapter = ServeAdapter(name="a", uri="s3://bucket/a")
    return [*build_finetune_children(job, gpu, "default", 1, CATALOG),
            *build_modelserve_children(serve, gpu, "default", [adapter], CATALOG)]


def test_every_rendered_child_kind_has_an_index():
    missing = {(o["apiVersion"], o["kind"]) for o in _rendered()} - REGISTERED
    assert not missing, f"builders render kinds without an index in CHILD_KINDS: {sorted(missing)}"


def test_the_check_fails_for_an_unregistered_kind():
    rendered = {(o["apiVersion"], o["kind"]) for o in _rendered()} | {("v1", "Service")}
    assert rendered - REGISTERED == {("v1", "Service")}


def test_the_secrets_index_keeps_key_names_never_values():
    from tuneserve.controller.indexes import secrets_index
    body = {"metadata": {"name": "hf-token"}, "data": {"token": "c2VjcmV0"}, "stringData": {"extra": "plain"}}
    indexed = secrets_index(body=body, namespace="bank", name="hf-token")
    assert indexed == {"bank": ("hf-token", frozenset({"token", "extra"}))}
    assert "c2VjcmV0" not in repr(indexed) and "plain" not in repr(indexed)
