#!/usr/bin/env python3
"""LoRA training-step throughput: plain transformers+PEFT loop vs the worker's step (fastpath).

Builds a random-initialised model straight on the device (no downloads), adds LoRA with PEFT and
trains it on the same fixed random batches from the same initial adapter weights with:

  plain   transformers + PEFT: ``model(input_ids, labels=...).loss``, backward, clip 1.0, fused AdamW
          (eager, SDPA attention, no activation checkpointing) - the baseline of the notes.
  worker  the worker's ``TrainStep`` (train/loop.py: fastpath.causal_lm_loss, clip 1.0, AdamW,
          scheduler) on a model passed through ``fastpath.optimize_for_training`` - variants below
          differ only in the options given to optimize_for_training / the batch.

Both run under bf16 autocast with fp32 LoRA weights, as the worker does. Prints a table (tokens/s,
MFU, peak memory allocated/reserved), the loss curves side by side with the max abs difference,
and the ratio to the same-run plain loop. Warm-up steps (compilation included) are not timed.

MFU: LoRA trains no base weights, so a step costs forward + input-gradient = 2x forward:
  FLOPs/token = 2 * (2*N + 4*L*S*d)   (N: non-embedding base parameters incl. the LM head,
  L layers, S sequence length, d hidden; attention counted without the causal half), against
  989 TFLOP/s bf16 dense (H100 SXM). The same formula as shared/notes/performance.md.

  python bench/train_throughput.py                 # Llama-3-8B shape on one CUDA GPU
  python bench/train_throughput.py --tiny          # tiny config, CPU or GPU, a smoke test
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Optional

os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workers"))

from tuneserve_workers.train import fastpath  # noqa: E402

PEAK_BF16 = 989e12
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GIB = 1024 ** 3


def load_train_step():
    """The worker's TrainStep; the bench says when it had to use its own copy of the semantics."""
    try:
        from tuneserve_workers.train.loop import TrainStep
        return TrainStep, "tuneserve_workers.train.loop.TrainStep"
    except Exception as e:  # e.g. the worker's other dependencies are missing on this machine
        print(f"note: cannot import loop.TrainStep ({type(e).__name__}: {e}); using bench copy")

        class BenchStep:
            def __init__(self, model, optimizer, scheduler, *, grad_accum, clip, amp_dtype=None):
                self.model, self.opt, self.sched, self.clip, self.amp = model, optimizer, scheduler, clip, amp_dtype
                self.params = [p for p in model.parameters() if p.requires_grad]

            def __call__(self, mb):
                dev = self.params[0].device
                mb = {k: v.to(dev) for k, v in mb.items()}
                with torch.autocast(dev.type, dtype=self.amp, enabled=self.amp is not None):
                    s, n = fastpath.causal_lm_loss(self.model, mb)
                (s / n).backward()
                torch.nn.utils.clip_grad_norm_(self.params, self.clip)
                self.opt.step(), self.sched.step(), self.opt.zero_grad(set_to_none=True)
                return {"loss": (s / n).item()}
        return BenchStep, "bench copy of TrainStep semantics"


