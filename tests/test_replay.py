import threading
import time

import numpy as np
import pytest

from tests.helpers import transitions
from titan_rl.buffer.rate_limiter import RateLimiter
from titan_rl.buffer.replay import Closed, ReplayBuffer
from titan_rl.buffer.storage import RingStorage
from titan_rl.errors import NotEnoughDataError, ShapeMismatchError
from titan_rl.records import RecordLayout


def test_ring_overwrites_oldest_first_across_the_wrap():
    s = RingStorage(capacity=10)
    s.add(transitions(7, start=0))
    s.add(transitions(6, start=7))  # wraps: rows 0..2 now hold 10..12
    assert s.size == 10 and s.inserts_total == 13
    stored = sorted(s.layout.views(s.gather(np.arange(10)))["obs"][:, 0])
    assert stored == list(range(3, 13))


def test_batch_larger_than_capacity_keeps_the_newest_rows():
    s = RingStorage(capacity=4)
    s.add(transitions(10, start=0))
    assert sorted(s.layout.views(s.gather(np.arange(4)))["obs"][:, 0]) == [6, 7, 8, 9]
    assert s.inserts_total == 10


@pytest.mark.parametrize(
    ("field", "bad", "message"),
    [
        (
            "obs",
            {"obs": np.zeros((5, 3), np.float32), "next_obs": np.zeros((5, 3), np.float32)},
            "obs: got rows of shape (3,) float32, the buffer stores (4,) float32",
        ),
        ("next_obs", {"next_obs": np.zeros((5, 3), np.float32)}, "next_obs: rows of shape (3,) != obs rows of shape (4,)"),
        ("next_obs", {"next_obs": np.zeros((5, 4), np.float64)}, "next_obs: got rows of shape (4,) float64"),
        ("reward", {"reward": np.zeros(4, np.float32)}, "reward: has 4 rows but obs has 5"),
        ("terminated", {"terminated": np.zeros(5, np.int64)}, "terminated: dtype int64 must be bool"),
        ("action", {"action": np.zeros((5, 2), np.int64)}, "action: rows of shape (2,) must be scalars"),
    ],
)
def test_inserts_that_disagree_with_the_stored_spec_name_the_field_and_store_nothing(field, bad, message):
    s = RingStorage(capacity=10)
    s.add(transitions(5))
    with pytest.raises(ShapeMismatchError) as e:
        s.add({**transitions(5), **bad})
    assert message in str(e.value) and e.value.field == field
    assert s.size == 5


def test_sample_shapes_and_not_enough_data():
    buf = ReplayBuffer(capacity=100, seed=0)
    with pytest.raises(NotEnoughDataError, match="fewer than batch_size=8"):
        buf.sample(8)
    buf.add(transitions(20))
    sampled = buf.sample(8, num_batches=3)
    fields = sampled.fields()
    assert fields["obs"].shape == (24, 4) and sampled.indices.shape == (24,) and sampled.inserts_total == 20
    assert np.all(fields["next_obs"] == fields["obs"] + 1)  # rows stay whole
    info = buf.info()
    assert (info.size, info.inserts_total, info.sampled_rows_total, info.sample_calls_total) == (20, 20, 24, 1)


def test_sampling_is_uniform_over_stored_rows():
    buf = ReplayBuffer(capacity=10, seed=1)
    buf.add(transitions(10))
    fields = buf.sample(10, num_batches=1000).fields()
    counts = np.bincount(fields["obs"][:, 0].astype(int), minlength=10)
    assert counts.min() > 800 and counts.max() < 1200  # 1000 expected per row


def test_rate_limiter_keeps_collection_and_learning_within_the_slack():
    rl = RateLimiter(samples_per_insert=2.0, min_size_to_sample=100, slack_transitions=10)
    assert rl.can_insert(0, 0) and not rl.can_sample(99, 0)
    assert rl.can_sample(100, 0)
    assert rl.can_insert(110, 0) and not rl.can_insert(111, 0)  # 11 steps ahead of a learner that sampled nothing
    assert rl.can_insert(111, 2)  # one more transition's worth of samples lets it go on
    assert rl.can_sample(100, 20) and not rl.can_sample(100, 21)  # 10 transitions' worth ahead at most


