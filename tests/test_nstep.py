import numpy as np
import pytest

from titan_rl.adders import NStepAccumulator


def run(acc, rewards, terminated_at=None, truncated_at=None):
    """One env; obs at step t is [t]; returns the emitted transitions in order."""
    out = []
    for t, r in enumerate(rewards):
        term, trunc = t == terminated_at, t == truncated_at
        out.append(
            acc.push(
                obs=np.array([[float(t)]]),
                action=np.array([t]),
                reward=np.array([r]),
                next_obs=np.array([[float(t + 1)]]),
                terminated=np.array([term]),
                truncated=np.array([trunc]),
                valid=np.array([True]),
            )
        )
    return {k: np.concatenate([o[k] for o in out]) for k in out[0]}


def test_full_windows_sum_discounted_rewards_and_point_n_steps_ahead():
    acc = NStepAccumulator(1, n=3, gamma=0.5, obs_shape=(1,), obs_dtype=np.float32)
    out = run(acc, [1.0, 2.0, 4.0, 8.0, 16.0])
    np.testing.assert_array_equal(out["obs"][:, 0], [0, 1, 2])
    np.testing.assert_array_equal(out["next_obs"][:, 0], [3, 4, 5])
    np.testing.assert_allclose(out["reward"], [1 + 1 + 1, 2 + 2 + 2, 4 + 4 + 4])
    assert not out["terminated"].any()


def test_termination_emits_every_remaining_window_without_bootstrap():
    acc = NStepAccumulator(1, n=3, gamma=0.5, obs_shape=(1,), obs_dtype=np.float32)
    out = run(acc, [1.0, 2.0, 4.0, 8.0], terminated_at=3)
    by_start = dict(zip(out["obs"][:, 0], zip(out["reward"], out["terminated"], out["next_obs"][:, 0], strict=True), strict=True))
    assert sorted(by_start) == [0, 1, 2, 3]  # every step starts exactly one transition
    assert by_start[1] == pytest.approx((2 + 2 + 2, True, 4))
    assert by_start[2] == pytest.approx((4 + 4, True, 4))
    assert by_start[3] == pytest.approx((8, True, 4))
    assert by_start[0][1] == False  # noqa: E712 - its window ended before the termination


def test_truncation_keeps_only_complete_windows():
    acc = NStepAccumulator(1, n=3, gamma=0.5, obs_shape=(1,), obs_dtype=np.float32)
    out = run(acc, [1.0] * 5, truncated_at=4)
    np.testing.assert_array_equal(out["obs"][:, 0], [0, 1, 2])
    assert out["truncated"].tolist() == [False, False, True] and not out["terminated"].any()


def test_short_episode_and_reset_rows_are_handled_per_env():
    acc = NStepAccumulator(2, n=3, gamma=1.0, obs_shape=(1,), obs_dtype=np.float32)
    obs = np.zeros((2, 1), np.float32)
    # env 0 terminates after 2 steps, env 1 keeps going; then env 0's reset row is invalid
    first = acc.push(
        obs, np.array([0, 0]), np.array([1.0, 1.0]), obs, np.array([False, False]), np.array([False, False]), np.array([True, True])
    )
    second = acc.push(
        obs, np.array([0, 0]), np.array([1.0, 1.0]), obs, np.array([True, False]), np.array([False, False]), np.array([True, True])
    )
    third = acc.push(
        obs, np.array([0, 0]), np.array([5.0, 1.0]), obs, np.array([False, False]), np.array([False, False]), np.array([False, True])
    )
    assert len(first["reward"]) == 0
    assert sorted(second["reward"].tolist()) == [1.0, 2.0] and second["terminated"].all()
    assert third["reward"].tolist() == [3.0]  # env 1's first full window; env 0 contributed nothing


def test_one_step_is_the_identity_on_valid_rows():
    acc = NStepAccumulator(1, n=1, gamma=0.9, obs_shape=(1,), obs_dtype=np.float32)
    out = run(acc, [1.0, 2.0, 3.0], terminated_at=2)
    np.testing.assert_allclose(out["reward"], [1, 2, 3])
    assert out["terminated"].tolist() == [False, False, True]


def reference_windows(steps, n, gamma):
    """The n-step transitions of a vector env's steps, env by env, the plain way, sorted.

    Each is (env, obs, action, reward, next_obs, terminated, truncated).
    """
    out, episodes = [], {}
    for obs, action, reward, next_obs, terminated, truncated, valid in steps:
        for e in range(len(valid)):
            if not valid[e]:
                episodes[e] = []
                continue
            episode = episodes.setdefault(e, [])
            episode.append((obs[e, 0], action[e], reward[e]))
            lengths = [n] if len(episode) >= n else []
            if terminated[e]:
                lengths += range(1, min(n - 1, len(episode)) + 1)
            for m in lengths:
                window = episode[-m:]
                ret = sum(gamma**k * r for k, (_, _, r) in enumerate(window))
                out.append((e, window[0][0], window[0][1], round(ret, 4), next_obs[e, 0], bool(terminated[e]), bool(truncated[e])))
    return sorted(out)


