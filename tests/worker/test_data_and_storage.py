"""Data rendering, loss masking, packing, checkpoint publication and clear failures (no Ray)."""
from __future__ import annotations

import json
import os

import pytest

from tuneserve_workers.contract import AcceleratorRuntime, AdapterSpec, DatasetSpec, Method
from tuneserve_workers.train.checkpoint import MARKER, CheckpointStore
from tuneserve_workers.train.data import (IGNORE, build_sequences, prepare, read_dataset,
                                          tokenize_row)
from tuneserve_workers.train.errors import ConfigError, DataError, ResourceError, StorageError
from tuneserve_workers.train.storage import Location, local_path

pytestmark = pytest.mark.worker


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from tuneserve_workers.train.model import load_tokenizer
    return load_tokenizer(tiny_model)


def test_loss_covers_only_the_assistant_turn(tokenizer):
    row = {"messages": [{"role": "system", "content": "Be brief."},
                        {"role": "user", "content": "What is 2+2?"},
                        {"role": "assistant", "content": "four"}]}
    ids, labels = tokenize_row(tokenizer, row, DatasetSpec(uri="x").format)
    learned = tokenizer.decode([t for t, lab in zip(ids, labels) if lab != IGNORE])
    assert learned.strip() == "four<|im_end|>"
    assert "2+2" not in learned and "brief" not in learned
    ins = tokenize_row(tokenizer, {"instruction": "What is 2+2?", "response": "four"},
                       DatasetSpec(uri="x", format="instruction").format)
    assert tokenizer.decode([t for t, lab in zip(*ins) if lab != IGNORE]).strip() == "four<|im_end|>"


