"""Learning-rate schedules as multipliers of the initial lr (``torch.optim.lr_scheduler.LambdaLR``).

Every schedule is written in fractions of the run's budget so that one config serves the
smoke, small and paper scales. With ``T`` total steps, warm-up ``W`` (``warmup_steps`` or
``warmup_frac * T``) and step ``t``:

- constant:  1 (after warm-up)
- step:      gamma ** #{milestone f : t >= f * T}   (or, with a ``gammas`` list, one factor per
             milestone: prod {gammas[k] : t >= milestones_frac[k] * T})
- cosine:    min_frac + (1 - min_frac) * (1 + cos(pi * (t - W) / (T - W))) / 2
- trapezoid: linear warm-up, flat, then linear decay to ``min_frac`` over the last
             ``warmdown_frac * T`` steps (modded-nanogpt / the paper's GPT-2 runs)

Warm-up is linear from 1/W to 1 over the first W steps. PISA-family optimizers turn a changed
``lr`` into new (sigma, rho) with their ratio kept, so these schedules apply to them unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

SCHEDULES = ("constant", "step", "cosine", "trapezoid")


def lr_multiplier(spec: Mapping[str, Any], total_steps: int) -> Callable[[int], float]:
    """The multiplier ``f(t)`` of ``spec`` (a ``train.schedule`` config) over ``total_steps``."""
    name = spec.get("name", "constant")
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule '{name}'; choose one of {', '.join(SCHEDULES)}")
    total = max(int(total_steps), 1)
    warm = int(spec.get("warmup_steps") or 0) or round(float(spec.get("warmup_frac") or 0) * total)
    min_frac = float(spec.get("min_frac", 0.0))
    gamma = float(spec.get("gamma", 0.1))
    milestones = [round(float(f) * total) for f in spec.get("milestones_frac", [])]
    gammas = [float(g) for g in spec.get("gammas") or [gamma] * len(milestones)]
    if len(gammas) != len(milestones):
        raise ValueError("schedule.gammas needs one factor per entry of schedule.milestones_frac")
    warmdown = round(float(spec.get("warmdown_frac", 0.0)) * total)

    def f(t: int) -> float:
        if warm and t < warm:
            return (t + 1) / warm
        if name == "constant":
            return 1.0
        if name == "step":
            return math.prod(g for g, m in zip(gammas, milestones) if t >= m)
        if name == "cosine":
            progress = min(1.0, (t - warm) / max(1, total - warm))
            return min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * progress))
        # trapezoid
        start = total - warmdown
        if warmdown <= 0 or t < start:
            return 1.0
        return 1.0 - (1.0 - min_frac) * min(1.0, (t - start) / warmdown)

    return f
