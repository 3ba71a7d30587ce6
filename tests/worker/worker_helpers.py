"""Helpers for the worker tests (imported by conftest.py and the test modules)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
STEPS = 40                      # steps of the toy job in the training tests
PYTHONPATH = os.pathsep.join([str(REPO / "workers"), str(REPO / "operator")])


from waiting import wait_for  # noqa: E402,F401  (the one polling loop: tests/waiting.py)


def cpu_flags() -> set[str]:
    """The CPU's feature flags as the kernel reports them (/proc/cpuinfo), read independently of
    torch's probes so tests can check the worker's own detection against them."""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def expected_cpu_bf16() -> tuple[bool, str]:
    """(native, via) as the worker should detect them: AMX-BF16 or AVX512-BF16 is native bf16."""
    flags = cpu_flags()
    if "amx_bf16" in flags:
        return True, "AMX-BF16"
    if "avx512_bf16" in flags:
        return True, "AVX512-BF16"
    return False, "none"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def job_config(tmp: Path, *, model: str, dataset: str, checkpoint: str | None = None,
               output: str | None = None, **training) -> dict:
    """A small 2-worker CPU job over the toy task."""
    t = {"max_steps": 40, "learning_rate": 5e-3, "warmup_ratio": 0.05, "global_batch_size": 4,
         "micro_batch_size": 1, "max_seq_length": 64, "packing": True, "seed": 7}
    ckpt = {"interval_steps": 10, "interval_minutes": None, "keep": 2}
    ckpt.update(training.pop("ckpt", {}))
    t.update(training)
    return {"job_name": "tiny", "namespace": "test",
            "base_model": {"uri": model},
            "dataset": {"uri": dataset, "format": "chat", "validation_split": 0.125},
            "adapter": {"method": "lora", "rank": 8, "alpha": 16, "dropout": 0.0,
                        "target_modules": ["all-linear"]},
            "training": t,
            "checkpoint": {"uri": checkpoint or str(tmp / "ckpt"), **ckpt},
            "output_uri": output or str(tmp / "out"),
            "accelerator": {"workers": 2, "torch_device": "cpu", "distributed_backend": "gloo"}}


def entrypoint_env(ray_address: str | None, tmp: Path, extra: dict | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=PYTHONPATH, HF_HUB_OFFLINE="1",
               TUNESERVE_PROGRESS_INTERVAL_S="0", TUNESERVE_CACHE=str(tmp / "cache"),
               TUNESERVE_RAY_STORAGE=str(tmp / "ray-storage"), PYTHONUNBUFFERED="1",
               TUNESERVE_FORWARD_ENV="1")    # our test Ray cluster was started without them
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    else:
        env.pop("RAY_ADDRESS", None)
    env.update(extra or {})
    return env


def start_entrypoint(cfg: dict, tmp: Path, env: dict, name: str = "run") -> subprocess.Popen:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(cfg))
    log = open(tmp / f"{name}.log", "wb")
    return subprocess.Popen([sys.executable, "-m", "tuneserve_workers.train", "--config", str(path)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=str(tmp))


def run_entrypoint(cfg: dict, tmp: Path, env: dict, name: str = "run", timeout: float = 240):
    """Run to completion; returns (exit code, log text)."""
    proc = start_entrypoint(cfg, tmp, env, name)
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"entrypoint {name} did not finish in {timeout}s:\n"
                             + (tmp / f"{name}.log").read_text()[-4000:])
    return rc, (tmp / f"{name}.log").read_text()


def progress_at(ckpt_dir: Path):
    from tuneserve_workers.contract import Progress
    return Progress.model_validate_json((ckpt_dir / "progress.json").read_text())


def base_loss(tiny_model: str, dataset: str) -> float:
    """Mean per-token loss of the untrained model on the toy task's answers."""
    import torch
    from transformers import AutoModelForCausalLM
    from tuneserve_workers.contract import DatasetSpec
    from tuneserve_workers.train.data import collate, prepare, read_dataset
    from tuneserve_workers.train.fastpath import causal_lm_loss
    from tuneserve_workers.train.model import load_tokenizer
    spec = DatasetSpec(uri=dataset)
    data = prepare(read_dataset(spec), spec, load_tokenizer(tiny_model), max_len=64, pack=True, seed=0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    with torch.no_grad():
        s, n = causal_lm_loss(model, collate(data.train, list(range(len(data.train.input_ids))),
                                             data.info["pad_id"]))
    return (s / n).item()


def assert_learned(manifest, adapter_dir: Path, tiny_model: str, toy_data: str) -> None:
    """The adapter answers every toy question; the base model answers none."""
    from peft import PeftModel
    from tuneserve_workers.testing.tiny import TOY_QA, greedy_answer
    from transformers import AutoModelForCausalLM, AutoTokenizer
    assert manifest.final_step == STEPS and manifest.tokens_trained > 0
    assert manifest.final_loss < base_loss(tiny_model, toy_data) / 5
    assert manifest.final_eval_loss is not None and manifest.final_eval_loss < 1.0
    tok = AutoTokenizer.from_pretrained(tiny_model)
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    base_answers = [greedy_answer(base, tok, q) for q, _ in TOY_QA]
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model),
                                      str(adapter_dir)).eval()
    assert [greedy_answer(tuned, tok, q) for q, _ in TOY_QA] == [a for _, a in TOY_QA]
    assert not any(got == want for got, (_, want) in zip(base_answers, TOY_QA)), base_answers




def kill_at_first_checkpoint(cfg: dict, tmp: Path, env: dict, cpus: int, timeout: float = 300) -> int:
    """Start the entrypoint, SIGKILL it once a checkpoint is committed, wait until Ray has reaped
    its workers (``cpus`` free again); return the newest committed step."""
    import ray
    ckpt = Path(cfg["checkpoint"]["uri"])
    first = start_entrypoint(cfg, tmp, env, "first")
    try:
        wait_for(lambda: any(ckpt.glob("step-*/COMMITTED")) or first.poll() is not None, timeout,
                 "the first checkpoint", interval=0.05)
        first.send_signal(signal.SIGKILL)
    finally:
        first.kill()
        first.wait()
    assert first.returncode == -signal.SIGKILL, (tmp / "first.log").read_text()[-3000:]
    wait_for(lambda: ray.available_resources().get("CPU", 0) >= cpus, 60, "the killed job's workers to exit")
    return max(int(p.parent.name.split("-")[1]) for p in ckpt.glob("step-*/COMMITTED"))
