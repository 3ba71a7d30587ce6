"""Dataset reading, validation, rendering, loss masking and packing.

Files: the dataset URI is one JSONL file or a directory/prefix of ``*.jsonl``/``*.json`` files
(JSON Lines, one example per line, read in name order). Formats (``DatasetSpec.format``):

* chat: ``{"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str}, ...]}``
  with at least one assistant turn;
* instruction: ``{"instruction": str, "input"?: str, "response": str}``, rendered as a user turn
  (instruction, a blank line, input) and an assistant turn;
* text: ``{"text": str}``, trained on every token, no template.

Chat and instruction rows go through the model's chat template; the loss covers only assistant
turns (the template's end-of-turn marker included, so the model learns to stop); every other
label is -100. A malformed row raises ``DataError("<uri>:<line>: ...")``.

Packing (``training.packing``): examples are laid end to end into sequences of
``max_seq_length`` tokens. Each example restarts ``position_ids`` at 0 and no attention mask is
passed (and no KV cache: ``use_cache=False``); transformers turns such position ids into per-example attention (varlen for
FlashAttention, a block-diagonal mask for SDPA/eager), so attention does not cross examples there.
An attention implementation that ignores position-id boundaries would let later examples attend to
earlier ones in the same sequence; their RoPE positions still restart. Without packing each example
is its own right-padded row with an attention mask.
"""
from __future__ import annotations

import hashlib
import json
import math
import posixpath
from dataclasses import dataclass, field

import numpy as np

from ..contract import DatasetFormat, DatasetSpec
from .errors import ConfigError, DataError, StorageError
from .storage import Location

IGNORE = -100
ROLES = {"system", "user", "assistant", "tool"}


@dataclass
class RawDataset:
    rows: list[tuple[str, int, dict]]   # (file uri, 1-based line, parsed row)
    digest: str                         # sha256 over file names and bytes
    files: list[str]


def dataset_files(uri: str) -> list[Location]:
    loc = Location(uri)
    if not loc.exists():
        raise StorageError(f"{uri}: dataset not found")
    if not loc.isdir():
        return [loc]
    files = [loc.child(n) for n in loc.ls() if n.endswith((".jsonl", ".json"))]
    if not files:
        raise StorageError(f"{uri}: no .jsonl/.json files in the dataset directory")
    return files


def read_dataset(spec: DatasetSpec) -> RawDataset:
    """Read and validate every row; fails on the first bad one, naming file and line."""
    rows, h, files = [], hashlib.sha256(), []
    for loc in dataset_files(spec.uri):
        data = loc.read_bytes()
        h.update(posixpath.basename(loc.uri).encode() + b"\0" + data)
        files.append(loc.uri)
        for lineno, line in enumerate(data.decode("utf-8", errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{loc.uri}:{lineno}: invalid JSON ({e.msg} at column {e.colno})")
            _validate(row, spec.format, f"{loc.uri}:{lineno}")
            rows.append((loc.uri, lineno, row))
    if not rows:
        raise DataError(f"{spec.uri}: the dataset has no rows")
    return RawDataset(rows=rows, digest="sha256:" + h.hexdigest(), files=files)


def _validate(row, fmt: DatasetFormat, where: str) -> None:
    def need_str(key, optional=False):
        v = row.get(key)
        if v is None and optional:
            return
        if not isinstance(v, str) or (not optional and not v.strip()):
            raise DataError(f"{where}: field {key!r} must be a non-empty string for format "
                            f"{fmt.value!r} (got {type(v).__name__})")

    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if fmt is DatasetFormat.text:
        need_str("text")
    elif fmt is DatasetFormat.instruction:
        need_str("instruction"), need_str("input", optional=True), need_str("response")
    else:
        msgs = row.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise DataError(f"{where}: field 'messages' must be a non-empty list for format 'chat'")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES \
                    or not isinstance(m.get("content"), str):
                raise DataError(f"{where}: messages[{i}] needs a role in {sorted(ROLES)} and "
                                f"string content")
        if not any(m["role"] == "assistant" for m in msgs):
            raise DataError(f"{where}: no assistant message, nothing to learn from")


def to_messages(row: dict, fmt: DatasetFormat) -> list[dict]:
    if fmt is DatasetFormat.instruction:
        user = row["instruction"] + (f"\n\n{row['input']}" if row.get("input") else "")
        return [{"role": "user", "content": user}, {"role": "assistant", "content": row["response"]}]
    return row["messages"]


def _render(tokenizer, messages, gen_prompt=False) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen_prompt)


def tokenize_row(tokenizer, row: dict, fmt: DatasetFormat) -> tuple[list[int], list[int]]:
    """(input_ids, labels) with labels -100 outside assistant turns (text: all tokens)."""
    if fmt is DatasetFormat.text:
        ids = tokenizer(row["text"], add_special_tokens=False)["input_ids"]
        if tokenizer.eos_token_id is not None:
            ids = ids + [tokenizer.eos_token_id]
        return ids, list(ids)
    if not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"format {fmt.value!r} needs a chat template and the model's tokenizer "
                          f"has none; use format 'text' or a model with a chat template")
    messages = to_messages(row, fmt)
    full = _render(tokenizer, messages)
    spans, cursor = [], 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start, end = len(_render(tokenizer, messages[:i], True)), len(_render(tokenizer, messages[:i + 1]))
        if not (full[:end].startswith(full[:start]) and 0 <= start < end <= len(full)) \
                or full[start:end].find(m["content"]) < 0:
            start = full.find(m["content"], cursor)   # template not prefix-stable: find the text
            end = start + len(m["content"])
        spans.append((start, end))
        cursor = end
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    labels = [tok if any(s <= a < e for s, e in spans) else IGNORE
              for tok, (a, _) in zip(ids, enc["offset_mapping"])]
    return ids, labels


