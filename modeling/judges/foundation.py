"""CLIP and DINO-ViT judges, loaded with transformers from a local folder (no weights ship with any package).

- ``ClipJudge`` (CLIP score, CMMD): a Hugging Face ``CLIPModel`` folder with its tokenizer (e.g. openai/clip-vit-
  large-patch14; CMMD's paper used ViT-L/14 at 336 px). Images are preprocessed here, as CLIP was trained: shorter
  side resized to the vision tower's ``image_size`` (bicubic, antialiased), centre crop, CLIP's mean/std. Prompts
  are tokenised to at most the text tower's ``max_position_embeddings`` (77) tokens. Outputs are the projected,
  L2-normalised embeddings ``(N, D)``.
- ``DinoJudge`` (DINO structure distance): a ``ViTModel`` (DINO v1, e.g. facebook/dino-vitb8 as in Splice) or
  ``Dinov2Model`` folder. Images resized to ``size`` x ``size`` (224, Splice's size) with ImageNet mean/std; the
  output is the cosine self-similarity of the last layer's attention keys over all tokens (CLS included, heads
  concatenated), ``(N, T, T)``: Splice's "structure" descriptor.

An absent folder raises ``JudgeUnavailable``, reported as "skipped: no weights at PATH"; nothing is downloaded.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from modeling.judges.files import require_folder
from modeling.judges.images import IMAGENET_MEAN, IMAGENET_STD, normalize, resize, to_unit

# OpenAI's CLIP preprocessing constants; OpenCLIP's LAION models use the same ones.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _pooled(output: Tensor | object) -> Tensor:
    # transformers 4 returns the projected embedding itself, 5 a ModelOutput holding it as pooler_output.
    return output if isinstance(output, Tensor) else output.pooler_output


class ClipJudge:
    def __init__(self, path: str | Path | None, device: str | torch.device = "cpu") -> None:
        from transformers import AutoTokenizer, CLIPModel

        folder = require_folder(
            path, "a CLIP model (CLIPModel weights + tokenizer), e.g. openai/clip-vit-large-patch14"
        )
        self.device = torch.device(device)
        self.model = CLIPModel.from_pretrained(folder, local_files_only=True).to(self.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
        self.image_size = int(self.model.config.vision_config.image_size)
        self.max_tokens = int(self.model.config.text_config.max_position_embeddings)

    def preprocess(self, images: Tensor) -> Tensor:
        x = to_unit(images).to(self.device)
        h, w = x.shape[-2:]
        scale = self.image_size / min(h, w)
        x = F.interpolate(
            x,
            size=(max(self.image_size, round(h * scale)), max(self.image_size, round(w * scale))),
            mode="bicubic",
            align_corners=False,
            antialias=True,
        ).clamp(0.0, 1.0)
        top, left = (x.shape[-2] - self.image_size) // 2, (x.shape[-1] - self.image_size) // 2
        x = x[..., top : top + self.image_size, left : left + self.image_size]
        return normalize(x, CLIP_MEAN, CLIP_STD)

    @torch.no_grad()
    def image_embeddings(self, images: Tensor) -> Tensor:
        emb = _pooled(self.model.get_image_features(pixel_values=self.preprocess(images)))
        return F.normalize(emb.float(), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> Tensor:
        tokens = self.tokenizer(
            list(prompts), padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(self.device)
        emb = _pooled(
            self.model.get_text_features(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        )
        return F.normalize(emb.float(), dim=-1)


def _last_key_projection(model: torch.nn.Module) -> torch.nn.Module:
    """The key projection of the last transformer layer: ``layers.{i}.attention.k_proj`` in transformers 5,
    ``encoder.layer.{i}.attention.attention.key`` in transformers 4."""
    found: dict[int, torch.nn.Module] = {}
    for name, module in model.named_modules():
        match = re.search(r"layers?\.(\d+)\..*\b(k_proj|key)$", name)
        if match and isinstance(module, torch.nn.Linear):
            found[int(match.group(1))] = module
    if not found:
        raise ValueError(f"{type(model).__name__}: no attention key projection found; expected a ViT/DINOv2 model")
    return found[max(found)]


class DinoJudge:
    def __init__(self, path: str | Path | None, device: str | torch.device = "cpu", size: int = 224) -> None:
        from transformers import AutoModel

        folder = require_folder(path, "a DINO ViT (ViTModel or Dinov2Model), e.g. facebook/dino-vitb8")
        self.device = torch.device(device)
        self.model = AutoModel.from_pretrained(folder, local_files_only=True).to(self.device).eval()
        self.size = size
        self._keys = _last_key_projection(self.model)
        # ViT refuses a size other than its config's unless asked to interpolate positions; DINOv2 always does.
        self._forward_kwargs = {"interpolate_pos_encoding": True} if self.model.config.model_type == "vit" else {}

    @torch.no_grad()
    def key_self_similarity(self, images: Tensor) -> Tensor:
        x = normalize(resize(to_unit(images).to(self.device), (self.size, self.size)), IMAGENET_MEAN, IMAGENET_STD)
        captured: list[Tensor] = []
        handle = self._keys.register_forward_hook(lambda _m, _i, out: captured.append(out))
        try:
            self.model(pixel_values=x, **self._forward_kwargs)
        finally:
            handle.remove()
        keys = F.normalize(captured[0].float(), dim=-1)  # (N, T, heads * head_dim): heads side by side
        return keys @ keys.transpose(1, 2)
