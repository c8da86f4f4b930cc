"""One place to look up any model preset by name, whichever architecture it belongs to.

Each architecture module keeps its own presets as data (``PRESETS``) and a ``describe_preset(name)``
that builds the model on the meta device and counts parameters. This module only dispatches.
"""

from __future__ import annotations

import importlib

# module that owns each architecture's presets; imported lazily so a lookup loads only what it needs
ARCHITECTURE_MODULES = ("modeling.mmface_dit", "modeling.face_mogle")


def _modules():
    for name in ARCHITECTURE_MODULES:
        yield importlib.import_module(name)


def preset_names() -> list[str]:
    return sorted(name for module in _modules() for name in module.PRESETS)


def describe(preset: str) -> dict:
    """``{"preset", "params", "trainable", "components": {name: params}}`` built on the meta device."""
    for module in _modules():
        if preset in module.PRESETS:
            return module.describe_preset(preset)
    raise KeyError(f"unknown preset {preset!r}; known presets: {', '.join(preset_names())}")
