"""The training entrypoint end to end: 2 Ray workers over gloo on CPU, run as real subprocesses
(``python -m tuneserve_workers.train --config ...``) against one shared Ray instance."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest

from worker_helpers import entrypoint_env, job_config, run_entrypoint, start_entrypoint, wait_for
from tuneserve_workers.contract import MANIFEST_FILE, AdapterManifest, Progress
from tuneserve_workers.testing.tiny import TOY_QA, greedy_answer, write_toy_dataset

pytestmark = pytest.mark.worker
STEPS = 40


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> str:
    return write_toy_dataset(str(tmp_path_factory.mktemp("toy") / "toy.jsonl"))


def progress_at(ckpt_dir: Path) -> Progress:
    return Progress.model_validate_json((ckpt_dir / "progress.json").read_text())


@pytest.fixture(scope="module")
def uninterrupted(ray_address, tiny_model, toy_data, tmp_path_factory):
    """One complete run of the toy job; several tests read its results."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    cfg = job_config(tmp, model=tiny_model, dataset=toy_data, max_steps=STEPS)
    rc, log = run_entrypoint(cfg, tmp, entrypoint_env(ray_address, tmp))
    assert rc == 0, log[-4000:]
    return tmp


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


def test_adapter_learns_the_toy_task(uninterrupted, tiny_model, toy_data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    progress = progress_at(uninterrupted / "ckpt")
    assert progress.state == "Succeeded" and progress.step == progress.total_steps == STEPS
    assert "fp32 on CPU" in progress.message
    assert progress.tokens_per_second and progress.last_checkpoint.step == STEPS
    manifest = AdapterManifest.model_validate_json((uninterrupted / "out" / MANIFEST_FILE).read_text())
    assert manifest.final_step == STEPS and manifest.tokens_trained > 0
    assert manifest.final_loss < base_loss(tiny_model, toy_data) / 5
    assert manifest.final_eval_loss is not None and manifest.final_eval_loss < 1.0
    assert {"q_proj", "v_proj", "down_proj"} <= set(manifest.target_modules)
    assert manifest.accelerator_hours > 0 and manifest.dataset_digest.startswith("sha256:")
    assert progress.artifact_digest == manifest.adapter_digest

    tok = AutoTokenizer.from_pretrained(tiny_model)
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    base_answers = [greedy_answer(base, tok, q) for q, _ in TOY_QA]
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model),
                                      str(uninterrupted / "out")).eval()
    assert [greedy_answer(tuned, tok, q) for q, _ in TOY_QA] == [a for _, a in TOY_QA]
    assert not any(got == want for got, (_, want) in zip(base_answers, TOY_QA)), base_answers


def test_killed_run_resumes_from_its_last_checkpoint(uninterrupted, ray_address, tiny_model,
                                                     toy_data, tmp_path):
    import ray
    cfg = job_config(tmp_path, model=tiny_model, dataset=toy_data, max_steps=STEPS,
                     ckpt={"interval_steps": 5})
    env = entrypoint_env(ray_address, tmp_path)
    ckpt = tmp_path / "ckpt"
    first = start_entrypoint(cfg, tmp_path, env, "first")
    try:
        wait_for(lambda: any(ckpt.glob("step-*/COMMITTED")) or first.poll() is not None, 180,
                 "the first checkpoint", interval=0.05)
        first.send_signal(signal.SIGKILL)
    finally:
        first.kill()
        first.wait()
    assert first.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    # Ray reaps the dead driver's workers; wait until their CPUs are free again.
    wait_for(lambda: ray.available_resources().get("CPU", 0) >= 2, 60, "the killed job's workers to exit")
    killed = progress_at(ckpt)
    assert killed.state != "Succeeded"
    newest = max(int(p.parent.name.split("-")[1]) for p in ckpt.glob("step-*/COMMITTED"))
    assert 0 < newest < STEPS

    rc, log = run_entrypoint(cfg, tmp_path, env, "second")
    assert rc == 0, log[-4000:]
    progress = progress_at(ckpt)
    assert progress.state == "Succeeded" and progress.resumed_from_step == newest
    assert progress.step == STEPS
    resumed = AdapterManifest.model_validate_json((tmp_path / "out" / MANIFEST_FILE).read_text())
    straight = AdapterManifest.model_validate_json((uninterrupted / "out" / MANIFEST_FILE).read_text())
    assert resumed.final_step == straight.final_step == STEPS
    # Optimizer, scheduler, data position and RNG were restored: same trajectory, same result.
    assert resumed.final_loss == pytest.approx(straight.final_loss, rel=1e-3, abs=1e-4)
    assert resumed.tokens_trained == straight.tokens_trained


