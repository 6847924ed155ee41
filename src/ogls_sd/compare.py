"""``ogls-sd compare``: the paper's comparison in miniature (issue 6, docs/experiments.md).

Runs every method of :data:`METHODS` that the installed algorithms support, for several seeds, at
equal budgets — the same prompts (``data.seed`` is shared), the same number of optimizer steps,
prompts per step and rollouts per prompt; the rollout tokens each method generated are reported —
each in its own run directory ``<out>/<method>/seed<k>/`` through :func:`ogls_sd.trainer.train`.
The warm start of the tiny model is built once per seed (cached by config hash) and shared by all
methods of that seed. A report (tables + plots, :mod:`ogls_sd.report`) is written into ``<out>``.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from .algorithms import compare_methods
from .config import Config
from .registry import ALGORITHMS

# method name -> (train.algorithm, extra overrides, description): every method that an algorithm
# module registered (algorithms/base.py register_algorithm(..., methods=...)), in registration order
METHODS: dict[str, tuple[str, list[str], str]] = {
    m: (cm.algorithm, list(cm.overrides), cm.description) for m, cm in compare_methods().items()}
DEFAULT_METHODS = [m for m, cm in compare_methods().items() if cm.default]

# The default size: fits about an hour on an idle 2-core CPU (docs/experiments.md has the timing).
DEFAULT_STEPS = 60
DEFAULT_SEEDS = 3
DEFAULT_EVAL_EVERY = 5


@dataclass
class RunSpec:
    method: str
    seed: int
    overrides: list[str]
    out: Path
    status: str = "pending"  # pending | running | done | skipped | failed | cached
    summary: dict = field(default_factory=dict)
    error: str = ""


def method_settings(method: str) -> tuple[str, list[str], str]:
    """``(train.algorithm, overrides, description)`` of a compare method: a registered name, or a
    registered name with settings of its own, ``NAME+section.key=value+...`` (e.g. for tuning:
    ``grpo+train.lr=3e-4``; the run directory is named after the whole string)."""
    name, *own = method.split("+")
    if name not in METHODS:
        raise ValueError(f"--methods: unknown method {name!r}; known: {', '.join(METHODS)} (variants: NAME+section.key=value)")
    bad = [o for o in own if "=" not in o or "/" in o]
    if bad:
        raise ValueError(f"--methods: {method!r}: expected NAME+section.key=value+..., got {bad[0]!r}")
    algo, mov, desc = METHODS[name]
    return algo, [*mov, *own], desc + (f" with {', '.join(own)}" if own else "")


def base_overrides(style: str, steps: int, eval_every: int) -> list[str]:
    """The settings every method shares. ``templated``: rollouts and evaluation are limited to the
    length of the longest plain solution, so a completion that copies the template is cut off."""
    ov = [f"data.arith_style={style}", f"train.steps={steps}", f"eval.every={eval_every}", "train.device=cpu"]
    if style == "templated":
        cfg = Config.load(None, ov)
        from .tasks import get_task

        n = get_task(cfg.data).plain_max_tokens()
        ov += [f"rollout.max_new_tokens={n}", f"eval.max_new_tokens={n}"]
    return ov


def plan_runs(out: Path, methods: list[str], seeds: list[int], style: str, steps: int, eval_every: int,
              extra: list[str], warn=print) -> list[RunSpec]:
    """One :class:`RunSpec` per (method, seed); methods whose algorithm is missing are skipped with a warning."""
    base = base_overrides(style, steps, eval_every)
    runs = []
    for m in methods:
        algo, mov, _ = method_settings(m)
        if algo not in ALGORITHMS:
            warn(f"warning: method {m} skipped: train.algorithm={algo} is not available (ALGORITHMS = {', '.join(ALGORITHMS)})")
            continue
        for s in seeds:
            d = out / m / f"seed{s}"
            # the method's own settings win over the shared extra overrides (ogls_lambda0 stays at lambda = 0),
            # and the explicit knobs (steps, eval every, seed, directory) over both
            ov = base + [f"train.algorithm={algo}", *extra, *mov, f"train.steps={steps}", f"eval.every={eval_every}",
                         f"train.seed={s}", f"train.output_dir={d}"]
            runs.append(RunSpec(m, s, ov, d))
    return runs


def _count_lines(p: Path) -> tuple[int, dict]:
    """Steps logged in ``metrics.jsonl`` so far and the latest record."""
    if not p.is_file():
        return 0, {}
    last, n = {}, 0
    with open(p) as f:
        for line in f:
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if r.get("step", 0) >= 1:
                n, last = r["step"], r
            elif "eval/accuracy" in r:
                last = r
    return n, last


def _table(runs: list[RunSpec]) -> Table:
    t = Table(title="runs", expand=False)
    for c in ("method", "seed", "status", "acc before", "acc after", "rollout tok", "wall s"):
        t.add_column(c, justify="right" if c not in ("method", "status") else "left")
    colours = {"done": "green", "cached": "green", "running": "yellow", "failed": "red", "skipped": "dim"}
    for r in runs:
        s = r.summary
        f = lambda k: f"{s[k]:.3f}" if isinstance(s.get(k), (int, float)) else ""  # noqa: E731
        tok = s.get("rollout_tokens")
        t.add_row(r.method, str(r.seed), f"[{colours.get(r.status, 'white')}]{r.status}[/]", f("accuracy_before"),
                  f("accuracy_after"), f"{tok:,}" if isinstance(tok, int) else "", str(s.get("wall_seconds", "")))
    return t


def _rollout_tokens(run: Path) -> int:
    n = 0
    p = run / "metrics.jsonl"
    if p.is_file():
        for line in open(p):
            r = json.loads(line)
            n += int(r.get("tokens/rollout", 0))
    return n


def warm_start_seed(cfg: Config, progress=None) -> str:
    """Build (or find in the cache) the warm start of ``cfg``'s seed; returns its cache path."""
    if cfg.model.name != "tiny":
        return ""
    from .tasks import get_task, task_templates
    from .warmstart import warm_start

    task = get_task(cfg.data)
    _, _, path = warm_start(cfg, task, task_templates(task), progress)
    return str(path)


