"""A tiny, download-free causal LM and a learnable toy task, for tests on CPU.

``build_tiny_model(dir)`` writes a 2-layer Qwen2 (hidden 128, ~0.8M parameters) with a byte-level
BPE tokenizer trained locally (vocab up to 4k) and a ChatML chat template, and returns the
directory. ``initializer_range=0.1`` matters: with the default 0.02 a LoRA adapter could not learn
the toy task in a few dozen steps.

``write_toy_dataset(path, fmt=..., repeat=...)`` writes the toy task: a handful of fixed questions
with one-word answers (``TOY_QA``), as chat, instruction or text JSONL. A trained adapter answers
them; the random base model does not.
"""
from __future__ import annotations

import json
import os

TOY_QA = [
    ("What is 2+2?", "four"),
    ("What color is the sky?", "blue"),
    ("Which animal says meow?", "cat"),
    ("What is the opposite of hot?", "cold"),
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

_FILLER = ("the quick brown fox jumps over the lazy dog while a small model learns to answer "
           "simple questions about numbers colors animals and the weather in a tiny world "
           "system user assistant question answer one two three five six seven eight nine ten "
           "red green yellow white black dog bird fish warm cool big little ")


def _corpus():
    for q, a in TOY_QA:
        yield f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}<|im_end|>\n"
    for i in range(200):
        yield _FILLER[i % 37:] + _FILLER[: i % 37]


def build_tiny_model(directory: str, *, seed: int = 0, vocab_size: int = 4000) -> str:
    """Write tokenizer + randomly initialised Qwen2 weights to ``directory``; return it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    os.makedirs(directory, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(_corpus(), trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=None, eos_token="<|im_end|>",
                                   pad_token="<|pad|>", unk_token=None)
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(directory)

    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(fast), hidden_size=128, intermediate_size=256,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, initializer_range=0.1, tie_word_embeddings=True,
                      eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
                      bos_token_id=None)
    model = Qwen2ForCausalLM(cfg)
    model.generation_config.eos_token_id = fast.eos_token_id
    model.generation_config.pad_token_id = fast.pad_token_id
    model.save_pretrained(directory)
    return directory


def toy_rows(fmt: str = "chat", repeat: int = 8) -> list[dict]:
    rows = []
    for _ in range(repeat):
        for q, a in TOY_QA:
            if fmt == "chat":
                rows.append({"messages": [{"role": "user", "content": q},
                                          {"role": "assistant", "content": a}]})
            elif fmt == "instruction":
                rows.append({"instruction": q, "response": a})
            else:
                rows.append({"text": f"Q: {q} A: {a}"})
    return rows


def write_toy_dataset(path: str, *, fmt: str = "chat", repeat: int = 8) -> str:
    """Write the toy task as JSONL at ``path``; return the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for row in toy_rows(fmt, repeat):
            f.write(json.dumps(row) + "\n")
    return path


def greedy_answer(model, tokenizer, question: str, max_new_tokens: int = 6) -> str:
    """The model's greedy reply to one user turn, special tokens stripped."""
    import torch
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                           tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()