def test_malformed_data_fails_with_file_and_line(tiny_model, tmp_path):
    data = tmp_path / "bad.jsonl"
    rows = [json.dumps({"messages": [{"role": "user", "content": "q"},
                                     {"role": "assistant", "content": "a"}]})] * 4
    rows[2] = '{"messages": "not a list"}'
    data.write_text("\n".join(rows) + "\n")
    cfg = job_config(tmp_path, model=tiny_model, dataset=str(data))
    rc, log = run_entrypoint(cfg, tmp_path, entrypoint_env(None, tmp_path), timeout=120)
    assert rc == 1, log[-3000:]
    progress = progress_at(tmp_path / "ckpt")
    assert progress.state == "Failed" and f"{data}:3:" in progress.message
    assert "'messages'" in progress.message


def test_error_inside_a_ray_worker_becomes_a_failed_state(ray_address, tiny_model, toy_data, tmp_path):
    cfg = job_config(tmp_path, model=tiny_model, dataset=toy_data)
    cfg["adapter"]["method"] = "qlora"            # the CPU accelerator has supports_4bit=False
    rc, log = run_entrypoint(cfg, tmp_path, entrypoint_env(ray_address, tmp_path), timeout=180)
    assert rc == 1, log[-3000:]
    progress = progress_at(tmp_path / "ckpt")
    assert progress.state == "Failed"
    assert "qlora" in progress.message and "does not support" in progress.message


def test_same_run_on_object_storage(ray_address, s3_env, tiny_model, toy_data, tmp_path):
    """Model, dataset, checkpoints, progress and output all on a real S3 server (MinIO)."""
    import s3fs
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    fs = s3fs.S3FileSystem(skip_instance_cache=True)       # configured from the environment
    root = f"{s3_env.bucket}/e2e"
    fs.put(tiny_model, f"{root}/models/tiny", recursive=True)
    fs.put_file(toy_data, f"{root}/data/toy.jsonl")
    cfg = job_config(tmp_path, model=f"s3://{root}/models/tiny", dataset=f"s3://{root}/data/",
                     checkpoint=f"s3://{root}/ckpt", output=f"s3://{root}/out", max_steps=10,
                     ckpt={"interval_steps": 5, "keep": 2})
    rc, log = run_entrypoint(cfg, tmp_path, entrypoint_env(ray_address, tmp_path, s3_env.env()))
    assert rc == 0, log[-4000:]

    fs.invalidate_cache()
    progress = Progress.model_validate_json(fs.cat_file(f"{root}/ckpt/progress.json"))
    assert progress.state == "Succeeded" and progress.step == 10
    assert progress.last_checkpoint.uri == f"s3://{root}/ckpt/step-000000010"
    assert fs.exists(f"{root}/ckpt/step-000000005/COMMITTED")
    manifest = AdapterManifest.model_validate_json(fs.cat_file(f"{root}/out/{MANIFEST_FILE}"))
    assert manifest.dataset_uri == f"s3://{root}/data/" and manifest.final_step == 10
    local = tmp_path / "adapter"
    fs.get(f"{root}/out/", str(local), recursive=True)
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(local))
