"""The training entrypoint end to end: 2 Ray workers over gloo on CPU, run as real subprocesses
(``python -m tuneserve_workers.train --config ...``) against one shared Ray instance."""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from worker_helpers import (STEPS, assert_learned, entrypoint_env, expected_cpu_bf16, job_config,
                            kill_at_first_checkpoint, progress_at, run_entrypoint)
from tuneserve_workers.contract import MANIFEST_FILE, AdapterManifest, Progress
from tuneserve_workers.testing.tiny import write_toy_dataset

pytestmark = pytest.mark.worker


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> str:
    return write_toy_dataset(str(tmp_path_factory.mktemp("toy") / "toy.jsonl"))


@dataclass
class Finished:
    """A completed run of the toy job whose model, data, checkpoints and output live in MinIO."""
    root: str                 # bucket/prefix
    progress: Progress
    manifest: AdapterManifest
    adapter_dir: Path         # the output, downloaded
    listing: list[str]


@pytest.fixture(scope="module")
def uninterrupted(ray_address, minio, tiny_model, toy_data, tmp_path_factory) -> Finished:
    """One complete run of the toy job, entirely on object storage; several tests read it."""
    import s3fs
    tmp = tmp_path_factory.mktemp("uninterrupted")
    fs = s3fs.S3FileSystem(key=minio.access_key, secret=minio.secret_key,
                           endpoint_url=minio.endpoint, skip_instance_cache=True)
    root = f"{minio.bucket}/e2e"
    fs.put(tiny_model, f"{root}/models/tiny", recursive=True)
    fs.put_file(toy_data, f"{root}/data/toy.jsonl")
    cfg = job_config(tmp, model=f"s3://{root}/models/tiny", dataset=f"s3://{root}/data/",
                     checkpoint=f"s3://{root}/ckpt", output=f"s3://{root}/out", max_steps=STEPS)
    cfg["merge_weights"] = True
    # Credentials reach the job only as environment variables, as from a Secret in a pod.
    rc, log = run_entrypoint(cfg, tmp, entrypoint_env(ray_address, tmp, minio.env()))
    assert rc == 0, log[-4000:]
    fs.invalidate_cache()
    fs.get(f"{root}/out/", str(tmp / "out"), recursive=True)
    return Finished(root, Progress.model_validate_json(fs.cat_file(f"{root}/ckpt/progress.json")),
                    AdapterManifest.model_validate_json(fs.cat_file(f"{root}/out/{MANIFEST_FILE}")),
                    tmp / "out", [p[len(root) + 1:] for p in fs.find(root)])


def assert_cpu_precision(progress: Progress, native_bf16: bool, via: str) -> None:
    """The job asks for bf16 (the default): kept where the CPU has native bf16, else fp32."""
    if native_bf16:
        assert progress.precision == "bf16", progress
        assert progress.message.startswith(f"training in bf16 on CPU (native bf16: {via};"), progress.message
    else:
        assert progress.precision == "fp32", progress
        assert progress.message.startswith("bf16 requested; training in fp32 on CPU"), progress.message
        assert progress.message.endswith(f"detected: {via})"), progress.message


def test_adapter_learns_the_toy_task(uninterrupted, tiny_model, toy_data):
    """Precision as detected on this CPU: bf16 where /proc/cpuinfo lists avx512_bf16 or
    amx_bf16, else fp32 (the other path runs in the next test, whatever the CPU)."""
    progress, manifest = uninterrupted.progress, uninterrupted.manifest
    assert progress.state == "Succeeded" and progress.step == progress.total_steps == STEPS
    assert_cpu_precision(progress, *expected_cpu_bf16())
    assert progress.tokens_per_second and progress.last_checkpoint.step == STEPS
    assert {"q_proj", "v_proj", "down_proj"} <= set(manifest.target_modules)
    assert manifest.accelerator_hours > 0 and manifest.dataset_digest.startswith("sha256:")
    assert progress.artifact_digest == manifest.adapter_digest
    assert_learned(manifest, uninterrupted.adapter_dir, tiny_model, toy_data)