@dataclass
class Sequences:
    """Training rows ready for the model: packed or one example each."""
    input_ids: list[list[int]]
    labels: list[list[int]]
    position_ids: list[list[int]] | None      # set when packed
    n_examples: int
    dropped: int = 0


def build_sequences(examples: list[tuple[list[int], list[int]]], max_len: int, pack: bool,
                    pad_id: int) -> Sequences:
    kept, dropped = [], 0
    for ids, labels in examples:
        ids, labels = ids[:max_len], labels[:max_len]
        if all(lab == IGNORE for lab in labels[1:]):
            dropped += 1            # nothing left to learn after truncation
            continue
        kept.append((ids, labels))
    if not pack:
        return Sequences([k[0] for k in kept], [k[1] for k in kept], None, len(kept), dropped)
    seqs_i, seqs_l, seqs_p = [], [], []
    cur_i, cur_l, cur_p = [], [], []

    def flush():
        if not cur_i:
            return
        pad = max_len - len(cur_i)
        seqs_i.append(cur_i + [pad_id] * pad)
        seqs_l.append(cur_l + [IGNORE] * pad)
        seqs_p.append(cur_p + list(range(pad)))   # padding is its own segment
    for ids, labels in kept:
        if len(cur_i) + len(ids) > max_len:
            flush()
            cur_i, cur_l, cur_p = [], [], []
        cur_i, cur_l, cur_p = cur_i + ids, cur_l + labels, cur_p + list(range(len(ids)))
    flush()
    return Sequences(seqs_i, seqs_l, seqs_p, len(kept), dropped)


@dataclass
class PreparedData:
    train: Sequences
    validation: Sequences | None
    digest: str
    n_rows: int
    info: dict = field(default_factory=dict)


def prepare(raw: RawDataset, spec: DatasetSpec, tokenizer, *, max_len: int, pack: bool,
            seed: int) -> PreparedData:
    """Tokenise every row, split off validation (seeded), pack each side separately."""
    examples = [tokenize_row(tokenizer, row, spec.format) for _, _, row in raw.rows]
    order = np.random.default_rng(seed).permutation(len(examples))
    n_val = 0
    if spec.validation_split > 0 and len(examples) > 1:
        n_val = min(len(examples) - 1, max(1, round(len(examples) * spec.validation_split)))
    val_idx, train_idx = order[:n_val], order[n_val:]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    train = build_sequences([examples[i] for i in train_idx], max_len, pack, pad or 0)
    if not train.input_ids:
        raise DataError(f"{spec.uri}: no trainable examples (every row lost its response tokens "
                        f"after truncation to max_seq_length={max_len})")
    val = build_sequences([examples[i] for i in val_idx], max_len, pack, pad or 0) if n_val else None
    return PreparedData(train, val, raw.digest, len(examples),
                        {"pad_id": pad or 0, "dropped": train.dropped})


class SampleStream:
    """An endless, seeded, epoch-by-epoch shuffled view of the training sequences.

    Sample k of the stream depends only on (seed, k), so the data position of a run is a single
    integer (samples consumed) and a resumed run sees exactly the samples it would have seen.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self._epoch, self._perm = n, seed, -1, None

    def __getitem__(self, k: int) -> int:
        epoch = k // self.n
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng(self.seed + epoch).permutation(self.n)
        return int(self._perm[k % self.n])


def step_layout(global_batch: int, micro: int, world: int) -> int:
    """Micro-batches per rank and step (gradient accumulation) that hold ``global_batch`` whatever
    the world size: ceil(global / (micro x world)); the slots past the global batch are padding."""
    return max(1, math.ceil(global_batch / (micro * world)))


def rank_positions(start: int, global_batch: int, micro: int, accum: int, rank: int,
                   world: int) -> list[list[int | None]]:
    """Stream positions of one rank's micro-batches for the step whose first sample is ``start``.

    Round ``a`` of the accumulation covers global slots [a·micro·world, (a+1)·micro·world); rank r
    takes ``micro`` consecutive slots of it. Slots at or past ``global_batch`` are None (padding:
    a row whose labels are all ignored, so every rank runs the same number of passes, which DDP
    and FSDP2 need, and the step still learns from exactly the global batch)."""
    out = []
    for a in range(accum):
        first = (a * world + rank) * micro
        out.append([start + first + j if first + j < global_batch else None for j in range(micro)])
    return out


def collate(seqs: Sequences, idx: list[int], pad_id: int, ignore: list[bool] | None = None):
    """A micro-batch dict of tensors: packed rows carry position_ids, others an attention mask.
    Rows flagged in ``ignore`` keep their tokens but no labels (padding slots, see rank_positions)."""
    import torch
    rows_i = [seqs.input_ids[i] for i in idx]
    rows_l = [[IGNORE] * len(seqs.labels[i]) if ignore and ignore[k] else seqs.labels[i]
              for k, i in enumerate(idx)]
    if seqs.position_ids is not None:
        return {"input_ids": torch.tensor(rows_i), "labels": torch.tensor(rows_l),
                "position_ids": torch.tensor([seqs.position_ids[i] for i in idx])}
    width = max(len(r) for r in rows_i)
    pad = lambda r, v: r + [v] * (width - len(r))  # noqa: E731
    return {"input_ids": torch.tensor([pad(r, pad_id) for r in rows_i]),
            "labels": torch.tensor([pad(r, IGNORE) for r in rows_l]),
            "attention_mask": torch.tensor([pad([1] * len(r), 0) for r in rows_i])}


def total_steps(n_train: int, samples_per_step: int, epochs: float | None, max_steps: int | None) -> int:
    if max_steps:
        return max_steps
    return max(1, math.ceil((epochs or 1.0) * n_train / samples_per_step))
