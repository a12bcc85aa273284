"""The study's plots: Optuna's matplotlib views of the trials, saved as PNG files (Agg).

A plot that cannot be drawn (too few completed trials, no intermediate values, an error
inside Optuna) is skipped, never raised: its one-line reason takes the image's place in the
report. Optuna's matplotlib functions are experimental and set the "ggplot" style globally,
so each is drawn with its ExperimentalWarning silenced and inside an rc_context that puts
matplotlib's settings back afterwards (the run report's plots keep their own look).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402

if TYPE_CHECKING:
    import optuna

DPI = 110


@dataclass(frozen=True)
class PlotSpec:
    name: str  # key in the returned dicts
    file: str
    title: str
    draw: str  # the function's name in optuna.visualization.matplotlib


PLOTS = (
    PlotSpec("history", "history.png", "optimisation history", "plot_optimization_history"),
    PlotSpec("importances", "importances.png", "parameter importances",
             "plot_param_importances"),
    PlotSpec("slice", "slice.png", "slice plot", "plot_slice"),
    PlotSpec("intermediate", "intermediate.png", "intermediate values (pruned trials too)",
             "plot_intermediate_values"),
)


@dataclass
class StudyPlots:
    """What was drawn (name -> file path) and what was skipped (name -> one-line reason)."""

    files: dict[str, Path] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def _why_not(spec: PlotSpec, study: optuna.Study) -> str | None:
    """The reason a plot would fail or be empty for this study, or None if it can be drawn."""
    from optuna.trial import TrialState

    complete = [t for t in study.trials if t.state == TrialState.COMPLETE]
    if spec.name == "importances":
        if len(complete) < 2:
            return "parameter importances need at least two completed trials"
        if not any(t.params for t in complete):
            return "parameter importances need at least one searched parameter"
    elif spec.name == "intermediate":
        if not any(t.intermediate_values for t in study.trials):
            return "no trial reported intermediate values"
    elif not complete:
        return f"the {spec.title} needs at least one completed trial"
    elif spec.name == "slice" and not any(t.params for t in complete):
        return "the slice plot needs at least one searched parameter"
    return None


def _figure(drawn: Any) -> Any:
    """The figure of what an Optuna plot function returned: one Axes or an array of them."""
    if hasattr(drawn, "figure"):
        return drawn.figure
    return next(iter(drawn.flat)).figure  # numpy array of Axes (slice plot, several params)


def _one_line(err: BaseException) -> str:
    text = (str(err).strip().splitlines() or [""])[0] or type(err).__name__
    return text[:160] + ("..." if len(text) > 160 else "")


def draw_plot(spec: PlotSpec, study: optuna.Study, path: Path) -> str | None:
    """Draw one plot into ``path``; returns None when saved, else the reason it was skipped."""
    reason = _why_not(spec, study)
    if reason:
        return reason
    from optuna.exceptions import ExperimentalWarning
    from optuna.visualization import matplotlib as optuna_plots

    draw: Callable[..., Any] = getattr(optuna_plots, spec.draw)
    before = set(plt.get_fignums())
    try:
        with warnings.catch_warnings(), matplotlib.rc_context():
            warnings.simplefilter("ignore", ExperimentalWarning)
            # layout and axis-limit notes (one trial, one value) do not matter in a file
            warnings.simplefilter("ignore", UserWarning)
            fig = _figure(draw(study))
            fig.savefig(path, dpi=DPI, bbox_inches="tight")
    except Exception as err:  # a plot is never worth failing the study's outputs
        path.unlink(missing_ok=True)
        return f"the {spec.title} could not be drawn: {_one_line(err)}"
    finally:
        for num in set(plt.get_fignums()) - before:  # every figure this call opened
            plt.close(num)
    return None


def write_plots(study: optuna.Study, study_dir: Path) -> StudyPlots:
    """Draw every plot of ``PLOTS`` into ``study_dir``; skipped ones keep their reason."""
    out = StudyPlots()
    for spec in PLOTS:
        path = Path(study_dir) / spec.file
        reason = draw_plot(spec, study, path)
        if reason is None:
            out.files[spec.name] = path
        else:
            out.skipped[spec.name] = reason
    return out