def save_for_peers(model, cfg, save_dir: Path) -> None:
    """The random base model and a word-level tokenizer over its vocabulary, for train_peers.py."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    save_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(save_dir)
    vocab = {f"w{i}": i for i in range(cfg.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", pad_token="w1", eos_token="w2",
                            bos_token="w3").save_pretrained(save_dir)


def build(args, device, dtype, save_dir: Optional[Path] = None):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    if args.tiny:
        cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, vocab_size=1000, max_position_embeddings=4096,
                          tie_word_embeddings=False)
    else:   # Llama-3-8B shape
        cfg = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                          num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192,
                          rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(args.seed)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(dtype)       # init directly in bf16 on the device (buffers stay fp32)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    if save_dir:
        save_for_peers(model, cfg, save_dir)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS, task_type="CAUSAL_LM")
    model = get_peft_model(model, lora)   # LoRA weights in fp32 (PEFT's default), like the worker
    model.train()
    n_all = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    n_emb = model.get_base_model().model.embed_tokens.weight.numel()
    n_lora = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return model, cfg, n_all - n_emb, n_lora, n_all


def make_batches(args, cfg, device, batch, packed=False):
    g = torch.Generator().manual_seed(args.seed + 1)
    out = []
    for _ in range(args.distinct_batches):
        ids = torch.randint(0, cfg.vocab_size, (batch, args.seq), generator=g)
        b = {"input_ids": ids, "labels": ids.clone()}
        if packed == "many":   # 32..512-token documents, a different split in every row
            rows = []
            for _ in range(batch):
                lens, left = [], args.seq
                while left > 0:
                    lens.append(min(left, int(torch.randint(32, 513, (1,), generator=g))))
                    left -= lens[-1]
                rows.append(torch.cat([torch.arange(n) for n in lens]))
            pos = torch.stack(rows)
            b["labels"][pos == 0] = -100    # no label across a document start
            b["position_ids"] = pos
        elif packed:   # documents of 1/4, 1/2, 1/4 of the row; no label across a document start
            q = args.seq // 4
            lens = [q, 2 * q, args.seq - 3 * q]
            pos = torch.cat([torch.arange(n) for n in lens]).expand(batch, -1).contiguous()
            b["labels"][:, [q, 3 * q]] = -100
            b["position_ids"] = pos
        out.append({k: v.to(device) for k, v in b.items()})
    return out


class Lora:
    """Initial adapter weights, restored before every run so all runs start identically."""

    def __init__(self, model):
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.init = [p.detach().clone() for p in self.params]

    def reset(self):
        with torch.no_grad():
            for p, v in zip(self.params, self.init):
                p.copy_(v)
                p.grad = None


def effective_attention_len(batches) -> float:
    """Mean keys a token attends over in the FLOP count: sum(L_i^2) / sum(L_i) over documents
    (the full row, S, when a row is one document - the convention of the FLOPs/token line)."""
    num = den = 0.0
    for b in batches:
        for row in b["position_ids"].cpu():
            starts = (row == 0).nonzero().flatten().tolist() + [row.numel()]
            for a, e in zip(starts[:-1], starts[1:]):
                num, den = num + (e - a) ** 2, den + (e - a)
    return num / den


def check_swiglu_kernel(device):
    """The Triton SwiGLU backward against its torch reference at the benchmark's shape."""
    from tuneserve_workers.train import kernels
    if kernels.triton is None:
        return "SwiGLU kernel: Triton missing, the worker uses Inductor's"
    g = torch.Generator(device=device).manual_seed(0)
    gu = torch.randn(4096, 2 * 14336, device=device, dtype=torch.bfloat16, generator=g)
    dy = torch.randn(4096, 14336, device=device, dtype=torch.bfloat16, generator=g)
    got, ref = kernels.swiglu_backward_cuda(gu, dy), kernels.swiglu_backward_reference(gu, dy)
    err = (got.float() - ref.float()).abs().max().item()
    return f"SwiGLU kernel vs torch reference (bf16 4096x2x14336): max |diff| {err:.3g}"


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def run(name, step_fn, batches, args, device, tokens_per_step, n_steps):
    """Run n_steps; time the last args.steps; returns dict with losses, timing, memory."""
    gc.collect()
    context_gib = None
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        free, total = torch.cuda.mem_get_info()
        context_gib = (total - free - torch.cuda.memory_reserved()) / GIB   # CUDA context, cuBLAS workspaces
    losses, t0, t_warm = [], time.perf_counter(), None
    warm = n_steps - args.steps
    ev0 = ev1 = None
    for i in range(n_steps):
        if i == warm:
            sync(device)
            t_warm = time.perf_counter()
            if device.type == "cuda":
                ev0, ev1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                ev0.record()
        losses.append(step_fn(batches[i % len(batches)]))
    if ev1 is not None:
        ev1.record()
    sync(device)
    t_end = time.perf_counter()
    wall = t_end - t_warm
    r = {"name": name, "losses": [float(x) for x in losses], "timed_steps": args.steps,
         "warmup_steps": warm, "warmup_s": t_warm - t0, "step_s": wall / args.steps,
         "tokens_per_s": tokens_per_step * args.steps / wall}
    if ev0 is not None:
        r["gpu_step_s"] = ev0.elapsed_time(ev1) / 1e3 / args.steps
        r["max_alloc_gib"] = torch.cuda.max_memory_allocated() / GIB
        r["max_reserved_gib"] = torch.cuda.max_memory_reserved() / GIB
        r["context_gib"] = context_gib
    return r


