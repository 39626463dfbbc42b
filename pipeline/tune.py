"""Hyperparameter search with Optuna, decided on the validation split alone.

Every trial trains on the training images minus the last `val_size` and reports validation
accuracy after each epoch; the test set is not even loaded (TrainConfig.test_eval "never").
Pruning compares trials at the same share of their schedule, so a short one-cycle schedule,
already annealed at epoch 2, is not preferred over a long one still at its peak learning rate.

The study lives in Optuna's RDB storage (sqlite by default, PostgreSQL for workers on several
machines): the same study name and storage resume it, and parallel workers share it. This
module never imports mlflow: the job passes observers (tracking's nested runs, progress lines)
and logs the StudyResult it gets back.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna

from pipeline.callbacks import TrainCallback, TrialObserver
from pipeline.config import MODEL_NAMES, PRUNERS, TrainConfig, default_data_dir, train_config
from pipeline.errors import PipelineError

# ----------------------------------------------------------------- search spaces


@dataclass(frozen=True)
class Float:
    low: float
    high: float
    log: bool = False

    def suggest(self, trial: optuna.Trial, name: str) -> float:
        return trial.suggest_float(name, self.low, self.high, log=self.log)


@dataclass(frozen=True)
class Int:
    low: int
    high: int

    def suggest(self, trial: optuna.Trial, name: str) -> int:
        return trial.suggest_int(name, self.low, self.high)


@dataclass(frozen=True)
class Choice:
    choices: tuple[Any, ...]

    def suggest(self, trial: optuna.Trial, name: str) -> Any:
        return trial.suggest_categorical(name, self.choices)


# What each model's search may vary, as TrainConfig fields; everything else is the model's recipe.
# Augmentation strength is the crop's padding (0: no crop) and whether to flip. The epoch ranges
# keep a trial within the chapter CNN's 5-epoch training time (see docs/recipe.md).
# The CNN's and DNN's search; cnn_plus's recipe trains at higher rates, with more regularisation.
_BASE_SPACE: dict[str, Float | Int | Choice] = {
    "lr": Float(2e-4, 5e-3, log=True),
    "weight_decay": Float(1e-6, 1e-3, log=True),
    "batch_size": Choice((64, 100, 256)),
    "label_smoothing": Float(0.0, 0.2),
    "crop_pad": Int(0, 2),
    "hflip": Choice((False, True)),
    "epochs": Int(3, 6),
}
SEARCH_SPACES: dict[str, dict[str, Float | Int | Choice]] = {
    "cnn_plus": {
        **_BASE_SPACE,
        "lr": Float(1e-3, 2e-2, log=True),
        "weight_decay": Float(1e-3, 0.3, log=True),
        "crop_pad": Int(0, 3),
        "epochs": Int(3, 8),  # the recipe's own 7 (of batch 256) and one more within reach
    },
    "cnn": _BASE_SPACE,
    "dnn": {**_BASE_SPACE, "epochs": Int(3, 10)},  # an epoch of the DNN costs a fraction of the CNN's
}
assert set(SEARCH_SPACES) == set(MODEL_NAMES), "every registered model needs a search space"

# The study remembers what it was started with; a resume that asks for other settings is refused.
STUDY_SETTINGS = ("model", "val_size", "seed")
PARENT_RUN_ATTR = "mlflow_parent_run_id"  # the study's tracking run, so workers and resumes share it


@dataclass
class TuneConfig:
    model: str = "cnn_plus"
    n_trials: int | None = 20  # trials this invocation runs (Optuna's meaning); None: until the timeout
    timeout_s: float | None = None
    study_name: str | None = None  # default: "<model>-tune"
    storage: str = ""  # an Optuna RDB URL; the job fills in the project's default
    val_size: int = 5000
    pruner: str = "median"
    seed: int = 0  # the training seed of every trial: trials differ in their settings only
    max_steps: int | None = None  # cap each trial's steps (smoke runs and tests)
    device: str = "auto"
    data_dir: Path = field(default_factory=default_data_dir)
    allow_other_data: bool = False

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir)
        if self.model not in SEARCH_SPACES:
            raise PipelineError(f"no search space for model {self.model!r}; known: {', '.join(SEARCH_SPACES)}")
        if self.pruner not in PRUNERS:
            raise PipelineError(f"pruner must be one of {', '.join(PRUNERS)}, got {self.pruner!r}")
        if self.val_size < 1:
            raise PipelineError("tuning needs a validation split: val_size must be at least 1")
        if self.n_trials is not None and self.n_trials < 1:
            raise PipelineError(f"n_trials must be at least 1, got {self.n_trials}")
        if self.timeout_s is not None and not (math.isfinite(self.timeout_s) and self.timeout_s > 0):
            raise PipelineError(f"timeout must be a positive number of seconds, got {self.timeout_s}")
        if self.n_trials is None and self.timeout_s is None:
            raise PipelineError("give a number of trials, a timeout, or both")
        self.study_name = self.study_name or f"{self.model}-tune"


def suggest(space: dict[str, Float | Int | Choice], trial: optuna.Trial) -> dict[str, Any]:
    return {name: param.suggest(trial, name) for name, param in space.items()}


def trial_config(config: TuneConfig, params: dict[str, Any]) -> TrainConfig:
    """What a trial trains: the model's recipe with the trial's params, on the training images minus
    the validation split, with the test set left unloaded."""
    return _train_config(config, params, val_size=config.val_size, test_eval="never")


def retrain_config(config: TuneConfig, params: dict[str, Any]) -> TrainConfig:
    """The best trial's settings on the full training set, evaluated on the test set once, at the end."""
    return _train_config(config, params, val_size=0, test_eval="end")


