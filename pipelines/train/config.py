"""One typed, validated training config for both architectures.

A YAML file gives the sections below; ``key=value`` overrides use dotted keys (``train.lr=3e-4``) or the
short aliases in ``ALIASES`` (``data=PATH max_steps=20 zero_stage=3``). Validation happens once, here; the
trainer trusts the result.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import yaml

ARCHITECTURES = ("mmface-dit", "face-mogle")
OBJECTIVES = {"mmface-dit": ("rfm", "ddpm"), "face-mogle": ("flux-rf",)}
OPTIMIZERS = ("adamw8bit", "deepspeed_adamw", "prodigy")


@dataclass
class RunSection:
    name: str = "run"  # Ray Train run name: re-running with the same name resumes from its last checkpoint
    storage: str = "runs"  # Ray Train storage path (local folder or cluster storage URI)
    seed: int = 0
    experiment: str | None = None  # MLflow experiment; default "<dataset>/<arch>"


@dataclass
class ModelSection:
    arch: str = "mmface-dit"
    preset: str = "mmface-dit-tiny"
    objective: str = "rfm"
    min_snr_gamma: float | None = 5.0  # DDPM only; null switches Min-SNR weighting off
    grad_checkpointing: int = 0  # 0 off, 1 every block, k every k-th block
    mode: str = "lora"  # face-mogle: lora (paper) | full (trains the whole tiny FLUX)
    init_from: str | None = None  # checkpoint folder whose weights initialise the model (512 from 256, ...)
    base_from: str | None = None  # face-mogle lora on a tiny base: the base run's checkpoint folder
    options: dict = field(default_factory=dict)  # architecture extras (e.g. text_rope, MoGLE ablation)
    any_size: bool = False  # train on data of another resolution than the preset is meant for, on purpose
    # how the trained model samples when served (recorded with its weights); None: the architecture's paper
    # setting (MMFace-DiT 50 steps, CFG 7.5; Face-MoGLE 28 steps, guidance 3.5)
    sample_steps: int | None = None
    sample_guidance: float | None = None
    # MMFace-DiT: the guidance a request with text alone (no mask, no sketch) gets; None: ``sample_guidance``
    sample_text_guidance: float | None = None
    # MMFace-DiT: share of samples whose spatial condition (mask or sketch latent) is dropped in training, so
    # that text alone learns to draw a face; None = the paper's 5% (SPEC §1). Face-MoGLE never drops its global
    # mask (its local-mask dropout is ``options.local_mask_dropout``)
    cond_dropout: float | None = None


@dataclass
class DataSection:
    path: str = "demo_out/prepared"
    split: str = "train"
    batch_size: int = 8  # per worker micro-batch
    grad_accum: int = 1
    # chunks (of shuffle_buffer rows) Ray Data fetches ahead in a background thread; 0 = fetched when needed (a
    # chunk covers at least 4 steps, and a thread blocked in Ray at shutdown printed a traceback on Ctrl-C)
    prefetch_batches: int = 0
    # rows a worker takes from Ray Data at a time and shuffles together (rounded up to whole micro-batches, at
    # least 4), on top of the per-epoch file shuffle; 0 keeps the rows of each chunk in file order
    shuffle_buffer: int = 64
    holdout_split: str = "test"  # where the fixed sample-grid conditions come from
    # MMFace-DiT: share of samples conditioned on the sketch instead of the mask, when both exist (paper: 0.5)
    sketch_fraction: float = 0.5
    # keep the split in Ray's object store so that an epoch restarts without re-reading the shards:
    # auto = when its shards take at most 1/8 of the object store; always | never
    materialize: str = "auto"
    # before the workers start, check the shards' bytes against the sha256 prepare recorded (a shard garbled
    # inside, behind an intact footer, is then one line instead of a decompression error in a worker):
    # auto = when the split holds at most verify_gb; always | never. The sample-grid shard is always checked.
    verify: str = "auto"
    verify_gb: float = 4.0


@dataclass
class TrainSection:
    max_steps: int = 100
    optimizer: str = "adamw8bit"
    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    warmup_steps: int = 200
    schedule: str = "cosine"  # cosine | constant (both after the linear warm-up)
    min_lr_ratio: float = 0.0
    grad_clip: float = 0.5
    zero_stage: int = 2
    precision: str = "auto"  # auto: bf16 on GPU, fp32 on CPU; bf16 on CPU = fp32 weights + bf16 autocast
    # torch.compile the model in place (fuses modulation, LayerNorm, GELU and RoPE around the GEMMs);
    # the first step compiles (~30 s for the tiny model on CPU, minutes for XL)
    compile: bool = False


@dataclass
class EMASection:
    enabled: bool = True
    decay: float = 0.9999
    warmup: bool = True


@dataclass
class LoggingSection:
    log_every: int = 10
    sample_every: int = 0  # 0: only at the end
    sample_steps: int = 20
    n_samples: int = 4
    guidance: float | None = None  # None: the model's serving guidance (model.sample_guidance)


@dataclass
class CheckpointSection:
    every: int = 50
    keep: int = 3


@dataclass
class ScalingSection:
    # an int: that many workers, fixed; [min, max]: elastic (Ray Train starts, and after a loss restarts, with as
    # many as can be placed, at least min; it grows back towards max, checked every resize_check_s)
    num_workers: int | list[int] = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    # CPU training: intra-op threads per worker; 0 = int(cpus_per_worker), at least 1 (a worker may use more
    # threads than the CPUs Ray reserves for it, e.g. to leave Ray Data its scheduling headroom)
    torch_threads: int = 0
    max_failures: int = 2
    # elastic runs: how often Ray Train looks for room to grow a healthy worker group (growing restarts the
    # workers from the newest checkpoint)
    resize_check_s: float = 60.0

    @property
    def elastic(self) -> bool:
        return isinstance(self.num_workers, list)

    @property
    def min_workers(self) -> int:
        return self.num_workers[0] if self.elastic else self.num_workers

    @property
    def max_workers(self) -> int:
        return self.num_workers[1] if self.elastic else self.num_workers


@dataclass
class FaultSection:
    """Test hook: rank ``kill_rank`` exits hard once at ``kill_at_step`` (recorded in the run folder)."""

    kill_rank: int | None = None
    kill_at_step: int | None = None


@dataclass
class TrainConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    ema: EMASection = field(default_factory=EMASection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    fault: FaultSection = field(default_factory=FaultSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """``{"train.lr": 1e-4, ...}``: MLflow params."""
        return {
            f"{section}.{key}": value for section, values in self.to_dict().items() for key, value in values.items()
        }

    def validate(self) -> TrainConfig:
        problems = []
        m, t, d = self.model, self.train, self.data
        if m.arch not in ARCHITECTURES:
            problems.append(f"model.arch={m.arch!r}: choose from {', '.join(ARCHITECTURES)}")
        elif m.objective not in OBJECTIVES[m.arch]:
            problems.append(f"model.objective={m.objective!r}: {m.arch} supports {', '.join(OBJECTIVES[m.arch])}")
        if m.mode not in ("lora", "full"):
            problems.append(f"model.mode={m.mode!r}: lora or full")
        if t.optimizer not in OPTIMIZERS:
            problems.append(f"train.optimizer={t.optimizer!r}: choose from {', '.join(OPTIMIZERS)}")
        if t.zero_stage not in (0, 1, 2, 3):
            problems.append(f"train.zero_stage={t.zero_stage}: 0, 1, 2 or 3")
        if t.precision not in ("auto", "bf16", "fp32"):
            problems.append(f"train.precision={t.precision!r}: auto, bf16 or fp32")
        if d.materialize not in ("auto", "always", "never"):
            problems.append(f"data.materialize={d.materialize!r}: auto, always or never")
        if d.verify not in ("auto", "always", "never"):
            problems.append(f"data.verify={d.verify!r}: auto, always or never")
        if not 0.0 <= d.sketch_fraction <= 1.0:
            problems.append(f"data.sketch_fraction={d.sketch_fraction}: a probability in [0, 1]")
        if m.cond_dropout is not None:
            if m.arch != "mmface-dit":
                problems.append(f"model.cond_dropout={m.cond_dropout}: only MMFace-DiT drops its spatial condition")
            elif not 0.0 <= m.cond_dropout <= 1.0:
                problems.append(f"model.cond_dropout={m.cond_dropout}: a probability in [0, 1]")
        if t.schedule not in ("cosine", "constant"):
            problems.append(f"train.schedule={t.schedule!r}: cosine or constant")
        for name, value in (
            ("train.max_steps", t.max_steps),
            ("data.batch_size", d.batch_size),
            ("data.grad_accum", d.grad_accum),
            ("scaling.num_workers", 1 if self.scaling.elastic else self.scaling.num_workers),
            ("checkpoint.every", self.checkpoint.every),
            ("checkpoint.keep", self.checkpoint.keep),
            ("logging.log_every", self.logging.log_every),
        ):
            if value < 1:
                problems.append(f"{name}={value}: must be >= 1")
        if t.lr <= 0:
            problems.append(f"train.lr={t.lr}: must be > 0")
        problems += self._elastic_problems()
        if not 0 < self.ema.decay < 1:
            problems.append(f"ema.decay={self.ema.decay}: must be in (0, 1)")
        if problems:
            raise ValueError("invalid training config:\n  " + "\n  ".join(problems))
        return self

    def _elastic_problems(self) -> list[str]:
        s, d = self.scaling, self.data
        if not s.elastic:
            return []
        low, high = s.min_workers, s.max_workers
        if low < 1 or low > high:
            return [f"scaling.num_workers={s.num_workers}: [min, max] with 1 <= min <= max"]
        if self.train.zero_stage == 3:
            return [
                f"scaling.num_workers={s.num_workers} with train.zero_stage=3: a ZeRO-3 checkpoint loads only at the "
                "world size that wrote it; use zero_stage 1 or 2 for elastic workers, or a fixed num_workers"
            ]
        uneven = [w for w in range(low, high + 1) if self.global_batch % (d.batch_size * w)]
        if uneven:
            return [
                f"scaling.num_workers={s.num_workers}: the global batch {self.global_batch} (data.batch_size "
                f"{d.batch_size} x data.grad_accum {d.grad_accum} x {high} workers) does not split into whole "
                f"micro-batches of {d.batch_size} at {', '.join(map(str, uneven))} worker(s); raise data.grad_accum "
                f"(e.g. to a multiple of {_lcm_up_to(low, high) // math.gcd(_lcm_up_to(low, high), high)}) or narrow "
                "the range"
            ]
        return []

    @property
    def global_batch(self) -> int:
        """Samples per optimizer step: the configured one, whatever the number of workers an elastic run has."""
        return self.data.batch_size * self.data.grad_accum * self.scaling.max_workers

    def grad_accum_at(self, world: int) -> int:
        """Micro-batches each of ``world`` workers accumulates per step, so that a step stays ``global_batch``."""
        accum, rest = divmod(self.global_batch, self.data.batch_size * world)
        if rest or accum < 1:
            raise ValueError(
                f"scaling.num_workers: {world} workers cannot make the global batch {self.global_batch} from "
                f"micro-batches of {self.data.batch_size}"
            )
        return accum

    @property
    def precision(self) -> str:
        if self.train.precision != "auto":
            return self.train.precision
        return "bf16" if self.scaling.use_gpu else "fp32"


ALIASES = {
    "data": "data.path",
    "batch": "data.batch_size",
    "batch_size": "data.batch_size",
    "grad_accum": "data.grad_accum",
    "max_steps": "train.max_steps",
    "steps": "train.max_steps",
    "lr": "train.lr",
    "zero_stage": "train.zero_stage",
    "optimizer": "train.optimizer",
    "precision": "train.precision",
    "compile": "train.compile",
    "name": "run.name",
    "storage": "run.storage",
    "seed": "run.seed",
    "experiment": "run.experiment",
    "preset": "model.preset",
    "objective": "model.objective",
    "mode": "model.mode",
    "init_from": "model.init_from",
    "base_from": "model.base_from",
    "workers": "scaling.num_workers",
    "num_workers": "scaling.num_workers",
    "gpu": "scaling.use_gpu",
    "ckpt_every": "checkpoint.every",
    "keep": "checkpoint.keep",
    "log_every": "logging.log_every",
    "sample_every": "logging.sample_every",
    "ema": "ema.enabled",
}


def _lcm_up_to(low: int, high: int) -> int:
    return math.lcm(*range(low, high + 1))


def _workers(value: Any) -> int | list[int]:
    """``scaling.num_workers``: an int (fixed), or ``[min, max]`` (elastic; ``[n, n]`` is fixed at n)."""
    items = yaml.safe_load(value) if isinstance(value, str) else value
    if isinstance(items, tuple):
        items = list(items)
    if isinstance(items, list):
        if len(items) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
            raise ValueError(f"scaling.num_workers={value!r}: an int, or [min, max] of two ints (e.g. [1, 2])")
        return items[0] if items[0] == items[1] else list(items)
    if isinstance(items, bool) or not isinstance(items, int):
        if isinstance(items, float) and items.is_integer():
            return int(items)
        raise ValueError(f"scaling.num_workers={value!r}: an int, or [min, max] of two ints (e.g. [1, 2])")
    return items


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """YAML/CLI value -> the dataclass field's type (a wrong type is an error naming the key)."""
    if value is None:
        return None
    text = str(hint)
    try:
        if hint is bool or text == "bool":
            if isinstance(value, str):
                lowered = value.lower()
                if lowered not in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                    raise ValueError(value)
                return lowered in ("true", "1", "yes", "on")
            return bool(value)
        if hint is int or text.startswith("int"):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if hint is float or text.startswith("float"):
            return float(value)
        if text.startswith("tuple"):
            items = yaml.safe_load(value) if isinstance(value, str) else value
            return tuple(float(v) for v in items)
        if hint is dict or text.startswith("dict"):
            return dict(yaml.safe_load(value) if isinstance(value, str) else value)
        if text.startswith("str"):
            return str(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}={value!r}: expected {text}") from None
    return value


