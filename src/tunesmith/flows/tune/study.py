"""``tune``: a hyperparameter search over a run configuration, on Optuna.

    from tunesmith.flows.tune import tune
    result = tune("examples/sms_spam/tune.yaml", trials=12)
    print(result.best_params)

The study lives in SQLite inside the study directory (Optuna's RDB storage), so it survives
being killed: ``resume=True`` continues it, completed trials kept and never rerun, a trial the
kill interrupted marked failed and queued again with the same values. ``optuna-dashboard
sqlite:///STUDY_DIR/study.db`` shows it live. Each trial runs in its own process
(``trial.py``); TPE samples, the median or Hyperband pruner stops hopeless trials from their
validation losses, and only the validation split is ever scored. ``final=True`` then trains
the best configuration and the untuned one as normal runs and compares them on the test split.
"""

from __future__ import annotations

import fcntl
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from rich.console import Console
from rich.progress import Progress

from tunesmith.config import RunConfig, TuneConfig, dump_config, load_config
from tunesmith.errors import ConfigError
from tunesmith.flows.tune import space as search
from tunesmith.flows.tune.launch import Outcome, Running, collect, launch
from tunesmith.flows.tune.outputs import (
    state_counts,
    steps_saved_fraction,
    write_study_outputs,
)
from tunesmith.flows.tune.trial import PRUNED, make_pruner
from tunesmith.models.resolve import default_home, resolve_model

log = logging.getLogger("tunesmith")

STUDY_NAME = "tunesmith"
STUDY_CONFIG = "study_config.yaml"
POLL_S = 0.5
# Fields that may change between invocations of the same study.
_FREE = {"trials", "timeout_minutes"}


@dataclass
class TuneResult:
    study_dir: Path
    objective: str
    direction: str
    best_value: float | None
    best_params: dict[str, Any]
    best_trial: int | None
    counts: dict[str, int]
    steps_saved: float | None
    best_config: Path | None
    seconds: float
    outputs: dict[str, Path] = field(default_factory=dict)
    final: dict[str, Any] | None = None


def default_study_dir(cfg: RunConfig) -> Path:
    run_dir = cfg.output_dir or Path("runs") / (cfg.name or "run")
    return run_dir.with_name(run_dir.name + "-tune")


def direction_of(t: TuneConfig) -> str:
    if t.direction != "auto":
        return t.direction
    return "minimize" if t.objective == "valid_loss" else "maximize"


def _differences(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            if prefix == "tune." and key in _FREE:
                continue
            out += _differences(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def open_study_dir(study_dir: Path, cfg: RunConfig, *, resume: bool, new: bool) -> Any:
    """Create, or check and reopen, the study directory; hold its lock while the study runs."""
    saved = study_dir / STUDY_CONFIG
    current = dump_config(cfg)
    if saved.is_file() and new:
        shutil.rmtree(study_dir)
    elif saved.is_file():
        changed = _differences(yaml.safe_load(saved.read_text(encoding="utf-8")), current)
        if changed:
            raise ConfigError(f"{study_dir}: this study was created for another configuration; "
                              "pass --new to start a new study there (the old one is deleted), "
                              "or --study-dir for another place", changed)
        if not resume:
            raise ConfigError(f"{study_dir}: a study exists here; pass --resume to continue it "
                              "or --new to start again")
    elif study_dir.exists() and any(study_dir.iterdir()):
        raise ConfigError(f"{study_dir}: exists and is not a study directory; choose another "
                          "--study-dir")
    study_dir.mkdir(parents=True, exist_ok=True)
    lock = (study_dir / ".lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ConfigError(f"{study_dir}: another `tunesmith tune` is running this study") from None
    saved.write_text(yaml.safe_dump(current, sort_keys=False), encoding="utf-8")
    return lock


@dataclass
class Opened:
    """The study, and the storage it was opened with (for what only a storage can do)."""

    study: Any
    storage: Any
    url: str

    def trial_id(self, number: int) -> int:
        study_id = self.storage.get_study_id_from_name(STUDY_NAME)
        return self.storage.get_trial_id_from_study_id_trial_number(study_id, number)


def create_study(study_dir: Path, cfg: RunConfig) -> Opened:
    import optuna

    t = cfg.tune
    assert t is not None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = f"sqlite:///{(study_dir / 'study.db').resolve()}"
    # a trial process writes its evaluations to the same file: wait for SQLite's lock
    storage = optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 60}})
    seed = cfg.train.seed if t.seed is None else t.seed
    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=t.startup_trials)
    study = optuna.create_study(study_name=STUDY_NAME, storage=storage, sampler=sampler,
                                pruner=make_pruner(t), direction=direction_of(t),
                                load_if_exists=True)
    for key, value in {"objective": t.objective, "config_name": cfg.name,
                       "base_model": cfg.model.base, "space": search.describe(t.space),
                       "pruner": t.pruner, "sampler_seed": seed}.items():
        study.set_user_attr(key, value)
    return Opened(study, storage, url)


