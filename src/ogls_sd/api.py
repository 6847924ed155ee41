"""The Python API: ``from ogls_sd import Config, train, evaluate``.

Everything the command line does, from Python, plus what a config file cannot hold:

* ``model=`` / ``tokenizer=``: a causal LM object and its tokenizer instead of ``model.name``;
* ``data=``: the training data as a list of dicts or a ``datasets.Dataset``, read with the
  ``data.*`` column settings (``data.problem_column``, ``data.answer_column``, ...) exactly like a
  data file: the same row checks, duplicate rule and held-out split;
* ``rewards=``: reward functions as callables, ``f`` or ``(f, weight)`` each (or entry strings as
  in ``reward.funcs``), after those of ``reward.funcs``.

A :class:`~ogls_sd.config.Config` checks every assignment (``cfg.train.lr = -1`` raises
:class:`~ogls_sd.config.ConfigError` naming ``train.lr``), and both functions check the whole
config again (the rules across sections) before anything is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping

from .config import Config, ConfigError
from .accuracy import EvalResult, evaluate_accuracy
from .loading import load_for_eval
from .models import load_policy
from .rewards.functions import RewardSet
from .tasks import rows_task, task_templates
from .templates import PromptBuilder


def train(cfg: Config | None = None, *, model=None, tokenizer=None, data=None, rewards=(), console=None,
          overwrite: bool = False) -> dict:
    """Train as ``ogls-sd train`` does with ``cfg`` (default: :class:`Config` ``()``) and return the
    run's summary (also written to ``<train.output_dir>/summary.json``).

    Args:
        model, tokenizer: a causal LM and its tokenizer (both), used instead of ``model.name``; the
            tokenizer needs a chat template and gets a pad token and left padding if it lacks them.
        data: training rows (a list of dicts or a ``datasets.Dataset``) instead of ``data.task`` (and
            ``data.mixture``), read with the ``data.*`` column settings.
        rewards: reward functions, ``f(prompts, completions, **columns) -> list[float]`` or
            ``(f, weight)`` each; with ``reward.funcs`` the reward is the weighted sum of all.
        console: a ``rich.console.Console`` for the progress output.
        overwrite: start afresh in a ``train.output_dir`` that holds another run (refused otherwise).
    """
    from .trainer import train as run_training  # the trainer (and rich) load when a run starts, not on import

    cfg = checked(cfg)
    task = data_task(data, cfg)
    return run_training(cfg, console, overwrite, model=model, tokenizer=tokenizer, task=task, rewards=list(rewards or ()))


def evaluate(cfg: Config | None = None, *, checkpoint: str | None = None, model=None, tokenizer=None, data=None,
             rewards=()) -> EvalResult:
    """Held-out accuracy as training measures it: greedy decoding of the task's held-out split
    (``data.eval_size`` problems, ``eval.max_new_tokens``), graded by the reward functions
    (``reward.funcs`` and ``rewards``; default the task's verifier) with ``reward.success_threshold``.

    The model is ``model``/``tokenizer``, else ``checkpoint`` (a run checkpoint or model directory),
    else the configured one (``model.name``; the tiny model's warm start). ``data``: as in
    :func:`train`. Returns an :class:`~ogls_sd.accuracy.EvalResult` (``accuracy``, ``n``,
    ``completions``, ``correct``, ``rewards``, ``mean_length``)."""
    from .trainer import reward_specs

    cfg = checked(cfg)
    specs = reward_specs(cfg, list(rewards or ()))
    task = data_task(data, cfg)
    if model is None and checkpoint is not None:
        model, tok, loaded, tpl, _ = load_for_eval(cfg, checkpoint)
        task = task if task is not None else loaded
        tpl = task_templates(task)
    else:
        model, tok, task, tpl, _ = load_policy(cfg, task=task, model=model, tokenizer=tokenizer)
    device = cfg.train.device if cfg.train.device != "auto" else _auto_device()
    model.to(device)
    heldout = task.examples(cfg.data.eval_size, seed=cfg.data.seed, split="test")
    return evaluate_accuracy(model, tok, PromptBuilder(tok, cfg.templates, tpl), task, heldout, cfg.eval.max_new_tokens,
                             cfg.eval.batch_size, rewards=RewardSet(specs, task, cfg.reward.success_threshold))


def checked(cfg: Config | None) -> Config:
    """``cfg`` (a fresh default when None) after every check of a loaded config, including those
    across sections that a single assignment cannot run (a :class:`ConfigError` otherwise)."""
    if cfg is None:
        return Config()
    if not isinstance(cfg, Config):
        raise ConfigError(f"cfg: expected an ogls_sd.Config, got {type(cfg).__name__} (Config.load(path) reads a YAML file)")
    Config.from_dict(cfg.to_dict(), source="cfg")
    return cfg


def data_task(data, cfg: Config):
    """``data=`` as a task (None: ``data.task`` decides)."""
    if data is None:
        return None
    if isinstance(data, (str, bytes)) or isinstance(data, Mapping):
        what = "a file name or hub id: set cfg.data.task" if isinstance(data, (str, bytes)) else (
            "a mapping (a DatasetDict? pass one split, e.g. ds['train'])")
        raise ConfigError(f"data=: expected a list of dicts or a datasets.Dataset, got {what}")
    return rows_task(data, cfg.data)


def _auto_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


__all__ = ["Config", "ConfigError", "evaluate", "train"]
