"""Stable-Baselines3 PPO with SISA as the policy optimizer (no change to SB3).

SB3 builds the optimizer as ``optimizer_class(params, lr=lr_schedule(1), **optimizer_kwargs)``
and calls ``step()`` once per minibatch, so with ``n_workers=m`` every ``m`` consecutive
minibatches form one round (make the number of minibatches per epoch a multiple of ``m``). SB3
sets ``group["lr"]`` from its learning-rate schedule; SISA keeps ``sigma/rho``.

    python examples/sb3_ppo.py --timesteps 20000
"""

from __future__ import annotations

import argparse

import numpy as np
from stable_baselines3 import PPO
from stable_baselines3.common.evaluation import evaluate_policy

import pisa


def make_agent(n_workers: int = 1, seed: int = 0) -> PPO:
    return PPO(
        "MlpPolicy",
        "CartPole-v1",
        learning_rate=3e-3,
        n_steps=512,
        batch_size=128,  # 4 minibatches per epoch: one round for n_workers=4
        n_epochs=4,
        seed=seed,
        device="cpu",
        policy_kwargs={
            "optimizer_class": pisa.SISA,
            "optimizer_kwargs": {"sigma": 0.05, "n_workers": n_workers},  # c = 1.5e-4
        },
    )


def mean_return(agent: PPO, episodes: int = 10) -> float:
    mean, _ = evaluate_policy(agent, agent.get_env(), n_eval_episodes=episodes, deterministic=True)
    return float(np.asarray(mean))


def train(timesteps: int, n_workers: int = 1, seed: int = 0) -> tuple[float, float]:
    """Mean evaluation return before and after ``timesteps`` of training."""
    agent = make_agent(n_workers, seed)
    assert isinstance(agent.policy.optimizer, pisa.SISA)
    before = mean_return(agent)
    agent.learn(total_timesteps=timesteps)
    assert agent.policy.optimizer.round_done
    return before, mean_return(agent)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timesteps", type=int, default=20_000)
    parser.add_argument("--workers", type=int, default=4)
    args = parser.parse_args()
    before, after = train(args.timesteps, args.workers)
    print(f"CartPole mean return {before:.1f} -> {after:.1f}")
