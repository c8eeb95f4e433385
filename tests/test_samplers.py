"""Samplers of the replay buffer: the sum tree against brute force, PER's distribution and weights, state round-trips.

Every test of the sum tree or the prioritized sampler runs twice, on the numba kernels and on the
numpy path (the `compiled` fixture); the tests at the end hold the kernels to the numpy path
directly: bit-identical trees, the same leaves found, the same draws from the same rng.
"""

from __future__ import annotations

import numpy as np
import pytest

from titan_rl.buffer import samplers
from titan_rl.buffer.samplers import PrioritizedSampler, Sampler, SumTree, UniformSampler

HAVE_NUMBA = samplers._kernels() is not None


@pytest.fixture(params=[False, True], ids=["numpy", "numba"])
def compiled(request) -> bool:
    if request.param and not HAVE_NUMBA:
        pytest.skip("numba is not installed")
    return request.param


class FixedRng:
    """Stands in for np.random.Generator where a test needs to choose the uniform draws of `random`."""

    def __init__(self, *draws: float):
        self.draws = np.array(draws, np.float64)

    def random(self, n: int) -> np.ndarray:
        return np.resize(self.draws, n)


def reference_find(values: np.ndarray, u: np.ndarray) -> np.ndarray:
    return np.searchsorted(np.cumsum(values), u, side="right")


