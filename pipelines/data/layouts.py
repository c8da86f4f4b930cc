"""Part files of the CelebAMask-HQ layout. The 19 classes and their colours live in ``modeling.conditions``
(shared with serving)."""

from __future__ import annotations

from modeling.conditions import CLASS_NAMES

# Part files of CelebAMask-HQ-mask-anno, in label order 1..18: ``{id:05d}_{part}.png``.
CELEBAMASK_PARTS: tuple[str, ...] = CLASS_NAMES[1:]
