"""Precompute: a face dataset on disk -> Parquet shards of latents and text embeddings, once.

The Ray Data pipeline, per shard (a fixed, sorted slice of one split's ids):

    plans (from_items) -> map(load_shard): read + validate + resize + decouple masks + sketch + clean captions
                       -> map_batches(ShardEncoder, actor pool): codec + text encoder (GPU actors when
                          GPUs exist), write ``shards/{split}-{k}.parquet`` and the shard's rejects
    driver: progress bar, then ``rejects.jsonl`` and ``manifest.json`` from the per-shard done markers.

A shard is finished once ``shards/.done/{name}.json`` exists (written last, atomically) and the shard still has the
size and sha256 it records, so a re-run skips finished shards, redoes damaged ones, and a killed run restarted ends
with the same rows and manifest as an uninterrupted one. ``--out`` may be a local folder or a bucket URI:
every file goes through ``modeling.storage``, a whole object or nothing.
Every input record is either a row or a line in ``rejects.jsonl``: ``n_input == n_written + n_rejected``.

Tensors are stored as raw little-endian bytes (zero-copy ``np.frombuffer`` in the trainer); the manifest's
``fields`` gives each one's dtype and shape (``-1`` = the per-row ``text_tokens``).
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from modeling import storage
from modeling.conditions import decouple_mask, resize_image, resize_labels
from modeling.storage import Location, Where
from pipelines.data.readers import FaceRecord, RecordError, open_reader
from pipelines.data.transforms import SketchExtractor, clean_captions

SCHEMA_VERSION = 1
TARGETS = ("mmface", "mogle")
DONE_DIR = ".done"
NULL_FILE = "null_text.safetensors"
MANIFEST_KEYS = frozenset({"schema_version", "shards", "fields", "counts", "latent_shape", "text_dims", "size"})
NULL_KEYS = frozenset({"seq", "mask", "pooled", "blank_latent"})
# What fixes a damaged prepared folder: prepare checks finished shards and the null file, and redoes damaged ones.
REPREPARE = (
    "re-run `faceforge data prepare` with the same options and --out (damaged shards are redone, intact ones kept)"
)


@dataclass(frozen=True)
class PrepareOptions:
    layout: str
    root: str
    out: str
    size: int = 64
    codec: str = "pixel"
    text: str = "minilm"
    targets: tuple[str, ...] = TARGETS
    rows_per_shard: int = 64
    encode_batch: int = 16
    max_captions: int = 10
    max_tokens: int = 77
    sketch_model: str | None = None
    allow_uncaptioned: bool = False
    reader_options: dict = field(default_factory=dict)
    num_encoders: int | None = None

    def validate(self) -> None:
        unknown = set(self.targets) - set(TARGETS)
        if unknown or not self.targets:
            raise ValueError(f"--targets {','.join(self.targets)}: choose from {','.join(TARGETS)}")
        if self.size < 8 or self.size % 8:
            raise ValueError(f"--size {self.size}: expected a multiple of 8 (>= 8)")
        if self.rows_per_shard < 1 or self.encode_batch < 1 or self.max_captions < 1:
            raise ValueError("rows_per_shard, encode_batch and max_captions must be >= 1")


@dataclass(frozen=True)
class ShardPlan:
    name: str
    split: str
    ids: tuple[str, ...]


def plan_shards(ids_by_split: dict[str, list[str]], rows_per_shard: int) -> list[ShardPlan]:
    plans = []
    for split in sorted(ids_by_split):
        ids = ids_by_split[split]
        for k, start in enumerate(range(0, len(ids), rows_per_shard)):
            plans.append(ShardPlan(f"{split}-{k:05d}", split, tuple(ids[start : start + rows_per_shard])))
    return plans


# ---------------------------------------------------------------------------------------------- stage 1


def prepare_record(record: FaceRecord, options: PrepareOptions, sketcher: SketchExtractor) -> dict:
    """Validated, resized arrays for one record; raises ``RecordError`` with the reason to reject it."""
    size = options.size
    image = resize_image(record.image, size)
    label_map = None
    if record.label_map is not None:
        h, w = record.image.shape[:2]
        mh, mw = record.label_map.shape
        if abs(h / w - mh / mw) > 0.02:
            raise RecordError(record.id, f"mask {mw}x{mh} and image {w}x{h} have different aspect ratios")
        if int(record.label_map.max(initial=0)) > 18:
            raise RecordError(record.id, f"label values out of range (max {int(record.label_map.max())} > 18)")
        label_map = resize_labels(record.label_map, size)
    if "mogle" in options.targets and label_map is None:
        raise RecordError(record.id, "no mask, but --targets includes mogle (masks are its condition)")
    if "mmface" in options.targets and label_map is None and record.sketch is None and sketcher is None:
        raise RecordError(record.id, "no mask and no sketch for the mmface target")
    if record.sketch is not None:
        sketch = resize_image(record.sketch, size)
        sketch_source = "dataset"
    else:
        sketch = sketcher(image)
        sketch_source = sketcher.name
    captions = clean_captions(record.captions)[: options.max_captions]
    if not captions:
        if not options.allow_uncaptioned:
            raise RecordError(
                record.id,
                "no usable caption after cleaning (add captions, or pass --allow-uncaptioned to train on '')",
            )
        captions = [""]
    return {
        "id": record.id,
        "split": record.split,
        "image": image,
        "label_map": label_map,
        "sketch": sketch,
        "sketch_source": sketch_source,
        "captions": captions,
    }


def load_shard(item: dict, options: PrepareOptions) -> dict:
    """Ray Data ``map``: reads and transforms every record of one shard (CPU work, no model)."""
    reader = open_reader(options.layout, options.root, **options.reader_options)
    sketcher = SketchExtractor(options.sketch_model)
    prepared, rejects = [], []
    for record_id in item["ids"]:
        try:
            prepared.append(prepare_record(reader.read(record_id), options, sketcher))
        except RecordError as error:
            rejects.append({"id": record_id, "reason": error.reason})
        except Exception as error:  # a bad file never stops the job: it is rejected with what went wrong
            rejects.append({"id": record_id, "reason": f"unexpected {type(error).__name__}: {error}"})
    return {"name": item["name"], "payload": pickle.dumps((prepared, rejects), protocol=5)}


# ---------------------------------------------------------------------------------------------- stage 2


def _to_unit(images: np.ndarray):
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def torch_from(images: np.ndarray):
    """(B, H, W, 3) floats already in [-1, 1] -> (B, 3, H, W) tensor."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def _grey_rgb(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=-1)


