#!/usr/bin/env python3
"""One peer of bench/train_throughput.py, in a process of its own: Liger kernel, Unsloth, or the
worker's QLoRA path. train_throughput.py saves its random model and initial adapter and starts
this once per peer, so each peer trains the same model from the same adapter on the same batches,
and the patches a peer applies to transformers (Liger's and Unsloth's are process-wide) cannot
touch the other runs. Prints one JSON line, ``PEER_RESULT {...}``, with the fields of
train_throughput.run() plus the CUDA context's memory.

  liger    HF + PEFT with liger-kernel's RoPE, SwiGLU, RMSNorm and fused linear cross-entropy
  unsloth  Unsloth's FastLanguageModel (its own LoRA kernels and fused CE), no recompute
  qlora    the worker's 4-bit path: model.load_model (bitsandbytes NF4, double quant), then
           fastpath.optimize_for_training and the worker's TrainStep, as a QLoRA job runs it
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def parse() -> argparse.Namespace:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peer", choices=("liger", "unsloth", "qlora"), required=True)
    ap.add_argument("--model", required=True, help="directory with the saved model, tokenizer, adapter_init.pt")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--distinct-batches", type=int, default=2)
    ap.add_argument("--recompute", action="store_true", help="qlora: activation checkpointing on")
    return ap.parse_args()


def load_unsloth(args):
    import unsloth  # noqa: F401 - must come before transformers: it patches it on import
    from unsloth import FastLanguageModel
    import torch
    model, _ = FastLanguageModel.from_pretrained(model_name=args.model, max_seq_length=args.seq,
                                                 dtype=torch.bfloat16, load_in_4bit=False)
    return FastLanguageModel.get_peft_model(
        model, r=16, lora_alpha=32, lora_dropout=0.0, bias="none", target_modules=TARGETS,
        use_gradient_checkpointing=False, random_state=args.seed)


def load_liger(args):
    import torch
    from liger_kernel.transformers import apply_liger_kernel_to_llama
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    apply_liger_kernel_to_llama(rope=True, swiglu=True, rms_norm=True, cross_entropy=False,
                                fused_linear_cross_entropy=True)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.bfloat16, attn_implementation="sdpa").cuda()
    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                            task_type="CAUSAL_LM"))


def load_qlora(args):
    import torch
    from tuneserve_workers.contract import AcceleratorRuntime, AdapterSpec, Method
    from tuneserve_workers.train.model import load_model
    adapter = AdapterSpec(method=Method.qlora, rank=16, alpha=32, dropout=0.0, target_modules=TARGETS)
    acc = AcceleratorRuntime(vendor="nvidia", product="h200", torch_device="cuda", supports_4bit=True)
    model = load_model(args.model, adapter, acc, torch.device("cuda"), torch.bfloat16,
                       gradient_checkpointing=args.recompute)
    return fastpath.optimize_for_training(model, device="cuda", compile=True)


def restore_adapter(model, path: Path) -> int:
    """The parent's initial adapter weights, by parameter name (same PEFT naming everywhere)."""
    import torch
    init = torch.load(path, map_location="cpu")
    n = 0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and name in init:
                p.copy_(init[name].to(p.dtype))
                n += 1
    return n


def main() -> int:
    args = parse()
    model = {"unsloth": load_unsloth, "liger": load_liger, "qlora": load_qlora}[args.peer](args)
    import torch
    device = torch.device("cuda")
    restored = restore_adapter(model, Path(args.model) / "adapter_init.pt")
    params = [p for p in model.parameters() if p.requires_grad]
    batches = tt.make_batches(args, model.config, device, args.batch)
    if args.peer == "qlora":
        TrainStep, _ = tt.load_train_step()
        step, _ = tt.worker_runner(TrainStep, model, params, args, device, torch.bfloat16)
    else:
        step, _ = tt.plain_runner(model, params, args, device, torch.bfloat16)
    free, total = torch.cuda.mem_get_info()
    context_gib = (total - free - torch.cuda.memory_reserved()) / tt.GIB
    r = tt.run(args.peer, step, batches, args, device, args.batch * args.seq, args.warmup + args.steps)
    r.update(context_gib=context_gib, adapter_tensors_restored=restored, trainable=sum(p.numel() for p in params))
    print("PEER_RESULT " + json.dumps(r), flush=True)
    return 0


sys.path.insert(0, str(Path(__file__).resolve().parent))
if __name__ == "__main__":
    if "unsloth" in sys.argv:
        import unsloth  # noqa: F401 - first of all: it patches transformers and torch on import
    import train_throughput as tt  # noqa: E402
    from tuneserve_workers.train import fastpath  # noqa: E402
    TARGETS = tt.TARGETS
    sys.exit(main())