def _train_config(config: TuneConfig, params: dict[str, Any], val_size: int, test_eval: str) -> TrainConfig:
    return train_config(
        config.model,
        **params,
        val_size=val_size,
        test_eval=test_eval,
        seed=config.seed,
        max_steps=config.max_steps,
        device=config.device,
        data_dir=config.data_dir,
        allow_other_data=config.allow_other_data,
    )


# ----------------------------------------------------------------- observers and pruning


class ProgressLines(TrialObserver):
    """One line per finished trial, handed to `say` (the CLI prints them to stderr)."""

    def __init__(self, say: Callable[[str], Any]):
        self.say = say
        self.params: dict[str, Any] = {}

    def trial_started(self, number: int, params: dict[str, Any]) -> list[TrainCallback]:
        self.params = params
        return []

    def trial_finished(self, number: int, state: str, value: float | None, metrics: dict[str, float]) -> None:
        shown = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.params.items())
        accuracy = f", validation accuracy {value:.2%}" if value is not None else ""
        self.say(f"trial {number}: {state}{accuracy} ({shown})")


class PruneOnValidation(TrainCallback):
    """Reports validation accuracy to the trial after every epoch and stops the trial if the pruner says so.

    The step reported is the share of the trial's schedule done, in percent, so the pruner
    compares trials at the same point of their (one-cycle) schedules, whatever their epochs.
    """

    def __init__(self, trial: optuna.Trial):
        self.trial = trial
        self.total_steps = 1
        self.last: dict[str, float] = {}

    def on_train_start(self, params: dict[str, Any]) -> None:
        self.total_steps = params["total_steps"]

    def on_epoch_end(self, epoch: int, step: int, metrics: dict[str, float]) -> None:
        self.last = metrics
        progress = round(100 * step / self.total_steps)
        self.trial.report(metrics["val_accuracy"], step=progress)
        if self.trial.should_prune():
            raise optuna.TrialPruned(f"pruned at {progress} % of its schedule")


# ----------------------------------------------------------------- the study


