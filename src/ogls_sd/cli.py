"""Command line: ``ogls-sd train``, ``eval``, ``compare``, ``report``. Parses arguments and nothing else.

Every failure is one line on stderr (``error: ...``) and a non-zero exit (2: bad config or
arguments, 1: anything else); ``--debug`` or ``OGLS_SD_DEBUG=1`` shows the full traceback instead
(see :func:`_guarded`)."""

from __future__ import annotations

import functools
import json
import os
import sys
import pickle
import textwrap

# Library progress bars off in the CLI (see quiet_library_bars): tqdm reads TQDM_* at import time,
# and transformers' GGUF loader uses plain tqdm, so this must precede every import of tqdm.
if os.environ.get("OGLS_SD_LIBRARY_BARS", "").lower() not in ("1", "true", "yes"):
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.text import Text

from .compare import DEFAULT_METHODS, METHODS
from .config import Config, ConfigError, describe_fields, trl_aliases

DEBUG_ENV = "OGLS_SD_DEBUG"
_DEBUG_HELP = f"On an error, show the full traceback instead of one line (same as {DEBUG_ENV}=1)."

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None, pretty_exceptions_enable=False,
                  help="OGLS-SD: on-policy self-distillation with outcome-guided logit steering. An error is one "
                       f"line and a non-zero exit; --debug (or {DEBUG_ENV}=1) shows its full traceback.")
err = Console(stderr=True)


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help=_DEBUG_HELP)) -> None:
    """``ogls-sd --debug COMMAND ...`` (the flag is also accepted after the command)."""


# ------------------------------------------------------------------------------ error handling
_PKG_DIR = os.path.dirname(os.path.abspath(__file__))


def _debug_env() -> bool:
    return os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")


def _one_line(msg: object) -> str:
    return " ".join(str(msg).split())


def _message(e: BaseException) -> str:
    if isinstance(e, KeyError) and len(e.args) == 1 and isinstance(e.args[0], str):
        return _one_line(e.args[0])  # str(KeyError) adds quotes
    return _one_line(e) or type(e).__name__


def _frames(tb) -> list:
    out = []
    while tb is not None:
        out.append(tb)
        tb = tb.tb_next
    return out


def _raised_by_us(e: BaseException) -> bool:
    """Raised by a ``raise`` statement in this package (a deliberate error with its message), as
    opposed to a failure inside a library or a bug (``a, b = x``, ``d[k]``) in our code."""
    tbs = _frames(e.__traceback__)
    if not tbs or isinstance(e, AssertionError):
        return False
    import linecache

    last = tbs[-1]
    fn = os.path.abspath(last.tb_frame.f_code.co_filename)
    return fn.startswith(_PKG_DIR + os.sep) and linecache.getline(fn, last.tb_lineno).lstrip().startswith("raise")


def _unpickling_failure(e: BaseException) -> BaseException | None:
    """The ``pickle.UnpicklingError`` (``torch.load(weights_only=True)`` refusing a file) behind ``e``."""
    seen: set[int] = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if isinstance(x, pickle.UnpicklingError) or "Weights only load failed" in str(x):
            return x
        x = x.__cause__ or x.__context__
    return None


def _file_of(*excs: BaseException) -> str | None:
    """The file a failed load was reading: an argument of the innermost frame that names one
    (``torch.load(f)``, transformers' ``checkpoint_file``, ...)."""
    for e in excs:
        for tb in reversed(_frames(e.__traceback__)):
            loc = tb.tb_frame.f_locals
            for name in ("f", "checkpoint_file", "resolved_archive_file", "filename", "file", "path", "p"):
                v = loc.get(name)
                if isinstance(v, (str, os.PathLike)) and os.path.isfile(v):
                    return os.fspath(v)
    return None


def _describe(e: Exception) -> tuple[str, int]:
    """``(one-line message, exit code)`` for an exception that reached the command line."""
    if isinstance(e, ConfigError):
        return _message(e), 2
    if type(e).__module__.split(".")[0] == "ogls_sd":  # our own error classes (CheckpointError, DataError, ...)
        return _message(e), 1
    bad = _unpickling_failure(e)
    if bad is not None:
        lines = [ln.strip() for ln in str(bad).splitlines() if ln.strip()]
        why = [ln for ln in lines if not ln.startswith(("Weights only load failed", "Check the documentation",
                                                         "Please file an issue", "You can use"))]
        reason = (why or lines or [type(bad).__name__])[0].removeprefix("WeightsUnpickler error:").strip()
        where = _file_of(bad, e) or "a pickled state file"
        return (f"{where}: not loaded: torch.load(weights_only=True) refused it ({reason[:300]}); a state file holds "
                "only tensors and plain data, so this one is corrupt or was tampered with"), 1
    if isinstance(e, OSError) or _raised_by_us(e):  # file system / network, or a deliberate error of ours
        return _message(e), 1
    msg = _message(e)
    if len(msg) > 500:
        msg = msg[:500] + "..."
    return f"{type(e).__name__}: {msg} (run with --debug for the traceback)", 1


