#!/usr/bin/env python
"""Peak extra memory and wall time of distillation losses: forward + backward, on CPU, float32.

What one measurement covers: the teacher lm head (under no_grad), the student lm head, the loss,
and ``loss.backward()`` down to the student hidden states and lm-head weight. The inputs (hidden
states, lm-head weights) exist before; "peak extra" is the peak resident set size during the call
minus the resident set size just before it (so it includes the gradients the call produces:
``grad_weight [V, H]`` is 0.58 GiB at V = 152k).

Rows:

* ``plain`` — forward KL(p_T ‖ p_S), one teacher input per row, token mean:
  ``reference`` (ogls_sd.losses.reference), ``chunked`` (ogls_sd.losses.chunked),
  ``trl`` (TRL's ``GKDTrainer.generalized_jsd_loss`` with ``beta=0``: in TRL's convention β = 0 is
  ``F.kl_div(log p_S, log p_T, log_target=True)`` = KL(p_T‖p_S), the forward KL), and ``liger``
  (Liger-Kernel's ``LigerFusedLinearJSDLoss(beta=0, weight_hard_loss=0, weight_soft_loss=1)``, its
  chunked pure-torch path; same convention).
* ``ogls`` — the OGLS-SD target: anchor + 4 positive + 4 negative teacher contexts per row (context
  pooling), per-entry clip τ = 0.05: ``reference`` and ``chunked``.

Each (case, size, implementation) runs in a fresh subprocess: one warm-up call (on the first
min(T, 1024) rows), then ``--reps`` timed calls; the reported numbers are medians. Memory is sampled
from /proc/self/statm every millisecond by a thread; ``ru_maxrss`` after the first timed call minus
the RSS before it is printed as a cross-check. A size whose
predicted peak exceeds ``--max-gib`` (scaled from the implementation's measured peak at the smallest
size) is skipped and reported as not fitting; each child also runs under ``RLIMIT_AS`` (its address
space at start + ``--max-gib``), so a wrong prediction fails with an allocation error instead of
starving the machine.

"matches" compares the loss and two gradient checksums with the reference implementation's values
on the same inputs (with the chunked implementation's where the reference does not fit).

The peer libraries live only in the ``bench`` extra; install them into a separate venv:

    python3 -m venv .venv-bench && .venv-bench/bin/pip install -c constraints-cpu.txt -e ".[bench]"
    .venv-bench/bin/python benchmarks/loss_memory.py

The last line printed is a JSON summary (see ``summary`` below).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import time

from _rss import PAGE, PeakSampler, rss  # benchmarks/ is on sys.path: scripts run by path

H = 1024
SIZES = [(32000, 1024), (32000, 4096), (151936, 1024), (151936, 4096)]
IMPLS = {"plain": ["reference", "chunked", "trl", "liger"], "ogls": ["reference", "chunked"]}
N_CTX = 4  # positive and negative contexts each in the OGLS-SD case
GIB = 2**30


# ------------------------------------------------------------------------------------------ child


def _inputs(case: str, V: int, T: int):
    import torch

    g = torch.Generator().manual_seed(1234)
    W = torch.randn(V, H, generator=g).mul_(2.0 / math.sqrt(H))  # student logits of std ~2
    tW = torch.randn(V, H, generator=g).mul_(0.5 / math.sqrt(H)).add_(W)  # a related teacher head
    h = torch.randn(T, H, generator=g)
    anchor = torch.randn(T, H, generator=g).mul_(0.5).add_(h)
    ctx = None
    if case == "ogls":
        ctx = tuple(torch.randn(N_CTX, T, H, generator=g).mul_(0.7).add_(h) for _ in range(2))
    probe = torch.randn(T, H, generator=g)
    return W, tW, h, anchor, ctx, probe


def _make_fn(case, impl, W, tW, h, anchor, ctx, chunk_size, liger_compiled):
    import torch

    T = h.shape[0]
    if impl in ("reference", "chunked"):
        from ogls_sd.losses import DivergenceSpec, TeacherTarget
        from ogls_sd.losses import chunked, reference

        if case == "plain":
            target = TeacherTarget(weight=tW, anchor_hidden=anchor)
            spec = DivergenceSpec()
        else:
            mask = torch.ones(N_CTX, T, dtype=torch.bool)
            target = TeacherTarget(
                weight=tW, anchor_hidden=anchor, pos_hidden=ctx[0], pos_mask=mask, neg_hidden=ctx[1], neg_mask=mask
            )
            spec = DivergenceSpec(clip="entry", clip_tau=0.05)
        rw = torch.full((T,), 1.0 / T)
        if impl == "reference":
            return lambda hh, WW: reference.distill_loss(hh, WW, None, target, spec, rw).loss
        return lambda hh, WW: chunked.distill_loss(hh, WW, None, target, spec, rw, chunk_size=chunk_size).loss
    if impl == "trl":
        try:
            from trl.experimental.gkd import GKDTrainer
        except ImportError:  # older TRL releases
            from trl import GKDTrainer

        def trl_fn(hh, WW):
            with torch.no_grad():
                teacher_logits = anchor @ tW.t()
            student_logits = hh @ WW.t()
            # [T, V] logits: reduction "batchmean" divides the sum by T, the token mean
            return GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, beta=0.0, reduction="batchmean")

        return trl_fn
    if impl == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        mod = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.0, compiled=liger_compiled)
        labels = torch.zeros(T, dtype=torch.long)
        return lambda hh, WW: mod(hh, WW, anchor, tW, labels)
    raise ValueError(impl)


def child(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    case, V, T, impl = args.child[0], int(args.child[1]), int(args.child[2]), args.child[3]
    W, tW, h, anchor, ctx, probe = _inputs(case, V, T)
    from ogls_sd.losses import auto_chunk_size

    chunk_size = args.chunk_size or auto_chunk_size(V, T)
    fn = _make_fn(case, impl, W, tW, h, anchor, ctx, chunk_size, not args.liger_eager)
    hh, WW = h.requires_grad_(True), W.requires_grad_(True)  # leaves; no copies (ru_maxrss cross-check)
    gc.collect()
    # hard safety net: this process may grow by at most max_gib beyond what it holds now
    with open("/proc/self/statm") as f:
        vm = int(f.read().split()[0]) * PAGE
    limit = vm + int(args.max_gib * GIB)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    sampler = PeakSampler(0.001)
    sampler.start()
    res = {"case": case, "V": V, "T": T, "impl": impl, "chunk_size": chunk_size if impl == "chunked" else None}
    peaks, times = [], []
    try:
        if args.warmup:
            # warm-up (code paths, thread pools, Liger's compiled graph: its chunks have the same shape)
            # on the first min(T, 1024) rows, to keep the largest sizes affordable
            Tw = min(T, 1024)
            wfn = fn if Tw == T else _make_fn(case, impl, WW.detach(), tW, hh.detach()[:Tw], anchor[:Tw],
                                                None if ctx is None else tuple(c[:, :Tw] for c in ctx), chunk_size,
                                                not args.liger_eager)
            hw = hh.detach()[:Tw].clone().requires_grad_(True)
            for _ in range(args.warmup):
                wfn(hw, WW).backward()
                WW.grad = None
            del hw, wfn
        for i in range(args.reps):
            hh.grad = None
            WW.grad = None
            gc.collect()
            base = sampler.reset()
            t0 = time.perf_counter()
            loss = fn(hh, WW)
            loss.backward()
            dt = time.perf_counter() - t0
            time.sleep(0.003)
            peak = max(sampler.peak, rss()) - base
            if i == 0:
                # cross-check: the process's lifetime peak after the first full-size call, minus the RSS
                # just before it (the inputs are made without temporaries and the warm-up is no larger)
                res["maxrss_minus_base_gib"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base) / GIB
                res["loss"] = loss.item()
                res["grad_h_probe"] = float((hh.grad * probe).sum())
                res["grad_w_norm"] = float(WW.grad.norm())
            peaks.append(peak / GIB)
            times.append(dt)
            del loss
        res["peak_gib"] = statistics.median(peaks)
        res["time_s"] = statistics.median(times)
        res["peaks"] = peaks
        res["times"] = times
    except (RuntimeError, MemoryError) as e:  # allocation refused by RLIMIT_AS
        res["error"] = f"out of memory (> {args.max_gib} GiB): {str(e).splitlines()[0][:120]}"
    sampler.stop = True
    print("RESULT " + json.dumps(res), flush=True)


# ----------------------------------------------------------------------------------------- parent


def _run_child(argv_extra, timeout):
    cmd = [sys.executable, os.path.abspath(__file__)] + argv_extra
    env = dict(os.environ)
    env.setdefault("PYTHONWARNINGS", "ignore")
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout} s"}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (p.stderr or p.stdout).strip().splitlines()[-3:]
    return {"error": f"child failed (rc {p.returncode}): {' | '.join(tail)[:300]}"}


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-30)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", default=",".join(f"{v}x{t}" for v, t in SIZES), help="VxT,VxT,...")
    ap.add_argument("--cases", default="plain,ogls")
    ap.add_argument("--impls", default="reference,chunked,trl,liger")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--chunk-size", type=int, default=0, help="rows per block of the chunked loss (0: auto_chunk_size(V))")
    ap.add_argument("--max-gib", type=float, default=13.0, help="largest peak allowed to a child")
    ap.add_argument("--liger-eager", action="store_true", help="run Liger without torch.compile")
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return

    sizes = [tuple(int(x) for x in s.split("x")) for s in args.sizes.split(",")]
    sizes.sort(key=lambda vt: vt[0] * vt[1])
    want = set(args.impls.split(","))
    common = ["--reps", str(args.reps), "--warmup", str(args.warmup), "--threads", str(args.threads),
              "--chunk-size", str(args.chunk_size), "--max-gib", str(args.max_gib)]
    if args.liger_eager:
        common.append("--liger-eager")
    print(f"# loss_memory: H={H}, float32, {args.threads} threads, warm-up {args.warmup} + median of {args.reps}; "
          f"load average at start {os.getloadavg()}", flush=True)
    results = []
    per_elem: dict[tuple[str, str], float] = {}  # (case, impl) -> GiB per T*V element, from the smallest run
    for case in args.cases.split(","):
        for V, T in sizes:
            for impl in IMPLS[case]:
                if impl not in want:
                    continue
                key = (case, impl)
                grad_w = V * H * 4 / GIB
                if key in per_elem:
                    pred = grad_w + per_elem[key] * T * V
                    if pred > args.max_gib:
                        r = {"case": case, "V": V, "T": T, "impl": impl,
                             "error": f"does not fit: predicted {pred:.1f} GiB > {args.max_gib:g} GiB"}
                        results.append(r)
                        print(f"  skip {case} {impl} V={V} T={T}: {r['error']}", flush=True)
                        continue
                t0 = time.time()
                r = _run_child(["--child", case, str(V), str(T), impl] + common, args.timeout)
                r.update(case=case, V=V, T=T, impl=impl)
                results.append(r)
                if "peak_gib" in r and key not in per_elem:
                    per_elem[key] = max(r["peak_gib"] - grad_w, 0.0) / (T * V)
                print(f"  {case:5s} {impl:9s} V={V:6d} T={T:4d}: "
                      + (f"peak {r['peak_gib']:.2f} GiB, {r['time_s']:.2f} s" if "peak_gib" in r else r["error"])
                      + f"  [{time.time() - t0:.0f} s wall]", flush=True)

    # value checks against the reference (or chunked where the reference did not run)
    by = {(r["case"], r["V"], r["T"], r["impl"]): r for r in results}
    for r in results:
        if "loss" not in r:
            continue
        base = by.get((r["case"], r["V"], r["T"], "reference"))
        if base is None or "loss" not in base:
            base = by.get((r["case"], r["V"], r["T"], "chunked"))
        if base is None or "loss" not in base or base is r:
            r["matches"] = "(is reference)" if r["impl"] == "reference" else "n/a"
            continue
        err = max(_rel(r["loss"], base["loss"]), _rel(r["grad_h_probe"], base["grad_h_probe"]),
                  _rel(r["grad_w_norm"], base["grad_w_norm"]))
        r["max_rel_diff"] = err
        r["matches"] = f"{'yes' if err < 1e-4 else 'NO'} ({err:.0e} vs {base['impl']})"

    print()
    head = "| case | V | T | implementation | peak extra (GiB) | time (s) | ru_maxrss − base (GiB) | loss | matches |"
    print(head)
    print("|---|---:|---:|---|---:|---:|---:|---:|---|")
    for r in results:
        if "peak_gib" in r:
            name = r["impl"] + (f" (chunk {r['chunk_size']})" if r.get("chunk_size") else "")
            print(f"| {r['case']} | {r['V']} | {r['T']} | {name} | {r['peak_gib']:.2f} | {r['time_s']:.2f} | "
                  f"{r['maxrss_minus_base_gib']:.2f} | {r['loss']:.6f} | {r.get('matches', '')} |")
        else:
            print(f"| {r['case']} | {r['V']} | {r['T']} | {r['impl']} | — | — | — | — | {r['error']} |")
    print(f"# load average at end {os.getloadavg()}")

    def get(case, V, T, impl, field):
        r = by.get((case, V, T, impl))
        return r.get(field) if r else None

    summary: dict = {}
    both = [(V, T) for V, T in sizes if get("ogls", V, T, "reference", "peak_gib") and get("ogls", V, T, "chunked", "peak_gib")]
    if both:
        V, T = max(both, key=lambda vt: vt[0] * vt[1])
        summary["ogls_ratio_size"] = f"{V}x{T}"
        summary["peak_ratio"] = get("ogls", V, T, "chunked", "peak_gib") / get("ogls", V, T, "reference", "peak_gib")
        summary["time_ratio"] = get("ogls", V, T, "chunked", "time_s") / get("ogls", V, T, "reference", "time_s")
    Vb, Tb = max(sizes, key=lambda vt: vt[0] * vt[1])
    if get("plain", Vb, Tb, "liger", "peak_gib") and get("plain", Vb, Tb, "chunked", "peak_gib"):
        summary["vs_liger_size"] = f"{Vb}x{Tb}"
        summary["vs_liger_peak"] = get("plain", Vb, Tb, "chunked", "peak_gib") / get("plain", Vb, Tb, "liger", "peak_gib")
        summary["vs_liger_time"] = get("plain", Vb, Tb, "chunked", "time_s") / get("plain", Vb, Tb, "liger", "time_s")
    if get("ogls", Vb, Tb, "chunked", "peak_gib") is not None:
        summary[f"ogls_{round(Vb / 1000)}k_{Tb}_peak_gib"] = get("ogls", Vb, Tb, "chunked", "peak_gib")
        summary[f"ogls_{round(Vb / 1000)}k_{Tb}_time_s"] = get("ogls", Vb, Tb, "chunked", "time_s")
    summary["all_match"] = all(r.get("matches", "yes").startswith(("yes", "(is", "n/a")) for r in results)
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in summary.items()}))


if __name__ == "__main__":
    main()
