"""The serve app's engine dtype: the config's, with auto resolved from the checkpoint."""
from __future__ import annotations

import json

import pytest

from tuneserve_workers.serve.engine_dtype import resolve_engine_dtype, stored_dtype
from tuneserve_workers.serve.server import engine_argv
from tuneserve_workers.contract import ServeAppConfig


@pytest.mark.parametrize("requested,stored,dtype", [
    ("float32", "bfloat16", "float32"),      # the CPU default, whatever the checkpoint
    ("bfloat16", "float32", "bfloat16"),
    ("float16", None, "float16"),
    ("auto", "bfloat16", "bfloat16"),        # a 16-bit checkpoint as stored
    ("auto", "float16", "float16"),
    ("auto", "float32", "bfloat16"),         # a float32 checkpoint in bfloat16 (vLLM's rule on GPUs)
    ("auto", None, "bfloat16"),
])
def test_resolve(requested, stored, dtype):
    assert resolve_engine_dtype(requested, stored)[0] == dtype


@pytest.mark.parametrize("config,dtype", [
    ({"dtype": "float32"}, "float32"),               # transformers 5
    ({"torch_dtype": "bfloat16"}, "bfloat16"),       # older checkpoints
    ({}, None),
])
def test_stored_dtype_from_config_json(tmp_path, config, dtype):
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert stored_dtype(str(tmp_path)) == dtype


def test_unreadable_config_is_unknown(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    assert stored_dtype(str(tmp_path)) is None
    assert stored_dtype(str(tmp_path / "missing")) is None


def test_engine_argv_passes_the_resolved_dtype():
    cfg = ServeAppConfig(served_model_name="m", base_model={"uri": "/models/m"}, dtype="auto")
    argv = engine_argv(cfg, "/models/m", "bfloat16")
    assert argv[argv.index("--dtype") + 1] == "bfloat16"