def _print_error(msg: str) -> None:
    # soft_wrap: rich would otherwise break a long message into several lines at the terminal width
    err.print(Text.assemble(("error:", "bold red"), " ", _one_line(msg)), soft_wrap=True, highlight=False)


def _console() -> Console:
    """stdout's console (:func:`ogls_sd.trainer.default_console`): off a terminal lines stay whole,
    and ``compare`` prints plain lines instead of redrawn progress bars."""
    from .trainer import default_console

    return default_console()


def _fail(msg: str, code: int = 2) -> None:
    _print_error(msg)
    raise typer.Exit(code)


def quiet_library_bars() -> None:
    """Our own progress (rich bars on a terminal, plain lines otherwise) is what a run prints:
    transformers' and the hub's bars (weight loading, GGUF de-quantisation, downloads) are off unless
    ``OGLS_SD_LIBRARY_BARS=1``. In a log file each redraw of theirs is another line of noise."""
    if os.environ.get("OGLS_SD_LIBRARY_BARS", "").lower() in ("1", "true", "yes"):
        return
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    try:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    except ImportError:  # pragma: no cover - a dependency of transformers
        pass


def _guarded(fn):
    """Run a command; an exception becomes one ``error:`` line and exit code 1 (2 for a bad config),
    unless ``--debug`` / ``OGLS_SD_DEBUG`` asks for the traceback. Unexpected exceptions (not ours,
    not raised deliberately by our code, not OS errors) keep their type in the line and point to
    ``--debug``: a bug is never disguised as a user error."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        quiet_library_bars()
        ctx = kwargs.get("ctx")  # the command's typer.Context: `ogls-sd --debug COMMAND` sets the root's flag
        root = ctx.find_root().params if ctx is not None else {}
        debug = bool(kwargs.get("debug")) or bool(root.get("debug")) or _debug_env()
        try:
            return fn(*args, **kwargs)
        except Exception as e:
            if type(e).__module__.split(".")[0] in ("typer", "click"):  # Exit, Abort, usage errors: theirs
                raise
            if debug:
                raise
            msg, code = _describe(e)
            _print_error(msg)
            raise typer.Exit(code) from None

    return wrapper


def _importable_cwd() -> None:
    """``--reward mymod:f`` with mymod.py in the current directory imports, as ``python -m`` would
    find it (the ``ogls-sd`` script's sys.path holds its own directory, not the current one)."""
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())


# what `ogls-sd eval` reads of a config: the model (and the tiny model's warm start), the data of the 'task'
# benchmark and of data files, the prompt templates, the sampling settings and the evaluation limits
EVAL_FIELDS = ("model.", "data.", "warmstart.", "templates.", "rollout.temperature", "rollout.top_p", "rollout.top_k",
               "eval.max_new_tokens", "eval.batch_size")


def _fields_epilog(only: tuple[str, ...] = ()) -> str:
    """The config fields for a command's --help: every field, or those whose key starts with one of ``only``
    (then followed by a line saying the others have no effect); every field lists TRL's names too."""
    title = "Config fields this command reads" if only else "Config fields"
    lines = [f"{title} (set with --config FILE and/or section.key=value overrides):", ""]
    for key, default, h in describe_fields():
        if only and not key.startswith(only):
            continue
        lines.append(f"  {key} (default {default})")
        lines += ["      " + s for s in textwrap.wrap(h, 90)]
    if only:
        lines += ["", "Training's other fields are accepted and have no effect here (`ogls-sd train --help` lists them)."]
        return "\n".join(lines)
    names = ", ".join(f"{t}={ours}" for t, ours in trl_aliases().items())
    lines += ["", "TRL names (GRPOConfig / SDPOConfig, TRL 1.16) accepted for the fields they mean, as NAME=value or a "
              "top-level YAML key; given together with the field itself in one source they are an error "
              "(docs/trl_names.md):"]
    lines += ["      " + s for s in textwrap.wrap(names, 90)]
    return "\n".join(lines)


class _RawEpilog(typer.core.TyperCommand):
    def format_epilog(self, ctx, formatter):  # keep line breaks of the field list
        if self.epilog:
            formatter.write("\n" + self.epilog + "\n")


_DEBUG = typer.Option(False, "--debug", help=_DEBUG_HELP)


