import math

import numpy as np
import pytest
import torch

from models.actor_critic import ActorCriticMLP
from models.dueling import DuelingMLP
from models.simple_policy import SimplePolicy
from trainers.vtrace import vtrace

# ---------------------------------------------------------------- V-trace


def reference_vtrace(mu_logp, pi_logp, r, v, nv, term, trunc, gamma, rho_bar, c_bar):
    """Per-element V-trace in the paper's explicit-sum form, cut at episode ends (float64, plain loops)."""
    B, T = r.shape
    vs, adv, rho = np.zeros((B, T)), np.zeros((B, T)), np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            rho[b, t] = min(rho_bar, math.exp(pi_logp[b, t] - mu_logp[b, t]))
        for s in range(T):
            total, coef = 0.0, 1.0
            for t in range(s, T):
                disc = 0.0 if term[b, t] else gamma
                total += coef * rho[b, t] * (r[b, t] + disc * nv[b, t] - v[b, t])
                if term[b, t] or trunc[b, t]:
                    break
                coef *= gamma * min(c_bar, math.exp(pi_logp[b, t] - mu_logp[b, t]))
            vs[b, s] = v[b, s] + total
        for s in range(T):
            continues = s + 1 < T and not term[b, s] and not trunc[b, s]
            boot = vs[b, s + 1] if continues else nv[b, s]
            disc = 0.0 if term[b, s] else gamma
            adv[b, s] = rho[b, s] * (r[b, s] + disc * boot - v[b, s])
    return vs, adv, rho


def random_segment(B=3, T=7, seed=0):
    rng = np.random.default_rng(seed)
    data = {
        "behaviour_log_prob": np.log(rng.uniform(0.1, 1.0, (B, T))),
        "target_log_prob": np.log(rng.uniform(0.1, 1.0, (B, T))),
        "reward": rng.normal(size=(B, T)),
        "value": rng.normal(size=(B, T)),
        "next_value": rng.normal(size=(B, T)),
        "terminated": np.zeros((B, T), bool),
        "truncated": np.zeros((B, T), bool),
    }
    for b, t in [(0, 2), (1, 6), (2, 0), (2, 4)]:
        data["terminated"][b, t] = True
    for b, t in [(0, 4), (1, 1), (2, 2)]:
        data["truncated"][b, t] = True
    return data


def as_torch(data):
    return {k: torch.from_numpy(v) if v.dtype == bool else torch.tensor(v, dtype=torch.float32) for k, v in data.items()}


