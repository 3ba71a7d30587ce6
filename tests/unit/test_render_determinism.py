"""The builders render the same bytes in every process: the applied-hash annotation compares a
child rendered now with one rendered by an earlier operator process, so any order that depends
on the process (set iteration under a different PYTHONHASHSEED) would re-apply every child after
a restart. Rendering twice in one process cannot show that; two processes with different hash
seeds can."""
from __future__ import annotations

import os
import subprocess
import sys

from helpers import REPO

SCRIPT = """
import hashlib
from test_builders import CATALOG, CHOICES, GOLDEN_CASES, bank_job, dump
from test_modelserve_builders import GOLDEN_ADAPTERS, GOLDEN_PROFILES, bank_serve
from tuneserve.core.scheduling.fit import Candidate
from tuneserve.finetunejob.builders.children import build_finetune_children
from tuneserve.modelserve.builders.children import build_modelserve_children
out = []
for name, (key, per_worker, workers, pool) in sorted(GOLDEN_CASES.items()):
    out += build_finetune_children(bank_job(CHOICES[name]), Candidate(CATALOG.get(key), per_worker, workers, "c"), pool, 1, CATALOG)
for name, key in sorted(GOLDEN_PROFILES.items()):
    out += build_modelserve_children(bank_serve(), Candidate(CATALOG.get(key), 1, 1, "c"), name, GOLDEN_ADAPTERS, CATALOG)
print(hashlib.sha256(dump(out).encode()).hexdigest())
"""


def _render_digest(hash_seed: str) -> str:
    path = os.pathsep.join(str(REPO / p) for p in ("tests/unit", "tests", "hack", "operator", "workers"))
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": path}
    return subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True,
                          cwd=REPO / "tests" / "unit").stdout.strip()


def test_two_processes_with_different_hash_seeds_render_the_same_bytes():
    first, second = _render_digest("1"), _render_digest("2")
    assert len(first) == 64 and first == second
