"""Organ-balanced sampling: per-organ weights and an endless, random-access organ mixture.

``organ_weights`` turns per-organ record counts into sampling probabilities; ``mix_organs`` turns
one grain ``MapDataset`` per organ into a single endless ``MapDataset`` that draws the organs
with those probabilities.

Design of ``mix_organs`` (exact per block, random inside a block, random access):

* The stream is cut into blocks of ``block_size`` (default 65,536) consecutive elements. Every
  block holds exactly ``slots[o]`` elements of organ ``o``, the largest-remainder rounding of
  ``weights[o] * block_size`` (each organ with a positive weight keeps at least one slot). So
  over any whole number of blocks the organ proportions are exact to within ``1 / block_size``.
* Inside a block the organ slots are arranged by a uniformly random permutation drawn from
  ``(seed, block)`` with a Philox counter-based generator: the organs of a window of ``n``
  elements inside one block follow the multivariate hypergeometric law (sampling without
  replacement from the block), whose variance is the i.i.d. multinomial variance times
  ``(block_size - n) / (block_size - 1)``: per-batch organ counts look i.i.d. (for
  ``n << block_size``) but never drift over the long run. There is no fixed periodic pattern
  (unlike grain's ``MapDataset.mix``, which interleaves deterministically and independently
  of the seed, so an organ would sit at the same batch rows every step).
* Because every block has the same organ counts, the number of earlier draws of organ ``o``
  before element ``i`` is ``block * slots[o] + (rank of i among organ-o slots of its block)``:
  a pure function of ``(seed, i)``. Draw ``k`` of organ ``o`` (``n_o`` records) is record
  ``perm[o, k // n_o][k % n_o]``, a fresh uniform permutation per epoch seeded by
  ``(seed, organ name)``: each organ repeats independently (a 1-record organ cycles on every
  draw while a 10,000-record organ is still in its first epoch), every record of an organ
  appears once before any repeats, and the epoch orders differ.
* Cost: a block layout (a permutation plus a stable argsort, ~2 ms) is computed once per
  ``block_size`` elements, and organs of up to ``SMALL_ORGAN`` records get their permutations
  from numpy about ``SMALL_ORGAN`` draws at a time; both are kept in small module-level LRU
  caches (< 20 MB). Larger organs use grain's index_shuffle (``MapDataset.range(n).shuffle``
  read past its end, reseeded every epoch; O(1) memory). About 5 us per element in all;
  memory does not grow with the data set.
"""

from __future__ import annotations

import functools
import math
import operator
import sys
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

WEIGHTINGS = ("balanced", "proportional", "temperature", "explicit")
DEFAULT_TEMPERATURE = 0.5  # weighting="temperature": p ~ count ** 0.5 unless given
DEFAULT_BLOCK_SIZE = 1 << 16
# Organs with at most this many records get their epoch permutations from numpy, a chunk of
# epochs (about this many draws) at a time; grain's index_shuffle costs ~1 ms per call on
# tiny domains. Larger organs use index_shuffle (O(1) memory, ~7 us per draw).
SMALL_ORGAN = 1 << 16
# SeedSequence stream tags: the block layouts and the per-organ shuffles never share numbers.
_BLOCK_STREAM = 1
_ORGAN_STREAM = 2


def organ_weights(
    counts: Mapping[str, int],
    weighting: str,
    *,
    temperature: float | None = None,
    explicit: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Sampling probability per organ (sums to 1) over the organs with at least one record.

    ``balanced``: equal; ``proportional``: count / total; ``temperature``:
    count**t / sum(count**t) for t = ``temperature`` (None: DEFAULT_TEMPERATURE; t=1
    proportional, t=0 balanced); ``explicit``: the given weights normalised. Organs with count
    0 are dropped (an explicit weight for them is ignored).
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting={weighting!r}: expected one of {WEIGHTINGS}")
    for organ, n in counts.items():
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 0:
            raise ValueError(f"counts[{organ!r}]={n!r}: expected a non-negative integer")
    present = {o: int(n) for o, n in counts.items() if n > 0}
    if not present:
        raise ValueError(f"no organ has data: counts={dict(counts)}")

    if weighting == "balanced":
        raw = dict.fromkeys(present, 1.0)
    elif weighting == "proportional":
        raw = {o: float(n) for o, n in present.items()}
    elif weighting == "temperature":
        temperature = DEFAULT_TEMPERATURE if temperature is None else temperature
        if not (math.isfinite(temperature) and temperature >= 0):
            raise ValueError(f"temperature={temperature!r}: expected a finite value >= 0")
        # Relative to the largest count so that large counts and exponents cannot overflow.
        top = max(present.values())
        raw = {o: (n / top) ** temperature for o, n in present.items()}
    else:
        raw = _explicit_weights(counts, present, explicit)
    total = math.fsum(raw.values())
    return {o: w / total for o, w in raw.items()}


def _explicit_weights(
    counts: Mapping[str, int], present: Mapping[str, int], explicit: Mapping[str, float] | None
) -> dict[str, float]:
    if explicit is None:
        raise ValueError("weighting='explicit' needs explicit={organ: weight, ...}")
    unknown = sorted(set(explicit) - set(counts))
    if unknown:
        raise ValueError(f"explicit weights name unknown organs {unknown}: known {sorted(counts)}")
    for organ, w in explicit.items():
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"explicit[{organ!r}]={w!r}: expected a finite weight >= 0")
    missing = sorted(set(present) - set(explicit))
    if missing:
        raise ValueError(f"explicit weights missing for organs with data: {missing}")
    raw = {o: float(explicit[o]) for o in present}
    if not any(raw.values()):
        raise ValueError(f"explicit weights are all zero for the organs with data {sorted(raw)}")
    return raw