def _f16(tensor) -> bytes:
    return tensor.detach().to("cpu").float().numpy().astype("<f2").tobytes()


class ShardEncoder:
    """Actor holding the frozen codec and text encoder; encodes whole shards and writes them."""

    def __init__(self, options: PrepareOptions, out: Location) -> None:
        import torch

        from modeling.codecs import load_codec
        from modeling.text_encoders import load_text_encoder

        self.options = options
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
        self.codec = load_codec(options.codec, self.device, dtype)
        self.text = load_text_encoder(options.text, self.device, dtype)
        self.out = out

    def __call__(self, batch: dict) -> dict:
        stats = [self.encode_and_write(name, payload) for name, payload in zip(batch["name"], batch["payload"])]
        return {"name": np.array([s["name"] for s in stats]), "stats": np.array([json.dumps(s) for s in stats])}

    def encode_and_write(self, name: str, payload: bytes) -> dict:
        prepared, rejects = pickle.loads(payload)
        rows, more_rejects = [], []
        step = self.options.encode_batch
        for start in range(0, len(prepared), step):
            chunk = prepared[start : start + step]
            try:
                rows.extend(self.encode_chunk(chunk))
            except Exception as error:  # keep the shard going: retry one by one to isolate the culprit
                if len(chunk) == 1:
                    more_rejects.append({"id": chunk[0]["id"], "reason": f"encoding failed: {error}"})
                    continue
                for record in chunk:
                    try:
                        rows.extend(self.encode_chunk([record]))
                    except Exception as single_error:
                        more_rejects.append({"id": record["id"], "reason": f"encoding failed: {single_error}"})
        rejects = rejects + more_rejects
        return write_shard(self.out, name, rows, rejects)

    def encode_chunk(self, chunk: list[dict]) -> list[dict]:
        import torch

        targets = self.options.targets
        codec = self.codec
        device = self.device
        with torch.no_grad():
            images = _to_unit(np.stack([r["image"] for r in chunk])).to(device)
            image_latents = codec.encode(images)
            has_mask = [r["label_map"] is not None for r in chunk]
            size = self.options.size
            labels = np.stack(
                [r["label_map"] if r["label_map"] is not None else np.zeros((size, size), np.uint8) for r in chunk]
            )
            decoupled = [decouple_mask(lab) for lab in labels]
            out: dict[str, list] = {}
            if "mmface" in targets:
                colours = _to_unit(np.stack([d[0] for d in decoupled])).to(device)
                sketches = _to_unit(np.stack([_grey_rgb(r["sketch"]) for r in chunk])).to(device)
                out["mask_latent"] = list(codec.encode(colours))
                out["sketch_latent"] = list(codec.encode(sketches))
            if "mogle" in targets:
                cond_images = []
                for colour, binary in decoupled:
                    cond_images.append(colour)
                    cond_images.extend(_grey_rgb(b.astype(np.uint8) * 255) for b in binary)
                cond = codec.encode(_to_unit(np.stack(cond_images)).to(device))
                out["cond_latents"] = list(cond.reshape(len(chunk), 20, *cond.shape[1:]))
            captions = [[self.text.truncate(c, self.options.max_tokens) or c for c in r["captions"]] for r in chunk]
            flat = [c for cs in captions for c in cs]
            emb = self.text.encode(flat)
        rows, offset = [], 0
        for i, record in enumerate(chunk):
            k = len(captions[i])
            seq, mask, pooled = (
                emb.seq[offset : offset + k],
                emb.mask[offset : offset + k],
                emb.pooled[offset : offset + k],
            )
            offset += k
            tokens = max(int(mask.sum(1).max()), 1)  # the row's longest caption (all 77 for CLIP)
            row = {
                "id": record["id"],
                "split": record["split"],
                "captions": captions[i],
                "n_captions": k,
                "text_tokens": tokens,
                "has_mask": has_mask[i],
                "sketch_source": record["sketch_source"],
                "mask_labels": labels[i].tobytes(),
                "image_latent": _f16(image_latents[i]),
                "text_seq": _f16(seq[:, :tokens]),
                "text_mask": mask[:, :tokens].to("cpu").numpy().astype(np.uint8).tobytes(),
                "text_pooled": _f16(pooled),
            }
            for key, values in out.items():
                row[key] = _f16(values[i])
            rows.append(row)
        return rows