WANT_DTYPES = {"obs": np.float64, "action": np.int64, "reward": np.float32, "next_obs": np.float64, "terminated": bool, "truncated": bool}


@pytest.mark.parametrize("n", [1, 2, 3, 5])
def test_many_envs_match_the_env_by_env_reference(n):
    rng = np.random.default_rng(n)
    envs, gamma, steps = 6, 0.9, []
    resetting = np.zeros(envs, dtype=bool)
    for t in range(400):
        obs = (np.arange(envs) * 1000.0 + t)[:, None]  # unique per (env, step): identifies a transition's start
        terminated, truncated = rng.random(envs) < 0.08, rng.random(envs) < 0.03
        steps.append((obs, rng.integers(0, 4, envs), rng.random(envs), obs + 0.5, terminated, truncated, ~resetting))
        resetting = terminated | truncated
    acc = NStepAccumulator(envs, n, gamma, obs_shape=(1,), obs_dtype=np.float64)
    got = []
    for step in steps:
        out = acc.push(*step)
        assert {k: a.dtype for k, a in out.items()} == WANT_DTYPES
        for i in range(len(out["reward"])):
            start = out["obs"][i, 0]
            got.append(
                (int(start // 1000), start, int(out["action"][i]), float(out["reward"][i]), out["next_obs"][i, 0])
                + (bool(out["terminated"][i]), bool(out["truncated"][i]))
            )
    got.sort()
    want = reference_windows(steps, n, gamma)
    assert len(got) == len(want) and len(want) > 300
    for g, w in zip(got, want, strict=True):
        assert g[:3] == w[:3] and g[4:] == w[4:] and g[3] == pytest.approx(w[3], abs=1e-3)


def test_an_infinite_reward_stays_in_its_own_episode():
    acc = NStepAccumulator(1, n=3, gamma=0.5, obs_shape=(1,), obs_dtype=np.float32)
    obs, no, yes = np.zeros((1, 1), np.float32), np.array([False]), np.array([True])
    acc.push(obs, np.array([0]), np.array([-np.inf]), obs, yes, no, yes)  # a 1-step episode with reward -inf
    acc.push(obs, np.array([0]), np.array([0.0]), obs, no, no, no)  # its reset row
    out = acc.push(obs, np.array([0]), np.array([1.0]), obs, yes, no, yes)  # the next episode, one step
    assert out["reward"].tolist() == [1.0]


def test_each_transition_carries_the_extras_of_the_step_whose_action_it_holds():
    extras = {"q_taken": ((), np.dtype(np.float32)), "scores": ((2,), np.dtype(np.float32))}
    acc = NStepAccumulator(1, n=3, gamma=0.5, obs_shape=(1,), obs_dtype=np.float32, extras=extras)
    out = []
    for t in range(5):
        step = {"q_taken": np.array([10.0 * t], np.float32), "scores": np.array([[t, -t]], np.float32)}
        out.append(
            acc.push(
                np.array([[float(t)]]),
                np.array([t]),
                np.array([1.0]),
                np.array([[t + 1.0]]),
                np.array([t == 4]),
                np.array([False]),
                np.array([True]),
                step,
            )
        )
    got = {k: np.concatenate([o[k] for o in out]) for k in out[0]}
    np.testing.assert_array_equal(got["q_taken"], 10.0 * got["obs"][:, 0])  # windows started at steps 0..4
    np.testing.assert_array_equal(got["scores"], np.stack([got["obs"][:, 0], -got["obs"][:, 0]], axis=1))
    assert sorted(got["obs"][:, 0]) == [0, 1, 2, 3, 4] and got["q_taken"].dtype == np.float32


def test_an_actor_that_returns_no_declared_extra_is_named():
    acc = NStepAccumulator(1, n=1, gamma=0.5, obs_shape=(1,), obs_dtype=np.float32, extras={"q_taken": ((), np.dtype(np.float32))})
    with pytest.raises(KeyError, match="the actor returned no 'q_taken'"):
        no, yes = np.zeros(1, bool), np.ones(1, bool)
        acc.push(np.zeros((1, 1)), np.zeros(1, int), np.zeros(1), np.zeros((1, 1)), no, no, yes, {})