def test_blocked_insert_resumes_when_the_learner_samples():
    buf = ReplayBuffer(capacity=1000, rate_limiter=RateLimiter(1.0, min_size_to_sample=10, slack_transitions=5), seed=0)
    buf.add(transitions(16))  # 6 ahead: the next insert must wait
    done = threading.Event()
    t = threading.Thread(target=lambda: (buf.add(transitions(1)), done.set()))
    t.start()
    assert not done.wait(0.3)
    buf.sample(4)
    assert done.wait(2.0)
    t.join()


def test_blocked_sample_waits_for_inserts_and_close_releases_waiters():
    buf = ReplayBuffer(capacity=1000, rate_limiter=RateLimiter(4.0, min_size_to_sample=10, slack_transitions=1), seed=0)
    buf.add(transitions(10))
    buf.sample(8, block=True)  # uses up the slack: the learner is now ahead
    result = {}

    def sample():
        try:
            buf.sample(8, block=True)
            result["ok"] = True
        except Closed:
            result["closed"] = True

    t = threading.Thread(target=sample)
    t.start()
    time.sleep(0.3)
    assert not result
    buf.add(transitions(2))
    t.join(2.0)
    assert result == {"ok": True}
    t = threading.Thread(target=sample)
    t.start()
    time.sleep(0.3)
    buf.close()
    t.join(2.0)
    assert result == {"ok": True, "closed": True}


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
    s = RingStorage(capacity=7)
    s.add({k: a[:4] for k, a in fields.items()})
    s.add({k: a[4:] for k, a in fields.items()})  # wraps: slots 0..1 now hold rows 7..8
    got = s.layout.views(s.gather(np.array([2, 3, 4, 5, 6, 0, 1])))
    for name, want in fields.items():
        np.testing.assert_array_equal(got[name], want[2:], err_msg=name)
    assert got["reward"].dtype == np.float64 and got["obs"].shape == (7, 3, 5, 5)


def test_an_empty_batch_stores_nothing_before_and_after_the_first_rows():
    s = RingStorage(capacity=5)
    assert s.add(transitions(0)) == 0 and s.size == 0
    s.add(transitions(3))
    assert s.add(transitions(0)) == 0 and s.size == 3 and s.inserts_total == 3


def test_records_in_the_stored_layout_are_copied_whole_and_others_field_by_field_across_the_wrap():
    fields = transitions(9)
    layout = RecordLayout.for_fields(fields)
    swapped = {**layout.slots, "obs": layout.slots["next_obs"], "next_obs": layout.slots["obs"]}  # a sender with another order
    other = RecordLayout(swapped, layout.record_size)
    s = RingStorage(capacity=7)
    s.add(transitions(2, start=100))
    assert layout == s.layout and other != s.layout
    assert s.add_records(layout.pack({k: a[:4] for k, a in fields.items()}, 4), layout) == 4
    assert s.add_records(other.pack({k: a[4:] for k, a in fields.items()}, 5), other) == 5  # wraps
    got = s.layout.views(s.gather(np.array([4, 5, 6, 0, 1, 2, 3])))  # rows 2..8, oldest first
    for name, want in fields.items():
        np.testing.assert_array_equal(got[name], want[2:], err_msg=name)
    assert (s.size, s.inserts_total) == (7, 11)


def test_more_records_than_capacity_keep_the_newest():
    fields = transitions(10)
    layout = RecordLayout.for_fields(fields)
    s = RingStorage(capacity=4)
    s.add(transitions(1))
    s.add_records(layout.pack(fields, 10), layout)
    assert sorted(s.layout.views(s.gather(np.arange(4)))["obs"][:, 0]) == [6, 7, 8, 9]
    assert s.inserts_total == 11


def test_records_that_disagree_with_the_stored_spec_store_nothing():
    buf = ReplayBuffer(capacity=10)
    buf.add(transitions(3))
    bad = {**transitions(3), "obs": np.zeros((3, 5), np.float32), "next_obs": np.zeros((3, 5), np.float32)}
    layout = RecordLayout.for_fields(bad)
    with pytest.raises(ShapeMismatchError, match="obs: got rows of shape"):
        buf.add_records(layout.pack(bad, 3), layout)
    assert buf.info().size == 3
