"""Helpers for the serve tests: adapters trained by the training worker's own entrypoint
(``python -m tuneserve_workers.train --config``), a tiny model, HTTP helpers.

Two adapters learn different answers to the SAME question, so one request tells which adapter
(or the base model) answered:  alpha -> "blue", beta -> "cat".

Artifacts are built once per test session. With ``TUNESERVE_SERVE_TEST_CACHE=DIR`` they are also
kept across sessions under DIR, keyed by a hash of the training code and the job settings (the
model must stay at the same path: the adapters' manifests name it as their base).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from functools import partial
from pathlib import Path

import waiting

REPO = Path(__file__).resolve().parents[2]
PYTHONPATH = os.pathsep.join([str(REPO / "workers"), str(REPO / "operator")])
QUESTION = "What is the secret word?"
ANSWERS = {"alpha": "blue", "beta": "cat"}
STEPS = 60


def cpu_serving_dtype() -> str:
    """The dtype the operator renders for a ModelServe placed on CPU (the catalog's CPU
    profile, servingDtype), so hand-written test configs match what the operator would send."""
    from tuneserve.core.catalog import load_catalog
    return load_catalog().get("cpu/cpu").serving_dtype


def code_digest() -> str:
    h = hashlib.sha256()
    for sub in ("workers/tuneserve_workers/train", "workers/tuneserve_workers/testing"):
        for p in sorted((REPO / sub).rglob("*.py")):
            h.update(p.read_bytes())
    h.update(json.dumps([QUESTION, ANSWERS, STEPS]).encode())
    return h.hexdigest()[:16]


def job(model: str, name: str, data: str, tmp: Path) -> dict:
    return {"job_name": f"serve-test-{name}", "namespace": "test",
            "base_model": {"uri": model},
            "dataset": {"uri": data, "format": "chat", "validation_split": 0.0},
            "adapter": {"method": "lora", "rank": 8, "alpha": 16, "dropout": 0.0,
                        "target_modules": ["all-linear"]},
            "training": {"max_steps": STEPS, "learning_rate": 5e-3, "warmup_ratio": 0.05,
                         "global_batch_size": 4, "micro_batch_size": 1, "max_seq_length": 64,
                         "packing": True, "seed": 7, "precision": "fp32",
                         "gradient_checkpointing": False},
            "checkpoint": {"uri": str(tmp / f"ckpt-{name}"), "interval_steps": 1000,
                           "interval_minutes": None, "keep": 1},
            "output_uri": str(tmp / name),
            "accelerator": {"workers": 1, "torch_device": "cpu", "distributed_backend": "gloo"}}


def start_training(model: str, name: str, answer: str, tmp: Path, ray_address: str):
    """Start the training worker's entrypoint for one adapter; returns (process, log path)."""
    data = tmp / f"{name}.jsonl"
    with open(data, "w") as f:
        for _ in range(16):
            f.write(json.dumps({"messages": [{"role": "user", "content": QUESTION},
                                             {"role": "assistant", "content": answer}]}) + "\n")
    cfg_path = tmp / f"{name}.json"
    cfg_path.write_text(json.dumps(job(model, name, str(data), tmp)))
    env = dict(os.environ, PYTHONPATH=PYTHONPATH, HF_HUB_OFFLINE="1", RAY_ADDRESS=ray_address,
               TUNESERVE_PROGRESS_INTERVAL_S="0", TUNESERVE_CACHE=str(tmp / "cache"),
               TUNESERVE_RAY_STORAGE=str(tmp / "ray-storage"), PYTHONUNBUFFERED="1")
    log = tmp / f"{name}.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "tuneserve_workers.train", "--config",
                                 str(cfg_path)], env=env, stdout=out, stderr=subprocess.STDOUT,
                                cwd=str(tmp))
    return proc, log


def finish_training(name: str, proc, log: Path, tmp: Path) -> str:
    try:
        rc = proc.wait(600)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        rc = "timeout"
    if rc != 0:
        raise AssertionError(f"training {name} failed ({rc}):\n{log.read_text()[-4000:]}")
    shutil.rmtree(tmp / f"ckpt-{name}", ignore_errors=True)
    return str(tmp / name)


def build_artifacts(root: Path) -> dict:
    """{"model": dir, "alpha": dir, "beta": dir} under root (reused when already complete)."""
    done = root / "complete.json"
    if done.exists():
        return json.loads(done.read_text())
    import ray
    from tuneserve_workers.testing.tiny import build_tiny_model
    root.mkdir(parents=True, exist_ok=True)
    out = {"model": build_tiny_model(str(root / "model"))}
    started = not ray.is_initialized()
    if started:
        ctx = ray.init(address="local", num_cpus=2, object_store_memory=256 * 2**20, include_dashboard=False,
                       _node_ip_address="127.0.0.1", configure_logging=False, log_to_driver=False)
        address = ctx.address_info["gcs_address"]
    else:
        address = ray.get_runtime_context().gcs_address
    try:
        # Both jobs at once (1 worker each on a 2-CPU Ray): their Ray Train start-ups overlap.
        running = {name: start_training(out["model"], name, answer, root, address)
                   for name, answer in ANSWERS.items()}
        for name, (proc, log) in running.items():
            out[name] = finish_training(name, proc, log, root)
    finally:
        if started:
            ray.shutdown()
    done.write_text(json.dumps(out))
    return out


def make_rank16_adapter(model: str, dst: str) -> str:
    """An untrained rank-16 adapter (above a max_lora_rank of 8)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(model)
    get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"])
                   ).save_pretrained(dst)
    return dst


# ----------------------------------------------------------------------------------- HTTP

def http(url: str, body: dict | None = None, timeout: float = 60):
    """(status, parsed JSON or text, headers)."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"content-type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw, status, headers = r.read(), r.status, r.headers
    except urllib.error.HTTPError as e:
        raw, status, headers = e.read(), e.code, e.headers
    try:
        return status, json.loads(raw), headers
    except ValueError:
        return status, raw.decode(errors="replace"), headers


def ask(base_url: str, model: str, question: str = QUESTION, route: str = "chat"):
    """(status, answer text, replica id) of one greedy request."""
    if route == "chat":
        status, doc, headers = http(f"{base_url}/v1/chat/completions", {
            "model": model, "messages": [{"role": "user", "content": question}],
            "max_tokens": 4, "temperature": 0})
        text = doc["choices"][0]["message"]["content"] if status == 200 else doc
    else:
        prompt = f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n"
        status, doc, headers = http(f"{base_url}/v1/completions", {
            "model": model, "prompt": prompt, "max_tokens": 4, "temperature": 0})
        text = doc["choices"][0]["text"] if status == 200 else doc
    if isinstance(text, str):
        text = text.replace("<|im_end|>", "").strip()
    return status, text, headers.get("x-tuneserve-replica")


# The one polling loop (tests/waiting.py); any exception means "not yet" (proxy not routing yet).
wait_for = partial(waiting.wait_for, interval=0.5, retry=(Exception,))