def frequencies(sampler: Sampler, size: int, draws: int, rows: int = 1000, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    slots = np.concatenate([sampler.sample(rows, size, rng)[0] for _ in range(draws // rows)])
    return np.bincount(slots, minlength=size) / slots.size


def filled(capacity: int, priorities: np.ndarray, compiled: bool | None = None, **kwargs: float) -> PrioritizedSampler:
    sampler = PrioritizedSampler(capacity, compiled=compiled, **kwargs)
    slots = np.arange(len(priorities))
    sampler.on_insert(slots)
    sampler.update_priorities(slots, priorities)
    return sampler


# 1, 7, 64: the top scan (samplers._SCANNED_LEVELS = 6 levels) reaches the leaves; 1000, 5000: 4 and 7 levels are descended below it.
@pytest.mark.parametrize("capacity", [1, 2, 7, 64, 1000, 5000])
def test_sum_tree_find_matches_searchsorted_on_exact_sums(capacity, compiled):
    rng = np.random.default_rng(capacity)
    tree = SumTree(capacity, compiled=compiled)
    assert tree.compiled == compiled
    values = np.zeros(capacity)
    for _ in range(4):  # several sparse updates, with repeated leaves, zeros among the values
        leaves = rng.integers(0, capacity, max(1, capacity // 3))
        new = rng.integers(0, 5, leaves.size).astype(np.float64)
        tree.set(leaves, new)
        for leaf, v in zip(leaves, new, strict=True):  # last write wins
            values[leaf] = v
    values[0] = max(values[0], 1.0)  # at least one non-zero leaf
    tree.set(np.array([0]), values[:1])
    cum = np.cumsum(values)
    # integer-valued leaves: every sum is exact, so the lookup must agree exactly, boundaries included
    u = np.concatenate([rng.random(2000) * cum[-1], cum[cum < cum[-1]], [0.0]])
    np.testing.assert_array_equal(tree.find(u), reference_find(values, u))
    np.testing.assert_array_equal(tree.get(np.arange(capacity)), values)
    assert tree.total == cum[-1]
    for n in (0, 1, capacity // 2, capacity - 1, capacity):
        assert tree.prefix_total(n) == values[:n].sum()


def test_sum_tree_find_matches_searchsorted_on_random_floats_away_from_boundaries(compiled):
    rng = np.random.default_rng(1)
    values = rng.random(3000) * (rng.random(3000) > 0.3)  # about 30 % zeros
    tree = SumTree(3000, compiled=compiled)
    tree.set(np.arange(3000), values)
    u = rng.random(20000) * values.sum()
    cum = np.cumsum(values)
    ref = reference_find(values, u)
    got = tree.find(u)
    near_boundary = np.min(np.abs(u[:, None] - cum[np.clip(ref[:, None] + np.array([-1, 0]), 0, 2999)]), axis=1) < 1e-9
    assert np.all((got == ref) | near_boundary)
    assert np.all(values[got] > 0)


def test_sum_tree_sparse_updates_build_the_same_tree_as_one_bulk_set(compiled):
    rng = np.random.default_rng(2)
    values = rng.random(5000)
    bulk, sparse = SumTree(5000, compiled=compiled), SumTree(5000, compiled=compiled)
    bulk.set(np.arange(5000), values)  # rebuilds every level
    for chunk in np.array_split(rng.permutation(5000), 400):  # updates only the parents touched
        sparse.set(chunk, values[chunk])
    assert bulk.total == sparse.total
    u = rng.random(1000) * bulk.total
    np.testing.assert_array_equal(bulk.find(u), sparse.find(u))
    assert [bulk.prefix_total(n) for n in range(0, 5000, 97)] == [sparse.prefix_total(n) for n in range(0, 5000, 97)]


def test_sum_tree_repeated_leaf_keeps_its_last_value_and_clips_overshoot(compiled):
    tree = SumTree(5, compiled=compiled)
    tree.set(np.array([3, 1, 3, 3]), np.array([1.0, 2.0, 7.0, 5.0]))
    assert tree.get(np.array([1, 3])).tolist() == [2.0, 5.0]
    assert tree.total == 7.0
    assert tree.find(np.array([7.0, 100.0])).tolist() == [4, 4]  # past the total: clipped to the last leaf, not the padding


def test_prioritized_frequencies_follow_priorities_with_alpha_1(compiled):
    rng = np.random.default_rng(3)
    priorities = rng.random(40) * 5 + 0.01
    sampler = filled(64, priorities, alpha=1.0, epsilon=0.0, compiled=compiled)
    draws = 200_000
    expected = priorities / priorities.sum()
    assert np.all(np.abs(frequencies(sampler, 40, draws) - expected) < 5 * np.sqrt(expected / draws))


def test_prioritized_alpha_0_is_uniform_and_unweighted(compiled):
    priorities = np.geomspace(1e-3, 1e3, 20)
    sampler = filled(32, priorities, alpha=0.0, compiled=compiled)
    draws = 100_000
    np.testing.assert_allclose(frequencies(sampler, 20, draws), 1 / 20, rtol=0, atol=5 * np.sqrt(1 / 20 / draws))
    assert np.all(sampler.sample(64, 20, np.random.default_rng(0))[1] == 1.0)


def test_prioritized_draws_are_stratified(compiled):
    sampler = PrioritizedSampler(8, compiled=compiled)
    sampler.on_insert(np.arange(8))  # equal priorities: each of the 8 segments holds exactly one slot
    rng = np.random.default_rng(4)
    for _ in range(20):
        assert sorted(sampler.sample(8, 8, rng)[0].tolist()) == list(range(8))


def test_new_items_enter_at_the_max_priority_seen(compiled):
    sampler = PrioritizedSampler(10, alpha=0.5, epsilon=0.01, compiled=compiled)
    sampler.on_insert(np.arange(4))
    assert sampler.tree.get(np.arange(4)) == pytest.approx([1.01**0.5] * 4)
    sampler.update_priorities(np.array([0, 1]), np.array([3.0, 7.0]))
    sampler.update_priorities(np.array([1]), np.array([0.5]))  # lower again: the max seen stays 7
    assert sampler.max_priority == 7.0
    sampler.on_insert(np.array([4, 0]))  # a new slot and an overwritten one
    assert sampler.tree.get(np.array([4, 0, 1, 2])) == pytest.approx([7.01**0.5, 7.01**0.5, 0.51**0.5, 1.01**0.5])


def test_importance_weights_on_a_hand_checked_case(compiled):
    sampler = filled(4, np.array([1.0, 2.0, 3.0, 4.0]), alpha=1.0, beta=0.5, epsilon=0.0, compiled=compiled)
    # P = [.1, .2, .3, .4], size 4: w = (4 P) ** -0.5 = [1.581, 1.118, 0.913, 0.791]; slots 0 and 3 -> [1, 0.791/1.581 = 0.5]
    slots, weights = sampler.sample(2, 4, FixedRng(0.0, 0.999))  # u = 0 and (1 + 0.999) * 10 / 2 = 9.995
    assert slots.tolist() == [0, 3]
    assert weights.dtype == np.float32
    np.testing.assert_allclose(weights, [1.0, 0.5], rtol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
def test_importance_weights_follow_the_formula_and_peak_at_1(beta, compiled):
    rng = np.random.default_rng(5)
    priorities = rng.random(50) + 0.1
    sampler = filled(64, priorities, alpha=0.7, beta=beta, compiled=compiled)
    slots, weights = sampler.sample(256, 50, rng)
    p = (priorities + 1e-6) ** 0.7
    w = (50 * p[slots] / p.sum()) ** -beta
    np.testing.assert_allclose(weights, w / w.max(), rtol=1e-6)
    assert weights.max() == 1.0


def test_beta_is_writable_and_checked(compiled):
    sampler = filled(4, np.array([1.0, 4.0]), alpha=1.0, epsilon=0.0, beta=0.0, compiled=compiled)
    sampler.beta = 1.0
    assert sampler.sample(2, 2, FixedRng(0.0, 0.9))[1].tolist() == [1.0, 0.25]
    with pytest.raises(ValueError, match="beta"):
        sampler.beta = 1.5


def test_samples_stay_below_size_when_the_table_is_not_full(compiled):
    rng = np.random.default_rng(6)
    sampler = filled(100, np.full(100, 1000.0), compiled=compiled)  # slots past `size` weigh a lot but are not filled yet
    sampler.on_insert(np.arange(30))
    draws = np.concatenate([sampler.sample(64, 30, rng)[0] for _ in range(200)])
    assert draws.max() < 30 and draws.min() >= 0
    assert np.bincount(draws).max() < 2 * draws.size / 30  # drawn among the 30, not piled onto slot 29
    overshoot = filled(8, np.ones(8), alpha=1.0, epsilon=0.0, compiled=compiled)
    assert overshoot.sample(1, 5, FixedRng(1.0))[0].tolist() == [4]  # u = 5 = mass lands on slot 5 (filled, but >= size)


def test_overshoot_never_returns_a_zero_priority_slot(compiled):
    sampler = filled(8, np.array([1.0, 1.0, 1.0, 1.0, 0.0]), alpha=1.0, epsilon=0.0, compiled=compiled)
    # draws of exactly 1.0 put u at the total: past every non-zero slot, onto slot 4 (priority 0) after clipping
    slots, weights = sampler.sample(3, 5, FixedRng(1.0))  # u = [4/3, 8/3, 4]
    assert slots.tolist() == [1, 2, 3]
    assert np.all(np.isfinite(weights))


def test_update_priorities_rejects_bad_input_and_changes_nothing(compiled):
    sampler = filled(8, np.arange(1.0, 5.0), compiled=compiled)
    before = sampler.state_dict()
    for slots, priorities, match in [
        ([0, 1], [1.0, np.nan], "finite"),
        ([0, 1], [1.0, np.inf], "finite"),
        ([0, 1], [1.0, -0.5], ">= 0"),
        ([0, 1], [1.0], "shape"),
        ([0, 8], [1.0, 1.0], r"\[0, 8\)"),
        ([0.0, 1.0], [1.0, 1.0], "integers"),
    ]:
        with pytest.raises(ValueError, match=match):
            sampler.update_priorities(np.array(slots), np.array(priorities))
    after = sampler.state_dict()
    np.testing.assert_array_equal(after.pop("tree_leaves"), before.pop("tree_leaves"))
    assert after == before


def test_state_dict_round_trip_gives_identical_draws(compiled):
    rng = np.random.default_rng(7)
    a = PrioritizedSampler(3000, alpha=0.7, beta=0.5, epsilon=1e-3, compiled=compiled)
    a.on_insert(np.arange(2500))
    a.update_priorities(rng.integers(0, 2500, 1000), rng.random(1000) * 10)
    a.beta = 0.8
    state = a.state_dict()
    assert all(isinstance(v, (np.ndarray, float)) for v in state.values())
    b = PrioritizedSampler(3000, compiled=compiled)
    b.load_state_dict(state)
    assert (b.alpha, b.beta, b.epsilon, b.max_priority) == (0.7, 0.8, 1e-3, a.max_priority)
    for seed in range(3):
        (sa, wa), (sb, wb) = a.sample(256, 2500, np.random.default_rng(seed)), b.sample(256, 2500, np.random.default_rng(seed))
        np.testing.assert_array_equal(sa, sb)
        np.testing.assert_array_equal(wa, wb)
    a.on_insert(np.array([2500]))
    b.on_insert(np.array([2500]))
    assert a.tree.get(np.array([2500])) == b.tree.get(np.array([2500]))
    state["tree_leaves"][:] = 0  # the state is a copy, not a view of the tree
    assert np.all(a.tree.get(np.arange(2500)) > 0)


@pytest.mark.parametrize(
    ("change", "key"),
    [
        (lambda s: s.pop("max_priority"), "max_priority"),
        (lambda s: s.update(extra=1), "extra"),
        (lambda s: s.update(tree_leaves=np.ones(9)), "tree_leaves"),
        (lambda s: s.update(tree_leaves=np.full(8, -1.0)), "tree_leaves"),
        (lambda s: s.update(alpha=float("nan")), "alpha"),
        (lambda s: s.update(beta=2.0), "beta"),
    ],
)
def test_load_state_dict_names_the_bad_key_and_changes_nothing(change, key, compiled):
    sampler = filled(8, np.arange(1.0, 5.0), compiled=compiled)
    state = sampler.state_dict()
    change(state)
    fresh = PrioritizedSampler(8, compiled=compiled)
    with pytest.raises(ValueError, match=key):
        fresh.load_state_dict(state)
    assert fresh.tree.total == 0.0 and fresh.alpha == 0.6


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"capacity": 0}, "capacity"),
        ({"capacity": 2.5}, "capacity"),
        ({"capacity": True}, "capacity"),
        ({"capacity": 4, "alpha": -0.1}, "alpha"),
        ({"capacity": 4, "alpha": float("nan")}, "alpha"),
        ({"capacity": 4, "beta": 1.1}, "beta"),
        ({"capacity": 4, "beta": -0.1}, "beta"),
        ({"capacity": 4, "epsilon": -1.0}, "epsilon"),
    ],
)
def test_prioritized_constructor_names_the_bad_argument(kwargs, name):
    with pytest.raises(ValueError, match=name):
        PrioritizedSampler(**kwargs)


def test_sample_checks_rows_and_size(compiled):
    sampler = filled(8, np.ones(4), compiled=compiled)
    for rows, size in [(0, 4), (4, 0), (4, 9)]:
        with pytest.raises(ValueError, match="rows" if rows < 1 else "size"):
            sampler.sample(rows, size, np.random.default_rng(0))
    with pytest.raises(ValueError, match="priority zero"):
        filled(8, np.zeros(4), epsilon=0.0, compiled=compiled).sample(4, 4, np.random.default_rng(0))


def test_uniform_sampler_basics():
    sampler = UniformSampler()
    assert not sampler.prioritized and PrioritizedSampler.prioritized
    slots, weights = sampler.sample(64, 10, np.random.default_rng(8))
    assert weights is None and slots.dtype == np.int64 and slots.shape == (64,)
    np.testing.assert_array_equal(slots, np.random.default_rng(8).integers(0, 10, 64))  # the buffer's historical draw
    np.testing.assert_allclose(frequencies(sampler, 5, 50_000), 0.2, rtol=0, atol=0.01)
    sampler.on_insert(np.arange(3))  # nothing to track
    with pytest.raises(ValueError, match="no priorities"):
        sampler.update_priorities(np.arange(2), np.ones(2))
    assert sampler.state_dict() == {}
    sampler.load_state_dict({})
    with pytest.raises(ValueError, match="tree_leaves"):
        sampler.load_state_dict({"tree_leaves": np.ones(3)})
    with pytest.raises(ValueError, match="rows"):
        sampler.sample(0, 10, np.random.default_rng(0))


# The numba kernels against the numpy path: the tests below need numba.
needs_numba = pytest.mark.skipif(not HAVE_NUMBA, reason="numba is not installed")


def twin_trees(capacity: int) -> tuple[SumTree, SumTree]:
    return SumTree(capacity, compiled=True), SumTree(capacity, compiled=False)


def boundaries(tree: SumTree) -> np.ndarray:
    """Points where round-off matters most: every leaf's start, as np.cumsum and as the tree's own partial sums add it."""
    values = tree.get(np.arange(tree.capacity))
    starts = np.concatenate([[0.0], np.cumsum(values)])
    return np.concatenate([starts, np.nextafter(starts, -np.inf), np.nextafter(starts, np.inf), [tree.total], tree._tree[1:]])


@needs_numba
@pytest.mark.parametrize("capacity", [1, 2, 3, 7, 64, 65, 1000, 5000, 70_000])
def test_kernels_build_bit_identical_trees_and_find_the_same_leaves(capacity):
    rng = np.random.default_rng(capacity)
    fast, reference = twin_trees(capacity)
    for step in range(6):
        if step == 3:  # most of the tree at once: both take their rebuild path
            leaves = rng.permutation(capacity)
        else:  # a few leaves, some repeated, some zeroed, some tiny
            leaves = rng.integers(0, capacity, max(1, capacity // 50))
        values = rng.random(leaves.size) ** 4 * (rng.random(leaves.size) > 0.2)
        fast.set(leaves, values)
        reference.set(leaves, values)
        np.testing.assert_array_equal(fast._tree, reference._tree)  # bit for bit, every node
        u = np.concatenate([rng.random(3000) * fast.total * 1.01, boundaries(fast), [0.0, -1.0, np.inf]])
        np.testing.assert_array_equal(fast.find(u), reference.find(u))  # unsorted, at and past every boundary
        np.testing.assert_array_equal(fast.find(np.sort(u)), reference.find(np.sort(u)))
        for n in (0, 1, capacity // 3, capacity - 1, capacity, capacity + 5):
            assert fast.prefix_total(n) == reference.prefix_total(n)
    fast.load(reference.values)
    np.testing.assert_array_equal(fast._tree, reference._tree)


@needs_numba
@pytest.mark.parametrize(
    ("capacity", "size", "rows", "kwargs"),
    [
        (1, 1, 5, {}),
        (100, 37, 64, {"alpha": 1.0, "beta": 1.0}),
        (1000, 1000, 256, {"alpha": 0.6, "beta": 0.4}),
        (5000, 4321, 64, {"alpha": 0.7, "beta": 0.0}),
        (70_000, 70_000, 256, {"alpha": 0.5, "beta": 0.77, "epsilon": 1e-3}),
        (300, 300, 128, {"alpha": 1.0, "epsilon": 0.0}),  # a third of the priorities zero: the redraw path
    ],
)
def test_kernel_sample_draws_what_the_numpy_path_draws(capacity, size, rows, kwargs):
    rng = np.random.default_rng(capacity + size)
    fast, reference = PrioritizedSampler(capacity, compiled=True, **kwargs), PrioritizedSampler(capacity, compiled=False, **kwargs)
    for sampler in (fast, reference):
        sampler.on_insert(np.arange(size))
    for _ in range(3):
        slots = rng.integers(0, size, max(1, size // 2))
        priorities = rng.random(slots.size) * 10 * (rng.random(slots.size) > (0.33 if kwargs.get("epsilon") == 0.0 else 0.0))
        fast.update_priorities(slots, priorities)
        reference.update_priorities(slots, priorities)
        for seed in range(5):
            fs, fw = fast.sample(rows, size, np.random.default_rng(seed))
            rs, rw = reference.sample(rows, size, np.random.default_rng(seed))
            np.testing.assert_array_equal(fs, rs)
            assert fw.dtype == rw.dtype == np.float32 and fs.dtype == rs.dtype == np.int64
            np.testing.assert_allclose(fw, rw, rtol=1e-6)
            assert (
                np.abs(fw.view(np.int32) - rw.view(np.int32)).max() <= 1
            )  # the kernel's pow is numpy's to the last float32 bit, ties aside
            assert fw.max() == 1.0
            assert np.all(fast.tree.get(fs) > 0)
        # both consumed the rng alike: a draw after them is the same
        ra, rb = np.random.default_rng(9), np.random.default_rng(9)
        fast.sample(rows, size, ra)
        reference.sample(rows, size, rb)
        assert ra.random() == rb.random()


@needs_numba
def test_kernels_are_compiled_once_cached_on_disk_and_take_any_input_layout():
    kernels = samplers._kernels()
    assert kernels is samplers._kernels()  # one compilation a process
    tree = SumTree(1000)
    assert tree.compiled
    reference = SumTree(1000, compiled=False)
    leaves = np.arange(0, 1000, dtype=np.int32)[::4]  # int32, strided
    values = np.linspace(0, 3, leaves.size).astype(np.float32)[::-1]  # float32, negative stride
    for t in (tree, reference):
        t.set(leaves, values)
    frozen = reference.values  # read-only
    tree.set(np.arange(1000), frozen)
    reference.set(np.arange(1000), frozen)
    np.testing.assert_array_equal(tree._tree, reference._tree)
    u = np.linspace(0, tree.total, 50)
    np.testing.assert_array_equal(tree.find(u[::3]), reference.find(u[::3]))
    np.testing.assert_array_equal(tree.find(u.reshape(5, 10)), reference.find(u.reshape(5, 10)))  # shape kept
    assert tree.find(2.5).shape == reference.find(2.5).shape == (1,)
    draws = FixedRng(*np.linspace(0, 0.99, 7))  # a duck-typed rng ...
    draws.draws = draws.draws.astype(np.float32)  # ... whose draws are float32: converted, not refused
    fast, reference = filled(64, np.arange(1.0, 41.0), compiled=True), filled(64, np.arange(1.0, 41.0), compiled=False)
    np.testing.assert_array_equal(fast.sample(7, 40, draws)[0], reference.sample(7, 40, draws)[0])
    for name in ("locate", "set", "prefix_total"):
        dispatcher = getattr(kernels, name)
        assert len(dispatcher.signatures) == 1, f"{name} compiled more than one version"
        assert type(dispatcher._cache).__name__ == "FunctionCache", f"{name} is not cached on disk"


def test_without_numba_the_tree_falls_back_to_numpy(monkeypatch):
    monkeypatch.setattr(samplers, "_kernels", lambda: None)
    tree = SumTree(8)
    assert not tree.compiled
    tree.set(np.arange(4), np.arange(1.0, 5.0))
    assert tree.find(np.array([0.5, 9.5])).tolist() == [0, 3]
    assert not PrioritizedSampler(8).tree.compiled
    with pytest.raises(ImportError, match="numba"):
        SumTree(8, compiled=True)


@needs_numba
@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 1.0])
def test_kernel_weights_cover_the_whole_float64_range(beta):
    # ratios from 1 down to 1e-300 (the vectorised pow), then a subnormal ratio (the kernel falls back to pow)
    for priorities in (np.geomspace(1e-300, 1.0, 4000), np.array([1e-310, 1.0, 0.5, 0.25])):
        fast = filled(priorities.size, priorities, alpha=1.0, beta=beta, epsilon=0.0, compiled=True)
        reference = filled(priorities.size, priorities, alpha=1.0, beta=beta, epsilon=0.0, compiled=False)
        u = np.concatenate([[0.0], np.cumsum(priorities)[:-1]])  # every leaf's start: each leaf drawn once
        slots = fast.tree.find(u)
        np.testing.assert_array_equal(slots, reference.tree.find(u))
        value = fast.tree.get(slots)
        expected = ((value.min() / value) ** beta).astype(np.float32)
        weights = np.empty(slots.size, np.float32)
        kernels = samplers._kernels()
        tree = fast.tree
        zeros = kernels.locate(tree._tree, u, 1.0, False, tree._pow2, tree._scanned, tree.capacity - 1, beta, np.empty_like(slots), weights)
        assert zeros == 0
        assert np.abs(weights.view(np.int32) - expected.view(np.int32)).max() <= 1