def test_packed_examples_do_not_attend_to_each_other(tiny_model, tokenizer):
    """The logits of an example are the same alone and packed after another one."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    fmt = DatasetSpec(uri="x").format
    a = tokenize_row(tokenizer, {"messages": [{"role": "user", "content": "What color is the sky?"},
                                              {"role": "assistant", "content": "blue"}]}, fmt)
    b = tokenize_row(tokenizer, {"messages": [{"role": "user", "content": "What is 2+2?"},
                                              {"role": "assistant", "content": "four"}]}, fmt)
    packed = build_sequences([a, b], max_len=64, pack=True, pad_id=tokenizer.pad_token_id)
    assert len(packed.input_ids) == 1 and packed.position_ids[0][len(a[0])] == 0
    with torch.no_grad():
        together = model(input_ids=torch.tensor(packed.input_ids),
                         position_ids=torch.tensor(packed.position_ids), use_cache=False).logits[0]
        alone = model(input_ids=torch.tensor([b[0]])).logits[0]
    start = len(a[0])
    torch.testing.assert_close(together[start:start + len(b[0])], alone, atol=1e-4, rtol=1e-4)


def test_validation_split_is_held_out(tokenizer, tmp_path):
    from tuneserve_workers.testing.tiny import write_toy_dataset
    spec = DatasetSpec(uri=write_toy_dataset(str(tmp_path / "d.jsonl"), repeat=4),
                       validation_split=0.25)
    data = prepare(read_dataset(spec), spec, tokenizer, max_len=64, pack=False, seed=1)
    assert data.validation is not None and len(data.validation.input_ids) == 4
    assert len(data.train.input_ids) == 12 and data.digest.startswith("sha256:")


@pytest.mark.parametrize("line,expected", [
    ('{"messages": [{"role": "user", "content": "hi"}', "invalid JSON"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    ('{"text": "wrong format"}', "'messages'"),
])
def test_malformed_row_names_file_and_line(tmp_path, line, expected):
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"messages": [{"role": "user", "content": "q"},
                                    {"role": "assistant", "content": "a"}]})
    path.write_text(f"{good}\n{good}\n{line}\n{good}\n")
    with pytest.raises(DataError) as err:
        read_dataset(DatasetSpec(uri=str(path)))
    assert f"{path}:3:" in str(err.value) and expected in str(err.value)


def test_missing_dataset_names_the_uri(tmp_path):
    with pytest.raises(StorageError, match="nowhere.jsonl"):
        read_dataset(DatasetSpec(uri=str(tmp_path / "nowhere.jsonl")))


def test_pvc_uri_maps_to_the_mount_convention(monkeypatch):
    monkeypatch.delenv("TUNESERVE_PVC_ROOT", raising=False)
    assert local_path("pvc://datasets/team/a.jsonl") == "/mnt/pvc/datasets/team/a.jsonl"
    monkeypatch.setenv("TUNESERVE_PVC_ROOT", "/srv")
    assert local_path("pvc://ckpt/job1") == "/srv/ckpt/job1"
    assert local_path("s3://bucket/key") is None


def test_model_that_does_not_fit_says_how_much_it_needs(tiny_model):
    import torch
    from tuneserve_workers.train.model import check_fits
    with pytest.raises(ResourceError) as err:
        check_fits(tiny_model, dtype=torch.float32, four_bit=False, device=torch.device("cpu"),
                   available=1 << 20)
    msg = str(err.value)
    assert "need about" in msg and "MiB" in msg and "1.0 MiB is free" in msg


def test_qlora_without_4bit_support_is_refused(tiny_model):
    import torch
    from tuneserve_workers.train.model import load_model
    with pytest.raises(ConfigError, match="does not support"):
        load_model(tiny_model, AdapterSpec(method=Method.qlora), AcceleratorRuntime(),
                   torch.device("cpu"), torch.float32)


# ------------------------------------------------------------------------- checkpoints

def _save(store: CheckpointStore, tmp, step: int):
    src = tmp / f"src-{step}"
    (src / "adapter").mkdir(parents=True)
    (src / "adapter" / "w.bin").write_bytes(os.urandom(4096))
    (src / "state.pt").write_bytes(json.dumps({"step": step}).encode())
    return store.save(step, str(src))


@pytest.fixture(params=["local", "s3"])
def ckpt_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "ckpts")
    minio = request.getfixturevalue("s3_env")
    return f"s3://{minio.bucket}/unit-{os.urandom(4).hex()}/ckpts"


def test_newest_corrupt_checkpoint_is_skipped(ckpt_uri, tmp_path):
    store = CheckpointStore(ckpt_uri, keep=3)
    for step in (10, 20, 30):
        _save(store, tmp_path, step)
    # Truncate a file of the newest checkpoint behind its marker's back.
    victim = Location(ckpt_uri).child("step-000000030", "adapter", "w.bin")
    victim.write_bytes(victim.read_bytes()[:100])
    got = store.latest_good(str(tmp_path / "fetched"))
    assert got is not None and got.step == 20
    assert json.loads((tmp_path / "fetched" / "state.pt").read_text()) == {"step": 20}


def test_checkpoint_without_marker_is_ignored_and_old_ones_pruned(ckpt_uri, tmp_path):
    store = CheckpointStore(ckpt_uri, keep=2)
    for step in (5, 10, 15):
        _save(store, tmp_path, step)
    assert [c.step for c in store.committed()] == [15, 10]          # keep=2
    Location(ckpt_uri).child("step-000000015", MARKER).rm()         # an upload cut short
    assert store.latest_good(str(tmp_path / "f")).step == 10


def test_hf_model_comes_from_the_local_cache_when_offline(tiny_model, tmp_path, monkeypatch):
    """hf:// goes through huggingface_hub; with HF_HUB_OFFLINE=1 only the local cache is used."""
    import shutil
    from tuneserve_workers.train.storage import materialize_model
    cache = tmp_path / "hub"
    rev = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / "models--tuneserve--tiny"
    shutil.copytree(tiny_model, repo / "snapshots" / rev)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(rev)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    import huggingface_hub.constants as hc
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    path = materialize_model("hf://tuneserve/tiny", None)
    assert os.path.samefile(path, repo / "snapshots" / rev)
    with pytest.raises(StorageError, match=r"hf://tuneserve/absent.*HF_HUB_OFFLINE"):
        materialize_model("hf://tuneserve/absent", None)
