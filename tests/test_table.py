"""The buffer's tables and their ring storage, in process: uniform and prioritized replay, FIFO queues."""

import threading
import time

import numpy as np
import pytest

from tests.helpers import transitions
from titan_rl.adders import transition_spec
from titan_rl.algorithm import TableSpec
from titan_rl.buffer.rate_limiter import RateLimiter
from titan_rl.buffer.storage import RingStorage
from titan_rl.buffer.table import Closed, Table
from titan_rl.errors import NotEnoughDataError, SampleTooLargeError, ShapeMismatchError
from titan_rl.records import RecordLayout

SPEC = transition_spec((4,), np.float32)  # what transitions() holds: DQN's record on CartPole


def _obs0(rows) -> list[int]:
    """The item number each row was inserted with (transitions() counts it up in obs[:, 0])."""
    return rows.fields()["obs"][:, 0].astype(int).tolist()


def _stored(s: RingStorage) -> list[int]:
    return sorted(s.layout.views(s.gather(np.arange(s.size)))["obs"][:, 0].astype(int).tolist())


def _uniform(capacity: int, seed: int = 0, **spec) -> Table:
    """A uniform table; unless told, its rate limiter never holds anyone back."""
    spec.setdefault("slack_items", 1_000_000)
    return Table(TableSpec("uniform", capacity_items=capacity, **spec), SPEC, seed=seed)


def _prioritized(capacity: int, seed: int = 0, **spec) -> Table:
    spec.setdefault("slack_items", 1_000_000)
    return Table(TableSpec("prioritized", capacity_items=capacity, **spec), SPEC, seed=seed)


def _fifo(capacity: int, **spec) -> Table:
    return Table(TableSpec("fifo", capacity_items=capacity, **spec), SPEC, seed=0)


def _soon(seconds: float = 2.0):
    """`should_wait` for a call expected to return at once: if it blocks, it raises Closed after `seconds` instead of hanging."""
    end = time.monotonic() + seconds
    return lambda: time.monotonic() < end


