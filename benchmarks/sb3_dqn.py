"""Stable-Baselines3 DQN with the rl-baselines3-zoo hyperparameters, evaluated like TITAN-RL.

Run by solve_time.py as a subprocess: every `--eval-every` env steps it plays `--eval-episodes`
greedy episodes on separate envs, and as many again where they would beat the best so far (the same
`titan_rl.evaluation.evaluate_confirmed` TITAN-RL's evaluator uses, inside the training process, so
evaluation time counts the same on both sides) and appends a JSON line
{"time", "env_steps", "mean_return", "episodes"} to `--out`. At the end the final model is
evaluated on fresh seeds and a last line {"final_mean_return", "final_returns", "wall_s"} is
appended.

    python -m benchmarks.sb3_dqn --env Acrobot-v1 --budget 100000 --eval-every 5000 --out sb3.jsonl
    python -m benchmarks.sb3_dqn --env titan_rl.minatar_envs:MinAtar/Breakout-v1 --budget 500000 --eval-every 25000 --out sb3.jsonl
"""

from __future__ import annotations

import argparse
import json
import time

import gymnasium as gym
import numpy as np
import torch
from stable_baselines3 import DQN
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from torch import nn

from models.minatar_cnn import MinAtarCNN
from titan_rl.evaluation import ActFn, confirmation_bar, eval_seed, evaluate, evaluate_confirmed

MINATAR_BREAKOUT = "titan_rl.minatar_envs:MinAtar/Breakout-v1"

# rl-baselines3-zoo hyperparams/dqn.yml (LunarLander's entry is for v2; v3 differs in bug fixes only)
ZOO = {
    "CartPole-v1": dict(
        learning_rate=2.3e-3,
        batch_size=64,
        buffer_size=100_000,
        learning_starts=1000,
        gamma=0.99,
        target_update_interval=10,
        train_freq=256,
        gradient_steps=128,
        exploration_fraction=0.16,
        exploration_final_eps=0.04,
        policy_kwargs=dict(net_arch=[256, 256]),
    ),
    "Acrobot-v1": dict(
        learning_rate=6.3e-4,
        batch_size=128,
        buffer_size=50_000,
        learning_starts=0,
        gamma=0.99,
        target_update_interval=250,
        train_freq=4,
        gradient_steps=-1,
        exploration_fraction=0.12,
        exploration_final_eps=0.1,
        policy_kwargs=dict(net_arch=[256, 256]),
    ),
    "MountainCar-v0": dict(
        learning_rate=4e-3,
        batch_size=128,
        buffer_size=10_000,
        learning_starts=1000,
        gamma=0.98,
        target_update_interval=600,
        train_freq=16,
        gradient_steps=8,
        exploration_fraction=0.2,
        exploration_final_eps=0.07,
        policy_kwargs=dict(net_arch=[256, 256]),
    ),
}
ZOO["LunarLander-v3"] = ZOO["Acrobot-v1"]  # the zoo gives LunarLander-v2 exactly Acrobot's settings


class MinAtarFeatures(BaseFeaturesExtractor):
    """models/minatar_cnn.py's network up to its last hidden layer; SB3's Q-head (net_arch=[]) adds
    the output layer, so both sides learn the same network."""

    def __init__(self, observation_space: gym.spaces.Box, hidden_size: int = 128):
        super().__init__(observation_space, hidden_size)
        grid_size, _, in_channels = observation_space.shape
        self.cnn = MinAtarCNN(in_channels, action_dim=1, grid_size=grid_size, hidden_size=hidden_size)
        self.cnn.net = self.cnn.net[:-1]

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.cnn(obs)


# The zoo has no MinAtar entry: config/minatar_breakout.yaml's settings in SB3's keys (SB3's DQN has
# neither double Q nor n-step returns), for the same work per env step: 1 update of 128 every 4.
# exploration_fraction is the config's 100k env steps of a 500k budget.
ZOO[MINATAR_BREAKOUT] = dict(
    learning_rate=2.5e-4,
    batch_size=128,
    buffer_size=100_000,
    learning_starts=5000,
    gamma=0.99,
    target_update_interval=1000,
    train_freq=4,
    gradient_steps=1,
    exploration_fraction=0.2,
    exploration_final_eps=0.05,
    policy_kwargs=dict(features_extractor_class=MinAtarFeatures, net_arch=[]),
)


def greedy(q_net: nn.Module) -> ActFn:
    """The argmax action of SB3's Q-network for each observation (as DQN.greedy_actions does for TITAN-RL's)."""

    def act(obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return q_net(torch.as_tensor(obs)).argmax(dim=1).numpy()

    return act


class GreedyEval(BaseCallback):
    def __init__(self, env_id: str, every: int, episodes: int, seed: int, out: str):
        super().__init__()
        self.env_id, self.every, self.episodes, self.seed, self.out = env_id, every, episodes, seed, out
        self.evals = 0
        self.best: float | None = None

    def _on_step(self) -> bool:
        if self.num_timesteps % self.every == 0:
            seed = eval_seed(self.seed, self.evals, self.episodes)
            bar = confirmation_bar(self.best, None)
            returns = evaluate_confirmed(greedy(self.model.q_net), self.env_id, self.episodes, seed, seed + self.episodes, bar)
            self.evals += 1
            mean_return = float(np.mean(returns))
            self.best = mean_return if self.best is None else max(self.best, mean_return)
            row = {"time": time.time(), "env_steps": self.num_timesteps, "mean_return": mean_return, "episodes": len(returns)}
            with open(self.out, "a") as f:
                f.write(json.dumps(row) + "\n")
        return True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--env", default="CartPole-v1", choices=sorted(ZOO))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=int, default=50_000)
    parser.add_argument("--eval-every", type=int, default=2500)
    parser.add_argument("--eval-episodes", type=int, default=20)
    parser.add_argument("--final-seed", type=int, default=777)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    started = time.monotonic()
    model = DQN("MlpPolicy", args.env, seed=args.seed, device="cpu", verbose=0, **ZOO[args.env])
    model.learn(total_timesteps=args.budget, callback=GreedyEval(args.env, args.eval_every, args.eval_episodes, args.seed, args.out))
    wall_s = time.monotonic() - started
    final = evaluate(greedy(model.q_net), args.env, args.eval_episodes, args.final_seed)
    with open(args.out, "a") as f:
        f.write(json.dumps({"final_mean_return": float(np.mean(final)), "final_returns": final, "wall_s": wall_s}) + "\n")


if __name__ == "__main__":
    main()
