"""Analysis of run directories: collect -> aggregate/statistics -> tables, figures, report.

Modules (one job each):

- :mod:`.collect`   find run directories, build the tidy runs table and the long curves table.
- :mod:`.stats`     mean / std / t confidence interval, paired tests.
- :mod:`.aggregate` per (task, scale, optimizer) statistics; significance against the best baseline.
- :mod:`.tables`    render the aggregate as Markdown and LaTeX.
- :mod:`.curves`    align seeds on a common x grid (mean and band).
- :mod:`.profiles`  performance profiles (Dolan–Moré / AlgoPerf).
- :mod:`.figures`   matplotlib (Agg) figures: curves and profiles.
- :mod:`.report`    write a whole report directory (``render``).
"""
