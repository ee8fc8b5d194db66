"""A Hydra Sweeper plugin that launches a precomputed list of jobs
(conf/hydra/sweeper/planned.yaml)."""
