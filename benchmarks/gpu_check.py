#!/usr/bin/env python
"""GPU check: a few OGLS-SD steps end to end on a small in-process Llama, with the HF rollout
backend and (when ``import vllm`` works) the vLLM backend; token-id contract checks; throughput.

Needs no internet: the model is the built-in char-level tokenizer + ``tiny_llama`` at a bigger size
(``--hidden 512 --layers 8`` by default, ~34M parameters), warm-started in-process on the arith task.
For each backend it runs ``ogls_sd.trainer.train`` (``train.device=cuda``,
``train.mixed_precision=bf16``) and then reports:

* contract: the prompts the backend received are exactly the step's student prompt ids; every
  completion ends with EOS iff ``finished`` and holds no EOS before its end; appended to the
  teacher (privileged) prompt its ids form exactly the completion slice; with vLLM, the sampling
  log-probs it returned agree with a teacher-forced HF forward pass over the same ids (a single
  shifted or re-tokenised id shows as a difference of several nats);
* throughput from ``metrics.jsonl`` (mean over the steps after the first): rollout tokens/s,
  step / rollout / train seconds, completion tokens trained per second;
* teacher (no-grad forward) and student (forward + backward) tokens/s of the backbone on the
  recorded rollouts (prompt + completion tokens per second).

Usage (GPU; sized to finish in < 8 minutes including vLLM start-up - not yet measured)::

    python benchmarks/gpu_check.py                       # hf, then vllm if importable
    python benchmarks/gpu_check.py --backends hf         # only the HF backend
    python benchmarks/gpu_check.py --cpu --tiny          # seconds on a laptop CPU (what the tests run)

Prints a table and, last, one JSON line; writes it to ``<out>/gpu_check.json``. Exit status 1 when a
check failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

LOGPROB_TOL = 0.1  # mean |vLLM - HF| per token, nats (bf16 engines differ by ~0.01-0.05)


def overrides(a: argparse.Namespace) -> list[str]:
    if a.tiny:
        size = ["model.tiny_hidden=32", "model.tiny_layers=1", "model.tiny_heads=2", "model.tiny_intermediate=64",
                "warmstart.steps=2", "warmstart.batch_size=8", "warmstart.check_size=4", "rollout.max_new_tokens=16", "rollout.num_generations=4",
                "train.prompts_per_step=2", "train.micro_batch_size=8", "steering.max_contexts=2"]
        steps = a.steps or 2
    else:
        size = [f"model.tiny_hidden={a.hidden}", f"model.tiny_layers={a.layers}", f"model.tiny_heads={a.heads}",
                f"model.tiny_intermediate={4 * a.hidden}", f"warmstart.steps={a.warmstart_steps}", "warmstart.target_accuracy=0", "warmstart.batch_size=64",
                "warmstart.lr=1e-3", "rollout.max_new_tokens=64", "rollout.num_generations=8",
                "train.prompts_per_step=16", "train.micro_batch_size=64"]
        steps = a.steps or 5
    dev = ["train.device=cpu"] if a.cpu else ["train.device=cuda", "train.mixed_precision=bf16"]
    return ["model.name=tiny", *size, *dev, f"train.steps={steps}", "eval.before_after=false",
            f"warmstart.cache_dir={Path(a.out) / 'warmstart'}", "train.report_to=none"]


class Recorder:
    """Wraps the trainer's rollout backend: records the first generate call and, for backends that
    report log-probs, compares them with a teacher-forced forward of the model that sampled them."""

    def __init__(self, inner, model, eos_id: int, max_new_tokens: int):
        self.inner, self.model, self.eos_id, self.max_new = inner, model, eos_id, max_new_tokens
        self.first: tuple[list[list[int]], list] | None = None
        self.errors: list[str] = []
        self.logprob_diff: float | None = None

    def sync_weights(self, model):
        return self.inner.sync_weights(model)

    def close(self):
        return getattr(self.inner, "close", lambda: None)()

    def generate(self, prompts, params):
        comps = self.inner.generate(prompts, params)
        if self.first is None:
            self.first = ([list(p) for p in prompts], comps)
            self._check(prompts, comps, params)
        return comps

    @torch.no_grad()
    def _check(self, prompts, comps, params) -> None:
        if len(comps) != len(prompts):
            self.errors.append(f"{len(comps)} completions for {len(prompts)} prompts")
        for k, c in enumerate(comps):
            if c.finished != (bool(c.ids) and c.ids[-1] == self.eos_id) or self.eos_id in c.ids[:-1]:
                self.errors.append(f"completion {k}: finished={c.finished} but ids end {c.ids[-3:]}")
            if len(c.ids) > params.max_new_tokens:
                self.errors.append(f"completion {k}: {len(c.ids)} > max_new_tokens")
        with_lp = [(p, c) for p, c in zip(prompts, comps) if c.logprobs is not None and c.ids]
        if not with_lp:
            return
        m = self.model.module if hasattr(self.model, "module") else self.model
        dev = next(m.parameters()).device
        diffs = []
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            for p, c in with_lp[:64]:
                logits = m(torch.tensor([list(p) + c.ids], device=dev)).logits[0].float()
                lp = torch.log_softmax(logits, -1)
                ref = lp[len(p) - 1 : len(p) - 1 + len(c.ids)].gather(1, torch.tensor(c.ids, device=dev)[:, None])[:, 0]
                diffs.append((ref.cpu() - torch.tensor(c.logprobs)).abs().mean().item())
        self.logprob_diff = sum(diffs) / len(diffs)
        if self.logprob_diff > LOGPROB_TOL:
            self.errors.append(f"engine log-probs differ from a teacher-forced HF forward by {self.logprob_diff:.3f} "
                               f"nats/token (> {LOGPROB_TOL}): token ids are misaligned or the weights were not synced")


def contract_against_builder(cfg, rec: Recorder) -> list[str]:
    """The first step's prompts and completions against the PromptBuilder's student/teacher ids."""
    from ogls_sd.models import load_policy
    from ogls_sd.templates import PromptBuilder, join_completion

    errors = []
    _, tok, task, tpl, _ = load_policy(cfg)  # the warm start is cached: no training here
    pb = PromptBuilder(tok, cfg.templates, tpl)
    exs = task.examples(cfg.train.prompts_per_step, seed=cfg.data.seed * 1_000_003, split="train")  # the trainer's step 0
    G = cfg.rollout.num_generations
    prompts, comps = rec.first
    want = [pb.student_ids(ex) for ex in exs for _ in range(G)]
    if prompts != want:
        errors.append("the backend did not receive the step's student prompt ids unchanged")
    for k, c in enumerate(comps):
        t = pb.teacher_ids(exs[k // G])
        seq, start = join_completion(t, c.ids)
        if seq[:start] != t or seq[start:] != c.ids:
            errors.append(f"completion {k}: teacher sequence slice != student completion ids")
    return errors


def backbone_throughput(cfg, rec: Recorder, reps: int = 3) -> dict:
    """Teacher (no-grad forward) and student (forward + backward) backbone tokens/s on the first
    step's rollouts, each sequence being student prompt + completion."""
    from ogls_sd.modeling import SeqBatch, completion_hidden
    from ogls_sd.models import load_policy
    from ogls_sd.teacher import Teacher

    dev = torch.device("cpu" if cfg.train.device == "cpu" else "cuda")
    policy = load_policy(cfg)[0].to(dev)
    prompts, comps = rec.first
    pairs = [(p, c.ids) for p, c in zip(prompts, comps) if c.ids]
    batch = SeqBatch([p + ids for p, ids in pairs], [len(p) for p, _ in pairs], [len(ids) for _, ids in pairs])
    tokens = sum(len(p) + len(ids) for p, ids in pairs)
    pad = 0
    bf16 = dict(device_type=dev.type, dtype=torch.bfloat16, enabled=cfg.train.mixed_precision == "bf16")
    teacher = Teacher(policy, "live")

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def timed(fn) -> float:
        fn()  # warm-up
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        return (time.perf_counter() - t0) / reps

    def teacher_fwd():
        with torch.autocast(**bf16):
            teacher.hidden(batch, pad, micro_batch=cfg.train.micro_batch_size)

    def student_fwd_bwd():
        policy.train()
        with torch.autocast(**bf16):
            h = completion_hidden(policy, batch, pad, micro_batch=cfg.train.micro_batch_size)
        h.float().pow(2).mean().backward()
        policy.zero_grad(set_to_none=True)

    tt, ts = timed(teacher_fwd), timed(student_fwd_bwd)
    return {"backbone_tokens": tokens, "teacher_tok_s": tokens / tt, "student_fwd_bwd_tok_s": tokens / ts}


