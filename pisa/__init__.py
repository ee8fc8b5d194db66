"""PISA / SISA / NSISA: preconditioned inexact stochastic ADMM optimizers for PyTorch.

``from pisa import SISA, NSISA`` and use them as any ``torch.optim.Optimizer``; see
:class:`pisa.PISA` for the round, the step-size convention and virtual / distributed workers.
"""

from . import cpu_kernel, distributed, fused, newton_schulz, preconditioners
from .admm import PISA
from .newton_schulz import NS_COEFFICIENTS, orthogonalize
from .nsisa import NSISA
from .preconditioners import (
    EMA,
    AbsValue,
    Hutchinson,
    Identity,
    Preconditioner,
    SecondMoment,
    hutchinson_diagonal,
)
from .protocol import ConsensusOptimizer, is_consensus
from .routing import (
    DEFAULT_EXCLUDE,
    Hybrid,
    NoHiddenMatrices,
    hybrid,
    hybrid_nsisa,
    split_hidden_matrices,
)
from .sisa import SISA

__all__ = [
    "DEFAULT_EXCLUDE",
    "EMA",
    "NSISA",
    "NS_COEFFICIENTS",
    "PISA",
    "SISA",
    "AbsValue",
    "ConsensusOptimizer",
    "Hutchinson",
    "Hybrid",
    "Identity",
    "NoHiddenMatrices",
    "Preconditioner",
    "SecondMoment",
    "cpu_kernel",
    "distributed",
    "fused",
    "hutchinson_diagonal",
    "hybrid",
    "hybrid_nsisa",
    "is_consensus",
    "newton_schulz",
    "orthogonalize",
    "preconditioners",
    "split_hidden_matrices",
]
