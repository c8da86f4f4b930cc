"""Re-cut a DeepSpeed ZeRO-1/2 checkpoint for another number of workers.

DeepSpeed's ZeRO-1/2 optimizer flattens each parameter group into one vector, pads it with zeros to a multiple
of ``2 * world`` (``nccl_start_alignment_factor``) and gives rank ``r`` the ``r``-th of ``world`` equal slices.
Each rank's ``zero_pp_rank_R_mp_rank_00_optim_states.pt`` holds its slice of the fp32 master weights (the
group's tail padding cut off, ``group_paddings`` saying how much) and the base optimizer's state for that slice:
tensors shaped like the padded slice (AdamW's ``exp_avg``/``exp_avg_sq``, bitsandbytes' 32-bit ``state1``/
``state2``), scalars (``step``), and for bitsandbytes' 8-bit states ``state1``/``state2`` as uint8 codes of
``qmap1``/``qmap2`` scaled by ``absmax1``/``absmax2``, one per 256-element block *of the slice*.

Re-cutting for ``world`` M joins the N old slices, drops the old padding, pads for M and slices again. fp32
master weights and 32-bit states move exactly. 8-bit states are decoded to fp32, moved, and encoded on the new
slice's own 256-element blocks; a new block that is exactly an old block (same first and last element: the old
and new block grids coincide there, e.g. the same world size, or slices that are multiples of 256 elements)
keeps its old codes and absmax bit for bit. Any other block is re-encoded to the nearest code of its new
absmax: within half a code step of the saved value, except a block's largest magnitude when it is negative,
which lands on the signed map's lowest code, -0.99297 x absmax (0.7% of absmax off: bitsandbytes' own encoding
does the same at every step). That is also why even an aligned block is copied, not re-encoded: it would come
back with a smaller absmax than it was saved with.

Whether a slice holds 8-bit states follows bitsandbytes' own rule (8-bit from ``min_8bit_size`` elements of the
*slice*), so a group can change between 8-bit and 32-bit states when the number of workers changes; decoding is
then exact and encoding as above.

DeepSpeed's own ``elastic_checkpoint`` path re-splits only tensors shaped like the slice and takes rank 0's
value for everything else, which would give every new rank rank 0's absmax: not used here.
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from modeling.optim import BLOCK, NearestCodeQuantizer, quantize_into

ALIGNMENT = 2  # DeepSpeed's nccl_start_alignment_factor: each group is padded to a multiple of 2 * world
OPTIM_FILE = re.compile(r"zero_pp_rank_(\d+)_mp_rank_00_optim_states\.pt")
BNB_QUANT_STATE = "__bnb_optimizer_quant_state__"  # where bitsandbytes' state_dict() tucks its 8-bit tensors
EIGHT_BIT = re.compile(r"state(\d+)")  # state1 / state2 with their qmapN and absmaxN


@dataclass(frozen=True)
class GatheredGroup:
    """One parameter group over all ranks, without padding."""

    master: Tensor  # the fp32 master weights
    states: dict[str, Tensor]  # every slice-shaped state as fp32 (8-bit ones decoded)
    scalars: dict[str, object]  # the states every rank holds the same (step)
    eight_bit: frozenset[str]  # which of ``states`` were saved as 8-bit codes


@dataclass(frozen=True)
class Partition:
    """What one rank's ZeRO optimizer holds for one parameter group."""

    master: Tensor  # its slice of the fp32 master weights, padded to the slice size
    state: dict[str, object]  # the base optimizer's state for that slice
    settings: dict[str, object]  # the group's optimizer settings (lr, betas, ...) as saved


def slice_size(numel: int, world: int) -> int:
    """Elements per rank of a group of ``numel`` elements: the padded group split ``world`` ways."""
    return math.ceil(numel / (ALIGNMENT * world)) * ALIGNMENT


def zero3_refusal(checkpoint: object, saved_world: int, world: int) -> ValueError:
    """The one-line error for a ZeRO-3 checkpoint met at another world size (its partitions are not re-cut)."""
    return ValueError(
        f"{checkpoint}: a ZeRO-3 checkpoint written by {saved_world} workers cannot be loaded by {world} "
        f"(resharding covers ZeRO stages 1 and 2); resume with scaling.num_workers={saved_world}"
    )


