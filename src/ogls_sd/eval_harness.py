"""``ogls-sd eval``: k samples per problem on one or more benchmarks, scored by the same templates
and verifier as training.

Writes into the output directory:

* ``results.json``: per benchmark ``avg@k``, ``pass@1``, ``pass@k`` (unbiased estimator),
  ``maj@k``, ``format_rate``, ``mean_length``, ``n``; and every setting that determines them
  (model, adapter, templates, thinking flags, sampling settings, k, max tokens, seed, verifier,
  package versions);
* ``generations_<benchmark>.jsonl``: every sample with its extracted answer, verdict and reason.

With a fixed seed two runs give identical files (CPU; generation is seeded per benchmark).
"""

from __future__ import annotations

import dataclasses
import json
import platform
from importlib import metadata
from pathlib import Path

import torch

from .config import Config
from .data.example import Example
from .eval_metrics import format_rate, maj_at_k, pass_at_k
from .accuracy import check_eval_prompts, context_limit
from .rollout import SamplingParams, build_eval_backend
from .tasks.base import Task
from .templates import PromptBuilder


@dataclasses.dataclass
class BenchmarkSpec:
    """``name`` is ``task`` (the configured task's held-out set), a registry name, or a file path;
    ``path`` optionally points a registry benchmark at a local file."""

    name: str
    path: str | None = None

    @classmethod
    def parse(cls, s: str) -> "BenchmarkSpec":
        name, _, path = s.partition("=")
        return cls(name.strip(), path.strip() or None)


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("ogls-sd", "torch", "transformers", "peft", "math-verify", "datasets"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def load_eval_examples(spec: BenchmarkSpec, cfg: Config, task: Task) -> tuple[str, list[Example], Task]:
    """``(label, examples, grader)``; the grader is a task (its ``extract``, ``rewards``)."""
    from .data.benchmarks import get_benchmark, load_benchmark
    from .data.files import require_examples
    from .tasks.dataset import DatasetTask

    if spec.name == "task":
        return cfg.data.task, task.examples(cfg.data.eval_size, seed=cfg.data.seed, split="test"), task
    try:
        bench = get_benchmark(spec.name)
    except KeyError:
        bench = None
    if bench is not None:
        res = require_examples(load_benchmark(bench.name, spec.path), spec.path or bench.hub_id)
        grader = DatasetTask(res.examples, name=bench.name, mode=bench.answer_mode)
        return bench.name, res.examples, grader
    if Path(spec.name).is_file():
        from .data.files import load_examples

        cols = {"problem": cfg.data.problem_column, "answer": cfg.data.answer_column,
                "reference": cfg.data.reference_column or None}
        res = require_examples(load_examples(spec.name, columns=cols, policy=cfg.data.policy,
                                             max_chars=cfg.data.max_chars, dedupe=False), spec.name)
        return Path(spec.name).stem, res.examples, DatasetTask(res.examples, name=Path(spec.name).stem)
    raise ValueError(f"--benchmark {spec.name!r}: not 'task', a known benchmark, or an existing file")


DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")


def generations_file(label: str) -> str:
    """``generations_<label>.jsonl``: a benchmark label that is a data file's path keeps its name
    without the suffix (``data/gsm60.jsonl`` -> ``generations_data_gsm60.jsonl``, not ``.jsonl.jsonl``);
    path separators become ``_``."""
    for suffix in DATA_SUFFIXES:
        if label.lower().endswith(suffix) and len(label) > len(suffix):
            label = label[: -len(suffix)]
            break
    return f"generations_{label.replace('/', '_').replace(chr(92), '_')}.jsonl"


def _extract(grader: Task, text: str) -> str | None:
    return grader.extract(text)


def evaluate_benchmarks(cfg: Config, model, tok, task, task_tpl, benchmarks: list[BenchmarkSpec], k: int,
                        seed: int, out_dir: Path, model_info: dict, greedy: bool = False, console=None) -> dict:
    """Evaluate ``model`` on every benchmark; write results.json and generations files."""
    out_dir.mkdir(parents=True, exist_ok=True)
    prompts = PromptBuilder(tok, cfg.templates, task_tpl)
    params = SamplingParams(cfg.eval.max_new_tokens, cfg.rollout.temperature, cfg.rollout.top_p, cfg.rollout.top_k,
                            greedy=greedy)
    backend = build_eval_backend(cfg, model, prompts.pad_id, prompts.eos_id)  # eval.backend (default hf)
    try:
        return _run_benchmarks(cfg, model, tok, task, task_tpl, benchmarks, k, seed, out_dir, model_info, prompts,
                               params, backend, console)
    finally:
        backend.close()


def _run_benchmarks(cfg: Config, model, tok, task, task_tpl, benchmarks: list[BenchmarkSpec], k: int, seed: int,
                    out_dir: Path, model_info: dict, prompts: PromptBuilder, params: SamplingParams, backend,
                    console) -> dict:
    results: dict = {
        "model": model_info,
        "templates": prompts.templates | {"system": cfg.templates.system},
        "student_thinking": cfg.templates.student_thinking,
        "sampling": dataclasses.asdict(params),
        "k": k,
        "max_new_tokens": cfg.eval.max_new_tokens,
        "seed": seed,
        "backend": cfg.eval.backend,
        "verifier": "task grader (arith: integer after last 'A:')" if task_tpl else
                    "ogls_sd.rewards.verifier: last \\boxed{} / #### / Answer:, pre-filter, math-verify in worker processes with a time limit",
        "versions": _versions(),
        "benchmarks": {},
    }
    for spec in benchmarks:
        label, examples, grader = load_eval_examples(spec, cfg, task)
        prompt_ids = [prompts.student_ids(ex) for ex in examples]
        check_eval_prompts(examples, prompt_ids, params.max_new_tokens, context_limit(model), f"{label} example")
        torch.manual_seed(seed)
        ids = [p for p in prompt_ids for _ in range(k)]
        comps = backend.generate(ids, params)
        texts = [tok.decode(c.ids, skip_special_tokens=True) for c in comps]
        answers = [_extract(grader, t) for t in texts]
        golds = [ex.answer for ex in examples for _ in range(k)]
        correct = [r > 0.5 for r in grader.rewards(texts, golds)]
        per_pass1, per_passk, per_maj = [], [], []
        with open(out_dir / generations_file(label), "w") as f:
            for i, ex in enumerate(examples):
                sl = slice(i * k, (i + 1) * k)
                c = sum(correct[sl])
                per_pass1.append(pass_at_k(k, c, 1))
                per_passk.append(pass_at_k(k, c, k))
                per_maj.append(float(maj_at_k(answers[sl], correct[sl], k)))
                for j in range(k):
                    idx = i * k + j
                    f.write(json.dumps({"id": ex.id, "sample": j, "problem": ex.problem, "gold": ex.answer,
                                        "completion": texts[idx], "extracted": answers[idx],
                                        "correct": bool(correct[idx]), "length": len(comps[idx].ids),
                                        "finished": comps[idx].finished}, sort_keys=True) + "\n")
        n = max(1, len(examples))
        results["benchmarks"][label] = {
            "n": len(examples),
            f"avg@{k}": sum(correct) / max(1, len(correct)),
            "pass@1": sum(per_pass1) / n,
            f"pass@{k}": sum(per_passk) / n,
            f"maj@{k}": sum(per_maj) / n,
            "format_rate": format_rate(answers),
            "mean_length": sum(len(c.ids) for c in comps) / max(1, len(comps)),
            "source": spec.path or spec.name,
        }
    (out_dir / "results.json").write_text(json.dumps(results, indent=1, sort_keys=True))
    if console is not None:
        _print_table(results, k, console)
    return results


def protocol(sampling: dict, k: int) -> str:
    """The decoding protocol in words, for every table: ``greedy`` or ``sampled T=1.0 top-p=0.95 top-k=20, k=4``
    (training's held-out accuracy is greedy; ``ogls-sd eval`` samples unless --greedy)."""
    if sampling.get("greedy"):
        return f"greedy, k={k}"
    extra = (f" top-p={sampling['top_p']}" if sampling.get("top_p", 1.0) < 1.0 else "") + \
        (f" top-k={sampling['top_k']}" if sampling.get("top_k", 0) > 0 else "")
    return f"sampled T={sampling.get('temperature')}{extra}, k={k}"


def _print_table(results: dict, k: int, console) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"ogls-sd eval ({protocol(results['sampling'], k)}, seed={results['seed']})")
    passes = ["pass@1"] + ([f"pass@{k}"] if k > 1 else [])  # k = 1: one pass@1 column, not two equal ones
    for col in ("benchmark", "n", f"avg@{k}", *passes, f"maj@{k}", "format", "mean len"):
        t.add_column(col, justify="right" if col != "benchmark" else "left")
    for name, r in results["benchmarks"].items():
        t.add_row(name, str(r["n"]), f"{r[f'avg@{k}']:.3f}", *(f"{r[p]:.3f}" for p in passes),
                  f"{r[f'maj@{k}']:.3f}", f"{r['format_rate']:.3f}", f"{r['mean_length']:.1f}")
    if not console.is_terminal:  # a log or a pipe: rich would squeeze the table into 80 columns
        console = Console(file=console.file, width=max(console.width, 200), force_terminal=False)
    console.print(t)
