"""Every competitor (torch.optim, pytorch-optimizer) and the PISA family, by ``optim._target_``."""

from pisa_bench.baselines.registry import (
    BASELINE,
    CONSENSUS,
    FAMILIES,
    Incompatible,
    build_optimizer,
    family_of,
    needs_create_graph,
    spec_of,
)

__all__ = [
    "BASELINE", "CONSENSUS", "FAMILIES", "Incompatible", "build_optimizer", "family_of",
    "needs_create_graph", "spec_of",
]