def safe_url(url: str) -> str:
    """The storage URL without its password, fit to log or print."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL sqlalchemy parses: Optuna will say what is wrong with it
        return url


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    if name == "median":
        # Five trials complete before any is pruned, and none before a fifth of its schedule.
        return optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=20)
    if name == "halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=20, reduction_factor=3)
    return optuna.pruners.NopPruner()


# Workers that open a new storage at the same moment race to create Optuna's tables (PostgreSQL:
# a duplicate key in pg_type; sqlite: "table already exists" or a locked database). The loser
# tries again and finds them made.
STORAGE_ATTEMPTS = 4


def open_study(config: TuneConfig, pruner: optuna.pruners.BasePruner | None = None) -> optuna.Study:
    """Create the study, or load it to resume: then it must be for the same model, split and seed."""
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # progress goes through the observers
    try:
        for attempt in range(1, STORAGE_ATTEMPTS + 1):
            try:
                study = optuna.create_study(
                    study_name=config.study_name,
                    storage=config.storage,
                    direction="maximize",
                    pruner=pruner or make_pruner(config.pruner),
                    load_if_exists=True,
                )
                break
            except (IntegrityError, OperationalError, ProgrammingError):
                if attempt == STORAGE_ATTEMPTS:
                    raise
                time.sleep(0.5 * attempt)
    except (ValueError, ImportError, optuna.exceptions.OptunaError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise PipelineError(f"cannot open the Optuna storage {safe_url(config.storage)}: {message}") from None
    except Exception as exc:  # sqlalchemy's errors: a database that is not there or refuses us
        raise PipelineError(
            f"cannot open the Optuna storage {safe_url(config.storage)}: {str(exc).splitlines()[0]}"
        ) from None
    if study.direction != optuna.study.StudyDirection.MAXIMIZE:
        raise PipelineError(f"study {config.study_name!r} exists but does not maximize; pick another --study-name")
    wanted = {name: getattr(config, name) for name in STUDY_SETTINGS}
    stored = {name: study.user_attrs[name] for name in STUDY_SETTINGS if name in study.user_attrs}
    clashes = {name: (stored[name], wanted[name]) for name in stored if stored[name] != wanted[name]}
    if clashes:
        described = ", ".join(f"{name} {old!r} (asked: {new!r})" for name, (old, new) in clashes.items())
        raise PipelineError(
            f"study {config.study_name!r} was started with {described}; resume it with the same settings "
            "or choose another --study-name"
        )
    for name, value in wanted.items():
        if name not in stored:
            study.set_user_attr(name, value)
    return study


def study_settings(config: TuneConfig) -> dict[str, Any]:
    """What the study's tracking run records as its params (and the search space as a file)."""
    return {
        "model": config.model,
        "study_name": config.study_name,
        "storage": safe_url(config.storage),
        "val_size": config.val_size,
        "seed": config.seed,
        "pruner": config.pruner,
        "direction": "maximize val_accuracy",
        "search_space": {name: repr(param) for name, param in SEARCH_SPACES[config.model].items()},
    }


def check_data(config: TuneConfig) -> None:
    """Fail once, before the study and its run exist, on data every trial would fail on."""
    from pipeline.data import check_known, load_split

    split = load_split(config.data_dir, "train")
    if not config.allow_other_data:
        check_known(split, config.data_dir)
    if config.val_size >= len(split):
        raise PipelineError(
            f"--val-size {config.val_size:,} leaves no training images (the training split has {len(split):,})"
        )


