"""Stable-Baselines3 DQN on CartPole-v1 with the rl-baselines3-zoo hyperparameters, evaluated like TITAN-RL.

Run by solve_time.py as a subprocess: every `--eval-every` env steps it plays `--eval-episodes`
greedy episodes on separate envs (the same `titan_rl.evaluation.evaluate` TITAN-RL's trainer uses,
inside the training process, so evaluation time counts the same on both sides) and appends a JSON line
{"time", "env_steps", "mean_return"} to `--out`. At the end the final model is evaluated on fresh seeds.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from stable_baselines3 import DQN
from stable_baselines3.common.callbacks import BaseCallback
from torch import nn

from titan_rl.evaluation import ActFn, evaluate

ZOO_CARTPOLE = dict(  # rl-baselines3-zoo hyperparams/dqn.yml, CartPole-v1
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
)


def greedy(q_net: nn.Module) -> ActFn:
    """The argmax action of SB3's Q-network for each observation (as DQN.greedy_actions does for TITAN-RL's)."""

    def act(obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return q_net(torch.as_tensor(obs)).argmax(dim=1).numpy()

    return act


class GreedyEval(BaseCallback):
    def __init__(self, every: int, episodes: int, seed: int, out: str):
        super().__init__()
        self.every, self.episodes, self.seed, self.out = every, episodes, seed, out
        self.evals = 0

    def _on_step(self) -> bool:
        if self.num_timesteps % self.every == 0:
            returns = evaluate(
                greedy(self.model.q_net), "CartPole-v1", self.episodes, 1_000_003 * (self.seed + 1) + self.evals * self.episodes
            )
            self.evals += 1
            with open(self.out, "a") as f:
                f.write(json.dumps({"time": time.time(), "env_steps": self.num_timesteps, "mean_return": float(np.mean(returns))}) + "\n")
        return True


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=int, default=50_000)
    parser.add_argument("--eval-every", type=int, default=2500)
    parser.add_argument("--eval-episodes", type=int, default=20)
    parser.add_argument("--final-seed", type=int, default=777)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    model = DQN("MlpPolicy", "CartPole-v1", seed=args.seed, device="cpu", verbose=0, **ZOO_CARTPOLE)
    model.learn(total_timesteps=args.budget, callback=GreedyEval(args.eval_every, args.eval_episodes, args.seed, args.out))
    final = evaluate(greedy(model.q_net), "CartPole-v1", args.eval_episodes, args.final_seed)
    with open(args.out, "a") as f:
        f.write(json.dumps({"final_mean_return": float(np.mean(final))}) + "\n")


if __name__ == "__main__":
    main()