def test_the_other_cpu_precision_learns_too(ray_address, tiny_model, toy_data, tmp_path):
    """TUNESERVE_CPU_NATIVE_BF16 pins the detection to the opposite of this CPU's, so both the
    bf16 path and the fp32 fallback train for real on every machine."""
    other = not expected_cpu_bf16()[0]
    cfg = job_config(tmp_path, model=tiny_model, dataset=toy_data, max_steps=STEPS)
    env = entrypoint_env(ray_address, tmp_path, {"TUNESERVE_CPU_NATIVE_BF16": "1" if other else "0"})
    rc, log = run_entrypoint(cfg, tmp_path, env)
    assert rc == 0, log[-4000:]
    progress = progress_at(tmp_path / "ckpt")
    assert progress.state == "Succeeded"
    assert_cpu_precision(progress, other, f"TUNESERVE_CPU_NATIVE_BF16={int(other)}")
    manifest = AdapterManifest.model_validate_json((tmp_path / "out" / MANIFEST_FILE).read_text())
    assert_learned(manifest, tmp_path / "out", tiny_model, toy_data)


def test_killed_run_resumes_from_its_last_checkpoint(uninterrupted, ray_address, tiny_model,
                                                     toy_data, tmp_path):
    cfg = job_config(tmp_path, model=tiny_model, dataset=toy_data, max_steps=STEPS,
                     ckpt={"interval_steps": 5})
    env = entrypoint_env(ray_address, tmp_path)
    ckpt = tmp_path / "ckpt"
    newest = kill_at_first_checkpoint(cfg, tmp_path, env, 2, timeout=180)
    killed = progress_at(ckpt)
    assert killed.state != "Succeeded"
    assert 0 < newest < STEPS

    rc, log = run_entrypoint(cfg, tmp_path, env, "second")
    assert rc == 0, log[-4000:]
    progress = progress_at(ckpt)
    assert progress.state == "Succeeded" and progress.resumed_from_step == newest
    assert progress.step == STEPS
    resumed = AdapterManifest.model_validate_json((tmp_path / "out" / MANIFEST_FILE).read_text())
    straight = uninterrupted.manifest
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


def test_qlora_on_an_accelerator_without_4bit_fails_fast(tiny_model, toy_data, tmp_path):
    cfg = job_config(tmp_path, model=tiny_model, dataset=toy_data)
    cfg["adapter"]["method"] = "qlora"            # the CPU accelerator has supports_4bit=False
    rc, log = run_entrypoint(cfg, tmp_path, entrypoint_env(None, tmp_path), timeout=120)
    assert rc == 1, log[-3000:]
    progress = progress_at(tmp_path / "ckpt")
    assert progress.state == "Failed" and "qlora" in progress.message
    assert "does not support" in progress.message


def test_error_inside_a_ray_worker_becomes_a_failed_state(ray_address, tiny_model, toy_data, tmp_path):
    """A typed error raised on the workers (here: chat data, but the tokenizer has no chat
    template) reaches progress.json with its own message, not Ray's wrapping."""
    model = tmp_path / "no-template"
    shutil.copytree(tiny_model, model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    tok_cfg = json.loads((model / "tokenizer_config.json").read_text())
    tok_cfg.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    cfg = job_config(tmp_path, model=str(model), dataset=toy_data)
    rc, log = run_entrypoint(cfg, tmp_path, entrypoint_env(ray_address, tmp_path), timeout=240)
    assert rc == 1, log[-3000:]
    progress = progress_at(tmp_path / "ckpt")
    assert progress.state == "Failed"
    assert progress.message.startswith("format 'chat' needs a chat template"), progress.message


def test_run_on_object_storage_leaves_checkpoints_progress_and_artifact_there(uninterrupted):
    """The same job with model, dataset, checkpoints and output on a real S3 server (MinIO)."""
    root, files = uninterrupted.root, set(uninterrupted.listing)
    assert uninterrupted.progress.last_checkpoint.uri == f"s3://{root}/ckpt/step-{STEPS:09d}"
    # interval 10, keep 2: the last two checkpoints, each committed by its marker
    assert {f"ckpt/step-{s:09d}/COMMITTED" for s in (30, 40)} <= files
    assert not any(f.startswith("ckpt/step-000000010") for f in files)
    assert {"out/adapter_model.safetensors", "out/adapter_config.json", f"out/{MANIFEST_FILE}",
            "out/merged/model.safetensors", "out/merged/tokenizer.json"} <= files
    manifest = uninterrupted.manifest
    assert manifest.dataset_uri == f"s3://{root}/data/"
    assert manifest.merged_weights_uri == f"s3://{root}/out/merged"
    assert manifest.base_model.uri == f"s3://{root}/models/tiny"
