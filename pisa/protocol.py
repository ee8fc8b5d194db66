"""What a training loop may rely on: the :class:`ConsensusOptimizer` protocol.

A consensus (ADMM-type) optimizer runs *rounds*: in virtual-worker mode each ``step()`` is one
worker's local step on its own gradient (computed at the global weights) and every
``n_workers``-th call closes the round; in distributed mode every ``step()`` is a round. A loop
drives one as::

    for i in range(opt.n_workers):           # 1 in distributed mode
        loss_i(batch_i).backward(); opt.step(); opt.zero_grad()
    assert opt.round_done                   # then log opt.telemetry(), step schedulers

:func:`is_consensus` tells such optimizers apart from plain ``torch.optim`` ones. Every PISA-family
optimizer and :class:`pisa.Hybrid` (whose rounds are the main optimizer's; one call per round
for a main optimizer without rounds) satisfy the protocol.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

__all__ = ["ConsensusOptimizer", "is_consensus"]


@runtime_checkable
class ConsensusOptimizer(Protocol):
    """A ``torch.optim.Optimizer`` whose steps form consensus rounds over ``n_workers`` workers."""

    @property
    def n_workers(self) -> int:
        """Workers ``m`` per round (virtual workers, or the world size in distributed mode)."""
        ...

    @property
    def worker_index(self) -> int:
        """Index of the worker the next ``step()`` belongs to (the rank in distributed mode)."""
        ...

    @property
    def round_done(self) -> bool:
        """True right after the ``step()`` that closed a round."""
        ...

    def telemetry(self) -> dict[str, float]:
        """Scalars of the last completed round (e.g. primal residual and dual norm)."""
        ...


def is_consensus(opt: Any) -> bool:
    """True when ``opt`` follows :class:`ConsensusOptimizer` (drive its steps in rounds).

    ``opt`` may also be an optimizer class: true when the class defines every member of the
    protocol (as properties and methods), so that its instances follow it; a registry can so
    tell the family from the class it names before building anything (``issubclass`` is not
    available for a protocol with properties)."""
    return isinstance(opt, ConsensusOptimizer)


def picklable_state(opt: Any) -> dict[str, Any]:
    """An optimizer's whole ``__dict__`` for ``__getstate__``, without torch's hook registries
    (hooks may be lambdas; ``Optimizer.__setstate__`` recreates them empty, as torch does)."""
    return {
        k: v
        for k, v in opt.__dict__.items()
        if not (k.startswith("_optimizer_") and k.endswith("_hooks"))
    }
