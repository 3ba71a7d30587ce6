"""Loading the base model and tokenizer, choosing precision, wrapping with LoRA/QLoRA.

Precision: bf16/fp16 are honoured on accelerators (base weights in that dtype, LoRA weights and
optimizer state in fp32, forward under autocast). On CPU, bf16 is kept where the CPU has native
bf16 (AVX512-BF16 or AMX-BF16, ``tuneserve_workers.cpu``): numerically it is the accelerators'
recipe, since only the frozen base is bf16. Without native bf16, and for fp16 (no CPU training
path), the worker trains in fp32. The choice and its reason go into the progress document
(``precision`` and the message) on every CPU run.
QLoRA loads the base in 4-bit NF4 through bitsandbytes and needs ``accelerator.supports_4bit``.
"""
from __future__ import annotations

import glob
import json
import os
import struct
from dataclasses import dataclass
from typing import Optional

import torch

from ..contract import AcceleratorRuntime, AdapterSpec, Method, Precision
from ..cpu import CpuBf16
from .errors import ConfigError, ResourceError

_DTYPES = {Precision.bf16: torch.bfloat16, Precision.fp16: torch.float16, Precision.fp32: torch.float32}


@dataclass(frozen=True)
class PrecisionChoice:
    """What the worker trains in; ``note`` says why on CPU (None on accelerators)."""
    precision: Precision
    note: Optional[str] = None

    @property
    def dtype(self) -> torch.dtype:
        return _DTYPES[self.precision]


def choose_precision(requested: Precision, device_type: str, cpu: Optional[CpuBf16] = None) -> PrecisionChoice:
    """Accelerators train in what was asked. CPUs keep bf16 only where it is native (``cpu``)."""
    if device_type != "cpu":
        return PrecisionChoice(requested)
    if requested is Precision.fp32:
        return PrecisionChoice(Precision.fp32, "training in fp32 on CPU, as requested")
    if requested is Precision.bf16 and cpu is not None and cpu.native:
        return PrecisionChoice(Precision.bf16, f"training in bf16 on CPU (native bf16: {cpu.via}; "
                                               "LoRA weights and optimizer state in fp32)")
    why = ("CPUs have no fp16 training path" if requested is Precision.fp16 else
           f"this CPU has no native bf16 (AVX512-BF16 or AMX-BF16), detected: {cpu.via if cpu else 'none'}")
    return PrecisionChoice(Precision.fp32, f"{requested.value} requested; training in fp32 on CPU ({why})")


def count_params(model_dir: str) -> int:
    """Parameter count from safetensors headers (no weights read)."""
    total = 0
    for path in glob.glob(os.path.join(model_dir, "*.safetensors")):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(n))
        for name, meta in header.items():
            if name != "__metadata__":
                numel = 1
                for d in meta["shape"]:
                    numel *= d
                total += numel
    return total


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}"
        n /= 1024


def free_memory(device: torch.device) -> int | None:
    mod = getattr(torch, device.type, None)
    if device.type != "cpu" and mod is not None and hasattr(mod, "mem_get_info"):
        return int(mod.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_fits(model_dir: str, *, dtype: torch.dtype, four_bit: bool, device: torch.device,
               available: int | None) -> None:
    """Fail early, saying how much memory the weights need, rather than dying in the loader."""
    n = count_params(model_dir)
    if not n or available is None:
        return
    per = 0.55 if four_bit else torch.empty((), dtype=dtype).element_size()
    needed = int(n * per * 1.2)          # +20% for LoRA weights, optimizer state, buffers
    if needed > available:
        kind = "4-bit" if four_bit else str(dtype).replace("torch.", "")
        raise ResourceError(
            f"the base model does not fit: {n / 1e9:.2f}B parameters in {kind} need about "
            f"{human(needed)} (weights + 20% headroom) but only {human(available)} is free on "
            f"{device}; use a larger accelerator, more memory, or method qlora")


def load_tokenizer(model_dir: str):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    if tok.pad_token_id is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(model_dir: str, adapter: AdapterSpec, acc: AcceleratorRuntime,
               device: torch.device, dtype: torch.dtype, *, gradient_checkpointing: bool = False):
    """The PEFT-wrapped model on ``device`` in train mode; only LoRA weights are trainable.
    Gradient checkpointing (activation recompute) trades ~1/3 more compute for memory."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype}
    four_bit = adapter.method is Method.qlora
    if four_bit:
        if not acc.supports_4bit:
            raise ConfigError(f"method qlora needs 4-bit weights, which accelerator "
                              f"{acc.vendor}/{acc.product} does not support; use method lora")
        try:
            from transformers import BitsAndBytesConfig
            import bitsandbytes  # noqa: F401
        except ImportError as e:
            raise ConfigError(f"method qlora needs the bitsandbytes package in the worker image "
                              f"({e})") from e
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype if dtype != torch.float32 else torch.bfloat16)
        kwargs["device_map"] = {"": device}
    check_fits(model_dir, dtype=dtype, four_bit=four_bit, device=device,
               available=free_memory(device))
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    except torch.OutOfMemoryError as e:
        raise ResourceError(f"out of memory loading the base model on {device}: {e}") from e
    if four_bit:
        from peft import prepare_model_for_kbit_training
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.to(device)
        if gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    targets = adapter.target_modules
    lora = LoraConfig(r=adapter.rank, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout,
                      target_modules="all-linear" if targets == ["all-linear"] else targets,
                      task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, lora)
    except ValueError as e:
        raise ConfigError(f"adapter target_modules {targets}: {e}") from e
    model.train()          # from_pretrained returns eval mode, which also disables recompute
    return model


def resolved_targets(peft_model) -> list[str]:
    """Leaf module names the adapter covers (``all-linear`` resolved), e.g. ['k_proj', 'q_proj']."""
    cfg = next(iter(peft_model.peft_config.values()))
    t = cfg.target_modules
    names = t if isinstance(t, (set, list, tuple)) else [str(t)]
    return sorted({n.rsplit(".", 1)[-1] for n in names})