def _in_thread(fn) -> tuple[threading.Thread, dict]:
    """Run `fn` in a thread; the dict gets "value" or "error" when it ends."""
    result: dict = {}

    def run():
        try:
            result["value"] = fn()
        except Exception as e:  # handed to the test
            result["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, result


# ---- ring storage ----------------------------------------------------------------------------------


def test_ring_overwrites_oldest_first_across_the_wrap():
    s = RingStorage(10, SPEC)
    s.add(transitions(7, start=0))
    s.add(transitions(6, start=7))  # wraps: slots 0..2 now hold 10..12
    assert s.size == 10 and s.inserts_total == 13 and s.next_slot == 3
    assert _stored(s) == list(range(3, 13))


def test_batch_larger_than_capacity_keeps_the_newest_rows():
    s = RingStorage(4, SPEC)
    s.add(transitions(10, start=0))
    assert _stored(s) == [6, 7, 8, 9]
    assert s.inserts_total == 10


def test_storage_rejects_a_bad_capacity_or_an_empty_signature():
    with pytest.raises(ValueError, match="capacity"):
        RingStorage(0, SPEC)
    with pytest.raises(ValueError, match="at least one field"):
        RingStorage(4, {})


@pytest.mark.parametrize(
    ("field", "bad", "message"),
    [
        (
            "obs",
            {"obs": np.zeros((5, 3), np.float32), "next_obs": np.zeros((5, 3), np.float32)},
            "obs: got rows of shape (3,) float32, the table stores (4,) float32",
        ),
        ("next_obs", {"next_obs": np.zeros((5, 3), np.float32)}, "next_obs: got rows of shape (3,) float32, the table stores (4,)"),
        ("next_obs", {"next_obs": np.zeros((5, 4), np.float64)}, "next_obs: got rows of shape (4,) float64"),
        ("reward", {"reward": np.zeros(4, np.float32)}, "reward: has 4 rows but obs has 5"),
        ("terminated", {"terminated": np.zeros(5, np.int64)}, "terminated: got rows of shape () int64, the table stores () bool"),
        ("action", {"action": np.zeros((5, 2), np.int64)}, "action: got rows of shape (2,) int64, the table stores () int64"),
        ("log_prob", {"log_prob": np.zeros(5, np.float32)}, "log_prob: is not in the table's signature (obs, "),
    ],
)
def test_inserts_that_disagree_with_the_signature_name_the_field_and_store_nothing(field, bad, message):
    s = RingStorage(10, SPEC)
    s.add(transitions(5))
    with pytest.raises(ShapeMismatchError) as e:
        s.add({**transitions(5), **bad})
    assert message in str(e.value) and e.value.field == field
    assert (s.size, s.inserts_total) == (5, 5)


@pytest.mark.parametrize("missing", ["obs", "reward", "truncated"])
def test_a_missing_field_is_named_and_nothing_is_stored(missing):
    t = _uniform(10)
    fields = {k: a for k, a in transitions(5).items() if k != missing}
    with pytest.raises(ShapeMismatchError, match=f"^{missing}: missing") as e:
        t.insert_fields(fields)
    assert e.value.field == missing
    layout = RecordLayout.for_fields(fields)
    with pytest.raises(ShapeMismatchError, match=f"^{missing}: missing"):
        t.insert_records(layout.pack(fields, 5), layout, env_steps=5)
    info = t.info()
    assert (info.size, info.inserts_total, info.env_steps_total) == (0, 0, 0)


def test_an_undeclared_field_is_rejected_naming_it_in_fields_and_in_records():
    """A signature is fixed at construction: a writer cannot add a field (an actor of another algorithm)."""
    t = _uniform(10)
    extra = {**transitions(5), "log_prob": np.zeros(5, np.float32)}
    with pytest.raises(ShapeMismatchError, match="^log_prob: is not in the table's signature") as e:
        t.insert_fields(extra)
    assert e.value.field == "log_prob"
    layout = RecordLayout.for_fields(extra)
    with pytest.raises(ShapeMismatchError, match="^log_prob: is not in the table's signature"):
        t.insert_records(layout.pack(extra, 5), layout, env_steps=5)
    assert t.info().inserts_total == 0
    t.insert_fields(transitions(5))  # the declared fields alone are fine
    assert t.info().size == 5


def test_records_keep_every_field_exact_for_odd_shapes_and_dtypes():
    rng = np.random.default_rng(0)
    n = 9
    fields = {
        "obs": rng.integers(0, 256, (n, 3, 5, 5), dtype=np.uint8),
        "action": rng.integers(-5, 5, n).astype(np.int32),
        "reward": rng.standard_normal(n).astype(">f8"),  # big-endian input is stored by value
        "next_obs": rng.integers(0, 256, (n, 3, 5, 5), dtype=np.uint8),
        "terminated": rng.random(n) < 0.5,
        "truncated": rng.random(n) < 0.5,
    }
    spec = {name: (a.shape[1:], a.dtype.newbyteorder("=")) for name, a in fields.items()}
    s = RingStorage(7, spec)
    s.add({k: a[:4] for k, a in fields.items()})
    s.add({k: a[4:] for k, a in fields.items()})  # wraps: slots 0..1 now hold rows 7..8
    got = s.layout.views(s.gather(np.array([2, 3, 4, 5, 6, 0, 1])))
    for name, want in fields.items():
        np.testing.assert_array_equal(got[name], want[2:], err_msg=name)
    assert got["reward"].dtype == np.float64 and got["obs"].shape == (7, 3, 5, 5)


def test_an_empty_batch_stores_nothing_before_and_after_the_first_rows():
    s = RingStorage(5, SPEC)
    assert len(s.add(transitions(0))) == 0 and s.size == 0
    s.add(transitions(3))
    assert len(s.add(transitions(0))) == 0 and (s.size, s.inserts_total) == (3, 3)


def test_records_in_the_stored_layout_are_copied_whole_and_others_field_by_field_across_the_wrap():
    fields = transitions(9)
    layout = RecordLayout.for_fields(fields)
    swapped = {**layout.slots, "obs": layout.slots["next_obs"], "next_obs": layout.slots["obs"]}  # a sender with another order
    other = RecordLayout(swapped, layout.record_size)
    s = RingStorage(7, SPEC)
    s.add(transitions(2, start=100))
    assert layout == s.layout and other != s.layout
    assert len(s.add_records(layout.pack({k: a[:4] for k, a in fields.items()}, 4), layout)) == 4
    assert len(s.add_records(other.pack({k: a[4:] for k, a in fields.items()}, 5), other)) == 5  # wraps
    got = s.layout.views(s.gather(np.array([4, 5, 6, 0, 1, 2, 3])))  # rows 2..8, oldest first
    for name, want in fields.items():
        np.testing.assert_array_equal(got[name], want[2:], err_msg=name)
    assert (s.size, s.inserts_total) == (7, 11)


def test_more_records_than_capacity_keep_the_newest():
    fields = transitions(10)
    layout = RecordLayout.for_fields(fields)
    s = RingStorage(4, SPEC)
    s.add(transitions(1))
    s.add_records(layout.pack(fields, 10), layout)
    assert _stored(s) == [6, 7, 8, 9]
    assert s.inserts_total == 11


def test_records_that_disagree_with_the_signature_store_nothing():
    t = _uniform(10)
    t.insert_fields(transitions(3))
    bad = {**transitions(3), "obs": np.zeros((3, 5), np.float32), "next_obs": np.zeros((3, 5), np.float32)}
    layout = RecordLayout.for_fields(bad)
    with pytest.raises(ShapeMismatchError, match="obs: got rows of shape"):
        t.insert_records(layout.pack(bad, 3), layout, env_steps=3)
    assert t.info().size == 3 and t.info().env_steps_total == 3


def test_keys_count_inserts_and_an_overwritten_item_is_no_longer_live():
    s = RingStorage(4, SPEC)
    s.add(transitions(6, start=0))  # keys 0..5; 0 and 1 were overwritten by 4 and 5
    np.testing.assert_array_equal(s.keys_of(np.arange(4)), [4, 5, 2, 3])
    slots, live = s.slots_of(np.array([0, 1, 2, 3, 4, 5, 6, -1]))
    np.testing.assert_array_equal(slots[live], [2, 3, 0, 1])
    np.testing.assert_array_equal(live, [False, False, True, True, True, True, False, False])
    stored = s.layout.views(s.gather(slots[live]))["obs"][:, 0]
    np.testing.assert_array_equal(stored, [2, 3, 4, 5])  # a live key finds its own item


def test_keys_of_a_partly_filled_ring_are_its_slots():
    s = RingStorage(8, SPEC)
    s.add(transitions(3))
    np.testing.assert_array_equal(s.keys_of(np.arange(3)), [0, 1, 2])
    assert s.slots_of(np.array([0, 2, 3]))[1].tolist() == [True, True, False]


def test_sampled_keys_name_the_items_they_came_with_across_the_wrap():
    t = _uniform(16, seed=3)
    for i in range(5):
        t.insert_fields(transitions(7, start=7 * i))  # 35 items: keys 19..34 remain
    rows = t.sample(8, num_batches=16)
    np.testing.assert_array_equal(rows.keys, _obs0(rows))
    assert rows.keys.min() >= 19 and rows.keys.max() <= 34 and rows.keys.dtype == np.int64


def test_storage_state_dict_round_trip_keeps_contents_and_counters():
    s = RingStorage(6, SPEC)
    s.add(transitions(9, start=0))
    state = s.state_dict()
    r = RingStorage(6, SPEC)
    r.load_state_dict(state)
    assert (r.size, r.inserts_total, r.next_slot) == (6, 9, 3)
    np.testing.assert_array_equal(r.gather(np.arange(6)), s.gather(np.arange(6)))
    np.testing.assert_array_equal(r.keys_of(np.arange(6)), s.keys_of(np.arange(6)))
    r.add(transitions(1, start=9))  # writes continue where they stopped
    assert _stored(r) == [4, 5, 6, 7, 8, 9]

    partial = RingStorage(6, SPEC)
    partial.add(transitions(2, start=50))
    r = RingStorage(6, SPEC)
    r.load_state_dict(partial.state_dict())
    assert (r.size, r.inserts_total) == (2, 2) and _stored(r) == [50, 51]


def test_storage_refuses_a_state_of_another_signature_or_capacity():
    other = RingStorage(6, {**SPEC, "log_prob": ((), np.dtype(np.float32))})
    other.add({**transitions(3), "log_prob": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match="signature"):
        RingStorage(6, SPEC).load_state_dict(other.state_dict())
    renamed = RingStorage(6, {("discount" if k == "reward" else k): v for k, v in SPEC.items()})  # same record size
    renamed.add({("discount" if k == "reward" else k): v for k, v in transitions(3).items()})
    with pytest.raises(ValueError, match="signature"):
        RingStorage(6, SPEC).load_state_dict(renamed.state_dict())
    big = RingStorage(8, SPEC)
    big.add(transitions(8))
    small = RingStorage(6, SPEC)
    with pytest.raises(ValueError, match="capacity"):
        small.load_state_dict(big.state_dict())
    assert (small.size, small.inserts_total) == (0, 0)
    few = RingStorage(6, SPEC)
    few.add(transitions(2))
    with pytest.raises(ValueError, match="capacity"):  # even when its items would fit: their slots depend on the capacity
        big.load_state_dict(few.state_dict())


# ---- replay tables: sampling and the rate limiter -------------------------------------------------------


def test_sample_shapes_and_not_enough_data():
    t = _uniform(100)
    with pytest.raises(NotEnoughDataError, match="fewer than batch_size=8"):
        t.sample(8)
    t.insert_fields(transitions(20))
    sampled = t.sample(8, num_batches=3)
    fields = sampled.fields()
    assert fields["obs"].shape == (24, 4) and sampled.keys.shape == (24,) and sampled.inserts_total == 20
    assert sampled.weights is None and sampled.env_steps_total == 20  # a uniform table needs no correction
    assert np.all(fields["next_obs"] == fields["obs"] + 1)  # rows stay whole
    info = t.info()
    assert (info.kind, info.size, info.capacity, info.inserts_total) == ("uniform", 20, 100, 20)
    assert (info.sampled_rows_total, info.sample_calls_total, info.dropped_stale_total) == (24, 1, 0)


def test_sampling_is_uniform_over_stored_rows():
    t = _uniform(10, seed=1)
    t.insert_fields(transitions(10))
    counts = np.bincount(_obs0(t.sample(10, num_batches=1000)), minlength=10)
    assert counts.min() > 800 and counts.max() < 1200  # 1000 expected per row


def test_the_same_seed_draws_the_same_rows_and_another_seed_other_rows():
    def keys(seed: int) -> np.ndarray:
        t = _uniform(50, seed=seed)
        t.insert_fields(transitions(50))
        return t.sample(16).keys

    np.testing.assert_array_equal(keys(7), keys(7))
    assert not np.array_equal(keys(7), keys(8))


def test_env_steps_total_counts_the_env_steps_passed_to_insert_not_rows():
    """A record may cover many env steps (a segment) or, with n-step returns, fewer than its rows suggest."""
    t = _uniform(100)
    t.insert_fields(transitions(10), env_steps=200)
    fields = transitions(5)
    layout = RecordLayout.for_fields(fields)
    t.insert_records(layout.pack(fields, 5), layout, env_steps=7)
    t.insert_fields(transitions(3))  # no env_steps: one per row
    info = t.info()
    assert (info.inserts_total, info.env_steps_total) == (18, 210)
    assert t.sample(4).env_steps_total == 210


def test_rate_limiter_keeps_collection_and_learning_within_the_slack():
    rl = RateLimiter(2.0, 100, 10)  # samples_per_insert, min_size_to_sample, slack
    assert rl.can_insert(0, 0) and not rl.can_sample(99, 0)
    assert rl.can_sample(100, 0)
    assert rl.can_insert(110, 0) and not rl.can_insert(111, 0)  # 11 items ahead of a learner that sampled nothing
    assert rl.can_insert(111, 2)  # one more item's worth of samples lets it go on
    assert rl.can_sample(100, 20) and not rl.can_sample(100, 21)  # 10 items' worth ahead at most


def test_blocked_insert_resumes_when_the_learner_samples():
    t = _uniform(1000, samples_per_insert=1.0, min_size_to_sample=10, slack_items=5)
    t.insert_fields(transitions(16))  # 6 ahead: the next insert must wait
    thread, result = _in_thread(lambda: t.insert_fields(transitions(1)))
    thread.join(0.3)
    assert not result
    t.sample(4)
    thread.join(2.0)
    assert result == {"value": 1} and t.info().inserts_total == 17


def test_a_blocked_insert_gives_up_when_its_caller_goes_away_and_on_close():
    t = _uniform(1000, samples_per_insert=1.0, min_size_to_sample=10, slack_items=5)
    t.insert_fields(transitions(16))
    gone = threading.Event()
    thread, result = _in_thread(lambda: t.insert_fields(transitions(1), should_wait=lambda: not gone.is_set()))
    thread.join(0.3)
    assert not result
    gone.set()
    thread.join(2.0)
    assert isinstance(result.get("error"), Closed)
    thread, result = _in_thread(lambda: t.insert_fields(transitions(1)))
    thread.join(0.3)
    assert not result
    t.close()
    thread.join(2.0)
    assert isinstance(result.get("error"), Closed) and t.info().inserts_total == 16  # neither waiter stored anything


def test_blocked_sample_waits_for_inserts_and_close_releases_waiters():
    t = _uniform(1000, samples_per_insert=4.0, min_size_to_sample=10, slack_items=1)
    t.insert_fields(transitions(10))
    t.sample(8, block=True)  # uses up the slack: the learner is now ahead
    thread, result = _in_thread(lambda: t.sample(8, block=True))
    thread.join(0.3)
    assert not result
    t.insert_fields(transitions(2))
    thread.join(2.0)
    assert "value" in result and len(result["value"].keys) == 8
    thread, result = _in_thread(lambda: t.sample(8, block=True))
    thread.join(0.3)
    assert not result
    t.close()
    thread.join(2.0)
    assert isinstance(result.get("error"), Closed)


def test_a_sample_over_the_byte_limit_is_refused_before_anything_is_drawn():
    t = Table(TableSpec("uniform", capacity_items=100), SPEC, seed=0, max_sample_bytes=10_000)
    t.insert_fields(transitions(100))
    with pytest.raises(SampleTooLargeError, match="batch_size \\* num_batches = 1000 rows"):
        t.sample(10, num_batches=100)
    assert t.info().sample_calls_total == 0
    assert len(t.sample(10).keys) == 10


def test_concurrent_writers_and_samplers_keep_rows_whole_and_counts_exact():
    t = _uniform(500, seed=0)
    t.insert_fields(transitions(64))
    errors: list[Exception] = []
    sampled: list[int] = []

    def write(worker: int):
        try:
            for i in range(40):
                t.insert_fields(transitions(8, seed=worker, start=1000 * worker + 8 * i), env_steps=10)
        except Exception as e:
            errors.append(e)

    def read():
        try:
            for _ in range(40):
                rows = t.sample(32)
                f = rows.fields()
                if not (np.all(f["next_obs"] == f["obs"] + 1) and len(rows.keys) == 32):
                    raise AssertionError("a torn row")
                sampled.append(len(rows.keys))
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(1, 5)] + [threading.Thread(target=read) for _ in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    assert not errors
    info = t.info()
    assert (info.inserts_total, info.env_steps_total) == (64 + 4 * 40 * 8, 64 + 4 * 40 * 10)
    assert (info.sampled_rows_total, info.sample_calls_total) == (sum(sampled), 120)
    rows = t.sample(500, num_batches=4)
    assert rows.keys.min() >= info.inserts_total - 500 and rows.keys.max() < info.inserts_total
    assert np.all(rows.fields()["next_obs"] == rows.fields()["obs"] + 1)


# ---- prioritized tables --------------------------------------------------------------------------------


@pytest.mark.parametrize("capacity", [10, 2048])  # 2048: a few updates in a large tree take its sparse path, not a rebuild
def test_update_priorities_by_key_skews_sampling_toward_those_items(capacity):
    t = _prioritized(capacity, seed=0, priority_exponent=1.0)
    t.insert_fields(transitions(capacity))
    counts = np.bincount(_obs0(t.sample(capacity, num_batches=100)), minlength=capacity)
    assert counts.min() > 60  # new items enter at the same (max) priority: uniform at first
    assert t.update_priorities(np.array([3, 7]), np.array([10.0 * capacity, 0.0])) == 2
    rows = t.sample(10, num_batches=100)
    np.testing.assert_array_equal(rows.keys, _obs0(rows))
    counts = np.bincount(rows.keys, minlength=capacity)
    assert 880 < counts[3] < 960  # 10 c / (10 c + c - 2)
    assert counts[7] == 0  # priority 0 (plus a 1e-6 epsilon) is as good as never drawn


def test_update_priorities_skips_overwritten_keys():
    t = _prioritized(4, seed=0, priority_exponent=1.0)
    t.insert_fields(transitions(6, start=0))  # keys 2..5 live at slots 2, 3, 0, 1
    assert t.update_priorities(np.array([0, 1, 5, 9]), np.array([100.0, 100.0, 100.0, 100.0])) == 1
    counts = np.bincount(t.sample(4, num_batches=250).keys, minlength=6)
    assert counts[0] == counts[1] == 0
    assert counts[5] > 900  # key 5: 100 / 103
    assert counts[4] < 40  # key 4 took over slot 0 but not key 0's new priority
    with pytest.raises(ValueError, match="2 keys but 1 priorities"):
        t.update_priorities(np.array([2, 3]), np.array([1.0]))


def test_update_priorities_on_a_uniform_or_fifo_table_is_an_error():
    for t in (_uniform(4), _fifo(4)):
        t.insert_fields(transitions(2))
        with pytest.raises(ValueError, match="has no priorities"):
            t.update_priorities(np.array([0]), np.array([1.0]))


def test_importance_weights_are_present_and_beta_anneals_with_env_steps_total():
    t = _prioritized(8, seed=0, priority_exponent=1.0, importance_exponent_start=0.4, importance_anneal_env_steps=1000)

    def beta() -> float:
        """beta, read off the weights: the low-priority item weighs 1, the one 4x as likely (1/4) ** beta."""
        rows = t.sample(2, num_batches=32)
        assert rows.weights is not None and rows.weights.dtype == np.float32 and rows.weights.shape == (64,)
        low, high = rows.weights[rows.keys == 0], rows.weights[rows.keys == 1]
        assert len(low) and len(high) and np.all(low == 1.0)
        return float(np.log(high[0]) / np.log(0.25))

    t.insert_fields(transitions(2), env_steps=250)  # rows count nothing: env steps anneal beta
    t.update_priorities(np.array([0, 1]), np.array([1.0, 4.0]))
    assert beta() == pytest.approx(0.4 + 0.6 * 0.25, abs=1e-5)
    t.insert_fields(transitions(0), env_steps=250)
    assert beta() == pytest.approx(0.4 + 0.6 * 0.5, abs=1e-5)
    t.insert_fields(transitions(0), env_steps=10_000)  # past the anneal: full correction, no further
    assert beta() == pytest.approx(1.0, abs=1e-5)
    assert t.info().env_steps_total == 10_500


def test_prioritized_sampling_waits_on_the_rate_limiter_like_uniform():
    t = _prioritized(100, samples_per_insert=1.0, min_size_to_sample=10, slack_items=0)
    t.insert_fields(transitions(9))
    thread, result = _in_thread(lambda: t.sample(4, block=True))
    thread.join(0.3)
    assert not result
    t.insert_fields(transitions(1))
    thread.join(2.0)
    assert "value" in result and result["value"].weights is not None


def _history(table: Table) -> None:
    """The same inserts and priorities, whichever table: what a saved one and a replayed one share."""
    table.insert_fields(transitions(7, start=0), env_steps=300)
    table.insert_fields(transitions(6, start=7), env_steps=400)  # wraps a ring of 10
    table.update_priorities(np.array([3, 4, 9, 12]), np.array([5.0, 0.5, 20.0, 2.0]))


def test_table_state_dict_round_trip_restores_contents_counters_and_sampler_state():
    spec = {"priority_exponent": 0.8, "importance_anneal_env_steps": 2000}
    saved = _prioritized(10, seed=1, **spec)
    _history(saved)
    saved.sample(8, num_batches=6)  # counters move; its rng is spent
    state = saved.state_dict()

    loaded = _prioritized(10, seed=2, **spec)
    loaded.load_state_dict(state)
    assert loaded.info() == saved.info()
    assert loaded.info().sampled_rows_total == 48 and loaded.info().env_steps_total == 700
    np.testing.assert_array_equal(loaded.storage.gather(np.arange(10)), saved.storage.gather(np.arange(10)))
    np.testing.assert_array_equal(loaded.sampler.tree.values, saved.sampler.tree.values)
    assert loaded.sampler.max_priority == 20.0

    a, b = loaded.sample(8, num_batches=8), saved.sample(8, num_batches=8)  # its random state came along too
    np.testing.assert_array_equal(a.keys, b.keys)
    np.testing.assert_array_equal(a.weights, b.weights)
    np.testing.assert_array_equal(a.records, b.records)
    assert a.keys.min() >= 3 and np.bincount(a.keys).argmax() == 9  # priorities came along
    assert loaded.update_priorities(np.array([0, 12]), np.array([1.0, 1.0])) == 1  # and so did the keys


def test_a_table_state_does_not_load_into_another_signature_or_kind():
    saved = _prioritized(10)
    _history(saved)
    state = saved.state_dict()
    other = Table(TableSpec("prioritized", capacity_items=10), {**SPEC, "log_prob": ((), np.dtype(np.float32))})
    with pytest.raises(ValueError, match="signature"):
        other.load_state_dict(state)
    uniform = _uniform(10)
    with pytest.raises(ValueError, match="tree_leaves"):
        uniform.load_state_dict(state)  # a uniform sampler has no priorities to load
    info = uniform.info()
    assert (info.size, info.inserts_total, info.env_steps_total) == (0, 0, 0), "a refused state must change nothing"


@pytest.mark.parametrize(
    "damage",
    [
        lambda state: state["counters"].pop("read_key"),
        lambda state: state["counters"].update(env_steps_total="many"),
        lambda state: state["counters"].update(sampled_rows_total=-1),
        lambda state: state["counters"].update(env_steps_total=float("inf")),  # JSON's Infinity: an OverflowError escaped
        lambda state: state["counters"].update(env_steps_total=2**64),  # taken, then every response carrying it failed
        lambda state: state["sampler"].update(max_priority=1e300),
        lambda state: state["sampler"].update(tree_leaves=np.full(10, 1e308)),  # finite leaves, an infinite sum
    ],
)
def test_a_table_state_with_bad_counters_or_priorities_changes_nothing(damage):
    """The counters were read after the storage and sampler had been replaced: a bad one left half a table."""
    saved = _prioritized(10)
    _history(saved)
    state = saved.state_dict()
    damage(state)
    fresh = _prioritized(10)
    with pytest.raises(ValueError, match="counters|max_priority|tree_leaves"):
        fresh.load_state_dict(state)
    info = fresh.info()
    assert (info.size, info.inserts_total, info.env_steps_total, fresh.sampler.tree.total) == (0, 0, 0, 0.0)


# ---- FIFO tables -------------------------------------------------------------------------------------------


def test_fifo_hands_out_each_item_once_oldest_first_across_the_wrap():
    t = _fifo(8)
    t.insert_fields(transitions(5, start=0), should_wait=_soon())
    a = t.sample(2, should_wait=_soon())
    b = t.sample(3, should_wait=_soon())
    assert _obs0(a) == [0, 1] and _obs0(b) == [2, 3, 4]
    assert a.keys.tolist() == [0, 1] and b.keys.tolist() == [2, 3, 4] and a.weights is None
    assert t.info().size == 0
    t.insert_fields(transitions(6, start=5), should_wait=_soon())  # slots 5..7, 0..2
    c = t.sample(3, should_wait=_soon(), num_batches=2)
    assert _obs0(c) == [5, 6, 7, 8, 9, 10] and c.keys.tolist() == [5, 6, 7, 8, 9, 10]
    info = t.info()
    assert (info.kind, info.size, info.inserts_total, info.sampled_rows_total, info.sample_calls_total) == ("fifo", 0, 11, 11, 3)


def test_fifo_sample_waits_for_enough_items_and_close_releases_it():
    t = _fifo(8)
    t.insert_fields(transitions(2, start=0), should_wait=_soon())
    thread, result = _in_thread(lambda: t.sample(4))
    thread.join(0.3)
    assert not result  # 2 of 4 are there: nothing is handed out yet
    t.insert_fields(transitions(3, start=2), should_wait=_soon())
    thread.join(2.0)
    assert _obs0(result["value"]) == [0, 1, 2, 3] and t.info().size == 1
    thread, result = _in_thread(lambda: t.sample(4))
    thread.join(0.3)
    assert not result
    t.close()
    thread.join(2.0)
    assert isinstance(result.get("error"), Closed) and t.info().size == 1


def test_fifo_inserts_wait_while_full_and_give_up_when_the_caller_goes_away():
    t = _fifo(4)
    t.insert_fields(transitions(3, start=0), should_wait=_soon())
    thread, result = _in_thread(lambda: t.insert_fields(transitions(2, start=3)))
    thread.join(0.3)
    assert not result  # 3 + 2 unread would not fit 4: nothing unread is overwritten
    assert _obs0(t.sample(1, should_wait=_soon())) == [0]
    thread.join(2.0)
    assert result == {"value": 2}
    assert _obs0(t.sample(4, should_wait=_soon())) == [1, 2, 3, 4]

    t.insert_fields(transitions(4, start=5), should_wait=_soon())
    gone = threading.Event()
    thread, result = _in_thread(lambda: t.insert_fields(transitions(1, start=9), should_wait=lambda: not gone.is_set()))
    thread.join(0.3)
    assert not result
    gone.set()
    thread.join(2.0)
    assert isinstance(result.get("error"), Closed)
    thread, result = _in_thread(lambda: t.insert_fields(transitions(1, start=9)))
    thread.join(0.3)
    t.close()
    thread.join(2.0)
    assert isinstance(result.get("error"), Closed)
    info = t.info()
    assert (info.size, info.inserts_total) == (4, 9)


def test_fifo_takes_a_chunk_larger_than_its_room_piece_by_piece_as_the_reader_takes_items():
    t = _fifo(4)
    t.insert_fields(transitions(1, start=0), should_wait=_soon())
    thread, result = _in_thread(lambda: t.insert_fields(transitions(10, start=1), env_steps=30))
    thread.join(0.3)
    assert not result and t.info().size == 4  # the first 3 rows filled the room; nothing unread was overwritten
    taken = [_obs0(t.sample(2, should_wait=_soon())) for _ in range(5)]  # a reader of more than the room must not wait forever
    assert taken == [[0, 1], [2, 3], [4, 5], [6, 7], [8, 9]]
    thread.join(2.0)
    assert result == {"value": 10}
    assert _obs0(t.sample(1, should_wait=_soon())) == [10]
    info = t.info()
    assert (info.size, info.inserts_total, info.env_steps_total, info.sampled_rows_total) == (0, 11, 31, 11)


def test_a_chunk_cut_short_by_close_counts_the_env_steps_of_the_rows_it_stored():
    t = _fifo(4)
    thread, result = _in_thread(lambda: t.insert_fields(transitions(10), env_steps=30))
    thread.join(0.3)
    t.close()
    thread.join(2.0)
    info = t.info()
    assert "value" not in result and (info.inserts_total, info.env_steps_total) == (4, 12)


def test_fifo_refuses_a_sample_larger_than_the_queue():
    t = _fifo(4)
    t.insert_fields(transitions(4), should_wait=_soon())
    with pytest.raises(SampleTooLargeError, match=r"^batch_size \* num_batches = 6 rows cannot come from a queue of 4"):
        t.sample(3, num_batches=2, should_wait=_soon())
    assert t.info().size == 4 and t.info().sample_calls_total == 0


def _versioned(t: Table, versions: list[int], start: int = 0) -> None:
    """One item per version, obs[:, 0] counting up from `start`."""
    for i, v in enumerate(versions):
        t.insert_fields(transitions(1, start=start + i), policy_version=v, should_wait=_soon())


def test_fifo_drops_items_older_than_the_policy_lag_and_keeps_fresh_ones_in_order():
    t = _fifo(16, max_policy_lag=2)
    _versioned(t, [1, 3, 2, 1, 5, 4, 3, 2])  # items 0..7
    rows = t.sample(4, should_wait=_soon(), min_policy_version=5)  # oldest allowed: 5 - 2 = 3
    assert _obs0(rows) == [1, 4, 5, 6]
    info = t.info()
    assert (info.dropped_stale_total, info.size, info.sampled_rows_total) == (4, 0, 4)
    _versioned(t, [4, 6], start=8)
    assert _obs0(t.sample(2, should_wait=_soon(), min_policy_version=6)) == [8, 9]  # version 4 is exactly 2 behind: kept
    assert t.info().dropped_stale_total == 4


def test_fifo_drops_stale_items_across_the_wrap_and_keeps_the_queue_usable():
    t = _fifo(4, max_policy_lag=1)
    _versioned(t, [0, 0, 0])
    assert _obs0(t.sample(3, should_wait=_soon())) == [0, 1, 2]  # no min_policy_version: nothing dropped
    _versioned(t, [7, 2, 8, 9], start=3)  # slots 3, 0, 1, 2
    assert _obs0(t.sample(2, should_wait=_soon(), min_policy_version=8)) == [3, 5]
    assert t.info().dropped_stale_total == 1
    _versioned(t, [9, 9], start=7)
    assert _obs0(t.sample(3, should_wait=_soon(), min_policy_version=9)) == [6, 7, 8]
    info = t.info()
    assert (info.size, info.inserts_total, info.dropped_stale_total) == (0, 9, 1)


def test_fifo_items_kept_when_a_gap_is_closed_keep_their_own_versions():
    t = _fifo(8, max_policy_lag=1)
    _versioned(t, [9, 6, 0, 9])  # dropping item 2 moves items 0 and 1 one slot later
    assert _obs0(t.sample(1, should_wait=_soon(), min_policy_version=5)) == [0]
    assert _obs0(t.sample(2, should_wait=_soon(), min_policy_version=6)) == [1, 3]  # item 1 (version 6) is fresh enough still
    assert t.info().dropped_stale_total == 1


def test_fifo_waits_for_fresh_items_once_stale_ones_are_dropped():
    t = _fifo(8, max_policy_lag=1)
    _versioned(t, [0, 0])
    thread, result = _in_thread(lambda: t.sample(2, min_policy_version=5))
    thread.join(0.3)
    assert not result and t.info().dropped_stale_total == 2 and t.info().size == 0
    _versioned(t, [5, 4], start=2)
    thread.join(2.0)
    assert _obs0(result["value"]) == [2, 3]


def test_fifo_keeps_every_item_without_a_lag_bound_or_a_min_policy_version():
    t = _fifo(8)  # max_policy_lag 0: keep all
    _versioned(t, [0, 1, 2])
    assert _obs0(t.sample(3, should_wait=_soon(), min_policy_version=100)) == [0, 1, 2]
    t = _fifo(8, max_policy_lag=1)
    _versioned(t, [0, 1, 2])
    assert _obs0(t.sample(3, should_wait=_soon())) == [0, 1, 2]  # min_policy_version -1: the reader does not say
    assert t.info().dropped_stale_total == 0


def test_fifo_state_dict_round_trip_keeps_the_read_position_and_versions():
    saved = _fifo(6, max_policy_lag=2)
    _versioned(saved, [0, 1, 2, 3, 4])
    saved.sample(2, should_wait=_soon())
    _versioned(saved, [1, 5, 6], start=5)  # wraps
    loaded = _fifo(6, max_policy_lag=2)
    loaded.load_state_dict(saved.state_dict())
    assert loaded.info() == saved.info() and loaded.info().size == 6
    for table in (saved, loaded):
        assert _obs0(table.sample(4, should_wait=_soon(), min_policy_version=5)) == [3, 4, 6, 7]  # versions 2 and 1 dropped, in both
        assert table.info().dropped_stale_total == 2


def test_a_chunk_sent_again_by_its_sender_is_stored_once_and_the_memory_of_it_survives_a_state_dict():
    table = _uniform(100)
    layout = table.layout
    records = layout.pack(transitions(5), 5)
    assert table.insert_records(records, layout, 5, origin=(7, 1)) == 5
    assert table.insert_records(records, layout, 5, origin=(7, 1)) == 0  # resent after a broken stream
    assert table.insert_records(records, layout, 5, origin=(8, 1)) == 5  # another sender's first chunk
    restored = _uniform(100)
    restored.load_state_dict(table.state_dict())
    assert restored.insert_records(records, layout, 5, origin=(7, 1)) == 0
    assert restored.insert_records(records, layout, 5, origin=(7, 2)) == 5
    assert (restored.info().size, restored.info().env_steps_total) == (15, 15)


def test_a_float_field_may_hold_nan_or_inf_only_where_the_table_spec_allows_it():
    strict = _uniform(100)
    relaxed = Table(TableSpec("uniform", capacity_items=100, slack_items=10**6, non_finite_fields=("reward",)), SPEC)
    rewards = {**transitions(4), "reward": np.array([0.0, -np.inf, np.nan, np.inf], np.float32)}
    with pytest.raises(ShapeMismatchError, match="reward: holds nan or inf at row 1"):
        strict.insert_fields(rewards)
    assert strict.info().size == 0
    relaxed.insert_fields(rewards)
    assert relaxed.info().size == 4
    with pytest.raises(ShapeMismatchError, match="obs: holds nan or inf"):  # every other float field stays checked
        relaxed.insert_fields({**transitions(4), "obs": np.full((4, 4), np.nan, np.float32)})
