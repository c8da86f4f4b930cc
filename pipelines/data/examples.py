"""Held-out example conditions of a prepared dataset, for ``faceforge publish`` to ship with a model.

Masks and captions come from the prepared shards (always there when the model trained on them); sketches, which
the shards keep only as latents, are recomputed from the dataset root exactly as ``prepare`` made them (the
dataset's own, or the same deterministic line drawing), and left out when the root is not readable here.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from modeling import storage
from modeling.examples import Example, ExampleSet, most_typical
from pipelines.data.prepare import decode_tensor, load_manifest


def held_out_examples(
    data: str | Path, k: int = 4, split: str = "test", pool: int = 256, sketches: bool = True
) -> ExampleSet:
    """``k`` examples from ``split`` of a prepared dataset; example 0 is the most typical mask of the first
    ``pool`` rows (the default layout), the others follow in the split's order."""
    import pyarrow.parquet as pq

    manifest = load_manifest(data)
    size = manifest["size"]
    ids, masks, captions = [], [], []
    for shard in (s for s in manifest["shards"] if s["split"] == split):
        with storage.open_input(storage.location(data) / "shards" / shard["file"]) as file:
            table = pq.read_table(file, columns=["id", "mask_labels", "captions"])
        for row in table.to_pylist():
            if row["mask_labels"] is None:
                continue
            ids.append(str(row["id"]))
            masks.append(decode_tensor(row["mask_labels"], "uint8", (size, size)))
            captions.append((row["captions"] or [""])[0])
        if len(ids) >= pool:
            break
    if not ids:
        raise ValueError(f"{data}: the '{split}' split has no rows with a mask; pass another split or dataset")
    ids, masks, captions = ids[:pool], np.stack(masks[:pool]), captions[:pool]
    typical = most_typical(masks)
    order = [typical] + [i for i in range(len(ids)) if i != typical][: k - 1]
    drawn = _sketches(manifest, [ids[i] for i in order]) if sketches else None
    examples = [
        Example(ids[i], captions[i], np.array(masks[i]), None if drawn is None else drawn[j])
        for j, i in enumerate(order)
    ]
    source = {"data": str(storage.location(data)), "split": split, "pool": len(ids), "sketches": drawn is not None}
    return ExampleSet(examples, default_layout=0, source=source)


def _sketches(manifest: dict, ids: list[str]) -> list[np.ndarray] | None:
    """The sketches ``prepare`` made for ``ids`` (from the dataset root); None when the root cannot be read."""
    from pipelines.data.prepare import PrepareOptions, prepare_record
    from pipelines.data.readers import RecordError, open_reader
    from pipelines.data.transforms import SketchExtractor

    options = dict(manifest["options"])
    options["targets"] = tuple(options.get("targets") or ())
    try:
        prepare_options = PrepareOptions(out="", **options)
        reader = open_reader(prepare_options.layout, prepare_options.root, **prepare_options.reader_options)
        sketcher = SketchExtractor(prepare_options.sketch_model)
        return [prepare_record(reader.read(i), prepare_options, sketcher)["sketch"] for i in ids]
    except (OSError, ValueError, TypeError, KeyError, RecordError):
        return None
