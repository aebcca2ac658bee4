"""Organ weights and the organ mixture: proportions, per-organ epochs, determinism, random
access and per-process slices."""

import collections
import itertools
import math

import grain
import numpy as np
import pytest

from usfm_jax.data import mixing
from usfm_jax.data.mixing import WEIGHTINGS, block_slots, mix_organs, organ_weights

COUNTS = {"liver": 10000, "kidney": 1000, "thyroid": 100, "breast": 10, "heart": 1}
DRAWS = 50_000


def _organ_datasets(counts: dict[str, int]) -> dict[str, grain.MapDataset]:
    return {
        o: grain.MapDataset.range(n).map(lambda i, o=o: {"organ": o, "index": i})
        for o, n in counts.items()
    }


def _draws(ds: grain.MapDataset, n: int) -> list[dict]:
    return [ds[i] for i in range(n)]


@pytest.fixture(scope="module")
def datasets():
    return _organ_datasets(COUNTS)


@pytest.fixture(scope="module")
def balanced_draws(datasets):
    return _draws(mix_organs(datasets, organ_weights(COUNTS, "balanced"), seed=3), DRAWS)


def _fractions(draws: list[dict]) -> dict[str, float]:
    c = collections.Counter(d["organ"] for d in draws)
    return {o: c[o] / len(draws) for o in COUNTS}


# ------------------------------------------------------------------------------------------
# organ_weights
# ------------------------------------------------------------------------------------------


def test_weightings_follow_their_formulas():
    total = sum(COUNTS.values())
    assert organ_weights(COUNTS, "balanced") == pytest.approx(dict.fromkeys(COUNTS, 0.2))
    assert organ_weights(COUNTS, "proportional") == pytest.approx(
        {o: n / total for o, n in COUNTS.items()}
    )
    for t in (0.5, 0.3):
        z = sum(n**t for n in COUNTS.values())
        w = organ_weights(COUNTS, "temperature", temperature=t)
        assert w == pytest.approx({o: n**t / z for o, n in COUNTS.items()}, rel=1e-12)
    # The limits: t=1 is proportional, t=0 balanced.
    assert organ_weights(COUNTS, "temperature", temperature=1.0) == pytest.approx(
        organ_weights(COUNTS, "proportional")
    )
    assert organ_weights(COUNTS, "temperature", temperature=0.0) == pytest.approx(
        organ_weights(COUNTS, "balanced")
    )
    # unset (as the config leaves it): the documented exponent 0.5
    assert organ_weights(COUNTS, "temperature") == organ_weights(
        COUNTS, "temperature", temperature=0.5
    )
    for weighting in ("balanced", "proportional", "temperature"):
        assert math.fsum(organ_weights(COUNTS, weighting).values()) == pytest.approx(1.0)


def test_explicit_weights_are_normalised_and_empty_organs_dropped():
    counts = {"liver": 5, "kidney": 3, "heart": 0}
    w = organ_weights(counts, "explicit", explicit={"liver": 3.0, "kidney": 1.0, "heart": 7.0})
    assert w == pytest.approx({"liver": 0.75, "kidney": 0.25})
    # A zero weight keeps the organ (at 0); empty organs are dropped for every weighting.
    assert organ_weights({"a": 1, "b": 2}, "explicit", explicit={"a": 0, "b": 2}) == {
        "a": 0.0,
        "b": 1.0,
    }
    for weighting in ("balanced", "proportional", "temperature"):
        assert set(organ_weights(counts, weighting)) == {"liver", "kidney"}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(weighting="uniform"), "weighting='uniform'.*balanced"),
        (dict(weighting="temperature", temperature=-0.1), "temperature=-0.1"),
        (dict(weighting="temperature", temperature=math.nan), "temperature=nan"),
        (dict(weighting="explicit"), "explicit="),
        (dict(weighting="explicit", explicit={"liver": 1.0}), "missing.*kidney"),
        (dict(weighting="explicit", explicit={"liver": 1, "kidney": 1, "lung": 1}), "lung"),
        (dict(weighting="explicit", explicit={"liver": 1.0, "kidney": -1.0}), "kidney.*-1"),
        (dict(weighting="explicit", explicit={"liver": 0, "kidney": 0}), "all zero"),
        (dict(weighting="explicit", explicit={"liver": 1, "kidney": math.inf}), "kidney"),
    ],
)
def test_organ_weights_errors_name_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        organ_weights({"liver": 10, "kidney": 2, "heart": 0}, **kwargs)


@pytest.mark.parametrize(
    "counts, match",
    [
        ({"liver": 0, "kidney": 0}, "no organ has data"),
        ({}, "no organ has data"),
        ({"liver": -1}, r"counts\['liver'\]=-1"),
        ({"liver": 2.5}, r"counts\['liver'\]"),
    ],
)
def test_organ_weights_rejects_bad_counts(counts, match):
    for weighting in WEIGHTINGS:
        with pytest.raises(ValueError, match=match):
            organ_weights(counts, weighting, explicit={"liver": 1.0})