def plain_runner(model, params, args, device, amp):
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=device.type == "cuda" or None)

    def step(b):
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = model(input_ids=b["input_ids"], labels=b["labels"],
                        **({"position_ids": b["position_ids"]} if "position_ids" in b else {}))
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return out.loss.item()
    return step, opt


def worker_runner(TrainStep, model, params, args, device, amp, cuda_graphs=False, parallel=None):
    if parallel is not None:   # the worker's data-parallel path (train/parallel.py), world size 1
        from tuneserve_workers.contract import DataParallel
        from tuneserve_workers.train.parallel import setup_parallel
        ensure_process_group(device)
        parallel = setup_parallel(model, DataParallel(parallel), device, param_dtype=amp, wrap_single=True)
        params = [p for p in model.parameters() if p.requires_grad]   # FSDP2 replaced them
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=device.type == "cuda" or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    kw = {"cuda_graphs": True} if cuda_graphs else {}
    if parallel is not None:
        kw["parallel"] = parallel
    ts = TrainStep(model, opt, sched, grad_accum=1, clip=1.0, amp_dtype=amp, **kw)
    return (lambda b: ts(b)["loss"]), opt


def ensure_process_group(device):
    """A process group of one (NCCL on CUDA, gloo on CPU), as Ray Train sets up for one worker."""
    import socket
    import torch.distributed as dist
    if dist.is_initialized():
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def nosync_runner(model, params, args, device, amp):
    """TrainStep's arithmetic (loss_sum / label tokens, clip 1.0, AdamW, scheduler) without its
    per-step host syncs (.item() of the metrics): how much the loop's bookkeeping costs."""
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, fused=device.type == "cuda" or None)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    def step(b):
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            s, n = fastpath.causal_lm_loss(model, b)
        (s / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step(), sched.step(), opt.zero_grad(set_to_none=True)
        return (s / n).detach()
    return step, opt


def profile_step(step_fn, batch, out_dir, device, label):
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(2):
            step_fn(batch)
        sync(device)
    ka = prof.key_averages()
    table, key = None, None
    for key in (("self_device_time_total", "self_cuda_time_total") if device.type == "cuda"
                else ("self_cpu_time_total",)):
        try:
            table = ka.table(sort_by=key, row_limit=45, max_name_column_width=80)
            break
        except Exception:
            continue
    table = table or ka.table(row_limit=45)
    (out_dir / f"profile_{label}.txt").write_text(table)
    print(f"--- profile ({label}, 2 steps), top kernels by {key} ---")
    print("\n".join(table.splitlines()[:32]))


def fmt_table(results, flops_per_token, base, device):
    lines = []
    hdr = f"{'run':<42} {'tok/s':>9} {'MFU':>6} {'step s':>7} {'alloc GiB':>9} {'resv GiB':>8} {'x plain':>7}"
    lines += [hdr, "-" * len(hdr)]
    for r in results:
        if "error" in r:
            lines.append(f"{r['name']:<42} FAILED: {r['error'][:80]}")
            continue
        fpt = r.get("flops_per_token", flops_per_token)
        mfu = r["tokens_per_s"] * fpt / PEAK_BF16 if device.type == "cuda" else float("nan")
        ratio = r["tokens_per_s"] / base["tokens_per_s"] if base else float("nan")
        lines.append(f"{r['name']:<42} {r['tokens_per_s']:>9,.0f} {mfu:>6.3f} {r['step_s']:>7.3f} "
                     f"{r.get('max_alloc_gib', float('nan')):>9.1f} {r.get('max_reserved_gib', float('nan')):>8.1f} "
                     f"{ratio:>7.2f}")
    return "\n".join(lines)


def loss_table(plain, others, n):
    lines = []
    names = [o["name"] for o in others]
    lines.append(f"{'step':>4} {'plain':>9} " + " ".join(f"{nm[:16]:>16}" for nm in names))
    for i in range(n):
        row = f"{i:>4} {plain['losses'][i]:>9.4f} "
        row += " ".join(f"{o['losses'][i]:>16.4f}" if i < len(o.get("losses", [])) else f"{'-':>16}" for o in others)
        lines.append(row)
    return "\n".join(lines)


def operator_settings(overrides: Optional[dict], batch: int, args) -> Optional[dict]:
    """The operator's rendering and sizing of this variant's FineTuneJob (operator_sizing.py)."""
    if overrides is None:
        return None
    try:
        import operator_sizing
        cfg, decision = operator_sizing.rendered(batch, args.seq, overrides)
    except Exception as e:   # the operator package cannot import here, or would not place it
        return {"error": f"{type(e).__name__}: {e}"}
    return {"predicted_gib": decision.memory.total_gib, "breakdown": decision.memory.breakdown(),
            "placement": decision.reason, "recompute": cfg.training.gradient_checkpointing,
            "dropout": cfg.adapter.dropout,
            "base_precision": cfg.training.base_precision.value if cfg.training.base_precision else None}


def run_peer(peer: str, name: str, args, save_dir: Path, out_dir: Path, recompute: bool = False) -> dict:
    """One peer in its own process (train_peers.py); its log goes to out_dir/peer_<peer>.log."""
    import subprocess
    cmd = [sys.executable, str(Path(__file__).with_name("train_peers.py")), "--peer", peer, "--model", str(save_dir),
           "--batch", str(args.batch), "--seq", str(args.seq), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--lr", str(args.lr), "--seed", str(args.seed),
           "--distinct-batches", str(args.distinct_batches)] + (["--recompute"] if recompute else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.peer_timeout_s)
    log = proc.stdout + proc.stderr
    (out_dir / f"peer_{peer}.log").write_text(log)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("PEER_RESULT ")), None)
    if line is None:
        tail = [ln for ln in log.strip().splitlines() if ln.strip()][-3:]
        raise RuntimeError(f"{peer} exited {proc.returncode}: " + " | ".join(tail))
    r = json.loads(line[len("PEER_RESULT "):])
    r["name"] = name
    r["context_gib"] = None   # the peer's view of the device includes this process's memory
    return r