def optimize(study: optuna.Study, config: TuneConfig, observers: Sequence[TrialObserver] = ()) -> None:
    """Run this invocation's trials (n_trials and/or timeout). A trial that fails (a diverging lr,
    say) is recorded as failed and the search goes on; Ctrl-C stops it, the trial marked killed."""
    from pipeline.train import train

    space = SEARCH_SPACES[config.model]

    def objective(trial: optuna.Trial) -> float:
        params = suggest(space, trial)
        pruning = PruneOnValidation(trial)
        # The observers' callbacks first: an epoch is logged before the pruner may stop the trial.
        callbacks = [cb for observer in observers for cb in observer.trial_started(trial.number, params)]
        try:
            result = train(trial_config(config, params), [*callbacks, pruning])
        except optuna.TrialPruned:
            _finish(observers, trial.number, "pruned", pruning.last.get("val_accuracy"), pruning.last)
            raise
        except KeyboardInterrupt:
            _finish(observers, trial.number, "killed", None, pruning.last)
            raise
        except Exception:
            _finish(observers, trial.number, "failed", None, pruning.last)
            raise
        value = result.metrics["val_accuracy"]
        trial.set_user_attr("train_time_s", result.metrics["train_time_s"])
        _finish(observers, trial.number, "complete", value, result.metrics)
        return value

    study.optimize(objective, n_trials=config.n_trials, timeout=config.timeout_s, catch=(PipelineError,))


def _finish(observers: Sequence[TrialObserver], number: int, state: str, value, metrics) -> None:
    for observer in observers:
        observer.trial_finished(number, state, value, metrics)


# ----------------------------------------------------------------- the result


@dataclass
class StudyResult:
    study_name: str
    storage: str  # password hidden
    counts: dict[str, int]  # trials by state: complete, pruned, fail, running, waiting
    best_number: int
    best_value: float
    best_params: dict[str, Any]
    trials: Any  # pandas DataFrame, one row per trial
    figures: dict[str, Any] = field(default_factory=dict)  # name -> matplotlib Figure
    notes: list[str] = field(default_factory=list)  # what could not be drawn, and why


def summarize(study: optuna.Study, config: TuneConfig) -> StudyResult:
    """The study so far (every worker's trials): best trial, counts, the trials table and Optuna's plots."""
    counts: dict[str, int] = {}
    for trial in study.trials:
        counts[trial.state.name.lower()] = counts.get(trial.state.name.lower(), 0) + 1
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise PipelineError(
            f"no trial of study {config.study_name!r} has completed yet ({_describe(counts)}); "
            "run more trials (--n-trials) or a longer --timeout"
        )
    best = study.best_trial
    figures, notes = study_figures(study)
    return StudyResult(
        study_name=config.study_name,
        storage=safe_url(config.storage),
        counts=counts,
        best_number=best.number,
        best_value=best.value,
        best_params=dict(best.params),
        trials=trials_table(study),
        figures=figures,
        notes=notes,
    )


def _describe(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no trials"


def trials_table(study: optuna.Study) -> Any:
    """One row per trial: number, state, value, params, duration in seconds; plain types for any table format."""
    table = study.trials_dataframe(attrs=("number", "state", "value", "params", "duration", "user_attrs"))
    if "duration" in table:
        table["duration"] = table["duration"].dt.total_seconds()
    return table.rename(columns={"value": "val_accuracy", "duration": "duration_s"})


def study_figures(study: optuna.Study) -> tuple[dict[str, Any], list[str]]:
    """Optuna's optimisation history and parameter importances, as matplotlib figures."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as plots

    figures, notes = {}, []
    with warnings.catch_warnings():
        # Optuna marks its matplotlib backend experimental and says so on every call.
        warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
        # With few trials, or trials alike, the importances come out equal; the figure shows that.
        warnings.filterwarnings("ignore", message=".*[Ii]mportances will be equal", category=UserWarning)
        for name, plot in (
            ("optimization_history", plots.plot_optimization_history),
            ("param_importances", plots.plot_param_importances),
        ):
            try:
                axes = plot(study)
            except (ValueError, RuntimeError) as exc:  # importances need 2+ completed trials that differ
                notes.append(f"{name}: not drawn ({exc})")
                continue
            figure = axes.figure
            figure.set_size_inches(8, 5)
            figure.tight_layout()
            figures[name] = figure
    return figures, notes
