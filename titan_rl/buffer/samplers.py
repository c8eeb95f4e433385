"""Which ring slots a sample draws: the replay buffer's sampler seam (after TorchRL's Sampler and Reverb's selectors).

The storage is a ring of `capacity` slots owned by someone else; a sampler only picks slots. The
owner tells it what was written (`on_insert`), asks it for `rows` slots among the `size` filled
ones (`sample`), and, for a prioritized sampler, hands back new priorities for slots it drew
(`update_priorities`). No locking (the owner serialises calls), no gRPC, no torch.

The prioritized sampler's sum tree runs on small numba kernels (`_kernels`) when numba is
installed, and on vectorised numpy otherwise. The numpy path is the reference the tests hold the
kernels to, and the fallback; it is several times slower (a batch from a 1M-item table costs a
dozen or so numpy calls, one per tree level, where the kernels make one call). The kernels are
compiled on the first `SumTree` a process builds (numba is imported only then, so a uniform-only
buffer never loads it) and cached on disk (numba's `cache=True`, in `__pycache__` beside this
file, or under NUMBA_CACHE_DIR if set): the first process after a change of this file compiles
them (about 3 s), later ones load them (about 0.2 s, plus 0.2 s to import numba).
"""

from __future__ import annotations

import functools
import math
import types
import warnings
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

# Levels of the sum tree that `SumTree.find` skips with one cumsum + search over a whole level
# instead of descending them one by one; the numba kernel and the numpy path skip the same levels
# (so that they find the same leaves, round-off included). Measured on a 1M-leaf tree, kernel:
# 6 levels ~10 % faster than 0 or 10 at batches of 64 and 256 (the 2**10-node walk costs more than
# the ten levels it saves). Numpy: 6 costs ~4 more numpy steps than 10, in the fallback only.
_SCANNED_LEVELS = 6
# Retries of rows that landed on a zero-priority slot before falling back to a deterministic answer.
_RESAMPLE_ROUNDS = 8
# `SumTree.set` recomputes the whole tree instead of each set leaf's ancestors once the leaves
# times the depth, times this, pass the number of nodes (one sequential pass beats that many scattered ones).
_REBUILD_FACTOR = 8


# The kernels below are plain Python over numpy arrays and scalars, compiled by `_kernels`. They
# do the numpy path's float operations in the numpy path's order, so the two build bit-identical
# trees and find identical leaves, boundaries and round-off included. Only the importance weights
# are computed another way (see the end of `_locate_kernel`), to the same float32 values but for
# a rare last-bit tie.


