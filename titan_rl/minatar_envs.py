"""MinAtar's games as Gymnasium envs, registered when this module is imported.

MinAtar registers its envs through a Gymnasium plugin entry point, which Gymnasium 1.x no longer
reads. Gymnasium imports the module named before a ':' in an env id, so configs name the games
`titan_rl.minatar_envs:MinAtar/Breakout-v1` and every process that makes the env (rollout
workers, the evaluator, visualize.py) registers them first. `-v1` uses the game's minimal action
set (Breakout: 3 actions), `-v0` all 6. MinAtar's own registration sets no time limit, and a
greedy policy can keep a game going forever (an evaluation would never end): here an episode
is truncated after `MAX_EPISODE_STEPS`.
"""

from __future__ import annotations

from gymnasium.envs.registration import register, registry

GAMES = ("asterix", "breakout", "freeway", "seaquest", "space_invaders")
MAX_EPISODE_STEPS = 10_000


def register_minatar() -> None:
    for game in GAMES:
        name = game.title().replace("_", "")
        for version, minimal in (("v0", False), ("v1", True)):
            env_id = f"MinAtar/{name}-{version}"
            if env_id not in registry:
                register(
                    id=env_id,
                    entry_point="minatar.gym:BaseEnv",
                    kwargs={"game": game, "use_minimal_action_set": minimal},
                    max_episode_steps=MAX_EPISODE_STEPS,
                )


register_minatar()