# ------------------------------------------------------------------------------------------
# mix_organs: proportions
# ------------------------------------------------------------------------------------------


def test_balanced_mixture_gives_every_organ_a_fifth(balanced_draws):
    for organ, fraction in _fractions(balanced_draws).items():
        assert abs(fraction - 0.2) < 0.01, organ


def test_proportional_mixture_matches_the_counts(datasets):
    w = organ_weights(COUNTS, "proportional")
    fractions = _fractions(_draws(mix_organs(datasets, w, seed=5), DRAWS))
    for organ, fraction in fractions.items():
        assert abs(fraction - w[organ]) < 0.01, organ
    assert abs(fractions["thyroid"] / w["thyroid"] - 1) < 0.1  # the ~1% organ


@pytest.mark.parametrize("t", [0.5, 0.3])
def test_temperature_mixture_matches_its_formula(datasets, t):
    w = organ_weights(COUNTS, "temperature", temperature=t)
    fractions = _fractions(_draws(mix_organs(datasets, w, seed=6), DRAWS))
    z = sum(n**t for n in COUNTS.values())
    for organ, fraction in fractions.items():
        assert abs(fraction - COUNTS[organ] ** t / z) < 0.01, organ


def test_every_block_holds_exact_organ_counts(datasets):
    w = organ_weights(COUNTS, "temperature", temperature=0.5)
    ds = mix_organs(datasets, w, seed=1, block_size=1000)
    assert ds.block_size == 1000 and sum(ds.slots) == 1000
    expected = dict(zip(ds.organs, ds.slots, strict=True))
    assert all(abs(expected[o] - 1000 * w[o]) < 1 for o in COUNTS)
    draws = _draws(ds, 3000)
    orders = []
    for block in range(3):
        chunk = draws[block * 1000 : (block + 1) * 1000]
        assert collections.Counter(d["organ"] for d in chunk) == expected
        orders.append([d["organ"] for d in chunk])
    assert orders[0] != orders[1] != orders[2]  # the layout is reshuffled per block


def test_block_slots_rounding():
    assert block_slots([0.5, 0.25, 0.25], 8) == (4, 2, 2)
    assert sum(block_slots([1 / 3] * 3, 100)) == 100
    # Largest remainder: 0.7 * 10 = 7, 0.2 * 10 = 2, 0.1 * 10 = 1 (float noise must not matter).
    assert block_slots([0.7, 0.2, 0.1], 10) == (7, 2, 1)
    # A tiny positive weight still gets a slot.
    assert block_slots([1 - 1e-9, 1e-9], 100) == (99, 1)


# ------------------------------------------------------------------------------------------
# mix_organs: per-organ epochs
# ------------------------------------------------------------------------------------------


def _epochs_of(draws: list[dict], organ: str) -> list[list[int]]:
    """The organ's walk cut into epochs of its record count (the last one may be partial)."""
    walk = [d["index"] for d in draws if d["organ"] == organ]
    n = COUNTS[organ]
    return [walk[k : k + n] for k in range(0, len(walk), n)]


@pytest.mark.parametrize("organ", ["liver", "kidney", "thyroid", "breast"])
def test_each_organ_visits_every_record_once_per_epoch(balanced_draws, organ):
    n = COUNTS[organ]
    *complete, last = _epochs_of(balanced_draws, organ)
    assert len(complete) >= (0 if n > 1000 else 9), organ  # liver: about 1 epoch in 50k draws
    for epoch in complete:
        assert sorted(epoch) == list(range(n)), organ
    assert len(set(last)) == len(last) and set(last) <= set(range(n)), organ
    if len(complete) > 1:  # and the epochs are reshuffled
        assert len({tuple(e) for e in complete}) > len(complete) // 2, organ


def test_rare_organs_cycle_while_large_ones_are_in_their_first_epoch(balanced_draws):
    walks = collections.defaultdict(list)
    for d in balanced_draws[:40_000]:
        walks[d["organ"]].append(d["index"])
    assert set(walks["heart"]) == {0} and len(walks["heart"]) > 7000
    assert len(walks["breast"]) // 10 > 700  # ~800 epochs of the 10-record organ
    assert len(set(walks["liver"])) == len(walks["liver"]) < 10000  # still in epoch 0


