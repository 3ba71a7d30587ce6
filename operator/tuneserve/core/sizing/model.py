"""The model's shape, from its name or the spec's size hints, shared by training and serving
estimates: parameters, hidden size, layers, vocabulary; LoRA and embedding parameter counts."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Optional

from tuneserve.api.sources import BaseModelSource

GIB = 1024 ** 3
DEFAULT_VOCAB = 128_000
FFN_RATIO = 3.5

# (d_in + d_out) / hidden of common projection names; unknown names count as a square (2).
MODULE_FACTORS = {
    "q_proj": 2.0, "k_proj": 2.0, "v_proj": 2.0, "o_proj": 2.0,
    "gate_proj": 1 + FFN_RATIO, "up_proj": 1 + FFN_RATIO, "down_proj": 1 + FFN_RATIO,
    "query_key_value": 4.0, "dense": 2.0, "c_attn": 4.0, "c_proj": 2.0, "c_fc": 1 + FFN_RATIO,
}
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

_SIZE_TOKEN = re.compile(r"^(?:(\d+)x)?(\d+(?:\.\d+)?)([bBmM])$")


class ModelSizeUnknown(ValueError):
    """The model's size cannot be derived: no size in the name and no hints."""


@dataclass(frozen=True)
class ModelShape:
    name: str
    parameters: float
    layers: int
    hidden_size: int
    vocab_size: int
    source: str  # "name", "hints", or "name+hints"

    @property
    def billions(self) -> float:
        return self.parameters / 1e9


def parse_parameter_count(name: str) -> Optional[float]:
    """Parameters from a well-known name: "Qwen2.5-7B-Instruct" -> 7e9, "0.5B", "SmolLM-135M",
    "Mixtral-8x7B" -> 56e9 (expert count x size: an upper bound, shared layers counted 8 times)."""
    for token in re.split(r"[-_/ ]", name):
        match = _SIZE_TOKEN.match(token)
        if match:
            experts = int(match.group(1) or 1)
            scale = 1e9 if match.group(3) in "bB" else 1e6
            return experts * float(match.group(2)) * scale
    return None


def _hidden_from_parameters(parameters: float) -> int:
    """Typical decoder aspect ratio L ~ h/128 with N ~ 12·L·h^2 gives h ~ (128·N/12)^(1/3)."""
    return max(128, int(round((128 * parameters / 12) ** (1 / 3) / 128)) * 128)


def model_shape(base_model: BaseModelSource) -> ModelShape:
    """Parameter count: hint, else the name, else 12·L·h^2 + 2·V·h from dimension hints. Missing
    dimensions are derived from the parameter count."""
    name = base_model.display_name()
    hints = base_model.size_hints
    from_name = parse_parameter_count(name)
    parameters = hints.parameters_billions * 1e9 if hints and hints.parameters_billions else None
    vocab = (hints.vocab_size if hints and hints.vocab_size else None) or DEFAULT_VOCAB
    hidden = hints.hidden_size if hints else None
    layers = hints.layers if hints else None
    source = "hints"
    if parameters is None and from_name is not None:
        parameters = from_name
        source = "name+hints" if hints and (hidden or layers or hints.vocab_size) else "name"
    if parameters is None and hidden and layers:
        parameters = 12 * layers * hidden ** 2 + 2 * vocab * hidden
    if parameters is None:
        raise ModelSizeUnknown(
            f"cannot tell the size of {name!r} from its name; set spec.baseModel.sizeHints.parametersBillions "
            "(or layers and hiddenSize)")
    hidden = hidden or _hidden_from_parameters(parameters)
    layers = layers or max(1, round(parameters / (12 * hidden ** 2)))
    return ModelShape(name=name, parameters=parameters, layers=layers, hidden_size=hidden, vocab_size=vocab, source=source)


def lora_parameters(shape: ModelShape, rank: int, target_modules: list[str]) -> float:
    modules = ALL_LINEAR if "all-linear" in target_modules else tuple(target_modules)
    factor = sum(MODULE_FACTORS.get(m, 2.0) for m in modules)
    return shape.layers * rank * shape.hidden_size * factor


def embedding_parameters(shape: ModelShape) -> float:
    """Input embedding + output head, 2·V·h (untied; capped at 30 % of N for small models with a
    large vocabulary, whose head is tied)."""
    return min(2 * shape.vocab_size * shape.hidden_size, 0.3 * shape.parameters)


def format_duration(seconds: Optional[float]) -> str:
    """'2d3h', '1h20m', '5m', '40s'."""
    if seconds is None:
        return ""
    s = max(0, int(math.ceil(seconds)))
    days, rem = divmod(s, 86400)
    hours, rem = divmod(rem, 3600)
    minutes, secs = divmod(rem, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m"
    return f"{secs}s"
