"""Every competitor by name (torch.optim, pytorch-optimizer) and the PISA family, one registry."""

from pisa_bench.baselines.registry import (
    CONSENSUS,
    FAMILIES,
    REGISTRY,
    Incompatible,
    available,
    build_optimizer,
    consensus_names,
    family_of,
    needs_create_graph,
    spec_of,
)

__all__ = [
    "CONSENSUS", "FAMILIES", "REGISTRY", "Incompatible", "available", "build_optimizer",
    "consensus_names", "family_of", "needs_create_graph", "spec_of",
]
