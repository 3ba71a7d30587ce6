"""The adapter reconciler on its own (no engine, no Ray): desired file -> load/unload calls,
validation messages, failure isolation, retries. Runs in about a second."""
from __future__ import annotations

import asyncio
import json
import os
from datetime import datetime, timezone

import pytest

from tuneserve_workers.contract import MANIFEST_FILE, AdapterManifest, ModelSource
from tuneserve_workers.serve.adapters import AdapterReconciler, parse_desired

pytestmark = pytest.mark.worker
BASE = ModelSource(uri="/models/base")


class FakeEngine:
    def __init__(self, fail: set[str] = ()):
        self.loaded: dict[str, str] = {}
        self.calls: list[tuple] = []
        self.fail = set(fail)
        self.load_hook = lambda name: None

    async def load(self, name, path):
        self.calls.append(("load", name))
        self.load_hook(name)
        if name in self.fail:
            raise RuntimeError("engine says no")
        self.loaded[name] = path

    async def unload(self, name):
        self.calls.append(("unload", name))
        self.loaded.pop(name)


def adapter(tmp, name, rank=8, base=None):
    d = tmp / name
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"r": rank, "rank_pattern": {}}))
    if base:
        (d / MANIFEST_FILE).write_text(AdapterManifest(
            job_name="j", base_model=ModelSource(uri=base), method="lora", rank=rank, alpha=16,
            target_modules=["q_proj"], dataset_uri="d", dataset_digest="sha256:x", final_step=1,
            tokens_trained=1, accelerator_hours=0, adapter_digest="sha256:y",
            created_at=datetime.now(timezone.utc)).model_dump_json())
    return str(d)


def write(path, items):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump([{"name": n, "uri": u} for n, u in items.items()], f)
    os.replace(tmp, path)


def states(rec):
    return {a["name"]: (a["state"], a["message"]) for a in rec.public()}


def test_reconciler_follows_the_file_and_isolates_failures(tmp_path):
    a = adapter(tmp_path, "a", base="/models/base/")
    b = adapter(tmp_path, "b")
    big = adapter(tmp_path, "big", rank=32)
    other = adapter(tmp_path, "other", base="hf://org/other")
    f = tmp_path / "adapters.json"
    engine = FakeEngine(fail={"boom"})
    rec = AdapterReconciler(engine, base=BASE, max_rank=16, adapters_file=str(f), retry_after=0)

    async def scenario():
        write(f, {"a": a, "b": b})
        assert await rec.sync()
        assert engine.loaded == {"a": a, "b": b}
        assert not await rec.sync()                     # unchanged file: nothing to do
        write(f, {"a": a, "c": b, "big": big, "other": other, "gone": str(tmp_path / "nope"),
                  "boom": b})
        await rec.sync()
        assert set(engine.loaded) == {"a", "c"}
        st = states(rec)
        assert st["a"] == ("Loaded", None) and st["c"] == ("Loaded", None)
        assert st["big"][0] == "Failed" and "rank 32 exceeds" in st["big"][1]
        assert st["other"][0] == "Failed" and "hf://org/other" in st["other"][1]
        assert st["gone"][0] == "Failed" and "not found" in st["gone"][1]
        assert st["boom"] == ("Failed", "RuntimeError: engine says no")
        assert rec.counts() == {"Loading": 0, "Loaded": 2, "Failed": 4}
        seen_during_retry = []
        engine.load_hook = lambda name: seen_during_retry.append(states(rec)[name])
        await rec.sync()                                 # a retry that fails again
        assert ("Failed", "RuntimeError: engine says no") in seen_during_retry
        assert states(rec)["boom"] == ("Failed", "RuntimeError: engine says no")
        engine.fail.clear()
        await rec.sync()                                 # retry_after=0: failed ones retried
        assert all(s[0] == "Failed" for s in seen_during_retry), "a retry never shows Loading"
        assert states(rec)["boom"] == ("Loaded", None)
        f.write_text("{broken")                          # half-written: keep the current set
        await rec.sync()
        assert "keeping the last good set" in rec.file_error and "a" in engine.loaded
        write(f, {"a": b})                               # new URI under the same name
        engine.calls.clear()
        await rec.sync()
        assert engine.loaded == {"a": b} and rec.file_error is None
        assert engine.calls.index(("unload", "a")) < engine.calls.index(("load", "a"))
        write(f, {})
        await rec.sync()
        assert engine.loaded == {} and rec.public() == []
    asyncio.run(scenario())


def test_desired_file_shapes():
    assert [a.name for a in parse_desired(b'{"adapters": [{"name": "x", "uri": "/x"}]}')] == ["x"]
    assert [a.name for a in parse_desired(b'[{"name": "y", "uri": "s3://b/y"}]')] == ["y"]
    assert parse_desired(b"") == []
    with pytest.raises(ValueError, match="duplicate"):
        parse_desired(b'[{"name": "y", "uri": "/a"}, {"name": "y", "uri": "/b"}]')
