r"""On-policy RL (PPO, A2C) by Stable-Baselines3 with our optimizer injected; metric ``return``.

The rollout loop, the losses, advantage estimation and gradient clipping (``max_grad_norm``)
are Stable-Baselines3's (``task.algo``: ``ppo`` | ``a2c``, its keyword arguments in
``task.algo_kwargs``); nothing of the algorithm is re-written here. The task only:

- replaces ``model.policy.optimizer`` after construction by the optimizer of ``optim=`` built
  by the trainer over the policy (``Trainer.make_optimizer``), and switches off SB3's own
  learning-rate updates: the suite's ``train.schedule`` sets the lr once per optimizer round;
- counts rounds and times ``step()`` (``Trainer.optimizer_step``), logs SB3's training
  statistics, the mean return of the last ``return_window`` finished training episodes
  (``episode_return``, split ``train``) and evaluation returns (``return``, the primary
  metric) against environment steps (the ``samples_or_tokens`` axis), through a callback;
- checkpoints and resumes.

PISA-family optimizers in virtual-worker mode (``optim.n_workers = m``). SB3 calls
``optimizer.step()`` once per minibatch, so consecutive minibatches are the m workers of one
round: PPO's minibatches of ``batch_size`` transitions, in SB3's order (a round may straddle
two epochs or two rollouts when m does not divide their count); A2C, which takes one step on
the whole rollout, gets its rollout cut into m minibatches (the rollout buffer's ``get`` is
given ``ceil(n_steps * n_envs / m)``), so that one rollout is one round, as in the official
code (80 transitions over 4 workers). Each minibatch's gradient is taken at the global weights
only because the optimizer keeps the parameters at w during the round (virtual-worker mode)
and writes the new w at its m-th step; policy and value share those parameters.
Differences from the official Tianshou scripts: they rebuild the duals and moments at every
update (every collect); here the optimizer state persists over the run (the paper's math).

Evaluation: ``eval.episodes`` episodes of the deterministic policy on a separate vectorised
environment seeded from the run seed (``seed + 10_000``, the same start states at every
evaluation): the test episodes, whose mean is ``return``, the primary metric (split ``test``).
With ``eval.val_episodes = n > 0`` (default 0: off), ``n`` more episodes on another environment
seeded with :data:`~pisa_bench.data.split.VAL_SPLIT_SEED` (the same start states for every
run, optimizer and seed) give ``val_return``, the validation metric on which the verdict
protocol selects (:mod:`pisa_bench.protocol`); the two seeds differ for every run seed but
``VAL_SPLIT_SEED - 10_000``, which :func:`eval_seeds` refuses, so selection never reads the
episodes whose return is reported. Evaluations run every ``eval.every_env_steps`` environment
steps (after the update that follows the rollout crossing the mark) and after the last update.
With ``env.normalize_obs`` the evaluation environments use the training statistics.

Checkpoint / resume. Saved: policy weights, optimizer and scheduler state, SB3's counters
(env steps, updates, episodes, recent episode infos), observation/reward normalisation
statistics, the suite's counters (rounds, minibatch steps, next evaluation) and the RNG state
(trainer). Not saved: the environments' internal state (a resumed run resets its
environments, with a seed derived from the env-step count, so episodes in progress at the
stop are lost) and a partially collected rollout (discarded; its env steps stay counted).
A stop (signal or ``train.preempt_at_step``, counted in rounds) takes effect at the next
environment step, i.e. after the update that reached it.
"""

from __future__ import annotations

import math
from collections import deque
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from pisa import is_consensus
from pisa_bench.baselines import needs_create_graph
from pisa_bench.data.split import VAL_SPLIT_SEED
from pisa_bench.runtime import round_telemetry, workers_per_round
from pisa_bench.tasks.base import Task
from pisa_bench.trainer import Diverged, Preempted, Trainer

try:
    from stable_baselines3 import A2C, PPO
    from stable_baselines3 import __version__ as sb3_version
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.env_util import make_vec_env
    from stable_baselines3.common.evaluation import evaluate_policy
    from stable_baselines3.common.logger import Logger
    from stable_baselines3.common.vec_env import (
        DummyVecEnv,
        SubprocVecEnv,
        VecNormalize,
        sync_envs_normalization,
    )