class ZeroCheckpoint:
    """The per-rank optimizer files of one DeepSpeed ZeRO-1/2 checkpoint folder (the tag folder)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        files = {}
        for path in self.folder.iterdir():
            match = OPTIM_FILE.fullmatch(path.name)
            if match:
                files[int(match.group(1))] = path
        if not files or sorted(files) != list(range(len(files))):
            raise ValueError(
                f"{self.folder}: expected zero_pp_rank_0..N-1_mp_rank_00_optim_states.pt, found ranks {sorted(files)}"
            )
        # mmap: a rank's tensors are read only when a new slice needs them
        loaded = [torch.load(files[r], map_location="cpu", weights_only=False, mmap=True) for r in sorted(files)]
        self._ranks = [sd["optimizer_state_dict"] for sd in loaded]
        zero = loaded[0].get("ds_config", {}).get("zero_optimization", {})
        if zero.get("round_robin_gradients"):
            raise ValueError(f"{self.folder}: round_robin_gradients orders each group by world size; cannot reshard")
        if any(not isinstance(sd["base_optimizer_state"], dict) for sd in self._ranks):
            raise ValueError(f"{self.folder}: an elastic ZeRO checkpoint (elastic_checkpoint=true); cannot reshard")
        self.world = len(self._ranks)
        self.groups = len(self._ranks[0]["single_partition_of_fp32_groups"])

    def numel(self, group: int) -> int:
        """The group's elements without the tail padding (parameter-alignment padding inside stays)."""
        return sum(sd["single_partition_of_fp32_groups"][group].numel() for sd in self._ranks)

    def old_slice(self, group: int) -> int:
        sd = self._ranks[0]
        return sd["single_partition_of_fp32_groups"][group].numel() + sd["group_paddings"][group]

    def gather(self) -> list[GatheredGroup]:
        """Every group whole: master weights and states over all ranks, for comparisons and tests."""
        out = []
        for i in range(self.groups):
            kinds = self._kinds(i)
            states = {k: self._window(i, k, 0, self.numel(i)) for k, kind in kinds.items() if kind != "scalar"}
            scalars = {k: self._scalar(i, k) for k, kind in kinds.items() if kind == "scalar"}
            eight = frozenset(k for k, kind in kinds.items() if kind == "8bit")
            out.append(GatheredGroup(self._window(i, None, 0, self.numel(i)), states, scalars, eight))
        return out

    def partition(self, world: int, rank: int, min_8bit_size: int | None = None) -> list[Partition]:
        """Rank ``rank``'s share of every group at ``world`` workers. ``min_8bit_size``: the bitsandbytes
        optimizer's (8-bit states for slices of at least that many elements), None for a 32-bit optimizer."""
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} is not one of {world} workers")
        out = []
        for i in range(self.groups):
            size = slice_size(self.numel(i), world)
            lo, hi = rank * size, (rank + 1) * size
            state: dict[str, object] = {}
            for key, kind in self._kinds(i).items():
                if kind == "scalar":
                    state[key] = self._scalar(i, key)
                    continue
                values = self._window(i, key, lo, hi)
                suffix = EIGHT_BIT.fullmatch(key)
                if suffix and min_8bit_size is not None and size >= min_8bit_size:
                    state.update(self._encode(i, key, suffix.group(1), kind, values, lo, hi))
                else:
                    state[key] = values
            out.append(Partition(self._window(i, None, lo, hi), state, self._settings(i)))
        return out

    # ---------------------------------------------------------------------------------------------- internals

    def _state(self, rank: int, group: int) -> dict:
        base = self._ranks[rank]["base_optimizer_state"]
        param = base["param_groups"][group]["params"][0]
        state = dict(base["state"].get(param, {}))
        state.update(state.pop(BNB_QUANT_STATE, {}))
        return state

    def _kinds(self, group: int) -> dict[str, str]:
        """Each state key of the group: '8bit' (codes; its qmapN/absmaxN are folded in), 'slice' (a tensor shaped
        like the padded slice) or 'scalar' (the same on every rank)."""
        state, size = self._state(0, group), self.old_slice(group)
        kinds = {}
        for key, value in state.items():
            match = EIGHT_BIT.fullmatch(key)
            if match and torch.is_tensor(value) and value.dtype == torch.uint8:
                kinds[key] = "8bit"
            elif torch.is_tensor(value) and value.shape == (size,):
                kinds[key] = "slice"
            elif not (key.startswith(("qmap", "absmax")) and f"state{key[-1]}" in state):
                kinds[key] = "scalar"
        return kinds

    def _piece(self, rank: int, group: int, key: str | None) -> Tensor:
        """Rank ``rank``'s unpadded slice of the master weights (``key`` None) or of a state, as fp32."""
        sd = self._ranks[rank]
        length = sd["single_partition_of_fp32_groups"][group].numel()
        if key is None:
            return sd["single_partition_of_fp32_groups"][group].detach().float()
        state = self._state(rank, group)
        value = state[key]
        if value.dtype == torch.uint8:
            suffix = key[len("state") :]
            value = decode(value, state[f"qmap{suffix}"], state[f"absmax{suffix}"])
        return value[:length].float()

    def _window(self, group: int, key: str | None, lo: int, hi: int) -> Tensor:
        """Elements [lo, hi) of the whole group (zeros past its end), read from the old ranks that hold them."""
        size, numel = self.old_slice(group), self.numel(group)
        out = torch.zeros(hi - lo, dtype=torch.float32)
        for rank in range(lo // size, min(self.world, -(-hi // size))):
            start = rank * size
            begin, end = max(lo, start), min(hi, start + size, numel)
            if begin < end:
                out[begin - lo : end - lo] = self._piece(rank, group, key)[begin - start : end - start]
        return out

    def _encode(self, group: int, key: str, suffix: str, kind: str, values: Tensor, lo: int, hi: int) -> dict:
        """8-bit codes and block absmax for the new slice [lo, hi) holding ``values``; blocks that coincide with
        an old block keep its codes and absmax unchanged."""
        ref = self._state(0, group)
        if kind == "8bit":
            qmap = ref[f"qmap{suffix}"].clone()
        else:  # 32-bit before: the maps bitsandbytes' 8-bit Adam gives its first and second moment
            import bitsandbytes.functional as F

            qmap = F.create_dynamic_map(signed=suffix == "1")
        codes = torch.empty(values.numel(), dtype=torch.uint8)
        absmax = torch.empty(-(-values.numel() // BLOCK), dtype=torch.float32)
        quantize_into(NearestCodeQuantizer(qmap), values, codes, absmax)
        if kind == "8bit":
            self._keep_aligned_blocks(group, key, suffix, lo, hi, codes, absmax)
        return {key: codes, f"qmap{suffix}": qmap, f"absmax{suffix}": absmax}

    def _keep_aligned_blocks(
        self, group: int, key: str, suffix: str, lo: int, hi: int, codes: Tensor, absmax: Tensor
    ) -> None:
        """Copy the old codes and absmax of every new block of [lo, hi) that is exactly one old block."""
        size = self.old_slice(group)
        starts = torch.arange(lo, hi, BLOCK)
        ends = torch.clamp(starts + BLOCK, max=hi)
        rank, offset = starts // size, starts % size
        old_ends = torch.minimum(starts + BLOCK, (rank + 1) * size)
        same = (rank < self.world) & (offset % BLOCK == 0) & (old_ends == ends)
        for r in rank[same].unique().tolist():
            old = self._state(r, group)
            blocks = torch.nonzero(same & (rank == r)).flatten()
            absmax[blocks] = old[f"absmax{suffix}"][offset[blocks] // BLOCK]
            # one old rank's kept blocks are consecutive in both grids: one copy of their codes
            first, last = int(blocks[0]), int(blocks[-1])
            if last - first + 1 != blocks.numel():
                raise AssertionError(f"kept blocks {first}..{last} of rank {r} are not consecutive")
            begin, end, source = int(starts[first]), int(ends[last]), int(offset[first])
            codes[begin - lo : end - lo] = old[key][source : source + end - begin]

    def _scalar(self, group: int, key: str) -> object:
        values = [self._state(r, group)[key] for r in range(self.world)]
        if not all(_same(values[0], v) for v in values[1:]):
            raise ValueError(f"{self.folder}: optimizer state '{key}' of group {group} differs between ranks")
        return values[0].clone() if torch.is_tensor(values[0]) else copy.deepcopy(values[0])

    def _settings(self, group: int) -> dict[str, object]:
        settings = [
            {k: v for k, v in sd["base_optimizer_state"]["param_groups"][group].items() if k != "params"}
            for sd in self._ranks
        ]
        for other in settings[1:]:
            differ = sorted(k for k in settings[0] if not _same(settings[0][k], other.get(k)))
            if differ:
                # e.g. Prodigy's step-size estimate, which each rank computes from its own slice
                raise ValueError(f"{self.folder}: optimizer setting {differ[0]} of group {group} differs between ranks")
        return copy.deepcopy(settings[0])


def decode(codes: Tensor, qmap: Tensor, absmax: Tensor) -> Tensor:
    """bitsandbytes' blockwise dequantization (each code's map value times its 256-element block's absmax): the
    values its 8-bit optimizer steps from."""
    import bitsandbytes  # noqa: F401  (registers torch.ops.bitsandbytes)

    return torch.ops.bitsandbytes.dequantize_blockwise(codes, absmax, qmap, BLOCK, torch.float32)


def _same(a: object, b: object) -> bool:
    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
    return a == b
