"""Hyperparameter search on Optuna: ``tune`` (``tunesmith tune``).

``study`` runs the study (SQLite storage in the study directory, resumable), ``launch`` starts
each trial in its own process, ``trial`` is that process, ``final`` trains and tests the best
configuration against the untuned one, ``outputs`` writes trials.csv, plots and the report.
"""

from tunesmith.flows.tune.study import TuneResult, tune

__all__ = ["TuneResult", "tune"]
