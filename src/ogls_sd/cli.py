"""Command line: ``ogls-sd train``, ``eval``, ``compare``, ``report``. Parses arguments and nothing else."""

from __future__ import annotations

import os
import sys
import textwrap
from typing import List, Optional

import typer
from rich.console import Console

from .compare import DEFAULT_METHODS
from .config import Config, ConfigError, describe_fields

app = typer.Typer(add_completion=False, no_args_is_help=True, rich_markup_mode=None, pretty_exceptions_enable=False,
                  help="OGLS-SD: on-policy self-distillation with outcome-guided logit steering.")
err = Console(stderr=True)


def _fields_epilog() -> str:
    lines = ["Config fields (set with --config FILE and/or section.key=value overrides):", ""]
    for key, default, h in describe_fields():
        lines.append(f"  {key} (default {default})")
        lines += ["      " + s for s in textwrap.wrap(h, 90)]
    return "\n".join(lines)


def _load(config: Optional[str], overrides: List[str]) -> Config:
    try:
        return Config.load(config, overrides)
    except ConfigError as e:
        err.print(f"[red]error:[/] {e}", highlight=False)
        raise typer.Exit(2)


class _RawEpilog(typer.core.TyperCommand):
    def format_epilog(self, ctx, formatter):  # keep line breaks of the field list
        if self.epilog:
            formatter.write("\n" + self.epilog + "\n")


@app.command(cls=_RawEpilog, epilog=_fields_epilog(),
             help="Train a model. With no arguments: the built-in default (arith task, tiny model, "
                  "warm start if not cached, OGLS-SD) on CPU in a few minutes.")
def train(
    overrides: List[str] = typer.Argument(None, help="section.key=value overrides, e.g. loss.clip=entry train.steps=20"),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML config file (sections as below)."),
    output_dir: Optional[str] = typer.Option(None, "--output-dir", "-o", help="Run directory (same as train.output_dir)."),
    resume: Optional[str] = typer.Option(None, "--resume", help="'latest' (newest checkpoint in the run directory) or a checkpoint path (same as train.resume)."),
):
    ov = list(overrides or [])
    if output_dir:
        ov.append(f"train.output_dir={output_dir}")
    if resume:
        ov.append(f"train.resume={resume}")
    cfg = _load(config, ov)
    from .trainer import TrainingHalted, train as run_train

    from .distributed import shutdown

    try:
        summary = run_train(cfg)
    except (ValueError, FileNotFoundError, OSError, TrainingHalted) as e:
        err.print(f"[red]error:[/] {e}", highlight=False)
        raise typer.Exit(1)
    shutdown()  # several processes: leave together, cleanly
    before, after = summary.get("accuracy_before"), summary.get("accuracy_after")
    if before is not None and after is not None:
        print(f"accuracy_before={before:.3f} accuracy_after={after:.3f} wall_seconds={summary['wall_seconds']}")
    print(f"summary: {os.path.join(summary['output_dir'], 'summary.json')}")


@app.command(cls=_RawEpilog, epilog=_fields_epilog(),
             help="Evaluate a model or checkpoint: k samples per problem on benchmarks; writes results.json "
                  "(avg@k, pass@k, maj@k, format rate, every setting) and generations_*.jsonl.")