def write_shard(out: Where, name: str, rows: list[dict], rejects: list[dict]) -> dict:
    """Writes the shard's Parquet file (whole, or not at all) and rejects, then its done marker (last), which
    records the file's size and sha256: what a re-run and the trainer check the shard against."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shards = storage.location(out) / "shards"
    path = shards / f"{name}.parquet"
    digest, size = None, 0
    if rows:
        buffer = pa.BufferOutputStream()
        pq.write_table(pa.Table.from_pylist(rows), buffer, compression="zstd")
        data = buffer.getvalue().to_pybytes()
        digest, size = hashlib.sha256(data).hexdigest(), len(data)
        storage.write_bytes(path, data)
    else:
        storage.delete(path)
    stats = {
        "name": name,
        "split": name.rsplit("-", 1)[0],
        "n_written": len(rows),
        "n_rejected": len(rejects),
        "rejects": rejects,
        "file": path.name if rows else None,
        "bytes": size,
        "sha256": digest,
    }
    storage.write_text(shards / DONE_DIR / f"{name}.json", json.dumps(stats))
    return stats


# ---------------------------------------------------------------------------------------------- driver


def field_schema(options: PrepareOptions, latent_shape: tuple[int, ...], text_dims: tuple[int, int]) -> dict:
    seq_dim, pooled_dim = text_dims
    fields = {
        "mask_labels": {"dtype": "uint8", "shape": [options.size, options.size]},
        "image_latent": {"dtype": "float16", "shape": list(latent_shape)},
        "text_seq": {"dtype": "float16", "shape": ["n_captions", "text_tokens", seq_dim]},
        "text_mask": {"dtype": "uint8", "shape": ["n_captions", "text_tokens"]},
        "text_pooled": {"dtype": "float16", "shape": ["n_captions", pooled_dim]},
    }
    if "mmface" in options.targets:
        fields["mask_latent"] = {"dtype": "float16", "shape": list(latent_shape)}
        fields["sketch_latent"] = {"dtype": "float16", "shape": list(latent_shape)}
    if "mogle" in options.targets:
        fields["cond_latents"] = {"dtype": "float16", "shape": [20, *latent_shape]}
    return fields


def decode_tensor(buffer: bytes, dtype: str, shape) -> np.ndarray:
    """Raw little-endian bytes as stored in a shard -> a (read-only, zero-copy) numpy array."""
    return np.frombuffer(buffer, dtype=np.dtype(dtype).newbyteorder("<")).reshape(shape)


def decode_field(row: dict, name: str, spec: dict) -> np.ndarray:
    """One stored tensor of one row as a numpy array (shape names resolved from the row)."""
    shape = [row[s] if isinstance(s, str) else s for s in spec["shape"]]
    return decode_tensor(row[name], spec["dtype"], shape)


def _describe_components(options: PrepareOptions) -> tuple[dict, dict, tuple[int, ...], tuple[int, int]]:
    """Codec and text encoder descriptions for the manifest; also writes the null conditions (``write_nulls``)."""
    import torch

    from modeling.codecs import load_codec
    from modeling.text_encoders import load_text_encoder

    # The driver loads them once on CPU for the manifest; on a cluster with paper-size encoders this is a
    # one-off cost of a few seconds next to hours of encoding, and it fails fast on a wrong path.
    codec = load_codec(options.codec, "cpu", torch.float32)
    text = load_text_encoder(options.text, "cpu", torch.float32)
    write_nulls(options.out, codec, text, options.size)
    return codec.describe(), text.describe(), codec.latent_shape(options.size), (text.seq_dim, text.pooled_dim)


def write_nulls(out: Where, codec, text, size: int) -> None:
    """What dropped conditions become during training: the empty caption's embedding, and the codec's latent
    of an all-black image (a dropped MoGLE local mask looks like an absent class, as at inference). Written
    (atomically) unless a complete file is there."""
    from safetensors import SafetensorError
    from safetensors.torch import load, save

    target = storage.location(out) / NULL_FILE
    try:
        if NULL_KEYS <= set(load(storage.read_bytes(target))):
            return
    except (OSError, SafetensorError, ValueError):
        pass  # missing or damaged: written below
    emb = text.encode([""])
    black = torch_from(-np.ones((1, size, size, 3), np.float32))
    tensors = {"seq": emb.seq[0], "mask": emb.mask[0], "pooled": emb.pooled[0], "blank_latent": codec.encode(black)[0]}
    tensors = {k: v.detach().float().cpu() if v.is_floating_point() else v.cpu() for k, v in tensors.items()}
    storage.write_bytes(target, save({k: v.contiguous() for k, v in tensors.items()}))


def prepare(
    options: PrepareOptions, progress: bool = True, on_progress: Callable[[int, int], None] | None = None
) -> dict:
    """Runs (or resumes) the whole precompute; returns the manifest. ``progress``: a progress bar on stderr;
    ``on_progress(shards_done, shards)``: a callback per finished shard instead."""
    import ray
    from tqdm import tqdm

    from pipelines.ray_runtime import ensure_ray

    options.validate()
    out = storage.check_reachable(options.out, create=True)  # a wrong bucket or key fails here, in one line
    storage.makedirs(out / "shards" / DONE_DIR)
    reader = open_reader(options.layout, options.root, **options.reader_options)
    ids_by_split: dict[str, list[str]] = {}
    for record_id in reader.ids():
        ids_by_split.setdefault(reader.split_of(record_id), []).append(record_id)
    plans = plan_shards(ids_by_split, options.rows_per_shard)
    codec_info, text_info, latent_shape, text_dims = _describe_components(options)

    with ThreadPoolExecutor(8) as pool:  # a finished shard is read once to check its sha256
        finished = list(pool.map(lambda p: shard_finished(out, p.name), plans))
    pending = [p for p, done in zip(plans, finished) if not done]
    if pending:
        ensure_ray()
        gpus = int(ray.cluster_resources().get("GPU", 0))
        cpus = int(ray.cluster_resources().get("CPU", 1))
        encoders = options.num_encoders or (gpus if gpus else max(1, cpus // 2))
        encoders = min(encoders, len(pending))
        items = [{"name": p.name, "ids": list(p.ids)} for p in pending]
        ds = ray.data.from_items(items, override_num_blocks=len(items))
        ds = ds.map(load_shard, fn_kwargs={"options": options}, num_cpus=1)
        ds = ds.map_batches(
            ShardEncoder,
            fn_constructor_kwargs={"options": options, "out": out},
            batch_size=1,
            concurrency=encoders,
            num_gpus=1 if gpus else 0,
            num_cpus=0 if gpus else 1,
        )
        bar = tqdm(total=len(pending), desc="prepare shards", unit="shard", disable=not progress)
        for done, _ in enumerate(ds.iter_rows(), start=1):
            bar.update(1)
            if on_progress is not None:
                on_progress(done, len(pending))
        bar.close()

    return build_manifest(options, plans, codec_info, text_info, latent_shape, text_dims)


def shard_problem(path: Where, rows: int, columns: tuple[str, ...] | list[str] = ()) -> str | None:
    """What is wrong with a written shard, judged from its Parquet footer alone (cheap); None when it looks intact.
    A damaged footer (truncated or overwritten file) is what pyarrow reports as "magic bytes not found"."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with storage.open_input(path) as f:
            metadata = pq.ParquetFile(f).metadata
    except FileNotFoundError:
        return "is missing"
    except (OSError, pa.ArrowException) as error:
        return f"is not a readable Parquet file ({error})"
    if metadata.num_rows != rows:
        return f"holds {metadata.num_rows} rows, the manifest says {rows}"
    missing = [c for c in columns if c not in metadata.schema.to_arrow_schema().names]
    if missing:
        return f"lacks the column(s) {', '.join(missing)}"
    return None


