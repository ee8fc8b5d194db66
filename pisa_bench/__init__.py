"""The benchmark harness: tasks, models, data, the shared trainer, run records and analysis."""
