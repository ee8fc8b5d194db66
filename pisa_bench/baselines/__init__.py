"""Every competitor (torch.optim, pytorch-optimizer) and the PISA family, by ``optim._target_``."""

from pisa_bench.baselines.registry import (
    Incompatible,
    build_optimizer,
    needs_create_graph,
    spec_of,
)

__all__ = ["Incompatible", "build_optimizer", "needs_create_graph", "spec_of"]