def _locate_kernel(
    tree: np.ndarray,
    points: np.ndarray,
    scale: float,
    stratified: bool,
    pow2: int,
    scanned: int,
    last: int,
    beta: float,
    slots: np.ndarray,
    weights: np.ndarray,
) -> int:
    """`SumTree.find` and, when `weights` has rows, the rest of `PrioritizedSampler.sample`, in one call.

    u[i] is points[i], or (points[i] + i) * scale when `stratified` (the numpy path's
    (draws + arange(rows)) * (mass / rows), rounded alike). Each u is located as `_find_numpy`
    does: the `scanned` top levels by the cumulative sums of level `scanned`'s nodes, added in
    np.cumsum's order, then one level at a time; the leaf, clipped to `last`, goes to `slots`.
    Then, if `weights` is not empty and no slot drawn has value zero, the importance weights
    (smallest value drawn / value) ** beta go to `weights`, as float32. Returns how many rows drew
    a zero-valued slot (then `weights` is left unset, and the caller redraws those rows).

    Stratified points come sorted, so the cumulative sums are walked once for all rows, as a
    merge (a point below the one before it starts the walk again). The descent below runs level
    by level over every row rather than row by row, and without branches, so the loads of one
    level, independent of each other, overlap in the memory system instead of waiting in turn,
    and no coin-toss branch is mispredicted (1M leaves, 64 rows: 22 us row by row with branches,
    5 us like this). Node indices are unsigned, which spares numba's check for negative indices.
    """
    rows = points.size
    u = np.empty(rows)
    if stratified:
        for i in range(rows):
            u[i] = (points[i] + i) * scale
    else:
        u[:] = points
    first = 1 << scanned  # the scanned level's first node; it has `first` nodes
    index, before, previous = 0, 0.0, -np.inf  # before: the sum of the level's nodes left of node `index`
    for i in range(rows):
        x = u[i]
        if x < previous:
            index, before = 0, 0.0
        previous = x
        while index < first - 1:  # searchsorted(cumsum[:-1], x, side="right"): past the last start is the last node
            after = before + tree[first + index]  # added in np.cumsum's order
            if after > x:
                break
            before = after
            index += 1
        u[i] = x - before
        slots[i] = first + index
    one = np.uint64(1)
    level = first
    while level < pow2:
        for i in range(rows):
            node = np.uint64(slots[i]) << one  # left child
            left = tree[node]
            x = u[i]
            right = x >= left
            u[i] = x - left if right else x
            slots[i] = np.int64(node | np.uint64(right))
        level *= 2
    zeros = 0
    smallest, largest = np.inf, 0.0
    for i in range(rows):
        slot = min(slots[i] - pow2, last)
        slots[i] = slot
        value = tree[pow2 + slot]
        zeros += value == 0.0
        smallest = min(smallest, value)
        largest = max(largest, value)
    if zeros or weights.size == 0:
        return zeros
    # The weights: (size * P(i)) ** -beta / max_batch, where size and mass cancel, is
    # (smallest / value) ** beta. One call of pow a row costs ~10 ns; this computes it as
    # 2 ** (beta * log2(ratio)) in plain float64 arithmetic, which LLVM vectorises: log2 from the
    # ratio's exponent bits and a series in its mantissa, 2 ** from a series and exponent bits.
    # Within ~1e-13 of pow, so the float32 weights are numpy's but for a rare last-bit tie.
    ratio = u  # the points are done with: reuse them
    for i in range(rows):
        ratio[i] = smallest / tree[pow2 + slots[i]]  # in (0, 1]
    if smallest < largest * 2.0**-1000:  # a ratio may be subnormal, out of the bit tricks' reach: pow it is
        for i in range(rows):
            weights[i] = np.float32(ratio[i] ** beta)
        return 0
    bits = ratio.view(np.int64)
    scratch = np.empty(rows, np.int64)
    for i in range(rows):  # ratio = mantissa * 2 ** exponent, mantissa in [1, 2)
        b = bits[i]
        scratch[i] = (b & 0xFFFFFFFFFFFFF) | 0x3FF0000000000000
        ratio[i] = np.float64((b >> 52) - 1023)
    mantissas = scratch.view(np.float64)
    for i in range(rows):
        m, e = mantissas[i], ratio[i]
        high = m > 1.4142135623730951  # centre the mantissa on 1: [0.707, 1.414]
        m = m * 0.5 if high else m
        e = e + 1.0 if high else e
        t = (m - 1.0) / (m + 1.0)  # ln(m) = 2 atanh(t), |t| <= 0.172
        z = t * t
        ln_m = 2.0 * t * (1.0 + z * (1 / 3 + z * (1 / 5 + z * (1 / 7 + z * (1 / 9 + z * (1 / 11 + z * (1 / 13 + z / 15)))))))
        y = beta * (e + ln_m * 1.4426950408889634)  # beta * log2(ratio), in [-1000, 0]
        k = np.rint(y)
        f = (y - k) * 0.6931471805599453  # 2 ** (y - k) = exp(f), |f| <= 0.347
        q = 1 / 40320 + f * (1 / 362880 + f * (1 / 3628800 + f / 39916800))
        ratio[i] = 1.0 + f * (1.0 + f * (1 / 2 + f * (1 / 6 + f * (1 / 24 + f * (1 / 120 + f * (1 / 720 + f * (1 / 5040 + f * q)))))))
        scratch[i] = (np.int64(k) + 1023) << 52  # 2 ** k, k in [-1000, 0]
    powers = scratch.view(np.float64)
    for i in range(rows):
        weights[i] = np.float32(ratio[i] * powers[i])
    return 0