def block_slots(weights: Sequence[float], block_size: int) -> tuple[int, ...]:
    """Largest-remainder rounding of ``weights * block_size`` (weights sum to 1): the organ
    counts of every block; each positive weight keeps at least one slot."""
    quota = np.asarray(weights, np.float64) * block_size
    slots = np.floor(quota).astype(np.int64)
    short = block_size - int(slots.sum())
    # Largest remainders first; ties by organ position so the rounding is deterministic.
    order = np.lexsort((np.arange(len(quota)), -(quota - slots)))
    slots[order[:short]] += 1
    for o in np.flatnonzero((slots == 0) & (quota > 0)):
        slots[o] += 1
        slots[int(np.argmax(slots))] -= 1
    return tuple(int(s) for s in slots)


@functools.lru_cache(maxsize=32)
def _block_layout(block_seed: int, slots: tuple[int, ...], block: int) -> tuple[Any, Any]:
    """(organ position, rank among that organ's slots) of every element of one block."""
    size = sum(slots)
    bitgen = np.random.Philox(np.random.SeedSequence([block_seed, block]))
    dtype = np.int16 if len(slots) <= np.iinfo(np.int16).max else np.int32
    organ = np.repeat(np.arange(len(slots), dtype=dtype), slots)
    np.random.Generator(bitgen).shuffle(organ)
    # A stable sort by organ lists each organ's positions in stream order.
    order = np.argsort(organ, kind="stable")
    starts = np.cumsum((0, *slots[:-1]))
    rank = np.empty(size, np.int64)
    rank[order] = np.arange(size) - np.repeat(starts, slots)
    organ.flags.writeable = False
    rank.flags.writeable = False
    return organ, rank


@functools.lru_cache(maxsize=64)
def _epoch_orders(organ_seed: int, n: int, epochs: int, chunk: int) -> Any:
    """Flattened record orders of epochs ``[chunk * epochs, (chunk + 1) * epochs)`` of an
    ``n``-record organ, each an independent uniform permutation (int32 [epochs * n])."""
    bitgen = np.random.Philox(np.random.SeedSequence([organ_seed, n, epochs, chunk]))
    keys = np.random.Generator(bitgen).random((epochs, n))
    orders = np.argsort(keys, axis=1).astype(np.int32).reshape(-1)
    orders.flags.writeable = False
    return orders


