"""Model weights on disk: safetensors files with the model config as JSON beside them.

A weights directory holds::

    config.json          the architecture config (whatever dict the caller passes)
    model.safetensors    the trained weights
    ema.safetensors      optional: the EMA of the trained weights

Nothing here knows about a particular architecture; ``load_into`` loads strictly, so a directory
saved at one resolution loads into a model built for another only when no weight depends on the
resolution (true for MMFace-DiT, which has no absolute position embedding).
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file
from torch import Tensor, nn

CONFIG_FILE = "config.json"
MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"


def save_weights(
    directory: str | Path,
    state_dict: dict[str, Tensor],
    config: dict,
    ema_state_dict: dict[str, Tensor] | None = None,
) -> Path:
    """Write config.json, model.safetensors and (if given) ema.safetensors into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    save_file(_contiguous(state_dict), str(directory / MODEL_FILE))
    if ema_state_dict is not None:
        save_file(_contiguous(ema_state_dict), str(directory / EMA_FILE))
    return directory


def load_weights(directory: str | Path, ema: bool = False, device: str = "cpu") -> tuple[dict[str, Tensor], dict]:
    """(state_dict, config) from a weights directory; ``ema=True`` returns the EMA weights instead."""
    directory = Path(directory)
    weights = directory / (EMA_FILE if ema else MODEL_FILE)
    config_path = directory / CONFIG_FILE
    for path in (weights, config_path):
        if not path.is_file():
            raise FileNotFoundError(f"weights directory {directory} lacks {path.name}")
    return load_file(str(weights), device=device), json.loads(config_path.read_text())


def load_into(model: nn.Module, state_dict: dict[str, Tensor]) -> None:
    """Strict load that names what is missing or unexpected, and any shape mismatch."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [
        f"{k}: saved {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"weights do not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shape mismatch {mismatched[:5]}"
        )
    model.load_state_dict(state_dict, strict=True)


def _contiguous(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    # safetensors refuses views and shared storage; a detached contiguous clone of each is always safe
    return {k: v.detach().contiguous().clone() if not v.is_contiguous() else v.detach() for k, v in state_dict.items()}