def recover_interrupted(opened: Opened) -> list[int]:
    """Trials left running by a study that was killed (the lock says no process runs them
    now): marked failed, and queued again with the same values."""
    from optuna.trial import TrialState

    recovered = []
    for t in opened.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        trial_id = opened.trial_id(t.number)
        opened.storage.set_trial_user_attr(trial_id, "error", "interrupted: the study stopped "
                                           "while this trial ran; queued again")
        opened.storage.set_trial_user_attr(trial_id, "interrupted", True)
        opened.storage.set_trial_state_values(trial_id, TrialState.FAIL)
        opened.study.enqueue_trial(t.params, skip_if_exists=False)
        recovered.append(t.number)
    return recovered


def counted(study: Any) -> list[Any]:
    """Trials that count towards the study's size: finished, the interrupted ones excepted."""
    from optuna.trial import TrialState

    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return [t for t in study.get_trials(deepcopy=False, states=done)
            if not t.user_attrs.get("interrupted")]


def tune(config: RunConfig | str | Path, *, trials: int | None = None,
         timeout_minutes: float | None = None, study_dir: Path | None = None,
         resume: bool = False, new: bool = False, jobs: int = 1, final: bool = False,
         home: Path | None = None, console: Console | None = None,
         show_progress: bool = True) -> TuneResult:
    """Search the configuration's ``tune:`` space; ``final`` then trains and tests the best."""
    started = time.perf_counter()
    cfg = config if isinstance(config, RunConfig) else load_config(config)
    if cfg.tune is None:
        raise ConfigError(f"{cfg.name}: the configuration has no tune: section; add one with "
                          "a search space, e.g. tune: {space: {train.learning_rate: {type: "
                          "log_uniform, low: 1.0e-5, high: 1.0e-3}}}")
    if jobs < 1:
        raise ConfigError(f"--jobs must be at least 1 (got {jobs})")
    console = console or Console(stderr=True)
    home = home or default_home()
    resolve_model(cfg.model.base, home=home)  # an unknown model fails before anything starts
    t = cfg.tune
    target = t.trials if trials is None else trials
    minutes = t.timeout_minutes if timeout_minutes is None else timeout_minutes
    study_dir = Path(study_dir or default_study_dir(cfg))
    lock = open_study_dir(study_dir, cfg, resume=resume, new=new)
    try:
        opened = create_study(study_dir, cfg)
        recovered = recover_interrupted(opened)
        if recovered:
            console.print(f"trial(s) {recovered} were interrupted; they run again")
        _search(opened, cfg, study_dir, target=target, minutes=minutes, jobs=jobs, home=home,
                console=console, show_progress=show_progress)
        return _finish(opened, cfg, study_dir, final=final, home=home, console=console,
                       show_progress=show_progress, started=started)
    finally:
        lock.close()


