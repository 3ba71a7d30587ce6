"""The dtype a replica's engine runs in, chosen here rather than by vLLM's own "auto".

The operator renders ``ServeAppConfig.dtype`` explicitly: ModelServe ``spec.engine.dtype``, else
the accelerator's catalog default (float32 on CPU, where vLLM's bf16 kernels differ from CPU to
CPU; ``auto`` on GPUs and NPUs). ``auto`` is resolved from the model's config: a 16-bit checkpoint
is served as stored, a float32 one in bfloat16 (what vLLM does on GPUs, made explicit so the
replica can report it). The resolved value goes to vLLM as ``--dtype``.
"""
from __future__ import annotations

import json
import os
from typing import Optional

SIXTEEN_BIT = ("bfloat16", "float16")


def stored_dtype(model_path: str) -> Optional[str]:
    """The checkpoint's dtype from its config.json (``dtype``, or ``torch_dtype`` before
    transformers 5); None when it cannot be read (then ``auto`` means bfloat16)."""
    try:
        if os.path.isdir(model_path):
            with open(os.path.join(model_path, "config.json")) as f:
                cfg = json.load(f)
        else:   # a hub id, from the local cache (no downloads at run time)
            from transformers import AutoConfig
            cfg = AutoConfig.from_pretrained(model_path).to_dict()
    except (OSError, ValueError):
        return None
    value = cfg.get("dtype") or cfg.get("torch_dtype")
    return str(value).replace("torch.", "") if value else None


def resolve_engine_dtype(requested: str, stored: Optional[str]) -> tuple[str, str]:
    """(the dtype for vLLM's --dtype, why) for ``ServeAppConfig.dtype`` and the model's."""
    if requested != "auto":
        return requested, "engine.dtype (spec or the accelerator's default)"
    if stored in SIXTEEN_BIT:
        return stored, f"auto: the model is stored in {stored}"
    return "bfloat16", f"auto: the model is stored in {stored or 'an unknown dtype'}; served in bfloat16"
