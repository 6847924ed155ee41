"""Build the tiny model's warm starts exactly as ``ogls-sd compare`` does (same overrides) and
print one table row per (variant, seed): warm-start steps, why it stopped (target, best_in_band,
cap), wall and CPU seconds (the machine is shared, so CPU seconds compare better) and the greedy accuracy of
every prompt format. One torch thread. Rows are appended to ``--out`` (JSON lines) as they finish.

    python benchmarks/warmstart_table.py --seeds 0,1,2 --styles templated,plain --out runs/ws.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ogls_sd.compare import DEFAULT_EVAL_EVERY, DEFAULT_STEPS, base_overrides, warm_start_seed
from ogls_sd.config import Config
from ogls_sd.warmstart import FORMATS, read_record

COLUMNS = ("style", "seed", "steps", "stopped", "wall_s", "cpu_s", *FORMATS)


def build_one(style: str, seed: int, extra: list[str]) -> dict:
    """Warm-start one (variant, seed) with compare's overrides; returns its table row."""
    ov = base_overrides(style, DEFAULT_STEPS, DEFAULT_EVAL_EVERY) + [f"train.seed={seed}", *extra]
    cfg = Config.load(None, ov)
    t0, c0 = time.time(), time.process_time()
    path = Path(warm_start_seed(cfg))
    wall, cpu = time.time() - t0, time.process_time() - c0
    rec = read_record(path)
    return {"style": style, "seed": seed, "steps": rec.get("steps"), "stopped": rec.get("stopped"),
            "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            **{f: rec.get("accuracy", {}).get(f) for f in FORMATS}, "path": str(path)}


def markdown_row(row: dict) -> str:
    cells = [row["style"], str(row["seed"]), str(row["steps"]), str(row["stopped"]), f"{row['wall_s']:.0f}", f"{row['cpu_s']:.0f}"]
    cells += [f"{100 * row[f]:.0f}" if isinstance(row[f], float) else "?" for f in FORMATS]
    return "| " + " | ".join(cells) + " |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated train.seed values")
    ap.add_argument("--styles", default="templated,plain", help="comma-separated data.arith_style values")
    ap.add_argument("--out", default="", help="append each row as a JSON line to this file")
    ap.add_argument("overrides", nargs="*", help="extra config overrides (key=value)")
    a = ap.parse_args()
    torch.set_num_threads(1)
    print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS), flush=True)
    for style in a.styles.split(","):
        for seed in (int(s) for s in a.seeds.split(",")):
            row = build_one(style, seed, a.overrides)
            print(markdown_row(row), flush=True)
            if a.out:
                with open(a.out, "a") as f:
                    f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