def checksum_problem(path: Where, expected: dict) -> str | None:
    """A shard whose bytes are not the ones prepare wrote (``expected``: a done marker or manifest entry with
    ``bytes`` and ``sha256``; older ones without them pass). Reads the whole file."""
    if not expected.get("sha256"):
        return None
    try:
        size = storage.size(path)
    except FileNotFoundError:
        return "is missing"
    if size != expected["bytes"]:
        return f"is {size} bytes, prepare wrote {expected['bytes']}"
    if storage.sha256(path) != expected["sha256"]:
        return "does not match the sha256 prepare recorded (its bytes were changed after it was written)"
    return None


def shard_finished(out: Where, name: str) -> bool:
    """A shard whose done marker is readable and whose file (if it wrote one) is intact, checksum included;
    anything else is redone."""
    shards = storage.location(out) / "shards"
    try:
        stats = json.loads(storage.read_text(shards / DONE_DIR / f"{name}.json"))
    except (OSError, ValueError):
        return False
    if not isinstance(stats, dict) or "n_written" not in stats:
        return False
    if not stats.get("file"):
        return True
    path = shards / stats["file"]
    return shard_problem(path, stats["n_written"]) is None and checksum_problem(path, stats) is None


def verify_prepared(out: Where, manifest: dict, split: str, columns: tuple[str, ...] | list[str] = ()) -> None:
    """Pre-flight before training: every shard of ``split`` opens as Parquet with the manifest's row count and the
    needed ``columns``. Raises ``ValueError`` naming the file and the fix, before any worker starts."""
    out = storage.location(out)
    shards = [s for s in manifest["shards"] if s["split"] == split]
    if not shards:
        there = ", ".join(sorted({s["split"] for s in manifest["shards"]})) or "none"
        raise ValueError(f"{out}: no '{split}' shards in manifest.json (data.split; it has: {there})")
    with ThreadPoolExecutor(8) as pool:
        problems = list(pool.map(lambda s: shard_problem(out / "shards" / s["file"], s["rows"], columns), shards))
    for shard, problem in zip(shards, problems):
        if problem:
            raise ValueError(f"{out / 'shards' / shard['file']}: {problem}; {REPREPARE}")