def metrics_summary(path: Path, sequences_per_step: int) -> dict:
    recs = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
    rest = recs[1:] or recs  # the first step includes compilation / allocator warm-up
    mean = lambda k: sum(r.get(k, 0.0) for r in rest) / len(rest)  # noqa: E731
    trained = [r.get("completion/len_mean", 0.0) * sequences_per_step / max(r.get("time/train_s", 0.0), 1e-9) for r in rest]
    return {
        "train_completion_tok_s": sum(trained) / len(trained),
        "steps": len(recs),
        "step_s": mean("time/step_s"),
        "rollout_s": mean("time/rollout_s"),
        "train_s": mean("time/train_s"),
        "rollout_tok_s": mean("throughput/rollout_tok_s"),
        "completion_len_mean": mean("completion/len_mean"),
        "reward_mean": mean("reward/mean"),
        "loss_finite": all(isinstance(r.get("loss"), (int, float)) and r["loss"] == r["loss"] for r in recs),
    }


def run_backend(backend: str, a: argparse.Namespace) -> dict:
    import ogls_sd.trainer as trainer_mod
    from ogls_sd.config import Config

    out = Path(a.out) / backend
    extra = [f"rollout.backend={backend}", f"train.output_dir={out}"]
    if backend == "vllm":
        extra += [f"rollout.vllm_gpu_memory_utilization={a.vllm_gpu_memory_utilization}",
                  f"rollout.vllm_enforce_eager={str(a.vllm_eager).lower()}"]
    cfg = Config.load(None, overrides(a) + extra)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    holder: dict = {}
    real_build = trainer_mod.build_backend

    def recording_build(rollout, model, pad_id, eos_id, **kw):
        holder["rec"] = Recorder(real_build(rollout, model, pad_id, eos_id, **kw), model, eos_id, rollout.max_new_tokens)
        return holder["rec"]

    trainer_mod.build_backend = recording_build
    t0 = time.time()
    try:
        summary = trainer_mod.train(cfg, overwrite=True)  # a deliberate rerun into the same directory
    finally:
        trainer_mod.build_backend = real_build
    wall = time.time() - t0
    rec: Recorder = holder["rec"]
    errors = list(rec.errors)
    if rec.first is None:
        errors.append("no rollouts were generated")
    else:
        errors += contract_against_builder(cfg, rec)
    seqs = cfg.train.prompts_per_step * cfg.rollout.num_generations
    res = {"backend": backend, "device": "cpu" if a.cpu else torch.cuda.get_device_name(0), "train_wall_s": wall,
           **metrics_summary(out / "metrics.jsonl", seqs), "logprob_mean_abs_diff": rec.logprob_diff,
           "sequences_per_step": seqs, "checkpoint": summary.get("checkpoint")}
    if rec.first is not None:
        res.update(backbone_throughput(cfg, rec))
    if not res["loss_finite"]:
        errors.append("non-finite loss")
    res["errors"] = errors
    res["ok"] = not errors
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="run on CPU (fp32)")
    ap.add_argument("--tiny", action="store_true", help="a 1-layer model, 2 steps: seconds on a CPU")
    ap.add_argument("--backends", default="auto", help="comma list of hf,vllm; auto = hf, plus vllm when importable (GPU)")
    ap.add_argument("--steps", type=int, default=0, help="training steps per backend (default 5; 2 with --tiny)")
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--warmstart-steps", type=int, default=150)
    ap.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.3)
    ap.add_argument("--vllm-eager", action="store_true", help="vLLM without CUDA graphs (faster start)")
    ap.add_argument("--out", default="runs/gpu_check")
    a = ap.parse_args(argv)
    if not a.cpu and not torch.cuda.is_available():
        print("no CUDA device: run with --cpu (add --tiny for a quick check)", file=sys.stderr)
        return 2
    if a.backends == "auto":
        backends = ["hf"] + (["vllm"] if not a.cpu and importlib.util.find_spec("vllm") is not None else [])
    else:
        backends = [b.strip() for b in a.backends.split(",") if b.strip()]
    Path(a.out).mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    results = []
    for b in backends:
        try:
            results.append(run_backend(b, a))
        except Exception as e:  # noqa: BLE001 - reported, the other backends still run
            results.append({"backend": b, "ok": False, "errors": [f"{type(e).__name__}: {e}"]})
    cols = ("backend", "ok", "step_s", "rollout_s", "train_s", "rollout_tok_s", "train_completion_tok_s", "teacher_tok_s",
            "student_fwd_bwd_tok_s", "logprob_mean_abs_diff", "reward_mean")
    print("  ".join(f"{c:>14}" for c in cols))
    for r in results:
        cells = []
        for c in cols:
            v = r.get(c)
            cells.append(f"{v:>14.3f}" if isinstance(v, float) else f"{str(v):>14}")
        print("  ".join(cells))
        for e in r.get("errors", []):
            print(f"  [{r['backend']}] FAILED: {e}")
    summary = {"ok": all(r.get("ok") for r in results), "wall_s": round(time.time() - t0, 1),
               "torch": torch.__version__, "results": results}
    (Path(a.out) / "gpu_check.json").write_text(json.dumps(summary, indent=1, default=str))
    print(json.dumps(summary, default=str))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
