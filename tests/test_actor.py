import numpy as np
import torch

from models.simple_policy import SimplePolicy
from titan_rl.rollout.actor import VectorActor, evaluate_greedy, linear_epsilon

# CartPole terminates when |x| > 2.4 or |angle| > 0.2095; a reset state is within +-0.05.
X_LIMIT, ANGLE_LIMIT = 2.4, 12 * 2 * np.pi / 360


def _collect(actor: VectorActor, steps: int, epsilon: float):
    rows, returns, lengths = [], [], []
    for _ in range(steps):
        r = actor.step(epsilon)
        rows.append(r.transitions)
        returns += r.episode_returns
        lengths += r.episode_lengths
    return {k: np.concatenate([t[k] for t in rows]) for k in rows[0]}, returns, lengths


def test_terminal_transitions_keep_the_true_final_observation_and_resets_are_not_transitions():
    torch.manual_seed(0)
    actor = VectorActor("CartPole-v1", 4, SimplePolicy(4, 2, [16]), seed=0)
    data, returns, lengths = _collect(actor, 300, epsilon=1.0)
    term = data["terminated"]
    assert term.sum() >= 10
    final = data["next_obs"][term]
    out_of_bounds = (np.abs(final[:, 0]) > X_LIMIT) | (np.abs(final[:, 2]) > ANGLE_LIMIT)
    assert out_of_bounds.all(), "a terminal next_obs must be the failing state, not a reset one"
    inside = (np.abs(data["obs"][:, 0]) <= X_LIMIT) & (np.abs(data["obs"][:, 2]) <= ANGLE_LIMIT)
    assert inside.all(), "no transition may start from a final observation"
    # exactly one reset step per finished episode (but those that ended on the last step) is dropped
    assert len(data["reward"]) == 4 * 300 - (len(returns) - actor._resetting.sum())
    assert sum(lengths) <= len(data["reward"]) and returns == [float(n) for n in lengths]


def test_truncation_is_reported_apart_from_termination():
    actor = VectorActor("CartPole-v1", 2, SimplePolicy(4, 2, [16]), seed=0)
    actor.env.close()
    import gymnasium as gym

    actor.env = gym.make_vec(
        "CartPole-v1", num_envs=2, vectorization_mode="sync", wrappers=[lambda e: gym.wrappers.TimeLimit(e.unwrapped, 5)]
    )
    actor.obs, _ = actor.env.reset(seed=0)
    data, returns, lengths = _collect(actor, 12, epsilon=0.0)
    assert data["truncated"].sum() >= 2 and not data["terminated"][data["truncated"]].any()
    assert set(lengths) == {5}


def test_epsilon_one_acts_uniformly_and_zero_acts_greedily():
    policy = SimplePolicy(4, 2, [16])
    actor = VectorActor("CartPole-v1", 64, policy, seed=0)
    obs = actor.obs
    greedy = policy(torch.as_tensor(obs)).argmax(1).numpy()
    np.testing.assert_array_equal(actor.act(obs, 0.0), greedy)
    random_share = np.mean([np.mean(actor.act(obs, 1.0) != greedy) for _ in range(20)])
    assert 0.4 < random_share < 0.6


def test_linear_epsilon_schedule():
    assert linear_epsilon(1.0, 0.1, 100, 0) == 1.0
    assert abs(linear_epsilon(1.0, 0.1, 100, 50) - 0.55) < 1e-9
    assert linear_epsilon(1.0, 0.1, 100, 1000) == 0.1
    assert linear_epsilon(1.0, 0.1, 0, 0) == 0.1


def test_greedy_evaluation_runs_one_episode_per_env():
    returns = evaluate_greedy(SimplePolicy(4, 2, [16]), "CartPole-v1", episodes=5, seed=0)
    assert len(returns) == 5 and all(1 <= r <= 500 for r in returns)


def test_workers_of_different_rollout_replicas_get_different_ids_and_seeds():
    from tests.helpers import make_config
    from titan_rl.rollout.worker import worker_identity

    identities = {worker_identity(make_config(f"rollout_server.replica_id={r}"), w) for r in range(3) for w in range(2)}
    assert len({i for i, _ in identities}) == 6 and len({s for _, s in identities}) == 6
    assert worker_identity(make_config("seed=1"), 0)[1] != worker_identity(make_config("seed=2"), 0)[1]


def test_a_reset_rows_reward_stays_out_of_the_next_episode_return():
    actor = VectorActor("CartPole-v1", 1, SimplePolicy(4, 2, [16]), seed=0)
    obs, no, yes = actor.obs, np.array([False]), np.array([True])
    # (reward, terminated): an episode of one step, its reset row with a reward of inf, a second one-step episode
    steps = iter([(1.0, yes), (np.inf, no), (2.0, yes)])

    def step(actions):
        reward, terminated = next(steps)
        return obs, np.array([reward]), terminated, no, {}

    actor.env.step = step
    returns = [r for _ in range(3) for r in actor.step(0.0).episode_returns]
    assert returns == [1.0, 2.0]
