import numpy as np
import pytest
import torch

from models.actor_critic import ActorCriticMLP
from models.simple_policy import SimplePolicy
from tests.helpers import make_config, make_config_from
from titan_rl.evaluation import evaluate
from titan_rl.off_policy import linear_schedule
from titan_rl.registry import build_algorithm
from titan_rl.rollout.actor import VectorActor


def dqn(*overrides: str):
    return build_algorithm(make_config(*overrides))


def dqn_actor(num_envs: int, epsilon: float, policy=None, n_step: int = 1) -> VectorActor:
    """A VectorActor acting with DQN's epsilon-greedy policy at a constant `epsilon`."""
    algo = dqn(
        f"algorithm.config.epsilon_start={epsilon}", f"algorithm.config.epsilon_final={epsilon}", f"algorithm.config.n_step={n_step}"
    )
    policy = policy or SimplePolicy(4, 2, [16])
    return VectorActor("CartPole-v1", num_envs, algo.make_actor(policy, 0, seed=0), algo.make_adder(num_envs), seed=0)


# CartPole terminates when |x| > 2.4 or |angle| > 0.2095; a reset state is within +-0.05.
X_LIMIT, ANGLE_LIMIT = 2.4, 12 * 2 * np.pi / 360


def _collect(actor: VectorActor, steps: int):
    rows, returns, lengths = [], [], []
    for _ in range(steps):
        r = actor.step()
        rows.append(r.records)
        returns += r.episode_returns
        lengths += r.episode_lengths
    return {k: np.concatenate([t[k] for t in rows]) for k in rows[0]}, returns, lengths


def test_terminal_transitions_keep_the_true_final_observation_and_resets_are_not_transitions():
    torch.manual_seed(0)
    actor = dqn_actor(4, epsilon=1.0)
    data, returns, lengths = _collect(actor, 300)
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
    actor = dqn_actor(2, epsilon=0.0)
    actor.env.close()
    import gymnasium as gym

    actor.env = gym.make_vec(
        "CartPole-v1", num_envs=2, vectorization_mode="sync", wrappers=[lambda e: gym.wrappers.TimeLimit(e.unwrapped, 5)]
    )
    actor.obs, _ = actor.env.reset(seed=0)
    data, returns, lengths = _collect(actor, 12)
    assert data["truncated"].sum() >= 2 and not data["terminated"][data["truncated"]].any()
    assert set(lengths) == {5}


def test_epsilon_one_acts_uniformly_and_zero_acts_greedily():
    policy = SimplePolicy(4, 2, [16])
    obs = np.random.default_rng(0).standard_normal((64, 4)).astype(np.float32)
    greedy = policy(torch.as_tensor(obs)).argmax(1).numpy()
    np.testing.assert_array_equal(dqn_actor(1, 0.0, policy).actor.act(obs)[0], greedy)
    uniform = dqn_actor(1, 1.0, policy).actor
    random_share = np.mean([np.mean(uniform.act(obs)[0] != greedy) for _ in range(20)])
    assert 0.4 < random_share < 0.6


def test_epsilon_follows_the_buffer_wide_env_steps_that_came_with_the_weights():
    algo = dqn("algorithm.config.epsilon_start=1.0", "algorithm.config.epsilon_final=0.1", "algorithm.config.epsilon_decay_env_steps=1000")
    actor = algo.make_actor(SimplePolicy(4, 2, [16]), worker_index=1, seed=0)
    assert actor.metrics() == {"epsilon": 1.0}
    actor.env_steps = 500  # what PolicySubscriber hands over with each version
    assert actor.metrics()["epsilon"] == pytest.approx(0.55)
    actor.env_steps = 10_000
    assert actor.metrics()["epsilon"] == pytest.approx(0.1)


def test_a_list_of_final_epsilons_gives_each_worker_its_own():
    algo = dqn("algorithm.config.epsilon_final=[0.5, 0.01]", "algorithm.config.epsilon_decay_env_steps=0")
    policy = SimplePolicy(4, 2, [16])
    assert [algo.make_actor(policy, w, seed=0).metrics()["epsilon"] for w in (0, 1)] == [0.5, 0.01]


