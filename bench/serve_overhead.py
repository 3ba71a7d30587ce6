"""Serving overhead: the tuneserve Ray Serve app vs plain vLLM, same engine, same model, same load.

One run does, one server at a time (never two engines at once):
  1. plain vLLM:  ``python -m vllm.entrypoints.openai.api_server`` with the engine arguments the
     serve app derives from the same ServeAppConfig (``server.engine_argv``), the adapter given
     with ``--lora-modules``;
  2. the serve app: Ray Serve, ``tuneserve_workers.serve.app:build_app``, adapter from the
     adapters file.
Against each: N concurrent clients send R non-streaming ``/v1/completions`` requests of exactly M
output tokens (``ignore_eos``), every prompt fresh (unique nonce first, so no prefix-cache hits;
prefix caching is also off unless ``--model-config`` turns it on), first with ``model`` = the base
name, then with ``model`` = the adapter. Prints requests/s, output tokens/s, p50/p95 latency, the
serve overhead % against plain vLLM, and the adapter cost % against the base model.

CPU (this repo's CI box), tiny model built locally, an untrained rank-8 adapter:
    PYTHONPATH=workers:operator HF_HUB_OFFLINE=1 python bench/serve_overhead.py --tiny
GPU, a random Llama-3-8B-shaped model and rank-16 adapter built in place (no download):
    TUNESERVE_BENCH_BUILD_ONLY=1 python bench/serve_overhead.py --llama8b /tmp/l8b   # own process
    PYTHONPATH=workers:operator python bench/serve_overhead.py --llama8b /tmp/l8b \\
        --concurrency 64 --requests 384 --max-tokens 256 --prompt-words 256
GPU, a real model and adapter (engine settings as the operator would render them):
    PYTHONPATH=workers:operator python bench/serve_overhead.py --model /models/llama-3-8b \\
        --adapter /adapters/my-lora --concurrency 64 --requests 1024 --max-tokens 256 \\
        --model-config '{"max_lora_rank": 16, "gpu_memory_utilization": 0.9, "device": "cuda"}'
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(REPO, "workers"), os.path.join(REPO, "operator")]

WORDS = ("the quick brown fox jumps over the lazy dog while a small model learns to answer simple "
         "questions about numbers colors animals and the weather in a tiny world").split()
ENV = {"HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"), "VLLM_HOST_IP": "127.0.0.1",
       "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"),
       "TOKENIZERS_PARALLELISM": "false"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, timeout: float, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{url} not ready after {timeout}s")


def prompt(i: int, n_words: int, rng: random.Random) -> str:
    return f"request {i} {rng.random():.12f}: " + " ".join(rng.choice(WORDS) for _ in range(n_words))


async def run_load(url: str, model: str, a, seed: int) -> dict:
    import aiohttp
    rng = random.Random(seed)
    prompts = [prompt(i, a.prompt_words, rng) for i in range(a.requests + a.warmup)]
    lat: list[float] = []
    out_tokens = 0
    errors = 0

    async def one(session, p, record: bool):
        nonlocal out_tokens, errors
        body = {"model": model, "prompt": p, "max_tokens": a.max_tokens, "temperature": 0,
                "ignore_eos": True}
        t0 = time.perf_counter()
        async with session.post(f"{url}/v1/completions", json=body) as r:
            doc = await r.json()
        dt = time.perf_counter() - t0
        if r.status != 200:
            errors += 1
            return
        if record:
            lat.append(dt)
            out_tokens += doc["usage"]["completion_tokens"]

    conn = aiohttp.TCPConnector(limit=a.concurrency)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(600)) as s:
        warm = prompts[:a.warmup]
        await asyncio.gather(*(one(s, p, False) for p in warm))
        queue = list(prompts[a.warmup:])

        async def worker():
            while queue:
                await one(s, queue.pop(), True)
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(a.concurrency)))
        wall = time.perf_counter() - t0
    lat.sort()
    return {"requests": len(lat), "errors": errors, "wall_s": wall,
            "req_per_s": len(lat) / wall, "out_tok_per_s": out_tokens / wall,
            "p50_ms": 1000 * statistics.median(lat),
            "p95_ms": 1000 * lat[min(len(lat) - 1, int(0.95 * len(lat)))]}


def measure(url: str, model: str, a, label: str, results: dict) -> None:
    runs = [asyncio.run(run_load(url, model, a, seed=1000 * r + hash(label) % 997))
            for r in range(a.repeats)]
    best = max(runs, key=lambda r: r["req_per_s"])   # best of repeats: least disturbed by others
    best["all_req_per_s"] = [round(r["req_per_s"], 3) for r in runs]
    results[label] = best
    print(f"  {label:<22} {best['req_per_s']:8.2f} req/s {best['out_tok_per_s']:9.1f} tok/s "
          f"p50 {best['p50_ms']:8.1f} ms p95 {best['p95_ms']:8.1f} ms "
          f"errors {best['errors']} runs {best['all_req_per_s']}", flush=True)


def bench_plain(cfg, model_path: str, adapter: str, a, results: dict) -> None:
    from tuneserve_workers.serve.engine_dtype import resolve_engine_dtype, stored_dtype
    from tuneserve_workers.serve.server import engine_argv
    port = free_port()
    dtype, _ = resolve_engine_dtype(cfg.dtype, stored_dtype(model_path))   # as the serve app does
    argv = [sys.executable, "-m", "vllm.entrypoints.openai.api_server",
            *engine_argv(cfg, model_path, dtype), "--lora-modules", f"bench-adapter={adapter}",
            "--host", "127.0.0.1", "--port", str(port), "--disable-uvicorn-access-log"]
    log = open(os.path.join(a.workdir, "plain-vllm.log"), "wb")
    t0 = time.monotonic()
    proc = subprocess.Popen(argv, env=dict(os.environ, **ENV), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_ready(url, a.start_timeout, proc)
        print(f"plain vLLM ready in {time.monotonic() - t0:.0f}s", flush=True)
        measure(url, cfg.served_model_name, a, "plain vLLM, base", results)
        measure(url, "bench-adapter", a, "plain vLLM, adapter", results)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


def bench_serve(cfg, adapter: str, a, results: dict) -> None:
    import ray
    from ray import serve
    from tuneserve_workers.serve.app import build_app
    adapters_file = os.path.join(a.workdir, "adapters.json")
    with open(adapters_file, "w") as f:
        json.dump([{"name": "bench-adapter", "uri": adapter}], f)
    cfg = cfg.model_copy(update={"adapters_file": adapters_file})
    serve_env = dict(kv.split("=", 1) for kv in a.serve_env)
    direct_port = None
    if a.direct_ingress:
        # What the operator renders for ModelServe spec.ingress: Direct (builders/rayservice.py
        # ingress_env): Ray Serve's throughput-optimized mode, no proxy, the ingress replica
        # itself listens on the one port of [MIN, MAX) (there 8000, here a free one).
        direct_port = free_port()
        serve_env.update({"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
                          "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(direct_port),
                          "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(direct_port + 1)})
    os.environ.update(serve_env)          # proxy/controller/replicas inherit it from the raylet
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    init = {"address": "local", "object_store_memory": a.object_store_mb * 2**20, "include_dashboard": False,
            "log_to_driver": False,
            "runtime_env": {"env_vars": {**ENV, **serve_env,
                                         "PYTHONPATH": os.pathsep.join(
                                             sys.path[:2] + [x for x in [os.environ.get("PYTHONPATH")] if x])}}}
    if a.local_ray:
        init["_node_ip_address"] = "127.0.0.1"
    ray.init(**init)
    port = free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port},
                    logging_config={"enable_access_log": a.serve_access_log})
        t0 = time.monotonic()
        app = build_app(cfg.model_dump(mode="json"))
        if not a.serve_access_log:   # plain vLLM runs with --disable-uvicorn-access-log
            from tuneserve_workers.serve.app import TuneServe, actor_options
            app = TuneServe.options(ray_actor_options=actor_options(cfg),
                                    logging_config={"enable_access_log": False}).bind(
                cfg.model_dump(mode="json"))
        serve.run(app, name="bench", route_prefix="/")
        print(f"serve app ready in {time.monotonic() - t0:.0f}s", flush=True)
        url = f"http://127.0.0.1:{direct_port or port}"
        if direct_port:
            wait_ready(url, 60)
        measure(url, cfg.served_model_name, a, "serve app, base", results)
        measure(url, "bench-adapter", a, "serve app, adapter", results)
    finally:
        serve.shutdown()
        ray.shutdown()


def tiny_artifacts(workdir: str) -> tuple[str, str]:
    """A tiny model built locally and an untrained rank-8 adapter (serving cost is the same)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    from tuneserve_workers.testing.tiny import build_tiny_model
    model = build_tiny_model(os.path.join(workdir, "model"))
    adapter = os.path.join(workdir, "adapter")
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(model),
                          LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                     init_lora_weights=False))
    peft.save_pretrained(adapter)
    return model, adapter


