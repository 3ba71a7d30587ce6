#!/usr/bin/env python3
"""The worker's whole training loop (train/loop.py: setup, resume, train, save, finish) in both
data-parallel modes on one accelerator, without Ray: a process group of one, as Ray Train sets up
for a one-device job. For the GPU machine, where Ray is not installed; runs on CPU too (gloo).

1. sharded (FSDP2) from scratch to ``--steps``, checkpointing every ``--interval`` steps;
2. the newest checkpoints removed, then replicated (DDP-free, one process) resuming from the one
   left: the FSDP2-written checkpoint (whole adapter, name-keyed optimizer state) must load into
   the other mode and end at the same step;
3. the final loss equals the uninterrupted run's within ``--tolerance``, and the adapter answers
   the toy questions (greedy decoding).

Prints one line per phase (tokens/s, steps, final loss) and exits non-zero when a check fails.

  python bench/train_loop_modes.py            # cuda if available, else cpu
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "workers"))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from tuneserve_workers.contract import Progress, TrainJobConfig  # noqa: E402
from tuneserve_workers.testing.tiny import TOY_QA, build_tiny_model, greedy_answer, write_toy_dataset  # noqa: E402
from tuneserve_workers.train import loop  # noqa: E402


def process_group(device: torch.device) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def bigger_model(directory: str, hidden: int, layers: int) -> str:
    """The tiny model's tokenizer with a wider, deeper random Qwen2 (still download-free)."""
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    build_tiny_model(directory)
    tok = AutoTokenizer.from_pretrained(directory)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 3,
                      num_hidden_layers=layers, num_attention_heads=hidden // 64,
                      num_key_value_heads=max(1, hidden // 256),
                      max_position_embeddings=512, initializer_range=0.1, tie_word_embeddings=True,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    Qwen2ForCausalLM(cfg).save_pretrained(directory)
    return directory


def config(tmp: Path, model: str, data: str, device: torch.device, mode: str, args) -> dict:
    gpu = device.type == "cuda"
    return {"job_name": "modes", "base_model": {"uri": model},
            "dataset": {"uri": data, "format": "chat", "validation_split": 0.125},
            "adapter": {"rank": 8, "alpha": 16, "dropout": 0.0},
            "training": {"max_steps": args.steps, "learning_rate": 5e-3, "warmup_ratio": 0.05,
                         "global_batch_size": 4, "micro_batch_size": 2, "max_seq_length": 64,
                         "gradient_checkpointing": False, "seed": 7,
                         "precision": "bf16" if gpu else "fp32"},
            "checkpoint": {"uri": str(tmp / "ckpt"), "interval_steps": args.interval,
                           "interval_minutes": None, "keep": 100},
            "output_uri": str(tmp / "out"),
            "accelerator": {"torch_device": device.type, "devices_per_worker": 1 if gpu else 0,
                            "ray_resource": "GPU" if gpu else None, "data_parallel": mode,
                            "distributed_backend": "nccl" if gpu else "gloo"}}


def run_phase(name: str, cfg: dict, device: torch.device) -> Progress:
    t0 = time.perf_counter()
    run = loop.setup({"config": cfg}, loop.Process(0, 1, device))
    first = run.counters.step
    t1 = time.perf_counter()
    loop.train(run)
    t2 = time.perf_counter()
    loop.finish(run)
    progress = Progress.model_validate_json((Path(cfg["checkpoint"]["uri"]) / "progress.json").read_text())
    steps = run.counters.step - first
    print(f"{name}: {cfg['accelerator']['data_parallel']}, steps {first}..{run.counters.step}, "
          f"setup {t1 - t0:.1f}s, train {t2 - t1:.1f}s ({steps / max(t2 - t1, 1e-9):.1f} steps/s), "
          f"final loss {run.counters.loss:.4f}, eval loss {run.counters.eval_loss}, "
          f"{loop.fastpath.fastpath_summary(run.model)}; message: {progress.message}", flush=True)
    return progress


def learned(model_dir: str, adapter: str) -> list[str]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter).eval()
    return [greedy_answer(tuned, tok, q) for q, _ in TOY_QA]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--interval", type=int, default=10)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tolerance", type=float, default=0.02,
                    help="max |final loss resumed - uninterrupted| (the fused and PEFT paths round differently in bf16)")
    args = ap.parse_args()
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    print(f"torch {torch.__version__}, device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}",
          flush=True)
    process_group(device)
    tmp = Path(tempfile.mkdtemp(prefix="modes-"))
    failures = []
    try:
        model = bigger_model(str(tmp / "model"), args.hidden, args.layers)
        data = write_toy_dataset(str(tmp / "toy.jsonl"))
        sharded = run_phase("1 sharded from scratch", config(tmp, model, data, device, "sharded", args), device)
        if not (sharded.state == "Succeeded" and sharded.step == args.steps):
            failures.append(f"sharded run ended {sharded.state} at {sharded.step}")
        keep = args.interval * 2
        for step_dir in (tmp / "ckpt").glob("step-*"):
            if int(step_dir.name.split("-")[1]) > keep:
                shutil.rmtree(step_dir)
        resumed = run_phase(f"2 replicated resuming the sharded checkpoint of step {keep}",
                            config(tmp, model, data, device, "replicated", args), device)
        if not (resumed.resumed_from_step == keep and resumed.step == args.steps and resumed.state == "Succeeded"):
            failures.append(f"resume: from {resumed.resumed_from_step}, ended {resumed.state} at {resumed.step}")
        if abs(resumed.loss - sharded.loss) > args.tolerance:
            failures.append(f"final loss {resumed.loss} resumed vs {sharded.loss} uninterrupted")
        answers = learned(model, str(tmp / "out"))
        print(f"3 answers {answers} (want {[a for _, a in TOY_QA]})", flush=True)
        if answers != [a for _, a in TOY_QA]:
            failures.append(f"the adapter did not learn the toy task: {answers}")
    finally:
        dist.destroy_process_group()
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({"ok": not failures, "failures": failures}))
    return 1 if failures else 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
