"""Local experiment tracking: every metrics record also goes to a tracker (``train.report_to``).

* ``tensorboard`` [default]: TensorBoard event files under ``<output_dir>/tb`` (view with
  ``tensorboard --logdir runs/``). If the ``tensorboard`` package is missing, a warning is printed
  and training goes on with ``metrics.jsonl`` only (the record of truth).
* ``wandb`` / ``trackio``: imported lazily; a clear error when not installed. They log under the
  project ``ogls-sd`` with ``train.run_name`` (default: the run directory's name), and write their local files under the run
  directory where the library allows it.
* ``none``: no tracker.

Only numeric values are forwarded; ``step`` is the record's ``step``.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path


class TrackerError(RuntimeError):
    """A tracker was requested that cannot be used (not installed)."""


def _numeric(rec: dict) -> dict[str, float]:
    out = {}
    for k, v in rec.items():
        if k == "step" or isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(float(v)):
            out[k] = float(v)
    return out


class Tracker:
    """No-op tracker (``report_to=none``); the base of the others."""

    name = "none"

    def log(self, rec: dict, step: int | None = None) -> None:
        pass

    def text(self, tag: str, text: str, step: int) -> None:
        """A text record (sample completions); trackers without text support ignore it."""

    def close(self) -> None:
        pass


class TensorBoardTracker(Tracker):
    name = "tensorboard"

    def __init__(self, logdir: Path):
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.logdir = Path(logdir)
        self.writer = SummaryWriter(log_dir=str(self.logdir))

    def log(self, rec: dict, step: int | None = None) -> None:
        step = int(rec.get("step", 0) if step is None else step)
        for k, v in _numeric(rec).items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def text(self, tag: str, text: str, step: int) -> None:
        self.writer.add_text(tag, text, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    name = "wandb"

    def __init__(self, run_dir: Path, config: dict | None, name: str = ""):
        import wandb

        self.wandb = wandb
        self.run = wandb.init(project="ogls-sd", name=name or Path(run_dir).name, dir=str(run_dir), config=config or {},
                              reinit=True)

    def log(self, rec: dict, step: int | None = None) -> None:
        step = int(rec.get("step", 0) if step is None else step)
        self.run.log(_numeric(rec), step=step)

    def close(self) -> None:
        self.run.finish()


class TrackioTracker(Tracker):
    name = "trackio"

    def __init__(self, run_dir: Path, config: dict | None, name: str = ""):
        import trackio

        self.trackio = trackio
        self.run = trackio.init(project="ogls-sd", name=name or Path(run_dir).name, config=config or {})

    def log(self, rec: dict, step: int | None = None) -> None:
        step = int(rec.get("step", 0) if step is None else step)
        self.trackio.log(_numeric(rec), step=step)

    def close(self) -> None:
        self.trackio.finish()


_INSTALL = {"wandb": "pip install wandb", "trackio": "pip install trackio", "tensorboard": "pip install tensorboard"}


def check_tracker(report_to: str) -> None:
    """Fail early (before any model is loaded) when the optional tracker ``report_to`` is not
    installed: one line naming the package and the alternatives."""
    import importlib.util

    if report_to in ("wandb", "trackio"):
        try:
            found = importlib.util.find_spec(report_to) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            raise TrackerError(f"train.report_to={report_to}: the {report_to} package is not installed "
                               f"({_INSTALL[report_to]}), or set train.report_to=tensorboard|none")


def open_tracker(report_to: str, run_dir: str | Path, config: dict | None = None, name: str = "") -> Tracker:
    """The tracker named by ``report_to`` writing under ``run_dir``; ``name`` is the run's name
    (``train.run_name``; '' = the run directory's name)."""
    run_dir = Path(run_dir)
    if report_to in ("none", "", None):
        return Tracker()
    if report_to == "tensorboard":
        try:
            return TensorBoardTracker(run_dir / "tb")
        except ImportError:
            print("warning: train.report_to=tensorboard but the tensorboard package is not installed "
                  f"({_INSTALL['tensorboard']}); metrics go to metrics.jsonl only", file=sys.stderr)
            return Tracker()
    if report_to == "wandb":
        cls = WandbTracker
    elif report_to == "trackio":
        cls = TrackioTracker
    else:
        raise TrackerError(f"train.report_to: unknown tracker {report_to!r}")
    try:
        return cls(run_dir, config, name)
    except ImportError as e:
        raise TrackerError(f"train.report_to={report_to}: the {report_to} package is not installed "
                           f"({_INSTALL[report_to]}), or set train.report_to=tensorboard|none ({e})") from None