def llama8b_artifacts(directory: str) -> tuple[str, str]:
    """A random-initialised Llama-3-8B-shaped model (bf16 safetensors, 16 GB) with a word-level
    tokenizer of the same vocabulary size, and a random rank-16 adapter on all linear layers:
    the serving cost of the real thing, without a download. Built on the GPU; reused if present."""
    model_dir, adapter_dir = os.path.join(directory, "model"), os.path.join(directory, "adapter")
    if os.path.exists(os.path.join(adapter_dir, "adapter_config.json")):
        return model_dir, adapter_dir
    import torch
    from peft import LoraConfig, get_peft_model
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    vocab_size = 128256
    words = ["<unk>", "<s>", "</s>"] + list(dict.fromkeys(WORDS + ["request"]))
    words += [f"w{i}" for i in range(vocab_size - len(words))]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>")
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
    torch.manual_seed(0)
    torch.set_default_dtype(torch.bfloat16)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = LlamaForCausalLM(cfg)
    model.save_pretrained(model_dir)
    fast.save_pretrained(model_dir)
    peft = get_peft_model(model, LoraConfig(
        r=16, lora_alpha=32, init_lora_weights=False,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    peft.save_pretrained(adapter_dir)
    return model_dir, adapter_dir


def pct(a: float, b: float) -> float:
    return 100.0 * (a - b) / a if a else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="build a tiny model + adapter (CPU)")
    p.add_argument("--llama8b", metavar="DIR",
                   help="build (or reuse) a random Llama-3-8B-shaped model + rank-16 adapter in DIR (GPU)")
    p.add_argument("--model", help="base model directory (or hub id)")
    p.add_argument("--adapter", help="LoRA adapter directory")
    p.add_argument("--model-config", default="{}",
                   help="JSON merged into the ServeAppConfig (engine settings)")
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--warmup", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-words", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--start-timeout", type=float, default=600)
    p.add_argument("--object-store-mb", type=int, default=512)
    p.add_argument("--local-ray", action="store_true", default=True,
                   help="bind Ray to 127.0.0.1 (default)")
    p.add_argument("--serve-env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for the Ray processes (e.g. "
                        "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD=0)")
    p.add_argument("--serve-access-log", action="store_true",
                   help="keep Ray Serve's per-request access log (plain vLLM's is off)")
    p.add_argument("--proxy", dest="direct_ingress", action="store_false",
                   help="serve app behind Ray Serve's HTTP proxy (ModelServe spec.ingress: Proxy); "
                        "default: direct ingress, Ray Serve's throughput-optimized mode (ingress: Direct)")
    p.add_argument("--direct-ingress", dest="direct_ingress", action="store_true", default=True,
                   help=argparse.SUPPRESS)   # the default since the operator renders it
    p.add_argument("--workdir")
    p.add_argument("--json-out", help="write the results as JSON here")
    a = p.parse_args()
    from tuneserve_workers.contract import ServeAppConfig

    a.workdir = a.workdir or tempfile.mkdtemp(prefix="serve-bench-")
    if a.tiny:
        model, adapter = tiny_artifacts(a.workdir)
        defaults = {"max_lora_rank": 8, "max_loras": 2, "dtype": "float32",   # the CPU catalog default
                    "extra_engine_args": {"max_model_len": "512", "max_num_seqs": "32"}}
    elif a.llama8b:
        model, adapter = llama8b_artifacts(a.llama8b)
        defaults = {"max_lora_rank": 16, "max_loras": 2, "device": "cuda", "ray_resource": "GPU",
                    "ray_resources_per_replica": 1, "gpu_memory_utilization": 0.9,
                    "extra_engine_args": {"max_model_len": "4096"}}
        if os.environ.get("TUNESERVE_BENCH_BUILD_ONLY"):
            print(f"built {model} and {adapter}")
            return
    else:
        if not (a.model and a.adapter):
            p.error("--model and --adapter (or --tiny, --llama8b)")
        model, adapter, defaults = a.model, a.adapter, {}
    overrides = json.loads(a.model_config)
    engine_extra = {"enable_prefix_caching": "false", **defaults.get("extra_engine_args", {}),
                    **overrides.pop("extra_engine_args", {})}
    cfg = ServeAppConfig.model_validate({"served_model_name": "base", "base_model": {"uri": model},
                                         **defaults, **overrides,
                                         "extra_engine_args": engine_extra})
    print(f"model {model}\nadapter {adapter}\nengine {cfg.model_dump_json(exclude={'adapters'})}\n"
          f"load: {a.concurrency} concurrent, {a.requests} requests (+{a.warmup} warm-up), "
          f"{a.max_tokens} output tokens each, ~{a.prompt_words}-word fresh prompts, "
          f"best of {a.repeats}; cpus {os.cpu_count()}; serve env {a.serve_env}, "
          f"serve access log {a.serve_access_log}, direct ingress {a.direct_ingress}", flush=True)
    results: dict = {}
    bench_plain(cfg, model, adapter, a, results)
    bench_serve(cfg, adapter, a, results)

    pb, pa = results["plain vLLM, base"], results["plain vLLM, adapter"]
    sb, sa = results["serve app, base"], results["serve app, adapter"]
    print("\nserve app overhead vs plain vLLM (positive = slower):")
    for what, plain, srv in (("base", pb, sb), ("adapter", pa, sa)):
        print(f"  {what:<8} throughput {pct(plain['req_per_s'], srv['req_per_s']):+6.2f}%  "
              f"p50 latency {-pct(plain['p50_ms'], srv['p50_ms']):+6.2f}%  "
              f"p95 latency {-pct(plain['p95_ms'], srv['p95_ms']):+6.2f}%")
    print("adapter cost vs base model (positive = slower):")
    for what, base, ad in (("plain", pb, pa), ("serve", sb, sa)):
        print(f"  {what:<8} throughput {pct(base['req_per_s'], ad['req_per_s']):+6.2f}%  "
              f"p50 latency {-pct(base['p50_ms'], ad['p50_ms']):+6.2f}%")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
