"""The launch layer: what runs, where, and the one command per paper artefact.

- :mod:`~pisa_bench.launch.plan`: an experiment expanded into points (run directories and
  statuses known before anything runs);
- :mod:`~pisa_bench.launch.ledger`: which points a live launcher holds;
- :mod:`~pisa_bench.launch.launchers`: here, one after the other, or one job each through a
  Hydra launcher plugin (``run.py -m hydra/sweeper=planned``);
- :mod:`~pisa_bench.launch.job`: the task function of ``run.py`` and every job (signals);
- :mod:`~pisa_bench.launch.reproduce`: ``scripts/reproduce.py``.

Hydra is used through its public APIs only: the compose API to plan, a Sweeper plugin
(``hydra_plugins/pisa_planned_sweeper``) and its launcher plugins to launch.
"""