def eval(
    overrides: List[str] = typer.Argument(None, help="section.key=value overrides (model, templates, rollout sampling, eval)."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML config file."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="A run checkpoint (…/checkpoints/step_N) or model directory; default: the configured model."),
    benchmark: List[str] = typer.Option(["task"], "--benchmark", "-b", help="'task' (the configured task's held-out set), a registry name (math500, aime24, aime25, hmmt_feb25, amc23, gsm8k, amo_bench, beyond_aime), NAME=PATH for a local copy, or a data file. Repeatable."),
    k: int = typer.Option(1, "--k", help="Samples per problem."),
    seed: int = typer.Option(0, "--seed", help="Sampling seed."),
    greedy: bool = typer.Option(False, "--greedy", help="Greedy decoding (k copies are identical)."),
    output_dir: str = typer.Option("runs/eval", "--output-dir", "-o", help="Where results.json and generations go."),
):
    cfg = _load(config, list(overrides or []))
    if k < 1:
        err.print("[red]error:[/] --k must be >= 1")
        raise typer.Exit(2)
    from pathlib import Path

    from .eval_harness import BenchmarkSpec, evaluate_benchmarks
    from .evaluate import load_for_eval

    try:
        model, tok, task, tpl, info = load_for_eval(cfg, checkpoint)
        res = evaluate_benchmarks(cfg, model, tok, task, tpl, [BenchmarkSpec.parse(b) for b in benchmark], k, seed,
                                  Path(output_dir), info, greedy=greedy, console=Console())
    except (ValueError, FileNotFoundError, OSError, KeyError) as e:
        err.print(f"[red]error:[/] {e}", highlight=False)
        raise typer.Exit(1)
    print(f"results: {Path(output_dir) / 'results.json'}")


@app.command(help="Run the miniature comparison (docs/experiments.md): SFT, RFT, GRPO, OPSD, OPSD+GRPO, OGLS-SD "
                  "context and global at equal budgets for several seeds on the built-in arith task, each run in "
                  "OUT/<method>/seed<k>/, then write OUT/report.md, report.json and PNG plots.")
def compare(
    overrides: List[str] = typer.Argument(None, help="extra section.key=value overrides applied to every run"),
    output_dir: str = typer.Option("runs/compare", "--output-dir", "-o", help="Output directory."),
    methods: str = typer.Option(",".join(DEFAULT_METHODS), "--methods",
                                help="Comma-separated methods (sft, rft, grpo, opsd, opsd_grpo, ogls_context, ogls_global, "
                                     "ogls_context_refpos, ogls_context_skip); missing algorithms are skipped with a warning."),
    seeds: int = typer.Option(3, "--seeds", help="Number of seeds (0..N-1)."),
    seed_list: Optional[str] = typer.Option(None, "--seed-list", help="Explicit comma-separated seeds (overrides --seeds)."),
    steps: int = typer.Option(60, "--steps", help="Optimizer steps per run (the same for every method)."),
    style: str = typer.Option("templated", "--style", help="data.arith_style: templated (references carry a check template) or plain."),
    eval_every: int = typer.Option(5, "--eval-every", help="Held-out accuracy every N steps (eval.every)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Accuracy threshold for 'rollout tokens to reach'; default: start + 0.1."),
    fresh: bool = typer.Option(False, "--fresh", help="Rerun runs that already finished with the same config (default: reuse them)."),
    threads: int = typer.Option(1, "--threads", help="torch CPU threads (1 is fastest for the tiny model; 0 = torch's default)."),
):
    from .compare import run_compare

    sl = [int(x) for x in seed_list.split(",") if x.strip()] if seed_list else list(range(seeds))
    if style not in ("plain", "templated"):
        err.print("[red]error:[/] --style must be plain or templated")
        raise typer.Exit(2)
    try:
        rep = run_compare(output_dir, [m.strip() for m in methods.split(",") if m.strip()], sl, style, steps, eval_every,
                          list(overrides or []), threshold, console=Console(), resume=not fresh,
                          threads=threads or None)
    except (ConfigError, ValueError, FileNotFoundError, OSError) as e:
        err.print(f"[red]error:[/] {e}", highlight=False)
        raise typer.Exit(1)
    from .report import markdown_table

    print(markdown_table(rep))
    print(f"report: {os.path.join(output_dir, 'report.md')}")


@app.command(help="Redraw the report (report.md, report.json, PNG plots) from the metrics.jsonl of any runs: each "
                  "RUN_DIR is a run directory or a directory containing runs (e.g. a compare output).")
def report(
    run_dirs: List[str] = typer.Argument(..., help="Run directories or parents of run directories."),
    output_dir: Optional[str] = typer.Option(None, "--output-dir", "-o", help="Where to write (default: the first RUN_DIR)."),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="Accuracy threshold for 'rollout tokens to reach'; default: start + 0.1."),
):
    from .report import markdown_table, write_report

    out = output_dir or run_dirs[0]
    try:
        rep = write_report(run_dirs, out, threshold=threshold)
    except (ValueError, FileNotFoundError, OSError) as e:
        err.print(f"[red]error:[/] {e}", highlight=False)
        raise typer.Exit(1)
    print(markdown_table(rep))
    print(f"report: {os.path.join(out, 'report.md')}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