def loss_check(r: dict, base: dict, tolerance: float) -> tuple[float, bool, str]:
    """(max |loss - plain|, within tolerance, the tolerance in words): ``tolerance`` absolute,
    plus ``rel_tolerance`` x the plain loss at each step where the variant sets one."""
    rel = r.get("rel_tolerance") or 0.0
    pairs = list(zip(r["losses"], base["losses"]))
    diff = max(abs(a - b) for a, b in pairs)
    ok = all(abs(a - b) <= tolerance + rel * abs(b) for a, b in pairs)
    return diff, ok, f"{tolerance}" + (f" + {rel:g} x plain loss" if rel else "")


def sizing_table(results) -> list[str]:
    """The operator's predicted memory per device against the measured device peak
    (PyTorch's peak reserved + the CUDA context), for the runs the operator sized."""
    rows = [r for r in results if "error" not in r and r.get("sizing") and "predicted_gib" in r["sizing"]
            and r.get("max_reserved_gib") is not None]
    if not rows:
        return []
    out = ["", "memory per device: operator's sizing vs measured (peak reserved + CUDA context):",
           f"{'run':<42} {'predicted':>9} {'measured':>8} {'pred/meas':>9}  within 15%"]
    own = next((r["context_gib"] for r in rows if r.get("context_gib") is not None), 0.0)
    for r in rows:   # peers run in processes of their own: the CUDA context measured here
        measured = r["max_reserved_gib"] + (r["context_gib"] if r.get("context_gib") is not None else own)
        ratio = r["sizing"]["predicted_gib"] / measured
        out.append(f"{r['name']:<42} {r['sizing']['predicted_gib']:>9.1f} {measured:>8.1f} {ratio:>9.2f}  "
                   f"{'yes' if abs(ratio - 1) <= 0.15 else 'NO'}   ({r['sizing']['breakdown']})")
    return out