except ImportError as e:  # the optional [rl] extra
    raise ImportError(
        "RL tasks need the optional dependencies: pip install 'pisa-bench[rl]'"
    ) from e

ACTIVATIONS: dict[str, type[nn.Module]] = {"tanh": nn.Tanh, "relu": nn.ReLU, "elu": nn.ELU}
EVAL_SEED_OFFSET = 10_000  # test episodes: run seed + this
STOP_KEYS = ("policy_loss", "value_loss")  # NaN/inf in these is divergence
RENAME = {"train/policy_gradient_loss": "policy_loss"}  # PPO's name; A2C says policy_loss


def eval_seeds(run_seed: int) -> tuple[int, int]:
    """``(validation, test)`` seeds of the evaluation environments of a run: the validation one
    is :data:`VAL_SPLIT_SEED` for every run, the test one follows the run seed."""
    val, test = VAL_SPLIT_SEED, run_seed + EVAL_SEED_OFFSET
    if val == test:
        raise ValueError(f"seed {run_seed}: its test episodes would be the validation episodes "
                         f"(seed {VAL_SPLIT_SEED}); use another seed")
    return val, test


class OnPolicyRL(Task):
    """PPO or A2C (Stable-Baselines3) on a Gymnasium environment (``task.env.id``)."""

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        super().__init__(cfg, device)
        self.algo = str(self.tcfg.algo).lower()
        if self.algo not in ("ppo", "a2c"):
            raise ValueError(f"task.algo must be ppo or a2c, not '{self.tcfg.algo}'")
        self.agent: Any = None
        self.eval_env: Any = None  # test episodes
        self.val_env: Any = None  # validation episodes (eval.val_episodes > 0)
        self.returns: deque[float] = deque(maxlen=int(self.tcfg.return_window))
        self.minibatch_steps = 0
        self.next_eval = 0
        self.last_eval_step = -1

    # --- environments and agent ---------------------------------------------------------
    def _make_env(self, n_envs: int, seed: int, training: bool) -> Any:
        e = self.tcfg.env
        kinds = {"dummy": DummyVecEnv, "subproc": SubprocVecEnv}
        vec = str(e.get("vec", "dummy"))
        if vec not in kinds:
            raise ValueError(f"task.env.vec must be dummy or subproc, not '{vec}'")
        kwargs = OmegaConf.to_container(e.kwargs, resolve=True) if e.get("kwargs") else {}
        env = make_vec_env(
            str(e.id),
            n_envs=n_envs,
            seed=seed,
            env_kwargs=kwargs,
            vec_env_cls=kinds[vec] if training else DummyVecEnv,
        )
        norm_obs, norm_rew = bool(e.get("normalize_obs")), bool(e.get("normalize_reward"))
        if norm_obs or norm_rew:
            env = VecNormalize(
                env,
                training=training,
                norm_obs=norm_obs,
                norm_reward=norm_rew and training,
                gamma=float(self.tcfg.algo_kwargs.get("gamma", 0.99)),
            )
        return env

    def build_agent(self) -> Any:
        """The SB3 algorithm on its training environment (with SB3's default optimizer)."""
        cls = {"ppo": PPO, "a2c": A2C}[self.algo]
        p = self.tcfg.policy
        act = str(p.get("activation", "tanh"))
        if act not in ACTIVATIONS:
            raise ValueError(
                f"task.policy.activation must be one of {sorted(ACTIVATIONS)}, not '{act}'"
            )
        policy_kwargs: dict[str, Any] = {
            "net_arch": list(p.net_arch),
            "activation_fn": ACTIVATIONS[act],
            "ortho_init": bool(p.get("ortho_init", True)),
        }
        env = self._make_env(int(self.tcfg.env.n_envs), self.seed, training=True)
        if p.get("log_std_init") is not None and not hasattr(env.action_space, "n"):
            policy_kwargs["log_std_init"] = float(p.log_std_init)
        algo_kwargs = OmegaConf.to_container(self.tcfg.algo_kwargs, resolve=True)
        assert isinstance(algo_kwargs, dict)
        device = str(p.get("device") or self.device)
        # learning_rate only feeds SB3's own optimizer, which is replaced (see module docstring)
        lr = float(self.cfg.optim.get("lr") or 0.0)
        return cls(
            "MlpPolicy",
            env,
            learning_rate=lr,
            policy_kwargs=policy_kwargs,
            seed=self.seed,
            device=device,
            verbose=0,
            **algo_kwargs,
        )

    def build_model(self) -> nn.Module:
        """The policy (actor and critic) of a freshly built agent."""
        self.agent = self.build_agent()
        return self.agent.policy

    # --- evaluation ---------------------------------------------------------------------
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Mean undiscounted return of ``eval.episodes`` test episodes of the policy ``model``
        (``return``) and, with ``eval.val_episodes``, of that many validation episodes
        (``val_return``)."""
        ev = self.tcfg.eval
        val_seed, test_seed = eval_seeds(self.seed)
        if self.eval_env is None:
            self.eval_env = self._make_env(1, test_seed, training=False)
        rewards, lengths = self._episodes(model, self.eval_env, test_seed, int(ev.episodes))
        out = {
            "return": float(np.mean(rewards)),
            "return_std": float(np.std(rewards)),
            "episode_length": float(np.mean(lengths)),
        }
        n_val = int(ev.get("val_episodes") or 0)
        if n_val > 0:
            if self.val_env is None:
                self.val_env = self._make_env(1, val_seed, training=False)
            out["val_return"] = float(np.mean(self._episodes(model, self.val_env, val_seed,
                                                             n_val)[0]))
        return out

    def _episodes(
        self, model: nn.Module, env: Any, seed: int, n: int
    ) -> tuple[list[float], list[int]]:
        """``(returns, lengths)`` of ``n`` episodes on ``env`` reseeded with ``seed`` (the same
        start states at every evaluation), with the training normalisation statistics."""
        if self.agent is not None:
            sync_envs_normalization(self.agent.get_env(), env)
        env.seed(seed)
        rewards, lengths = evaluate_policy(
            model,
            env,
            n_eval_episodes=n,
            deterministic=bool(self.tcfg.eval.deterministic),
            return_episode_rewards=True,
            warn=False,
        )
        return list(rewards), list(lengths)

    # --- budget -------------------------------------------------------------------------
    def rollout_size(self) -> int:
        return int(self.tcfg.algo_kwargs.n_steps) * int(self.tcfg.env.n_envs)

    def minibatches_per_rollout(self, m: int) -> int:
        """``optimizer.step()`` calls per rollout (see the module docstring for A2C with m > 1)."""
        if self.algo == "a2c":
            return m
        bs = int(self.tcfg.algo_kwargs.batch_size)
        return int(self.tcfg.algo_kwargs.get("n_epochs", 10)) * math.ceil(self.rollout_size() / bs)

    def total_rounds(self, m: int) -> int:
        rollouts = math.ceil(int(self.tcfg.total_timesteps) / self.rollout_size())
        return max((rollouts * self.minibatches_per_rollout(m)) // m, 1)

    # --- the run ------------------------------------------------------------------------
    def _split_a2c_rollouts(self, agent: Any, m: int) -> None:
        """Make A2C's one-batch ``rollout_buffer.get()`` yield m minibatches (one round)."""
        buf = agent.rollout_buffer
        total = buf.buffer_size * buf.n_envs
        size = math.ceil(total / m)
        if total < m or math.ceil(total / size) != m:
            raise ValueError(
                f"A2C rollout of {total} transitions (n_steps x n_envs) cannot be cut "
                f"into {m} worker minibatches; make it a multiple of {m}"
            )
        get = buf.get
        buf.get = lambda batch_size=None: get(size if batch_size is None else batch_size)

    def _instrument(
        self, opt: torch.optim.Optimizer, sched: Any, trainer: Trainer, bar: Any
    ) -> None:
        """Route SB3's ``optimizer.step()`` through the trainer: timing, rounds, lr schedule."""
        inner = SimpleNamespace(step=opt.step)
        pisa = is_consensus(opt)

        def step(closure: Any = None) -> None:
            trainer.optimizer_step(inner, closure)  # type: ignore[arg-type]
            self.minibatch_steps += 1
            if not pisa or opt.round_done:
                sched.step()
                trainer.end_round()
                trainer.step += 1
                bar.update(1)

        # ``inner`` is the step the LR scheduler wrapped (it records that step() ran); say so
        step._wrapped_by_lr_sched = True  # type: ignore[attr-defined]
        opt.step = step  # type: ignore[method-assign]

    def state_for_checkpoint(self, opt: torch.optim.Optimizer, sched: Any) -> dict[str, Any]:
        a = self.agent
        env = a.get_env()
        norm = (
            {"obs_rms": env.obs_rms, "ret_rms": env.ret_rms}
            if isinstance(env, VecNormalize)
            else None
        )
        return {
            "policy": a.policy.state_dict(),
            "optimizer": opt.state_dict(),
            "scheduler": sched.state_dict(),
            "num_timesteps": int(a.num_timesteps),
            "n_updates": int(a._n_updates),
            "episode_num": int(a._episode_num),
            "ep_info_buffer": list(a.ep_info_buffer or []),
            "ep_success_buffer": list(a.ep_success_buffer or []),
            "vec_normalize": norm,
            "returns": list(self.returns),
            "minibatch_steps": self.minibatch_steps,
            "next_eval": self.next_eval,
            "last_eval_step": self.last_eval_step,
        }

    def restore(self, state: dict[str, Any], opt: torch.optim.Optimizer, sched: Any) -> None:
        a = self.agent
        a.policy.load_state_dict(state["policy"])
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        a.num_timesteps, a._n_updates = state["num_timesteps"], state["n_updates"]
        a._episode_num = state["episode_num"]
        a.ep_info_buffer = deque(state["ep_info_buffer"], maxlen=a._stats_window_size)
        a.ep_success_buffer = deque(state["ep_success_buffer"], maxlen=a._stats_window_size)
        if state["vec_normalize"] is not None:
            env = a.get_env()
            env.obs_rms, env.ret_rms = (
                state["vec_normalize"]["obs_rms"],
                state["vec_normalize"]["ret_rms"],
            )
        self.returns.extend(state["returns"])
        self.minibatch_steps, self.next_eval = state["minibatch_steps"], state["next_eval"]
        self.last_eval_step = state["last_eval_step"]
        # fresh episodes, seeded apart from the first start's
        a.get_env().seed(self.seed * 1_000_003 + a.num_timesteps)

    def run(self, trainer: Trainer) -> None:
        if trainer.dist.world > 1:
            raise NotImplementedError(f"task {self.tcfg.name} runs in one process (no torchrun)")
        if needs_create_graph(self.cfg.optim):
            raise ValueError(
                f"optimizer '{self.cfg.optim.name}' needs backward(create_graph=True), which "
                f"Stable-Baselines3's {self.algo.upper()} does not provide"
            )
        policy = self.build_model()
        try:
            self._train(trainer, policy)
        finally:  # subprocess environments end with the run
            for env in (self.agent.get_env(), self.eval_env, self.val_env):
                if env is not None:
                    env.close()

    def _train(self, trainer: Trainer, policy: nn.Module) -> None:
        agent = self.agent
        self.notes.append(
            f"{self.algo.upper()} (Stable-Baselines3 {sb3_version}) on {self.tcfg.env.id}, "
            f"{self.tcfg.env.n_envs} environments, {self.tcfg.total_timesteps} environment steps"
        )
        n_val = int(self.tcfg.eval.get("val_episodes") or 0)
        if n_val > 0:
            val_seed, test_seed = eval_seeds(self.seed)
            self.notes.append(
                f"validation split: {n_val} episodes on environment seed {val_seed} (val_return);"
                f" test: {self.tcfg.eval.episodes} episodes on seed {test_seed} (return)"
            )
        agent.set_logger(Logger(folder=None, output_formats=[]))
        agent._update_learning_rate = lambda optimizers: None  # the suite's schedule owns the lr
        opt = trainer.make_optimizer(policy)
        agent.policy.optimizer = opt
        m = workers_per_round(opt)
        if self.algo == "a2c" and m > 1:
            self._split_a2c_rollouts(agent, m)
        total = trainer.max_steps = self.total_rounds(m)
        sched = trainer.make_scheduler(opt, total)
        state = trainer.load_checkpoint()
        if state is not None:
            self.restore(state, opt, sched)
        bar = trainer.progress(total, initial=trainer.step)
        self._instrument(opt, sched, trainer, bar)
        n_params = sum(p.numel() for p in policy.parameters() if p.requires_grad)
        every = int(self.tcfg.eval.every_env_steps or 0)
        if state is None:
            self.next_eval = every if every else -1
        bridge = _Bridge(self, trainer, opt, sched, every)
        trainer.set_checkpoint_state(lambda: self.state_for_checkpoint(opt, sched))
        remaining = int(self.tcfg.total_timesteps) - int(agent.num_timesteps)
        if remaining > 0:
            agent.learn(
                total_timesteps=remaining,
                callback=bridge,
                log_interval=None,
                reset_num_timesteps=False,
                progress_bar=False,
            )
        bridge.flush_train_stats()
        if bridge.stopped:
            trainer.save_checkpoint(self.state_for_checkpoint(opt, sched))
            bar.close()
            raise Preempted(
                f"stopped at step {trainer.step} ({agent.num_timesteps} env steps); "
                "resume with the same command"
            )
        if self.last_eval_step != trainer.step:  # the policy after the last update
            bridge.evaluate()
        bar.close()
        trainer.finish([opt], n_params)