def test_vtrace_matches_reference_with_episode_ends_inside_segments():
    data = random_segment()
    gamma, rho_bar, c_bar = 0.9, 1.3, 0.7
    ratio = np.exp(data["target_log_prob"] - data["behaviour_log_prob"])
    assert (ratio > rho_bar).any() and ((ratio > c_bar) & (ratio < rho_bar)).any() and (ratio < c_bar).any()
    out = vtrace(**as_torch(data), gamma=gamma, rho_bar=rho_bar, c_bar=c_bar)
    vs, adv, rho = reference_vtrace(*data.values(), gamma, rho_bar, c_bar)
    for got, want in [(out.vs, vs), (out.pg_advantage, adv), (out.rho, rho)]:
        assert got.shape == (3, 7) and got.dtype == torch.float32
        np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_on_policy_vtrace_is_the_n_step_bootstrapped_return():
    B, T, gamma = 2, 5, 0.8
    rng = np.random.default_rng(1)
    reward = rng.normal(size=(B, T))
    value = rng.normal(size=(B, T))
    bootstrap = rng.normal(size=B)
    next_value = np.concatenate([value[:, 1:], bootstrap[:, None]], axis=1)
    logp = np.log(rng.uniform(0.1, 1.0, (B, T)))
    no_end = torch.zeros(B, T, dtype=torch.bool)
    out = vtrace(*(torch.tensor(x, dtype=torch.float32) for x in (logp, logp, reward, value, next_value)), no_end, no_end, gamma=gamma)
    returns = np.zeros((B, T))
    for b in range(B):
        for t in range(T):
            returns[b, t] = sum(gamma ** (k - t) * reward[b, k] for k in range(t, T)) + gamma ** (T - t) * bootstrap[b]
    np.testing.assert_allclose(out.vs.numpy(), returns, rtol=1e-5, atol=1e-5)
    next_returns = np.concatenate([returns[:, 1:], bootstrap[:, None]], axis=1)
    np.testing.assert_allclose(out.pg_advantage.numpy(), reward + gamma * next_returns - value, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(out.rho.numpy(), 1.0)


def test_clipping_clips_rho_and_c():
    data = as_torch(random_segment(seed=2))
    data["terminated"][:] = False
    data["truncated"][:] = False
    ratio = (data["target_log_prob"] - data["behaviour_log_prob"]).exp()
    rho_bar = 0.5
    assert (ratio > rho_bar).any() and (ratio < rho_bar).any()
    out = vtrace(**data, gamma=0.9, rho_bar=rho_bar, c_bar=0.0)
    np.testing.assert_allclose(out.rho.numpy(), ratio.clamp(max=rho_bar).numpy(), rtol=1e-6)
    # c_bar = 0 cuts every trace: vs is the one-step target
    delta = out.rho * (data["reward"] + 0.9 * data["next_value"] - data["value"])
    np.testing.assert_allclose(out.vs.numpy(), (data["value"] + delta).numpy(), rtol=1e-5, atol=1e-6)
    unclipped = vtrace(**data, gamma=0.9, rho_bar=100.0, c_bar=100.0)
    np.testing.assert_allclose(unclipped.rho.numpy(), ratio.numpy(), rtol=1e-6)


def test_vtrace_targets_carry_no_gradient():
    data = as_torch(random_segment())
    for k in ("target_log_prob", "value", "next_value"):
        data[k].requires_grad_(True)
    out = vtrace(**data, gamma=0.99)
    assert not any(x.requires_grad for x in out)


@pytest.mark.parametrize("name", ["value", "next_value", "truncated"])
def test_vtrace_shape_mismatch_raises_naming_the_argument(name):
    data = as_torch(random_segment())
    data[name] = data[name][:, :-1]
    with pytest.raises(ValueError, match=name):
        vtrace(**data, gamma=0.99)
    data[name] = torch.zeros(3 * 7)
    with pytest.raises(ValueError, match=name):
        vtrace(**data, gamma=0.99)


# ---------------------------------------------------------------- models


def test_actor_critic_shapes_and_init():
    torch.manual_seed(0)
    net = ActorCriticMLP(4, 3, hidden_sizes=[32, 16])
    logits, value = net(torch.randn(5, 2, 2, dtype=torch.float64))  # flattened to 4, cast to float
    assert logits.shape == (5, 3) and value.shape == (5,)
    assert logits.dtype == value.dtype == torch.float32
    first = net.torso[0].weight  # [32, 4]: orthonormal columns times sqrt(2)
    np.testing.assert_allclose((first.T @ first).detach().numpy(), 2.0 * np.eye(4), atol=1e-5)
    assert net.policy_head.weight.norm(dim=1).max() < 0.02  # near-uniform initial policy
    assert logits.abs().max() < 0.1
    assert net.value_head.weight.norm().item() == pytest.approx(1.0, abs=1e-5)


def test_actor_critic_learns_a_toy_policy_gradient_problem():
    torch.manual_seed(0)
    net = ActorCriticMLP(4, 2)
    obs = torch.randn(64, 4)
    action = (obs[:, 0] > 0).long()  # the "good" action depends on the observation
    ret = obs[:, 1]  # a return the critic should fit
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)

    def chosen_prob():
        with torch.no_grad():
            return net(obs)[0].softmax(-1).gather(1, action[:, None]).mean().item()

    before = chosen_prob()
    for _ in range(200):
        logits, value = net(obs)
        logp = torch.log_softmax(logits, -1).gather(1, action[:, None]).squeeze(1)
        loss = -logp.mean() + 0.5 * (value - ret).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert abs(before - 0.5) < 0.05
    assert chosen_prob() > 0.9
    with torch.no_grad():
        assert (net(obs)[1] - ret).pow(2).mean() < 0.1 * ret.pow(2).mean()


@pytest.mark.parametrize("num_atoms", [1, 5])
def test_dueling_shapes_and_zero_mean_advantage(num_atoms):
    torch.manual_seed(0)
    net = DuelingMLP(4, 3, hidden_sizes=(32,), num_atoms=num_atoms)
    obs = torch.randn(6, 4, dtype=torch.float64)
    q = net(obs)
    assert q.shape == ((6, 3) if num_atoms == 1 else (6, 3, num_atoms))
    assert q.dtype == torch.float32
    with torch.no_grad():
        v = net.value_stream(net.torso(obs.float()))  # [6, num_atoms]
        q3 = q.view(6, 3, num_atoms)
    a_part = q3 - v[:, None, :]
    np.testing.assert_allclose(a_part.mean(dim=1).detach().numpy(), 0.0, atol=1e-6)
    assert a_part.abs().max() > 1e-3  # the advantage stream does contribute
    assert net(torch.randn(0, 4)).shape[0] == 0


def test_simple_policy_atoms_and_unchanged_default():
    net = SimplePolicy(4, 2, num_atoms=3)
    obs = torch.randn(5, 4)
    q = net(obs)
    assert q.shape == (5, 2, 3)
    np.testing.assert_array_equal(q.reshape(5, 6).detach().numpy(), net.net(obs).detach().numpy())
    default = SimplePolicy(4, 2)
    shapes = {k: tuple(v.shape) for k, v in default.state_dict().items()}
    assert shapes == {
        "net.0.weight": (64, 4),
        "net.0.bias": (64,),
        "net.2.weight": (64, 64),
        "net.2.bias": (64,),
        "net.4.weight": (2, 64),
        "net.4.bias": (2,),
    }
    assert default(obs).shape == (5, 2)
    with pytest.raises(ValueError):
        SimplePolicy(4, 2, num_atoms=0)