def test_linear_schedule():
    assert linear_schedule(1.0, 0.1, 100, 0) == 1.0
    assert abs(linear_schedule(1.0, 0.1, 100, 50) - 0.55) < 1e-9
    assert linear_schedule(1.0, 0.1, 100, 1000) == 0.1
    assert linear_schedule(1.0, 0.1, 0, 0) == 0.1


def test_greedy_evaluation_runs_one_episode_per_env():
    algo, policy = dqn(), SimplePolicy(4, 2, [16])
    returns = evaluate(lambda obs: algo.greedy_actions(policy, obs), "CartPole-v1", episodes=5, seed=0)
    assert len(returns) == 5 and all(1 <= r <= 500 for r in returns)


def test_workers_of_different_rollout_replicas_get_different_ids_and_seeds():
    from titan_rl.rollout.worker import worker_identity

    identities = {worker_identity(make_config(f"rollout_server.replica_id={r}"), w) for r in range(3) for w in range(2)}
    assert len({i for i, _ in identities}) == 6 and len({s for _, s in identities}) == 6
    assert worker_identity(make_config("seed=1"), 0)[1] != worker_identity(make_config("seed=2"), 0)[1]


def test_a_reset_rows_reward_stays_out_of_the_next_episode_return():
    actor = dqn_actor(1, epsilon=0.0)
    obs, no, yes = actor.obs, np.array([False]), np.array([True])
    # (reward, terminated): an episode of one step, its reset row with a reward of inf, a second one-step episode
    steps = iter([(1.0, yes), (np.inf, no), (2.0, yes)])

    def step(actions):
        reward, terminated = next(steps)
        return obs, np.array([reward]), terminated, no, {}

    actor.env.step = step
    returns = [r for _ in range(3) for r in actor.step().episode_returns]
    assert returns == [1.0, 2.0]


def impala_actor(num_envs: int, segment_length: int) -> VectorActor:
    algo = build_algorithm(make_config_from("config/cartpole_impala.yaml", f"algorithm.config.segment_length={segment_length}"))
    torch.manual_seed(0)
    policy = ActorCriticMLP(4, 2, [16])
    return VectorActor("CartPole-v1", num_envs, algo.make_actor(policy, 0, seed=0), algo.make_adder(num_envs), seed=0)


def test_segments_hold_consecutive_steps_of_one_env_with_true_successors_and_behaviour_log_probs():
    actor = impala_actor(3, segment_length=5)
    data, returns, _ = _collect(actor, 120)
    assert data["obs"].shape[1:] == (5, 4) and data["log_prob"].shape[1:] == (5,)
    assert len(data["obs"]) >= 60  # 3 envs x 120 steps, less one reset step per episode, in segments of 5
    assert sum(returns) <= 5 * len(data["obs"]) + 3 * 5
    within = ~(data["terminated"][:, :-1] | data["truncated"][:, :-1])
    # inside an episode, each step starts where the last one ended; across an episode end, a reset state follows
    np.testing.assert_array_equal(data["next_obs"][:, :-1][within], data["obs"][:, 1:][within])
    assert data["terminated"].any()
    assert (data["log_prob"] < 0).all() and (data["log_prob"] > np.log(1e-6)).all()


def test_sampling_actor_records_the_log_probability_of_the_action_it_took():
    algo = build_algorithm(make_config_from("config/cartpole_impala.yaml"))
    policy = ActorCriticMLP(4, 2, [16])
    with torch.no_grad():
        policy.policy_head.bias.copy_(torch.tensor([0.0, np.log(3.0)]))  # p(action 1) = 0.75 near zero weights
        policy.policy_head.weight.zero_()
    actor = algo.make_actor(policy, 0, seed=0)
    obs = np.zeros((4000, 4), np.float32)
    actions, extras = actor.act(obs)
    assert abs(actions.mean() - 0.75) < 0.03
    np.testing.assert_allclose(extras["log_prob"], np.where(actions == 1, np.log(0.75), np.log(0.25)), rtol=1e-5)
    np.testing.assert_array_equal(algo.greedy_actions(policy, obs[:3]), [1, 1, 1])