def verify_checksums(out: Where, shards: list[dict]) -> None:
    """Every byte of ``shards`` (manifest entries) against the sha256 prepare recorded: a shard garbled inside,
    behind an intact footer, is found here in one line instead of as a decompression error in a worker."""
    out = storage.location(out)
    with ThreadPoolExecutor(8) as pool:
        problems = list(pool.map(lambda s: checksum_problem(out / "shards" / s["file"], s), shards))
    for shard, problem in zip(shards, problems):
        if problem:
            raise DamagedShard(f"{out / 'shards' / shard['file']}: {problem}; {REPREPARE}")


class DamagedShard(ValueError):
    """A prepared shard whose bytes are not the ones prepare wrote (one line: the shard and the fix)."""


def build_manifest(options, plans, codec_info, text_info, latent_shape, text_dims) -> dict:
    out = storage.location(options.out)
    done_dir = out / "shards" / DONE_DIR
    splits: dict[str, dict] = {}
    shards, rejects = [], []
    missing = []
    for plan in plans:
        try:
            stats = json.loads(storage.read_text(done_dir / f"{plan.name}.json"))
        except FileNotFoundError:
            missing.append(plan.name)
            continue
        counts = splits.setdefault(plan.split, {"n_input": 0, "n_written": 0, "n_rejected": 0})
        counts["n_input"] += len(plan.ids)
        counts["n_written"] += stats["n_written"]
        counts["n_rejected"] += stats["n_rejected"]
        if stats["file"]:
            entry = {"file": stats["file"], "split": plan.split, "rows": stats["n_written"]}
            if stats.get("sha256"):
                entry.update(bytes=stats["bytes"], sha256=stats["sha256"])
            shards.append(entry)
        rejects.extend(stats["rejects"])
    if missing:
        raise RuntimeError(f"{len(missing)} shard(s) did not finish ({', '.join(missing[:5])}); run prepare again")
    storage.write_text(out / "rejects.jsonl", "".join(json.dumps(r) + "\n" for r in rejects))
    totals = {k: sum(s[k] for s in splits.values()) for k in ("n_input", "n_written", "n_rejected")}
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "layout": options.layout,
        "root": str(Path(options.root).resolve()),
        "size": options.size,
        "targets": list(options.targets),
        "codec": codec_info,
        "text_encoder": text_info,
        "sketch": SketchExtractor(options.sketch_model).name,
        "latent_shape": list(latent_shape),
        "text_dims": {"seq": text_dims[0], "pooled": text_dims[1]},
        "fields": field_schema(options, latent_shape, text_dims),
        "counts": {**totals, "splits": splits},
        "shards": shards,
        "options": {k: v for k, v in asdict(options).items() if k not in ("out",)},
    }
    storage.write_text(out / "manifest.json", json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def load_manifest(out: Where) -> dict:
    path = storage.check_reachable(out) / "manifest.json"
    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no manifest; run `faceforge data prepare ... --out {out}` first") from None
    try:
        manifest = json.loads(text)
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: not readable JSON ({error}); {REPREPARE}") from None
    missing = MANIFEST_KEYS - set(manifest) if isinstance(manifest, dict) else MANIFEST_KEYS
    if missing:
        raise ValueError(f"{path}: not a faceforge manifest (no {', '.join(sorted(missing))}); {REPREPARE}")
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ValueError(
            f"{path}: schema version {manifest.get('schema_version')}, this faceforge reads {SCHEMA_VERSION}; "
            "re-run prepare into a new folder"
        )
    return manifest


def inspect_field(out: Where, record_id: str, field_name: str) -> np.ndarray:
    """One field of one row, e.g. ``image_latent`` of id ``17``."""
    import pyarrow.dataset as pads

    manifest = load_manifest(out)
    fields = manifest["fields"]
    if field_name not in fields:
        raise KeyError(f"field {field_name!r} not stored; stored fields: {', '.join(sorted(fields))}")
    out = storage.location(out)
    files = [(out / "shards" / s["file"]).path for s in manifest["shards"]]
    table = pads.dataset(files, format="parquet", filesystem=out.fs).to_table(filter=pads.field("id") == record_id)
    if table.num_rows == 0:
        raise KeyError(f"id {record_id!r} is not among the written rows of {out} (see rejects.jsonl)")
    row = table.slice(0, 1).to_pylist()[0]
    return decode_field(row, field_name, fields[field_name]).copy()
