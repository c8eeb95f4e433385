"""V-trace off-policy targets (Espeholt et al. 2018, IMPALA), for segments that may cross episode boundaries.

Every step t of a [B, T] segment carries its own successor value `next_value_t = V(x'_t)`, where x'_t is
the true next observation of step t (so a time-limit truncation can bootstrap from the final observation
even though the following step of the segment starts a new episode). With

    discount_t = gamma * (1 - terminated_t)                       # no bootstrap past a terminal state
    trace_t    = gamma * (1 - (terminated_t | truncated_t))       # the correction chain stops at any episode end
    rho_t      = min(rho_bar, pi(a_t|x_t) / mu(a_t|x_t)),  c_t = min(c_bar, pi(a_t|x_t) / mu(a_t|x_t))
    delta_t    = rho_t * (r_t + discount_t * next_value_t - value_t)

the targets are vs_t = value_t + acc_t with acc_t = delta_t + trace_t * c_t * acc_{t+1}, acc_T = 0 (within
an episode next_value_t == value_{t+1}, so this is the paper's recursion), and the policy-gradient advantage is
rho_t * (r_t + discount_t * vs'_{t+1} - value_t), where vs'_{t+1} is vs_{t+1} when step t+1 continues the same
episode and next_value_t otherwise (episode end, or t the last step of the segment).

Example:
    out = vtrace(behaviour_log_prob, target_log_prob.detach(), reward, value.detach(), next_value.detach(),
                 terminated, truncated, gamma=0.99)
    policy_loss = -(out.pg_advantage * target_log_prob).mean()
    value_loss = 0.5 * (out.vs - value).pow(2).mean()
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class VTraceReturns(NamedTuple):
    vs: Tensor  # [B, T] value targets
    pg_advantage: Tensor  # [B, T] advantages for the policy gradient
    rho: Tensor  # [B, T] clipped importance weights min(rho_bar, pi/mu)


def vtrace(
    behaviour_log_prob: Tensor,
    target_log_prob: Tensor,
    reward: Tensor,
    value: Tensor,
    next_value: Tensor,
    terminated: Tensor,
    truncated: Tensor,
    gamma: float,
    rho_bar: float = 1.0,
    c_bar: float = 1.0,
) -> VTraceReturns:
    """V-trace targets for a batch of B segments of T steps; every argument is a [B, T] tensor (see the module docstring).

    `terminated`/`truncated` are read as booleans. Computed without gradients, in float32, on the inputs' device.
    """
    args = {
        "behaviour_log_prob": behaviour_log_prob,
        "target_log_prob": target_log_prob,
        "reward": reward,
        "value": value,
        "next_value": next_value,
        "terminated": terminated,
        "truncated": truncated,
    }
    for name, tensor in args.items():
        if not isinstance(tensor, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
        if tensor.dim() != 2:
            raise ValueError(f"{name} must have shape [B, T], got {tuple(tensor.shape)}")
        if tensor.shape != behaviour_log_prob.shape:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {tuple(behaviour_log_prob.shape)} like behaviour_log_prob")

    with torch.no_grad():
        f32 = torch.float32
        log_ratio = target_log_prob.to(f32) - behaviour_log_prob.to(f32)
        ratio = log_ratio.exp()
        rho = ratio.clamp(max=rho_bar)
        c = ratio.clamp(max=c_bar)
        reward, value, next_value = reward.to(f32), value.to(f32), next_value.to(f32)
        terminated = terminated.bool()
        episode_end = terminated | truncated.bool()
        discount = gamma * (~terminated).to(f32)
        trace_c = gamma * (~episode_end).to(f32) * c

        delta = rho * (reward + discount * next_value - value)
        acc = torch.empty_like(delta)
        running = torch.zeros_like(delta[:, 0])
        for t in range(delta.shape[1] - 1, -1, -1):
            running = delta[:, t] + trace_c[:, t] * running
            acc[:, t] = running
        vs = value + acc

        # vs'_{t+1}: vs_{t+1} where step t+1 continues step t's episode, else the stored successor value
        vs_next = next_value.clone()
        vs_next[:, :-1] = torch.where(episode_end[:, :-1], next_value[:, :-1], vs[:, 1:])
        pg_advantage = rho * (reward + discount * vs_next - value)
    return VTraceReturns(vs=vs, pg_advantage=pg_advantage, rho=rho)
