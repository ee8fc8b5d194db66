"""Every competitor by name (torch.optim, pytorch-optimizer) and the PISA family, one registry."""

from pisa_bench.baselines.registry import (
    REGISTRY,
    Incompatible,
    available,
    build_optimizer,
    needs_create_graph,
    spec_of,
)

__all__ = [
    "REGISTRY", "Incompatible", "available", "build_optimizer", "needs_create_graph", "spec_of",
]