def _search(opened: Opened, cfg: RunConfig, study_dir: Path, *, target: int,
            minutes: float | None, jobs: int, home: Path, console: Console,
            show_progress: bool) -> None:
    assert cfg.tune is not None
    objective, direction = cfg.tune.objective, direction_of(cfg.tune)
    deadline = None if minutes is None else time.monotonic() + minutes * 60
    running: list[Running] = []
    done = len(counted(opened.study))
    with Progress(console=console, disable=not show_progress) as progress:
        bar = progress.add_task("trials", total=target, completed=done)
        try:
            while True:
                in_time = deadline is None or time.monotonic() < deadline
                if done + len(running) < target and in_time and len(running) < jobs:
                    slot = min(set(range(jobs)) - {r.slot for r in running})
                    started = launch(opened, cfg, study_dir, objective=objective,
                                     direction=direction, home=home, jobs=jobs, slot=slot)
                    if isinstance(started, Running):
                        running.append(started)
                    else:
                        done += 1
                        _announce(console, started, objective)
                    continue
                if not running:
                    break
                # the storage is read only when a trial ends: a trial's process writes to it
                # at every evaluation, and polling it would take the cores the trial trains on
                for r in [r for r in running if r.process.poll() is not None]:
                    running.remove(r)
                    _announce(console, collect(opened, r), objective)
                    done += 1
                    best = _best_value(opened.study)
                    progress.update(bar, completed=done, description="trials" if best is None
                                    else f"trials (best {objective} {best:.4g})")
                time.sleep(POLL_S)
        finally:
            for r in running:  # interrupted: the trials end with the study
                r.process.kill()
                r.process.wait()


def _best_value(study: Any) -> float | None:
    try:
        return study.best_value
    except ValueError:  # no completed trial yet
        return None


def _announce(console: Console, o: Outcome, objective: str) -> None:
    values = ", ".join(f"{k.split('.')[-1]}={v:.3g}" if isinstance(v, float) else
                       f"{k.split('.')[-1]}={v}" for k, v in o.params.items())
    if o.state == "complete":
        text = f"{objective} {o.value:.4f}"
    elif o.state == PRUNED:
        text = f"pruned at step {o.attrs.get('steps')} of {o.attrs.get('total_steps')}"
    else:
        text = "failed: " + str(o.attrs.get("error", "")).splitlines()[0]
    console.print(f"trial {o.number}: {text}  ({values})", markup=False, highlight=False)


def _finish(opened: Opened, cfg: RunConfig, study_dir: Path, *, final: bool, home: Path,
            console: Console, show_progress: bool, started: float) -> TuneResult:

    study, objective = opened.study, cfg.tune.objective if cfg.tune else "valid_loss"
    trials = study.get_trials(deepcopy=False)
    counts = state_counts(trials)
    best_trial = None if _best_value(study) is None else study.best_trial
    best_config = None
    final_results = None
    if best_trial is not None:
        best_cfg = search.without_search(search.with_values(
            cfg, best_trial.params, source="best trial"), name=f"{cfg.name}-best",
            output_dir=None)
        best_config = study_dir / "best.yaml"
        best_config.write_text(yaml.safe_dump(dump_config(best_cfg), sort_keys=False),
                               encoding="utf-8")
        if final:
            from tunesmith.flows.tune.final import final_runs

            final_results = final_runs(cfg, best_trial.params, study_dir, home=home,
                                       console=console, show_progress=show_progress)
    elif final:
        raise ConfigError(f"{study_dir}: no trial completed, so there is no best "
                          "configuration to train; see trials.csv for the errors")
    outputs = write_study_outputs(study, study_dir, final=final_results)
    return TuneResult(
        study_dir=study_dir, objective=objective, direction=direction_of(cfg.tune)
        if cfg.tune else "minimize", best_value=best_trial.value if best_trial else None,
        best_params=dict(best_trial.params) if best_trial else {},
        best_trial=best_trial.number if best_trial else None, counts=counts,
        steps_saved=steps_saved_fraction(trials), best_config=best_config,
        seconds=time.perf_counter() - started, outputs=outputs, final=final_results)
