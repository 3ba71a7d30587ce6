"""Reading the job config the operator rendered (contract.TrainJobConfig as JSON)."""
from __future__ import annotations

import json

from pydantic import ValidationError

from ..contract import TrainJobConfig
from .errors import ConfigError


def load_config(path: str) -> TrainJobConfig:
    try:
        with open(path) as f:
            raw = json.load(f)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the job config ({e})") from e
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}:{e.lineno}: the job config is not valid JSON ({e.msg})") from e
    try:
        return TrainJobConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"{path}: invalid job config: {e}") from e


def checkpoint_uri_of(path: str) -> str | None:
    """Best effort: where progress should go even when the config does not validate."""
    try:
        with open(path) as f:
            return json.load(f)["checkpoint"]["uri"]
    except Exception:
        return None