def run_compare(out: str | Path, methods: list[str] | None = None, seeds: list[int] | None = None,
                style: str = "templated", steps: int = DEFAULT_STEPS, eval_every: int = DEFAULT_EVAL_EVERY,
                extra: list[str] | None = None, threshold: float | None = None, console: Console | None = None,
                resume: bool = True, threads: int | None = 1) -> dict:
    """Run the comparison; returns the report dict (also written to ``<out>/report.json``).

    ``threads``: torch intra-op threads (default 1: the tiny model gains nothing from more, and on a
    shared CPU OpenMP spin-waiting made 2 threads ~80x slower than 1; None = torch's default).
    """
    import torch

    from . import report

    if threads:
        torch.set_num_threads(threads)

    if console is None:
        console = Console()
        console.soft_wrap = not console.is_terminal  # a log file: whole lines, not wrapped at 80 columns
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    methods = list(methods or DEFAULT_METHODS)
    seeds = list(range(DEFAULT_SEEDS)) if seeds is None else list(seeds)
    runs = plan_runs(out, methods, seeds, style, steps, eval_every, list(extra or []),
                     warn=lambda m: console.print(f"[yellow]{escape(m)}[/]", highlight=False, soft_wrap=True))
    if not runs:
        raise ValueError("no method to run (all requested algorithms are missing)")
    meta = {"methods": methods, "seeds": seeds, "style": style, "steps": steps, "eval_every": eval_every,
            "extra": list(extra or []), "runs": [{"method": r.method, "seed": r.seed, "dir": str(r.out.relative_to(out)),
                                                  "overrides": r.overrides} for r in runs],
            "descriptions": {m: method_settings(m)[2] for m in methods}}
    for r in runs:  # validate every config before spending time
        Config.load(None, r.overrides)
    (out / "compare.json").write_text(json.dumps(meta, indent=1))
    t0 = time.time()
    view = LiveView(console, runs, steps) if console.is_terminal else PlainView(console, runs)
    with view:
        done_ws: set[int] = set()
        for r in runs:
            cfg = Config.load(None, r.overrides)
            if resume and (r.out / "summary.json").is_file() and (r.out / "config.yaml").is_file() \
                    and (r.out / "config.yaml").read_text() == cfg.to_yaml():
                r.status, r.summary = "cached", json.loads((r.out / "summary.json").read_text())
                r.summary["rollout_tokens"] = _rollout_tokens(r.out)
                view.finished(r)
                continue
            if r.seed not in done_ws:
                warm_start_seed(cfg, view.warm_start(r.seed, cfg.warmstart.steps))
                done_ws.add(r.seed)
            view.started(r)
            _run_one(r, cfg, console)
            view.finished(r)
    wall = time.time() - t0
    meta["wall_seconds"] = round(wall, 1)
    meta["status"] = {f"{r.method}/seed{r.seed}": r.status for r in runs}
    (out / "compare.json").write_text(json.dumps(meta, indent=1))
    rep = report.write_report([out], out, threshold=threshold)
    console.print(f"compare: {len(runs)} runs in {wall / 60:.1f} min; report: {out / 'report.md'}", markup=False,
                  soft_wrap=True)
    failed = [r for r in runs if r.status == "failed"]
    if failed:
        console.print(f"[red]{len(failed)} run(s) failed:[/] " + ", ".join(f"{r.method}/seed{r.seed}" for r in failed),
                      soft_wrap=True)
    return rep