def _apply(config: TrainConfig, key: str, value: Any, source: str) -> None:
    section_name, _, field_name = key.partition(".")
    section = getattr(config, section_name, None)
    if section is None or not field_name or not dataclasses.is_dataclass(section):
        sections = ", ".join(f.name for f in dataclasses.fields(TrainConfig))
        raise ValueError(f"{source}: unknown key {key!r} (sections: {sections}; aliases: {', '.join(ALIASES)})")
    if field_name.startswith("options."):
        section.options[field_name.split(".", 1)[1]] = yaml.safe_load(value) if isinstance(value, str) else value
        return
    hints = get_type_hints(type(section))
    if field_name not in hints:
        known = ", ".join(f"{section_name}.{name}" for name in hints)
        raise ValueError(f"{source}: unknown key {key!r}; {section_name} has {known}")
    if key == "scaling.num_workers":
        section.num_workers = _workers(value)
        return
    setattr(section, field_name, _coerce(value, hints[field_name], key))


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> TrainConfig:
    config = TrainConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such config file (see configs/ for the shipped ones)")
        raw = yaml.safe_load(path.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"{path}: expected a mapping of sections (run, model, data, train, ...)")
        for section, values in raw.items():
            if not isinstance(values, dict):
                raise ValueError(f"{path}: section {section!r} must be a mapping")
            for key, value in values.items():
                _apply(config, f"{section}.{key}", value, str(path))
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r}: expected key=value (e.g. max_steps=20)")
        key = ALIASES.get(key.strip(), key.strip())
        _apply(config, key, yaml.safe_load(value) if value.strip() else "", "override")
    return config.validate()


def config_from_dict(values: dict) -> TrainConfig:
    config = TrainConfig()
    for section, items in values.items():
        for key, value in items.items():
            _apply(config, f"{section}.{key}", value, "config dict")
    return config.validate()


def dump_config(config: TrainConfig) -> str:
    return json.dumps(config.to_dict(), indent=2, default=list)
