"""The ``planned`` sweeper: the jobs of a plan file, handed to the configured launcher.

Hydra's basic sweeper launches the cartesian product of the command line's sweeps. The suite's
plans are not products (lr grids relative to each optimizer's default, protocol stages, skipped
finished runs), so ``scripts/reproduce.py`` computes the jobs itself, writes them to a JSON file
(``{"jobs": [[override, ...], ...]}``) and runs ``run.py -m hydra/sweeper=planned
hydra.sweeper.plan_file=<file> hydra/launcher=<launcher>``. This plugin uses Hydra's public
plugin API only (:class:`hydra.plugins.sweeper.Sweeper`, ``Plugins.instantiate_launcher``).
Plugins are found in the ``hydra_plugins`` namespace package: this folder sits at the
repository root, on ``sys.path`` whenever ``run.py`` runs from the checkout.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hydra.core.plugins import Plugins
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class PlannedSweeper(Sweeper):
    """Launch the jobs listed in ``plan_file``, in one batch, in their order."""

    def __init__(self, plan_file: str, params: Any = None) -> None:
        self.plan_file = Path(plan_file)
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.launcher: Any = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        """``arguments`` (the command line's overrides) are already in every planned job."""
        jobs = json.loads(self.plan_file.read_text())["jobs"]
        if not isinstance(jobs, list) or not all(isinstance(j, list) for j in jobs):
            raise ValueError(f"{self.plan_file}: 'jobs' must be a list of override lists")
        batch = [[str(o) for o in job] for job in jobs]
        self.validate_batch_is_legal(batch)
        return self.launcher.launch(batch, initial_job_idx=0)