def _set_kernel(tree: np.ndarray, pow2: int, leaves: np.ndarray, values: np.ndarray) -> None:
    """Write the leaves in order (so a repeated one keeps its last value), then recompute their ancestors.

    Each leaf's path is recomputed bottom-up after every leaf is written, so the last pass through
    any node reads children already final: the tree comes out the same as a full rebuild.
    """
    for i in range(leaves.size):
        tree[pow2 + leaves[i]] = values[i]
    depth = 0
    while (1 << depth) < pow2:
        depth += 1
    if leaves.size * depth * _REBUILD_FACTOR > pow2:
        for node in range(pow2 - 1, 0, -1):
            tree[node] = tree[2 * node] + tree[2 * node + 1]
        return
    for i in range(leaves.size):
        node = (pow2 + leaves[i]) // 2
        while node >= 1:
            tree[node] = tree[2 * node] + tree[2 * node + 1]
            node //= 2


def _prefix_total_kernel(tree: np.ndarray, pow2: int, n: int) -> float:
    """Sum of leaves 0..n-1 (n < capacity): the left siblings on the way up from leaf n, added bottom-up."""
    node = pow2 + n
    total = 0.0
    while node > 1:
        if node & 1:
            total += tree[node - 1]
        node //= 2
    return total


@functools.cache
def _kernels() -> types.SimpleNamespace | None:
    """The kernels above compiled by numba (imported here, on first use), or None where numba is not installed.

    Explicit signatures: each kernel is compiled once, here, and a call with another dtype or
    layout fails instead of silently compiling another version; arrays only read are typed
    read-only, which accepts writable ones as well. `cache=True` keeps the machine code on disk, so
    only the first process after a change of this file compiles (a few seconds); later ones load
    it (a few tenths of a second, most of it numba's own start-up). `nogil` lets the service's
    other threads run during a call. No `fastmath`: its reordering would break the match with the
    numpy path.
    """
    try:
        import numba
    except ImportError:
        warnings.warn(
            "numba is not installed (see pyproject.toml): the prioritized sampler's sum tree falls back to numpy, several times slower",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
    from numba import boolean, float32, float64, int64, void
    from numba import types as nbtypes

    tree, out_i64, out_f32 = float64[::1], int64[::1], float32[::1]
    in_f64, in_i64 = nbtypes.Array(float64, 1, "C", readonly=True), nbtypes.Array(int64, 1, "C", readonly=True)
    jit = functools.partial(numba.njit, cache=True, nogil=True, error_model="numpy")
    return types.SimpleNamespace(
        locate=jit(int64(in_f64, in_f64, float64, boolean, int64, int64, int64, float64, out_i64, out_f32))(_locate_kernel),
        set=jit(void(tree, int64, in_i64, in_f64))(_set_kernel),
        prefix_total=jit(float64(in_f64, int64, int64))(_prefix_total_kernel),
    )


def _check_slots(slots: np.ndarray, capacity: int | None, name: str = "slots") -> np.ndarray:
    """`slots` as a 1-D int64 array, each in [0, capacity) when a capacity is known."""
    a = np.asarray(slots)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if a.size == 0:
        return a.astype(np.int64)
    if not np.issubdtype(a.dtype, np.integer):
        raise ValueError(f"{name} must be integers, got dtype {a.dtype}")
    if capacity is not None:
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi >= capacity:
            raise ValueError(f"{name} must lie in [0, {capacity}), got {lo if lo < 0 else hi}")
    return a.astype(np.int64, copy=False)


def _check_rows_size(rows: int, size: int, capacity: int | None) -> None:
    if rows < 1:
        raise ValueError(f"rows must be >= 1, got {rows}")
    if size < 1 or (capacity is not None and size > capacity):
        raise ValueError(f"size must be in [1, {capacity if capacity is not None else 'inf'}], got {size}")


def _check_number(name: str, value: Any, lo: float, hi: float = math.inf) -> float:
    """`value` as a float in [lo, hi]; raises ValueError naming `name` otherwise (bools and non-numbers included)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    v = float(value)
    if not (math.isfinite(v) and lo <= v <= hi):
        raise ValueError(f"{name} must be finite and in [{lo:g}, {hi:g}], got {value!r}")
    return v


def _check_keys(state: Mapping[str, Any], expected: tuple[str, ...]) -> None:
    for key in expected:
        if key not in state:
            raise ValueError(f"{key}: missing from the sampler state")
    for key in state:
        if key not in expected:
            raise ValueError(f"{key}: not a key of this sampler's state (expected {', '.join(expected) or 'none'})")


class Sampler(ABC):
    """Picks ring slots for a sample. Subclasses override `sample`, and whatever else keeps per-slot state.

    Not thread-safe: the owner of the storage calls it under its own lock.
    """

    prioritized: ClassVar[bool] = False

    def on_insert(self, slots: np.ndarray) -> None:  # noqa: B027 (a hook with a do-nothing default, not an abstract method)
        """New items were written at these int64 slots, overwriting whatever was there. Stateless samplers ignore it."""

    @abstractmethod
    def sample(self, rows: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        """Draw `rows` slots (with replacement) among the `size` filled slots 0..size-1.

        Returns:
            (int64 slots of shape [rows], float32 importance weights of shape [rows] or None when
            the draw is uniform and needs no correction).
        """

    def update_priorities(self, slots: np.ndarray, priorities: np.ndarray) -> None:
        """Set the priorities of `slots`; only prioritized samplers have any."""
        raise ValueError("this table's sampler has no priorities")

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint must hold to resume sampling as it was: numpy arrays and plain numbers only."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()`'s output; raises ValueError naming the first missing, unexpected or bad key."""
        _check_keys(state, ())


class UniformSampler(Sampler):
    """Every filled slot equally likely, drawn with replacement; no state, no importance weights."""

    def sample(self, rows: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        _check_rows_size(rows, size, None)
        return rng.integers(0, size, rows), None


class SumTree:
    """A binary sum tree over `capacity` non-negative leaves, in one float64 array; every operation takes many leaves.

    `tree[1]` is the root and node `i` has children `2i` and `2i+1`; the leaves are
    `tree[pow2 : pow2 + capacity]`, where pow2 is the smallest power of two >= capacity (the
    padding leaves after them stay 0). Parents are always recomputed from their children rather
    than adjusted by deltas, so round-off never accumulates: the tree is a pure function of its
    leaves, whatever order they were set in.

    `compiled`: True runs `find`, `set` and `prefix_total` on the numba kernels (ImportError
    without numba), False on numpy (the reference), None (default) on the kernels where numba is
    installed. Both build bit-identical trees and find the same leaves in them.
    """

    def __init__(self, capacity: int, *, compiled: bool | None = None):
        if isinstance(capacity, bool) or not isinstance(capacity, (int, np.integer)) or capacity < 1:
            raise ValueError(f"capacity must be an integer >= 1, got {capacity!r}")
        self.capacity = int(capacity)
        self._pow2 = 1 << (self.capacity - 1).bit_length()
        self._depth = self._pow2.bit_length() - 1  # levels below the root
        self._scanned = min(_SCANNED_LEVELS, self._depth)
        self._tree = np.zeros(2 * self._pow2, np.float64)
        self._no_weights = np.empty(0, np.float32)
        self._kernels = None if compiled is False else _kernels()
        if compiled and self._kernels is None:
            raise ImportError("SumTree(compiled=True) needs numba (see pyproject.toml)")

    @property
    def compiled(self) -> bool:
        """Whether this tree runs on the numba kernels."""
        return self._kernels is not None

    @property
    def total(self) -> float:
        """Sum of every leaf."""
        return float(self._tree[1])

    @property
    def values(self) -> np.ndarray:
        """The `capacity` leaf values (a read-only view)."""
        view = self._tree[self._pow2 : self._pow2 + self.capacity]
        view.flags.writeable = False
        return view

    def get(self, leaves: np.ndarray) -> np.ndarray:
        """Values of `leaves` (int indices in [0, capacity))."""
        return self._tree[self._pow2 + np.asarray(leaves, np.int64)]

    def prefix_total(self, n: int) -> float:
        """Sum of leaves 0..n-1: the left siblings along the path to leaf n, O(log capacity)."""
        if n >= self.capacity:
            return self.total
        if self._kernels is not None:
            return self._kernels.prefix_total(self._tree, self._pow2, max(int(n), 0))
        node, total = self._pow2 + max(int(n), 0), 0.0
        while node > 1:
            if node & 1:
                total += self._tree[node - 1]
            node >>= 1
        return float(total)

    def set(self, leaves: np.ndarray, values: np.ndarray) -> None:
        """Set many leaves at once; where an index repeats, its last value wins.

        Compiled: the leaves are written in order, then each one's ancestors recomputed (`_set_kernel`).
        Numpy: leaves are deduplicated with one stable sort (numpy leaves repeated fancy-index
        assignment unordered), then each level's touched parents are recomputed in one numpy step.
        """
        leaves = _check_slots(leaves, self.capacity, "leaves")
        values = np.asarray(values, np.float64)
        if values.shape != leaves.shape:
            raise ValueError(f"values must have shape {leaves.shape} like leaves, got {values.shape}")
        if leaves.size == 0:
            return
        if self._kernels is not None:
            self._kernels.set(self._tree, self._pow2, np.ascontiguousarray(leaves), np.ascontiguousarray(values))
            return
        order = np.argsort(leaves, kind="stable")
        leaves, values = leaves[order], values[order]
        last = np.empty(leaves.size, bool)
        last[-1] = True
        np.not_equal(leaves[1:], leaves[:-1], out=last[:-1])  # the last of each run of equal leaves
        nodes = leaves[last] + self._pow2
        tree = self._tree
        tree[nodes] = values[last]
        if nodes.size * self._depth * _REBUILD_FACTOR > self._pow2:  # touching a good part of the tree: rebuild it with slices
            self._rebuild()
            return
        for _ in range(self._depth):
            nodes >>= 1
            keep = np.empty(nodes.size, bool)
            keep[0] = True
            np.not_equal(nodes[1:], nodes[:-1], out=keep[1:])  # sorted, so siblings' shared parent is adjacent
            nodes = nodes[keep]
            left = nodes << 1
            tree[nodes] = tree[left] + tree[left + 1]

    def _rebuild(self) -> None:
        """Recompute every parent from its children, level by level (same sums as `set`'s sparse path)."""
        tree = self._tree
        for depth in range(self._depth - 1, -1, -1):
            lo = 1 << depth
            tree[lo : 2 * lo] = tree[2 * lo : 4 * lo : 2] + tree[2 * lo + 1 : 4 * lo : 2]

    def load(self, values: np.ndarray) -> None:
        """Replace every leaf with `values` (shape [capacity]) and rebuild the tree."""
        values = np.asarray(values, np.float64)
        if values.shape != (self.capacity,):
            raise ValueError(f"values must have shape ({self.capacity},), got {values.shape}")
        self._tree[self._pow2 : self._pow2 + self.capacity] = values
        self._tree[self._pow2 + self.capacity :] = 0.0
        self._rebuild()

    def find(self, prefix_sums: np.ndarray) -> np.ndarray:
        """For each u in `prefix_sums` (in [0, total)), the leaf i with cumsum[i-1] <= u < cumsum[i].

        That is `np.searchsorted(np.cumsum(leaf_values), u, side="right")`: zero-valued leaves are
        never returned for u in range. Round-off that carries u past the last leaf is clipped to
        leaf capacity-1; callers that must not draw zero-valued leaves check for them (see
        PrioritizedSampler.sample).

        The top levels are skipped in one step by a search of the cumulative sums of a whole level,
        then the rest is descended one level at a time: in one numba call (`_locate_kernel`), or in
        numpy (`_find_numpy`), one numpy step per level. Both give the same leaves, bit for bit.
        """
        if self._kernels is None:
            return self._find_numpy(prefix_sums)
        u = np.array(prefix_sums, dtype=np.float64, ndmin=1)
        leaves = np.empty(u.size, np.int64)
        flat, last = u.reshape(-1), self.capacity - 1
        self._kernels.locate(self._tree, flat, 1.0, False, self._pow2, self._scanned, last, 0.0, leaves, self._no_weights)
        return leaves.reshape(u.shape)

    def _find_numpy(self, prefix_sums: np.ndarray) -> np.ndarray:
        """`find` in numpy: a scan of the top `_SCANNED_LEVELS` levels, then one numpy step per level below."""
        u = np.array(prefix_sums, dtype=np.float64, ndmin=1)  # a copy: it is reduced in place below
        tree = self._tree
        scanned = self._scanned
        level = tree[1 << scanned : 2 << scanned]
        before = np.empty(level.size + 1)  # before[i]: sum of the level's nodes left of node i
        before[0] = 0.0
        np.cumsum(level, out=before[1:])
        index = np.searchsorted(before[1:-1], u, side="right")  # past the last node's start: the last node
        u -= before[index]  # within the chosen node's subtree; >= 0 since before[index] <= u
        node = index + (1 << scanned)
        for _ in range(self._depth - scanned):
            node <<= 1  # left child
            left = tree[node]
            right = u >= left
            np.subtract(u, left, out=u, where=right)
            node += right
        node -= self._pow2
        np.minimum(node, self.capacity - 1, out=node)
        return node


MAX_PRIORITY = 1e30
"""The largest priority taken: a few finite priorities near float64's limit overflow the sum tree to
inf, after which every sample is the newest item. No TD error of a learning run comes near it."""


class PrioritizedSampler(Sampler):
    """Proportional prioritized replay (Schaul et al. 2016, "Prioritized Experience Replay", section 3.3).

    Slot i is drawn with probability P(i) = v_i / sum_j v_j, v_i = (priority_i + epsilon) ** alpha,
    and weighted by w_i = (size * P(i)) ** -beta / max_batch w, which undoes the bias of the
    non-uniform draw in the gradient (fully at beta = 1). A new item enters at the largest
    priority seen so far (1.0 before any update), so it is drawn at least once soon.

    `beta` may be set at any time; the owner anneals it toward 1 as training progresses.
    `compiled` picks the sum tree's implementation (see SumTree): the numba kernels by default.
    """

    prioritized: ClassVar[bool] = True
    _STATE_KEYS = ("tree_leaves", "max_priority", "alpha", "beta", "epsilon")

    def __init__(self, capacity: int, alpha: float = 0.6, beta: float = 0.4, epsilon: float = 1e-6, *, compiled: bool | None = None):
        self._tree = SumTree(capacity, compiled=compiled)
        self.capacity = self._tree.capacity
        self.alpha = _check_number("alpha", alpha, 0.0)
        self.beta = beta
        self.epsilon = _check_number("epsilon", epsilon, 0.0)
        self.max_priority = 1.0

    @property
    def beta(self) -> float:
        """Importance-sampling exponent in [0, 1]: 0 no correction, 1 full correction."""
        return self._beta

    @beta.setter
    def beta(self, value: float) -> None:
        self._beta = _check_number("beta", value, 0.0, 1.0)

    @property
    def tree(self) -> SumTree:
        """The sum tree of leaf values (priority + epsilon) ** alpha; read it, do not set it."""
        return self._tree

    def on_insert(self, slots: np.ndarray) -> None:
        slots = _check_slots(slots, self.capacity)
        self._tree.set(slots, np.full(slots.size, (self.max_priority + self.epsilon) ** self.alpha))

    def sample(self, rows: int, size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        """Stratified: [0, mass) is cut into `rows` equal segments and one point is drawn uniformly in each.

        The stratification lowers the variance of a batch's make-up against `rows` independent
        draws while keeping every row's marginal distribution P(i). Draws that round-off carries
        past the filled range are clipped into it; any that still land on a zero-priority slot
        (possible only with epsilon = 0) are drawn again.

        Compiled, everything after `rng.random` is one kernel call (`_locate_kernel`). The numpy
        path below it is the reference: from the same rng it draws the same slots and the same
        float32 weights (but for a rare last-bit tie), and leaves the rng in the same state.
        """
        _check_rows_size(rows, size, self.capacity)
        tree = self._tree
        mass = tree.prefix_total(size)
        if not mass > 0.0:
            raise ValueError(f"every one of the {size} filled slots has priority zero; nothing can be drawn")
        draws = rng.random(rows)
        kernels = tree._kernels
        if kernels is not None:
            slots, weights = np.empty(rows, np.int64), np.empty(rows, np.float32)
            draws = np.ascontiguousarray(draws, np.float64)
            zeros = kernels.locate(tree._tree, draws, mass / rows, True, tree._pow2, tree._scanned, size - 1, self._beta, slots, weights)
            if not zeros:
                return slots, weights
            values = tree.get(slots)
        else:
            u = draws
            u += np.arange(rows)
            u *= mass / rows
            slots = tree.find(u)
            np.minimum(slots, size - 1, out=slots)
            values = tree.get(slots)
        if not values.all():
            self._redraw_zeros(slots, values, size, mass, rng)
        weights = np.divide(values.min(), values)  # (size * P(i)) ** -beta / max_batch: size and mass cancel
        weights **= self._beta
        return slots, weights.astype(np.float32)

    def _redraw_zeros(self, slots: np.ndarray, values: np.ndarray, size: int, mass: float, rng: np.random.Generator) -> None:
        """Redraw, in place and unstratified, the rows of `slots` whose leaf value is zero."""
        tree = self._tree
        for _ in range(_RESAMPLE_ROUNDS):
            bad = np.flatnonzero(values == 0.0)
            if bad.size == 0:
                return
            redrawn = tree.find(rng.random(bad.size) * mass)
            np.minimum(redrawn, size - 1, out=redrawn)
            slots[bad], values[bad] = redrawn, tree.get(redrawn)
        bad = values == 0.0
        if bad.any():  # only round-off at the very top of [0, mass) gets here: its answer is the last non-zero slot
            slots[bad] = np.flatnonzero(tree.values[:size])[-1]
            values[bad] = tree.get(slots[bad])

    def update_priorities(self, slots: np.ndarray, priorities: np.ndarray) -> None:
        """Set new priorities (e.g. |TD error|) of `slots`: finite, >= 0, one per slot; a repeated slot keeps its last."""
        slots = _check_slots(slots, self.capacity)
        priorities = np.asarray(priorities, dtype=np.float64)
        if priorities.shape != slots.shape:
            raise ValueError(f"priorities must have shape {slots.shape} like slots, got {priorities.shape}")
        if priorities.size == 0:
            return
        if not np.isfinite(priorities).all():
            raise ValueError("priorities must be finite, got nan or inf")
        if (priorities < 0).any():
            raise ValueError(f"priorities must be >= 0, got {priorities.min()}")
        if (priorities > MAX_PRIORITY).any():
            raise ValueError(f"priorities must be <= {MAX_PRIORITY:g}, got {priorities.max():g}")
        self.max_priority = max(self.max_priority, float(priorities.max()))
        self._tree.set(slots, (priorities + self.epsilon) ** self.alpha)

    def state_dict(self) -> dict[str, Any]:
        """Leaf values (priority + epsilon) ** alpha, max priority, alpha, beta and epsilon; the tree is rebuilt from the leaves."""
        return {
            "tree_leaves": self._tree.values.copy(),
            "max_priority": self.max_priority,
            "alpha": self.alpha,
            "beta": self._beta,
            "epsilon": self.epsilon,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore `state_dict()`'s output; everything is checked before anything changes."""
        _check_keys(state, self._STATE_KEYS)
        leaves = np.asarray(state["tree_leaves"])
        if leaves.shape != (self.capacity,):
            raise ValueError(f"tree_leaves: shape {leaves.shape}, this sampler has capacity {self.capacity}")
        if not np.issubdtype(leaves.dtype, np.floating):
            raise ValueError(f"tree_leaves: dtype {leaves.dtype} is not floating point")
        with np.errstate(over="ignore"):  # an infinite sum is the answer sought, not a warning
            total = leaves.sum()
        if not (np.isfinite(leaves).all() and (leaves >= 0).all() and np.isfinite(total)):
            raise ValueError("tree_leaves: every value must be finite and >= 0, and so must their sum")
        max_priority = _check_number("max_priority", state["max_priority"], 0.0, MAX_PRIORITY)
        alpha = _check_number("alpha", state["alpha"], 0.0)
        beta = _check_number("beta", state["beta"], 0.0, 1.0)
        epsilon = _check_number("epsilon", state["epsilon"], 0.0)
        self._tree.load(leaves)
        self.max_priority, self.alpha, self._beta, self.epsilon = max_priority, alpha, beta, epsilon