class _RecordOrder:
    """Record of an ``n``-record organ visited at its draw ``k``: epoch ``k // n`` walks a
    fresh permutation of the records."""

    def __init__(self, n: int, organ_seed: int):
        self._n = n
        self._seed = organ_seed
        self._epochs = max(1, SMALL_ORGAN // n)  # epochs per cached chunk
        # index_shuffle permutation of range(n), reseeded every epoch by grain.
        self._large = (
            grain.MapDataset.range(n).shuffle(seed=organ_seed) if n > SMALL_ORGAN else None
        )

    def __getitem__(self, k: int) -> int:
        if self._large is not None:
            return self._large[k]
        if self._n == 1:
            return 0
        chunk, r = divmod(k, self._epochs * self._n)
        return int(_epoch_orders(self._seed, self._n, self._epochs, chunk)[r])


def _organ_seed(seed: int, organ: str) -> int:
    """Shuffle seed of one organ: depends only on (seed, organ name)."""
    key = zlib.crc32(organ.encode("utf-8"))
    return int(np.random.SeedSequence([seed, _ORGAN_STREAM, key]).generate_state(1)[0])


class OrganMixMapDataset(grain.MapDataset):
    """Endless organ mixture; see the module docstring. Build it with ``mix_organs``."""

    def __init__(
        self,
        datasets: Sequence[grain.MapDataset],
        organs: Sequence[str],
        slots: Sequence[int],
        seed: int,
    ):
        super().__init__(list(datasets))
        self._organs = tuple(organs)
        self._slots = tuple(int(s) for s in slots)
        self._block_size = sum(self._slots)
        self._block_seed = int(
            np.random.SeedSequence([seed, _BLOCK_STREAM]).generate_state(1, np.uint64)[0]
        )
        self._orders = tuple(
            _RecordOrder(len(ds), _organ_seed(seed, o))
            for ds, o in zip(datasets, organs, strict=True)
        )

    @property
    def organs(self) -> tuple[str, ...]:
        """Organ names, in the order of ``parents``."""
        return self._organs

    @property
    def slots(self) -> tuple[int, ...]:
        """Elements of each organ in every block of ``block_size`` elements."""
        return self._slots

    @property
    def block_size(self) -> int:
        return self._block_size

    def __len__(self) -> int:
        return sys.maxsize

    def __str__(self) -> str:
        return f"OrganMixMapDataset(organs={self._organs}, slots={self._slots})"

    def locate(self, index: int) -> tuple[int, int]:
        """(organ position in ``organs``, record index in that organ's dataset) of element
        ``index``: a pure function of (seed, index)."""
        index = operator.index(index)
        if index < 0:
            raise IndexError(f"index {index} < 0: the organ mixture is endless")
        block, pos = divmod(index, self._block_size)
        organ, rank = _block_layout(self._block_seed, self._slots, block)
        o = int(organ[pos])
        draw = block * self._slots[o] + int(rank[pos])
        return o, self._orders[o][draw]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        with self._stats.record_self_time():
            o, record = self.locate(index)
        return self._stats.record_output_spec(self._parents[o][record])

    def _getitems(self, indices: Sequence[int]) -> Sequence[Any]:
        with self._stats.record_self_time(num_elements=len(indices)):
            by_organ: dict[int, tuple[list[int], list[int]]] = {}
            for i, index in enumerate(indices):
                o, record = self.locate(index)
                records, where = by_organ.setdefault(o, ([], []))
                records.append(record)
                where.append(i)
        out: list[Any] = [None] * len(indices)
        for o, (records, where) in by_organ.items():
            for i, element in zip(where, self._parents[o]._getitems(records), strict=True):
                out[i] = element
        return self._stats.record_output_spec_for_batch(out)


def mix_organs(
    datasets: Mapping[str, grain.MapDataset],
    weights: Mapping[str, float],
    *,
    seed: int,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> OrganMixMapDataset:
    """An endless, deterministic ``MapDataset`` drawing organ ``o`` with probability
    ``weights[o]`` and walking each organ's records in a per-epoch reshuffled order.

    Element ``i`` is a pure function of ``(seed, i)``: ``ds[i]``, ``ds[p::P]`` and a restored
    iterator all agree. Organ counts are exact in every block of ``block_size`` consecutive
    elements (to the rounding of ``weights * block_size``) and randomly arranged inside it.
    Organs missing from ``weights`` or with weight 0 are never drawn. Weights need not sum to 1.
    """
    seed = operator.index(seed)
    if seed < 0:
        raise ValueError(f"seed={seed}: expected a non-negative integer")
    block_size = operator.index(block_size)
    if block_size < 1:
        raise ValueError(f"block_size={block_size}: expected a positive integer")
    unknown = sorted(set(weights) - set(datasets))
    if unknown:
        raise ValueError(f"weights name organs without a dataset: {unknown}")
    for organ, w in weights.items():
        if not (math.isfinite(w) and w >= 0):
            raise ValueError(f"weights[{organ!r}]={w!r}: expected a finite weight >= 0")
        if w > 0 and len(datasets[organ]) == 0:
            raise ValueError(f"weights[{organ!r}]={w} > 0 but its dataset is empty")
    # Sorted names: the stream does not depend on the mappings' insertion order.
    organs = sorted(o for o, w in weights.items() if w > 0)
    if not organs:
        raise ValueError(f"no organ has a positive weight: weights={dict(weights)}")
    if block_size < len(organs):
        raise ValueError(f"block_size={block_size} < {len(organs)} organs with a positive weight")
    for o in organs:
        if len(datasets[o]) >= sys.maxsize:
            raise ValueError(f"datasets[{o!r}] is infinite: pass one epoch of the organ's data")
    total = math.fsum(weights[o] for o in organs)
    slots = block_slots([weights[o] / total for o in organs], block_size)
    return OrganMixMapDataset([datasets[o] for o in organs], organs, slots, seed)