# The worker-step variants: "name" ({b}: batch), "opts" for optimize_for_training, and what else
# differs from the default: packed data ("many": 32-512-token documents), CUDA graph, gradient
# checkpointing, LoRA dropout, batch, Inductor config, whether the loss is held to the plain loop.
VARIANTS: dict = {
    "fast": {"name": "worker b{b} fused+compile, no recompute", "operator": {"training.gradientCheckpointing": False}},
    "fast-cudnn": {"name": "worker b{b} fused+compile, cuDNN attn", "opts": {"attention": "cudnn"}},
    "fast-flash": {"name": "worker b{b} fused+compile, flash attn", "opts": {"attention": "flash"}},
    "fast-fusedadd": {"name": "worker b{b} fused+compile, LoRA add fused", "opts": {"lora_add": "add"}},
    "fast-fusedadd-emu": {"name": "worker b{b} fused+compile, LoRA add fused, bf16 casts kept",
                          "opts": {"lora_add": "add"}, "inductor": {"emulate_precision_casts": True}},
    "fast-inplace-fwd": {"name": "worker b{b} fused+compile, in-place LoRA add fwd only",
                         "opts": {"lora_add": "inplace-fwd"}},
    "fast-addmm": {"name": "worker b{b} fused+compile, LoRA add in addmm", "opts": {"lora_add": "addmm"}},
    "fast-swiglu-compiled": {"name": "worker b{b} fused+compile, SwiGLU bwd by Inductor",
                             "opts": {"swiglu_kernel": False}},
    "fast-graph": {"name": "worker b{b} fused+compile+CUDA graph", "graph": True},
    "fast-ckpt": {"name": "worker b{b} fused+compile, grad checkpointing", "ckpt": True,
                  "operator": {"training.gradientCheckpointing": True}},
    "fast-autotune": {"name": "worker b{b} fused+compile, max-autotune GEMMs",
                      "inductor": {"max_autotune": True, "max_autotune_gemm": True}},
    "fast-nosync": {"name": "what-if: fast, no per-step host sync"},
    "fast-cdt": {"name": "worker b{b} fused+compile, coord-descent",
                 "inductor": {"coordinate_descent_tuning": True}},
    "fused-eager": {"name": "worker b{b} fused, no compile", "opts": {"compile": False}},
    "peft-compiled": {"name": "worker b{b} PEFT layers compiled+CE", "opts": {"fuse_layers": False}},
    "packed": {"name": "worker b{b} packed 3 docs (default)", "packed": True},
    "packed-mask": {"name": "worker b{b} packed 3 docs, dense doc mask", "packed": True,
                    "opts": {"varlen": False}},
    # what a graph captures (static shapes): the dense mask
    "packed-graph": {"name": "worker b{b} packed 3 docs, mask+CUDA graph", "packed": True, "graph": True,
                     "opts": {"varlen": False}},
    "packed-many": {"name": "worker b{b} packed 32-512 tok docs (default)", "packed": "many"},
    "packed-many-mask": {"name": "worker b{b} packed 32-512 tok docs, mask", "packed": "many",
                         "opts": {"varlen": False}},
    "dropout": {"name": "worker b{b} fused+compile, dropout .05", "dropout": 0.05, "compare": False,
                "operator": {"training.gradientCheckpointing": False, "lora.dropout": 0.05}},
    # What a user gets: the FineTuneJob API defaults for this model on one H200, placed and
    # rendered by the operator's own code (operator_sizing.py); recompute and dropout come from
    # the rendered worker config, and the peak memory is held to the placement's sizing.
    "defaults": {"name": "worker b{b} FineTuneJob defaults (operator)", "operator": {}},
    # The frozen base in FP8 (fastpath/fp8.py). It frees the bf16 base weights: it runs last.
    # Loss tolerance (fixed before the first GPU run; bench/README.md): every step within
    # --tolerance + 10 % of the plain loop's loss at that step.
    "fp8": {"name": "worker b{b} fused+compile, FP8 base", "opts": {"base_precision": "fp8"},
            "operator": {"training.basePrecision": "fp8"}, "rel_tolerance": 0.10, "last": True},
    # Peers and the 4-bit path, each in a process of its own (train_peers.py) on the same saved
    # model, initial adapter and batches.
    "liger": {"name": "peer: HF+PEFT+Liger kernel b{b}", "peer": "liger"},
    "unsloth": {"name": "peer: Unsloth b{b}", "peer": "unsloth"},
    "qlora": {"name": "worker b{b} QLoRA NF4 (bitsandbytes)", "peer": "qlora", "compare": "report",
              "operator": {"method": "qlora", "training.gradientCheckpointing": False}},
    "batch4": {"name": "worker b{b} fused+compile (default)", "batch": 4, "compare": False},
    "plain-again": {"name": "plain b{b} again (noise floor)"},
    # The worker's data-parallel path at world size 1 (train/parallel.py): DDP around the default
    # fast path, and FSDP2 per decoder layer on PEFT's layers (fused layers off in that mode, as
    # the worker does). FSDP2 shards the model in place for good: keep dp-fsdp2 last.
    "dp-ddp": {"name": "worker b{b} fused+compile in DDP (world 1)", "parallel": "replicated"},
    "peft-eager": {"name": "worker b{b} PEFT layers, no compile", "opts": {"fuse_layers": False, "compile": False}},
    "dp-fsdp2-compiled": {"name": "worker b{b} FSDP2 sharded (world 1), PEFT layers compiled",
                          "opts": {"fuse_layers": False, "compile": True}, "parallel": "sharded"},
    "dp-fsdp2": {"name": "worker b{b} FSDP2 sharded (world 1), PEFT layers",
                 "opts": {"fuse_layers": False, "compile": False}, "parallel": "sharded"},
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tiny", action="store_true", help="tiny config (CPU or GPU smoke test)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=None, help="timed steps per run (default 12, tiny 3)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 8, tiny 2)")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--distinct-batches", type=int, default=2, help="batches cycled (so the loss can fall)")
    ap.add_argument("--tolerance", type=float, default=0.02, help="max |loss diff| allowed vs plain")
    ap.add_argument("--variants", default="fast,packed,packed-many,fast-swiglu-compiled,packed-mask,fast-graph,fast-ckpt,plain-again",
                    help="worker-step variants to run after the plain loop, in order")
    ap.add_argument("--profile", action="store_true", help="torch.profiler over 2 steps of plain and fast")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "bench" / "out"))
    ap.add_argument("--budget-s", type=float, default=float("inf"), help="skip variants after this many seconds")
    ap.add_argument("--peer-dir", default="/tmp/tuneserve-bench-model", help="where peers read the saved model")
    ap.add_argument("--peer-timeout-s", type=float, default=480)
    args = ap.parse_args()
    t_start = time.perf_counter()
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if args.tiny:
        args.seq = min(args.seq, 128)
    args.steps = args.steps or (3 if args.tiny else 12)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.tiny else 8)
    n_steps = args.warmup + args.steps
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = torch.bfloat16 if cuda else torch.float32
    amp = torch.bfloat16 if cuda else None

    import peft
    import transformers
    env = (f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
           f"device {torch.cuda.get_device_name() if cuda else 'cpu'}")
    print(env, flush=True)
    TrainStep, step_src = load_train_step()
    print(f"worker step: {step_src}", flush=True)

    variants = [v for v in args.variants.split(",") if v]
    variants = ([v for v in variants if not VARIANTS.get(v, {}).get("last")]
                + [v for v in variants if VARIANTS.get(v, {}).get("last")])   # fp8 frees the bf16 base
    save_dir = Path(args.peer_dir) if any(VARIANTS.get(v, {}).get("peer") for v in variants) else None
    model, cfg, n_params, n_lora, n_all = build(args, device, dtype, save_dir)
    L, d = cfg.num_hidden_layers, cfg.hidden_size
    attn = 4 * L * args.seq * d
    flops_per_token = 2 * (2 * n_params + attn)
    print(f"model: {n_all / 1e9:.3f}B base params ({n_params / 1e9:.3f}B non-embedding), {n_lora / 1e6:.1f}M LoRA; "
          f"batch {args.batch} x seq {args.seq}; FLOPs/token = 2*(2*{n_params:.4g} + 4*{L}*{args.seq}*{d}) = "
          f"{flops_per_token:.4g}; build {time.perf_counter() - t_start:.0f}s", flush=True)
    if cuda:
        try:
            hd = d // cfg.num_attention_heads
            q = torch.randn(args.batch, cfg.num_attention_heads, args.seq, hd, device=device, dtype=dtype)
            kv = torch.randn(args.batch, cfg.num_key_value_heads, args.seq, hd, device=device, dtype=dtype)
            names = {0: "math", 1: "flash", 2: "efficient", 3: "cudnn", 4: "overrideable"}
            ch = torch._fused_sdp_choice(q, kv, kv, is_causal=True, enable_gqa=True)
            print(f"SDPA backend for causal GQA (enable_gqa) at these shapes: {names.get(int(ch), ch)}", flush=True)
            del q, kv
        except Exception as e:
            print(f"SDPA backend check failed: {e}")
    kernel_check = check_swiglu_kernel(device) if cuda else "SwiGLU kernel: CPU run, not checked"
    print(kernel_check, flush=True)
    params = [p for p in model.parameters() if p.requires_grad]
    lora = Lora(model)
    if save_dir:   # the initial adapter, by name, so every peer starts from it
        torch.save({n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad},
                   save_dir / "adapter_init.pt")
    batches = make_batches(args, cfg, device, args.batch)
    tokens = args.batch * args.seq
    results = []

    def report():
        base = next((r for r in results if r["name"].startswith("plain") and "error" not in r), None)
        text = [env, f"worker step: {step_src}", kernel_check,
                f"FLOPs/token {flops_per_token:.4g} (2x(2N+4LSd), N={n_params:.4g}); peak {PEAK_BF16 / 1e12:.0f} TFLOP/s",
                f"batch {args.batch} x seq {args.seq}, {args.warmup} warm-up + {args.steps} timed steps, "
                f"lr {args.lr}, {args.distinct_batches} distinct batches cycled, seed {args.seed}", "",
                fmt_table(results, flops_per_token, base, device)]
        if base:
            comp = [r for r in results if r is not base and "error" not in r and r.get("compare", True)]
            if comp:
                text += ["", "loss per step (same init, same batches):", loss_table(base, comp, n_steps), ""]
                for r in comp:
                    diff, ok, tol = loss_check(r, base, args.tolerance)
                    r["max_abs_loss_diff"] = diff
                    verdict = "reported, not bounded" if r.get("compare") == "report" else (
                        f"tolerance {tol}: {'OK' if ok else 'EXCEEDS'}")
                    r["loss_ok"] = ok or r.get("compare") == "report"
                    text.append(f"max |loss - plain| over {len(r['losses'])} steps, {r['name']}: {diff:.4f} ({verdict})")
            # packed rows have no plain-loop twin: hold each packed run to the first one of its data
            firsts: dict = {}
            for r in results:
                if "error" in r or not r.get("packed"):
                    continue
                ref = firsts.setdefault(r["packed"], r)
                if ref is not r:
                    diff = max(abs(a - b) for a, b in zip(r["losses"], ref["losses"]))
                    ok = "OK" if diff <= args.tolerance else "EXCEEDS"
                    text.append(f"max |loss - {ref['name']}|, {r['name']}: {diff:.4f} "
                                f"(tolerance {args.tolerance}: {ok})")
            drop = base["losses"][0] - min(base["losses"])
            text.append(f"plain loss fell by {drop:.3f} over the run (curves must move for the check to mean much)")
        text += sizing_table(results)
        for r in results:
            if r.get("sizing"):
                text.append(f"operator, {r['name']}: {r['sizing'].get('placement') or r['sizing'].get('error')}")
        s = "\n".join(text)
        (out_dir / "train_throughput.txt").write_text(s + "\n")
        (out_dir / "train_throughput.json").write_text(json.dumps(
            {"env": env, "args": vars(args), "flops_per_token": flops_per_token, "results": results}, indent=1))
        return s

    # (a) plain loop ------------------------------------------------------------------------
    lora.reset()
    step, opt = plain_runner(model, params, args, device, amp)
    results.append(run(f"plain b{args.batch} (HF+PEFT eager)", step, batches, args, device, tokens, n_steps))
    if args.profile:
        profile_step(step, batches[0], out_dir, device, "plain")
    del step, opt
    print(report(), flush=True)

    # (b) the worker's step, variants ----------------------------------------------------------
    for v in variants:
        if time.perf_counter() - t_start > args.budget_s:
            results.append({"name": v, "error": "skipped: time budget"})
            continue
        opts = dict(compile=cuda, attention="auto", fuse_layers=True)
        bsz, name = args.batch, None
        saved_inductor: dict = {}
        spec = VARIANTS.get(v)
        if spec is None:
            print(f"unknown variant {v}")
            continue
        opts.update(spec.get("opts", {}))
        bsz = spec.get("batch", bsz)
        packed, graph, ckpt = spec.get("packed", False), spec.get("graph", False), spec.get("ckpt", False)
        dropout, compare = spec.get("dropout", 0.0), spec.get("compare", True)
        sizing = operator_settings(spec.get("operator"), bsz, args)
        if v == "defaults":    # what the operator rendered, or the run says why not
            if sizing is None or "error" in sizing:
                results.append({"name": spec["name"].format(b=bsz), "variant": v, "error": (sizing or {}).get("error", "?")})
                continue
            ckpt, dropout = sizing["recompute"], sizing["dropout"]
        inductor_cfg = spec.get("inductor", {})
        name = spec["name"].format(b=bsz)
        if not cuda:
            opts["compile"] = False
            if v == "fast-cudnn" or graph:
                continue
            name = name.replace("fused+compile", "fused (CPU: no compile)")
        try:
            fastpath.reset_fastpath(model)
            lora.reset()
            step = opt = None
            if spec.get("peer"):
                if not cuda:
                    continue
                r = run_peer(spec["peer"], name, args, save_dir, out_dir,
                             recompute=bool(sizing and sizing.get("recompute")))
            elif v == "plain-again":
                step, opt = plain_runner(model, params, args, device, amp)
                r = run(name, step, batches, args, device, tokens, n_steps)
            else:
                if inductor_cfg:
                    import torch._inductor.config as ic
                    saved_inductor = {k: getattr(ic, k) for k in inductor_cfg if hasattr(ic, k)}
                    missing = [k for k in inductor_cfg if not hasattr(ic, k)]
                    if missing:
                        raise RuntimeError(f"torch._inductor.config lacks {missing}")
                    for key, val in inductor_cfg.items():
                        setattr(ic, key, val)
                if ckpt:     # the FineTuneJob default; the fused layers honour it (recompute)
                    model.get_base_model().gradient_checkpointing_enable(
                        gradient_checkpointing_kwargs={"use_reentrant": False})
                fastpath.optimize_for_training(model, device=device.type, force=not cuda, **opts)
                st = getattr(model, fastpath._STATE_ATTR)
                if dropout:
                    for p in st.layers:
                        for l in (*p.qkv, p.o, *p.gu, p.down):
                            l.dropout = dropout
                    fastpath.reset_fastpath(model)   # rebuild the compiled fns with the new meta
                    setattr(model, fastpath._STATE_ATTR, st)
                    st.layer_fns = []
                    fns = {}
                    for p in st.layers:
                        meta = fastpath._layer_meta(p)
                        if meta not in fns:
                            fn = fastpath._make_layer_fn(st, meta)
                            fns[meta] = torch.compile(fn, dynamic=False) if opts["compile"] else fn
                        st.layer_fns.append(fns[meta])
                at_rest = torch.cuda.memory_allocated() / GIB if cuda else float("nan")
                print(f"[{name}] {fastpath.fastpath_summary(model)}; allocated before the run {at_rest:.2f} GiB", flush=True)
                bb = batches if (bsz == args.batch and not packed) else make_batches(args, cfg, device, bsz, packed)
                if v == "fast-nosync":
                    step, opt = nosync_runner(model, params, args, device, amp)
                elif graph:
                    step, opt = worker_runner(TrainStep, model, params, args, device, amp, cuda_graphs=True)
                else:
                    step, opt = worker_runner(TrainStep, model, params, args, device, amp,
                                              parallel=spec.get("parallel"))
                r = run(name, step, bb, args, device, bsz * args.seq, n_steps)
                if packed:   # attention within documents only: count its FLOPs at the mean doc span
                    s_eff = effective_attention_len(bb)
                    r["flops_per_token"] = 2 * (2 * n_params + 4 * L * s_eff * d)
                    r["attention_len"] = s_eff
                if v == "fast" and args.profile:
                    profile_step(step, bb[0], out_dir, device, "fast")
            r["compare"] = compare if not packed else False
            r["sizing"], r["rel_tolerance"] = sizing, spec.get("rel_tolerance")
            r["packed"] = packed
            r["variant"] = v
            results.append(r)
            del step, opt
        except Exception as e:  # keep going: one failing variant must not lose the others
            traceback.print_exc()
            results.append({"name": name or v, "variant": v, "error": f"{type(e).__name__}: {e}"})
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if ckpt:
            model.get_base_model().gradient_checkpointing_disable()
        if saved_inductor:               # the next variants compile with the defaults again
            import torch._inductor.config as ic
            for key, val in saved_inductor.items():
                setattr(ic, key, val)
        print(report(), flush=True)
        print(f"[elapsed {time.perf_counter() - t_start:.0f}s]", flush=True)
    # the exit code judges the worker's default configuration; other rows are for comparison
    failed = [r for r in results if r.get("variant") in ("fast", "defaults", "fp8") and
              ("error" in r or not r.get("loss_ok", True))]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