def _run_one(r: RunSpec, cfg: Config, console: Console) -> None:
    """Train one run afresh in ``r.out`` (its log in ``train.log``); a failure is recorded, not raised."""
    import shutil

    from .trainer import train

    if r.out.exists():  # a stale or partial run: start it afresh
        shutil.rmtree(r.out)
    r.out.mkdir(parents=True, exist_ok=True)
    (r.out / "run.json").write_text(json.dumps({"method": r.method, "seed": r.seed, "overrides": r.overrides}))
    r.status = "running"
    with open(r.out / "train.log", "w") as log:
        try:
            # a deliberate rerun (--fresh, or a stale run): replaces whatever run was there; the log keeps
            # its lines whole (soft_wrap) instead of wrapping them at the console width
            r.summary = train(cfg, console=Console(file=log, width=120, force_terminal=False, soft_wrap=True),
                              overwrite=True)
            r.summary["rollout_tokens"] = _rollout_tokens(r.out)
            r.status = "done"
        except Exception as e:  # keep going: one failed run must not lose the others
            r.status, r.error = "failed", f"{type(e).__name__}: {e}"
            log.write(f"\nFAILED: {r.error}\n")
            console.print(f"[red]{escape(r.method)} seed {r.seed} failed:[/] {escape(r.error)} "
                          f"(see {escape(str(r.out / 'train.log'))})", highlight=False, soft_wrap=True)


class LiveView:
    """A terminal: progress bars (all runs, the current run's steps) and the runs table, redrawn in
    place while a thread follows the running run's metrics.jsonl."""

    def __init__(self, console: Console, runs: list[RunSpec], steps: int):
        self.runs, self.steps = runs, steps
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TextColumn("{task.fields[info]}"), console=console)
        self.overall = self.progress.add_task("all runs", total=len(runs), info="")
        self.current = self.progress.add_task("-", total=steps, info="")
        self.live = Live(self._view(), console=console, refresh_per_second=2, transient=False)
        self.stop = threading.Event()
        self.active: RunSpec | None = None
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def _view(self):
        return Group(self.progress, _table(self.runs))

    def _poll(self) -> None:  # follow the running run's metrics.jsonl
        while not self.stop.wait(1.0):
            r = self.active
            if r is not None:
                n, last = _count_lines(r.out / "metrics.jsonl")
                self.progress.update(self.current, completed=n, info=_step_info(last))

    def __enter__(self):
        self.live.__enter__()
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(timeout=2)
        return self.live.__exit__(*exc)

    def warm_start(self, seed: int, total: int):
        self.progress.update(self.current, description=f"warm start seed {seed}", completed=0, total=total,
                             info="(shared by all methods of the seed)")
        return _ProgressProxy(self.progress, self.current)

    def started(self, r: RunSpec) -> None:
        self.progress.update(self.current, description=f"{r.method} seed {r.seed}", completed=0, total=self.steps,
                             info="")
        self.active = r
        self.live.update(self._view())

    def finished(self, r: RunSpec) -> None:
        self.active = None
        self.progress.advance(self.overall)
        self.live.update(self._view())


class PlainView:
    """Not a terminal (a log file, a pipe): one plain line per event, nothing redrawn, no bars."""

    def __init__(self, console: Console, runs: list[RunSpec]):
        self.console, self.total, self.n = console, len(runs), 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def _say(self, msg: str) -> None:
        self.console.print(msg, markup=False, highlight=False, soft_wrap=True)

    def warm_start(self, seed: int, total: int):
        self._say(f"warm start seed {seed} (shared by all methods of the seed; at most {total} steps)")
        return _PlainProgress(self.console)

    def started(self, r: RunSpec) -> None:
        self._say(f"[{self.n + 1}/{self.total}] {r.method} seed {r.seed}: running ({r.out / 'train.log'})")

    def finished(self, r: RunSpec) -> None:
        self.n += 1
        s = r.summary
        acc = " ".join(f"{k.removeprefix('accuracy_')} {s[k]:.3f}" for k in ("accuracy_before", "accuracy_after")
                       if isinstance(s.get(k), (int, float)))
        tok = s.get("rollout_tokens")
        extra = [acc, f"rollout tokens {tok:,}" if isinstance(tok, int) else "",
                 f"{s['wall_seconds']} s" if "wall_seconds" in s else ""]
        self._say(f"[{self.n}/{self.total}] {r.method} seed {r.seed}: {r.status}"
                  + "".join(f", {x}" for x in extra if x))


def _step_info(last: dict) -> str:
    info = []
    if "reward/mean" in last:
        info.append(f"reward {last['reward/mean']:.2f}")
    if "eval/accuracy" in last:
        info.append(f"eval acc {last['eval/accuracy']:.3f}")
    if "markers/template" in last:
        info.append(f"tmpl {last['markers/template']:.2f}")
    return "  ".join(info)


class _PlainProgress:
    """The warm start's progress off a terminal: its messages as lines of the console, no bar."""

    def __init__(self, console: Console):
        self.console = console

    def add_task(self, description, total=None, **fields):
        return 0

    def update(self, task_id, advance=None, description=None, **kw):
        pass


class _ProgressProxy:
    """Lets the warm start drive the compare display's current-run bar (it calls add_task/update)."""

    def __init__(self, progress: Progress, task_id):
        self.p, self.t = progress, task_id

    def add_task(self, description, total=None, **fields):
        self.p.update(self.t, description=f"{description} (shared)", total=total, completed=0)
        return self.t

    def update(self, task_id, advance=None, description=None, **kw):
        self.p.update(self.t, advance=advance, description=description)


__all__ = ["DEFAULT_METHODS", "LiveView", "METHODS", "PlainView", "RunSpec", "base_overrides", "method_settings", "plan_runs", "run_compare"]