@pytest.mark.parametrize("small_organ", [64, 8])
def test_epochs_with_index_shuffle_and_across_cache_chunks(monkeypatch, small_organ):
    # SMALL_ORGAN=64: the 200-record organ takes grain's index_shuffle path; SMALL_ORGAN=8:
    # the 5-record organ's orders come in chunks of one epoch, crossed many times here.
    monkeypatch.setattr(mixing, "SMALL_ORGAN", small_organ)
    counts = {"big": 200, "small": 5}
    ds = mix_organs(_organ_datasets(counts), {"big": 1.0, "small": 1.0}, seed=9)
    walks = collections.defaultdict(list)
    for d in _draws(ds, 1000):
        walks[d["organ"]].append(d["index"])
    for organ, n in counts.items():
        epochs = [walks[organ][k : k + n] for k in range(0, len(walks[organ]) - n + 1, n)]
        assert len(epochs) >= 2, organ
        assert all(sorted(e) == list(range(n)) for e in epochs), organ
        assert len({tuple(e) for e in epochs}) > 1, organ


# ------------------------------------------------------------------------------------------
# mix_organs: determinism, random access, slices
# ------------------------------------------------------------------------------------------


def test_same_seed_same_stream_and_different_seed_different_stream(datasets):
    w = organ_weights(COUNTS, "balanced")
    a = _draws(mix_organs(datasets, w, seed=7), 2000)
    b = _draws(mix_organs(datasets, w, seed=7), 2000)
    c = _draws(mix_organs(datasets, w, seed=8), 2000)
    assert a == b
    assert [d["organ"] for d in a] != [d["organ"] for d in c]
    liver = lambda draws: [d["index"] for d in draws if d["organ"] == "liver"][:50]
    assert liver(a) != liver(c)
    # The mappings' insertion order does not matter.
    reordered = dict(reversed(list(datasets.items())))
    assert _draws(mix_organs(reordered, dict(reversed(list(w.items()))), seed=7), 2000) == a


@pytest.mark.parametrize("num_threads", [0, 4])
def test_random_access_matches_iteration_and_restored_iterators(datasets, num_threads):
    ds = mix_organs(datasets, organ_weights(COUNTS, "temperature"), seed=2)
    it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads)))
    streamed = list(itertools.islice(it, 3000))
    assert streamed == _draws(ds, 3000)
    # Random access far into the stream, past many epochs of the small organs.
    far = 10**9 + 12345
    assert ds[far] == ds[far] and ds[far]["organ"] in COUNTS
    # An iterator restored from a checkpointed state continues at its position.
    it = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads)))
    for _ in range(1234):
        next(it)
    state = it.get_state()
    restored = iter(ds.to_iter_dataset(grain.ReadOptions(num_threads=num_threads)))
    restored.set_state(state)
    assert list(itertools.islice(restored, 10)) == [ds[i] for i in range(1234, 1244)]


@pytest.mark.parametrize("process_count", [2, 4])
def test_process_slices_partition_the_stream(datasets, process_count):
    ds = mix_organs(datasets, organ_weights(COUNTS, "balanced"), seed=4)
    n = 4000
    first = _draws(ds, n)
    slices = [ds[p::process_count] for p in range(process_count)]
    per_process = [[s[j] for j in range(n // process_count)] for s in slices]
    rebuilt = [per_process[i % process_count][i // process_count] for i in range(n)]
    assert rebuilt == first
    # Batch-then-slice: process p's block of global batch k.
    batch = 64
    local = ds.batch(batch // process_count)
    for p in range(process_count):
        block = local[p::process_count][1]
        expected = first[batch + p * (batch // process_count) :][: batch // process_count]
        assert list(block["index"]) == [d["index"] for d in expected]
        assert list(block["organ"]) == [d["organ"] for d in expected]


# ------------------------------------------------------------------------------------------
# mix_organs: errors
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "weights, kwargs, match",
    [
        ({"liver": 1.0, "lung": 1.0}, {}, "lung"),
        ({"liver": 1.0, "kidney": -0.5}, {}, r"weights\['kidney'\]=-0.5"),
        ({"liver": 1.0, "empty": 1.0}, {}, "'empty'.*empty"),
        ({"liver": 0.0}, {}, "no organ has a positive weight"),
        ({"liver": 1.0}, {"seed": -1}, "seed=-1"),
        ({"liver": 1.0, "kidney": 1.0}, {"block_size": 1}, "block_size=1"),
    ],
)
def test_mix_organs_errors(weights, kwargs, match):
    datasets = _organ_datasets({"liver": 10, "kidney": 5, "empty": 0})
    with pytest.raises(ValueError, match=match):
        mix_organs(datasets, weights, **{"seed": 0, **kwargs})


def test_organs_without_weight_are_never_drawn():
    datasets = _organ_datasets({"liver": 10, "kidney": 5, "heart": 0})
    ds = mix_organs(datasets, {"liver": 1.0, "kidney": 0.0}, seed=0)
    assert ds.organs == ("liver",)
    assert {d["organ"] for d in _draws(ds, 200)} == {"liver"}
    assert np.all(np.array(ds.slots) > 0)