@app.command(cls=_RawEpilog, epilog=_fields_epilog(),
             help="Train a model. With no arguments: the built-in default (arith task, tiny model, "
                  "warm start if not cached, OGLS-SD) on CPU in a few minutes. One run at a time per output "
                  "directory (<output_dir>/.lock); a fresh run in a directory that holds another run needs --overwrite "
                  "(or continue it with --resume latest).")
@_guarded
def train(
    ctx: typer.Context,
    overrides: List[str] = typer.Argument(None, help="section.key=value overrides, e.g. loss.clip=entry train.steps=20"),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML config file (sections as below)."),
    output_dir: Optional[str] = typer.Option(None, "--output-dir", "-o", help="Run directory (same as train.output_dir)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="'latest' (newest checkpoint in the run directory) or a checkpoint path (same as train.resume)."),
    reward: List[str] = typer.Option(None, "--reward", help="A reward function, module:function[=weight] (your own; the module must be importable: on PYTHONPATH or in the current directory) or a built-in name (verifier, reasoning_gym). Repeatable; the rewards are summed with their weights. Same as reward.funcs=...; replaces reward.funcs of --config. Called as f(prompts, completions, **columns) -> list[float] (docs/data_and_eval.md, 'Your own reward')."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Start afresh in an output directory that holds another run: its config, metrics, checkpoints and summary are removed once every check of the new run passed. Without it such a run is refused."),
    debug: bool = _DEBUG,
):
    ov = list(overrides or [])
    if output_dir:
        ov.append(f"train.output_dir={output_dir}")
    if resume:
        ov.append(f"train.resume={resume}")
    if reward:
        ov.append(f"reward.funcs={json.dumps(list(reward))}")  # a YAML flow list: entries may hold '=' and ','
    cfg = Config.load(config, ov)
    if cfg.reward.funcs:
        _importable_cwd()
    from .distributed import shutdown
    from .trainer import train as run_train

    summary = run_train(cfg, overwrite=overwrite)
    shutdown()  # several processes: leave together, cleanly
    before, after = summary.get("accuracy_before"), summary.get("accuracy_after")
    if before is not None and after is not None:
        print(f"accuracy_before={before:.3f} accuracy_after={after:.3f} wall_seconds={summary['wall_seconds']}")
    print(f"summary: {os.path.join(summary['output_dir'], 'summary.json')}")


@app.command(cls=_RawEpilog, epilog=_fields_epilog(only=EVAL_FIELDS),
             help="Evaluate a model or checkpoint: k samples per problem on benchmarks; writes results.json "
                  "(avg@k, pass@k, maj@k, format rate, every setting) and generations_*.jsonl.")
@_guarded
def eval(
    ctx: typer.Context,
    overrides: List[str] = typer.Argument(None, help="section.key=value overrides (model, templates, rollout sampling, eval)."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML config file."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="A run checkpoint (…/checkpoints/step_N) or model directory; default: the configured model."),
    benchmark: List[str] = typer.Option(["task"], "--benchmark", "-b", help="'task' (the configured task's held-out set), a registry name (math500, aime24, aime25, hmmt_feb25, amc23, gsm8k, amo_bench, beyond_aime), NAME=PATH for a local copy, or a data file. Repeatable."),
    k: int = typer.Option(1, "--k", help="Samples per problem."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    greedy: bool = typer.Option(False, "--greedy", help="Greedy decoding (k copies are identical), the protocol of training's held-out accuracy (eval/accuracy, accuracy_before/after); without it the samples use rollout.temperature / top_p / top_k. The table's title and results.json name the protocol."),
    output_dir: str = typer.Option("runs/eval", "--output-dir", "-o", help="Where results.json and generations go."),
    debug: bool = _DEBUG,
):
    cfg = Config.load(config, list(overrides or []))
    if k < 1:
        _fail("--k must be >= 1")
    from .eval_harness import BenchmarkSpec, evaluate_benchmarks
    from .loading import load_for_eval

    model, tok, task, tpl, info = load_for_eval(cfg, checkpoint)
    evaluate_benchmarks(cfg, model, tok, task, tpl, [BenchmarkSpec.parse(b) for b in benchmark], k, seed,
                        Path(output_dir), info, greedy=greedy, console=_console())
    print(f"results: {Path(output_dir) / 'results.json'}")


@app.command(help="Run the miniature comparison (docs/experiments.md): SFT, RFT, GRPO, OPSD, OPSD+GRPO, OGLS-SD "
                  "context and global at equal budgets for several seeds on the built-in arith task, each run in "
                  "OUT/<method>/seed<k>/, then write OUT/report.md, report.json and PNG plots.")
@_guarded
def compare(
    ctx: typer.Context,
    overrides: List[str] = typer.Argument(None, help="extra section.key=value overrides applied to every run (a method's own settings win over them)"),
    output_dir: str = typer.Option("runs/compare", "--output-dir", "-o", help="Output directory."),
    methods: str = typer.Option(",".join(DEFAULT_METHODS), "--methods",
                                help=f"Comma-separated methods ({', '.join(METHODS)}; docs/experiments.md), each optionally with "
                                     "settings of its own, NAME+section.key=value+... (e.g. grpo+train.lr=3e-4); "
                                     "missing algorithms are skipped with a warning."),
    seeds: int = typer.Option(3, "--seeds", help="Number of seeds (0..N-1)."),
    seed_list: Optional[str] = typer.Option(None, "--seed-list", help="Explicit comma-separated seeds (overrides --seeds)."),
    steps: int = typer.Option(60, "--steps", help="Optimizer steps per run (the same for every method)."),
    style: str = typer.Option("templated", "--style", help="data.arith_style: templated (references carry a check template) or plain."),
    eval_every: int = typer.Option(5, "--eval-every", help="Held-out accuracy every N steps (eval.every)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Accuracy threshold for 'rollout tokens to reach'; default: start + 0.1."),
    fresh: bool = typer.Option(False, "--fresh", help="Rerun runs that already finished with the same config (default: reuse them)."),
    threads: int = typer.Option(1, "--threads", help="torch CPU threads (1 is fastest for the tiny model; 0 = torch's default)."),
    debug: bool = _DEBUG,
):
    from .compare import run_compare

    try:
        sl = [int(x) for x in seed_list.split(",") if x.strip()] if seed_list else list(range(seeds))
    except ValueError:
        _fail(f"--seed-list {seed_list!r}: expected comma-separated integers")
    if style not in ("plain", "templated"):
        _fail("--style must be plain or templated")
    rep = run_compare(output_dir, [m.strip() for m in methods.split(",") if m.strip()], sl, style, steps, eval_every,
                      list(overrides or []), threshold, console=_console(), resume=not fresh, threads=threads or None)
    from .report import markdown_table

    print(markdown_table(rep))
    print(f"report: {os.path.join(output_dir, 'report.md')}")


@app.command(help="Redraw the report (report.md, report.json, PNG plots) from the metrics.jsonl of any runs: each "
                  "RUN_DIR is a run directory or a directory containing runs (e.g. a compare output).")
@_guarded
def report(
    ctx: typer.Context,
    run_dirs: List[str] = typer.Argument(..., help="Run directories or parents of run directories."),
    output_dir: Optional[str] = typer.Option(None, "--output-dir", "-o", help="Where to write (default: the first RUN_DIR)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Accuracy threshold for 'rollout tokens to reach'; default: start + 0.1."),
    debug: bool = _DEBUG,
):
    from .report import markdown_table, write_report

    out = output_dir or run_dirs[0]
    rep = write_report(run_dirs, out, threshold=threshold)
    print(markdown_table(rep))
    print(f"report: {os.path.join(out, 'report.md')}")


@app.command(cls=_RawEpilog, epilog=_fields_epilog(),
             help="Resolve and validate a config without training: every key and value, the reward functions, the "
                  "data (loaded and split as training splits it) and the model's context limit (its config and "
                  "tokenizer only, no weights) against every held-out prompt and the prompts of the first training "
                  "steps. Prints the resolved config with --print. Nothing is written.")
@_guarded
def check(
    ctx: typer.Context,
    overrides: List[str] = typer.Argument(None, help="section.key=value overrides, as for train"),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML config file (sections as below)."),
    print_config: bool = typer.Option(False, "--print", help="Print the resolved config (YAML) first."),
    model: bool = typer.Option(True, "--model/--no-model", help="Also check prompts against the model's context (loads its config and tokenizer)."),
    debug: bool = _DEBUG,
):
    from .check import check as run_check

    cfg = Config.load(config, list(overrides or []))
    if cfg.reward.funcs:
        _importable_cwd()
    if print_config:
        print(cfg.to_yaml(), end="")
    for line in run_check(cfg, model=model):
        print(line)


@app.command(help="Upload a checkpoint's model/ (weights or LoRA adapter, tokenizer, model card) to the Hugging Face "
                  "hub (needs `huggingface-cli login` or HF_TOKEN). Optimizer state and shards stay local.")
@_guarded
def push(
    ctx: typer.Context,
    checkpoint: str = typer.Argument(..., help="A run checkpoint (…/checkpoints/step_N) or a model directory."),
    repo_id: str = typer.Argument(..., help="Hub repository, user/name (created if missing)."),
    public: bool = typer.Option(False, "--public", help="Create the repository public (default: private)."),
    debug: bool = _DEBUG,
):
    from .hub import check_hub, push_checkpoint

    check_hub(repo_id)
    print(f"pushed to {push_checkpoint(checkpoint, repo_id, private=not public)}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