class _Bridge(BaseCallback):
    """SB3 callback: env-step counter, episode returns, logging, evaluation, checkpoints, stops."""

    def __init__(
        self, task: OnPolicyRL, trainer: Trainer, opt: torch.optim.Optimizer, sched: Any, every: int
    ) -> None:
        super().__init__(verbose=0)
        self.task, self.trainer, self.opt, self.sched, self.every = task, trainer, opt, sched, every
        self.stopped = False
        self.new_episodes = 0
        self.rollouts = 0

    def _on_step(self) -> bool:
        self.trainer.samples = int(self.model.num_timesteps)
        for info in self.locals.get("infos", ()):
            ep = info.get("episode")
            if ep is not None:
                self.task.returns.append(float(ep["r"]))
                self.new_episodes += 1
        if self.trainer.stop_requested():
            self.stopped = True
            return False
        return True

    def _on_rollout_start(self) -> None:
        """Called after the previous rollout's update: its statistics, evaluation and checkpoint
        cadences (so an evaluation sees the policy updated on every step counted)."""
        log_every = self.trainer.cadence.log_every
        self.flush_train_stats(write=self.rollouts % log_every == 0)
        t = self.model.num_timesteps
        if self.every and t >= self.task.next_eval:
            self.evaluate()
            while self.task.next_eval <= t:
                self.task.next_eval += self.every
        if self.trainer.checkpoint_due():
            self.trainer.save_checkpoint(self.task.state_for_checkpoint(self.opt, self.sched))

    def _on_rollout_end(self) -> None:
        self.rollouts += 1
        log_every = self.trainer.cadence.log_every
        if self.new_episodes and self.rollouts % log_every == 0:
            self.trainer.log(
                "train",
                {
                    "episode_return": float(np.mean(self.task.returns)),
                    "episodes": float(self.new_episodes),
                },
            )
            self.new_episodes = 0

    def evaluate(self) -> None:
        self.trainer.samples = int(self.model.num_timesteps)
        self.trainer.record_eval(self.task.evaluate(self.model.policy))
        self.task.last_eval_step = self.trainer.step

    def check_weights(self) -> None:
        """Divergence the losses miss: an update whose losses were finite can leave NaN / inf
        weights, which SB3's next rollout or evaluation would meet as a ``ValueError`` of its
        action distribution (a failed run instead of a diverged one). Finiteness only:
        ``task.explode_above`` bounds the watched losses, not the weights' size."""
        with torch.no_grad():
            size = float(sum(p.detach().abs().sum() for p in self.model.policy.parameters()))
        if not math.isfinite(size):
            raise Diverged(self.trainer.step, "the policy's sum of |weights|", size)

    def flush_train_stats(self, write: bool = True) -> None:
        """Log what SB3's last update recorded (``train/*``), with the ADMM telemetry if any
        (``write=False``: only check it for divergence)."""
        self.check_weights()
        logger = self.model.logger
        row = {
            RENAME.get(k, k.split("/", 1)[1]): float(v)
            for k, v in logger.name_to_value.items()
            if k.startswith("train/") and isinstance(v, (int, float, np.floating, np.integer))
        }
        logger.name_to_value.clear()
        logger.name_to_count.clear()
        logger.name_to_excluded.clear()
        if not row:
            return
        for k in STOP_KEYS:
            if k in row:
                self.trainer.check_finite(row[k], k)
        if not write:
            return
        row["lr"] = float(self.opt.param_groups[0]["lr"])
        row.update(round_telemetry(self.opt))
        self.trainer.log("train", row)
