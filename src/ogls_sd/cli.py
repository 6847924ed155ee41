"""Command line: ``ogls-sd train``, ``ogls-sd eval``. Parses arguments and nothing else."""

from __future__ import annotations

import os
import sys
import textwrap
from typing import List, Optional

import typer
from rich.console import Console

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
):
    ov = list(overrides or [])
    if output_dir:
        ov.append(f"train.output_dir={output_dir}")
    cfg = _load(config, ov)
    from .trainer import train as run_train

    try:
        summary = run_train(cfg)
    except (ValueError, FileNotFoundError, OSError) as e:
        err.print(f"[red]error:[/] {e}", highlight=False)
        raise typer.Exit(1)
    before, after = summary.get("accuracy_before"), summary.get("accuracy_after")
    if before is not None and after is not None:
        print(f"accuracy_before={before:.3f} accuracy_after={after:.3f} wall_seconds={summary['wall_seconds']}")
    print(f"summary: {os.path.join(summary['output_dir'], 'summary.json')}")


@app.command(cls=_RawEpilog, epilog=_fields_epilog(),
             help="Evaluate a model or checkpoint on the configured task's held-out problems (greedy accuracy).")
def eval(
    overrides: List[str] = typer.Argument(None, help="section.key=value overrides."),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="YAML config file."),
    checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="A checkpoint directory (…/checkpoints/step_N) or model path."),
):
    cfg = _load(config, list(overrides or []))
    from .evaluate import evaluate_checkpoint

    try:
        res = evaluate_checkpoint(cfg, checkpoint)
    except (ValueError, FileNotFoundError, OSError) as e:
        err.print(f"[red]error:[/] {e}", highlight=False)
        raise typer.Exit(1)
    print(f"accuracy={res.accuracy:.3f} n={res.n} mean_length={res.mean_length:.1f}")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
