"""benchmarks/step_time.py runs (a minimal configuration) and ends with its JSON line of ratios."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_step_time_benchmark_prints_its_table_and_ratios(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "step_time.py"), "--rounds", "1", "--warmup", "0",
                          "--max-new-tokens", "6", "--only", "ogls_context,opsd", "--trl-dir", str(tmp_path / "trl")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.strip().splitlines()
    ratios = json.loads(lines[-1])
    assert set(ratios) == {"grpo_over_trl_grpo", "grpo_over_trl_grpo_checkpointing", "ogls_context_over_opsd",
                           "ogls_context_long_over_opsd", "ogls_global_over_opsd", "lambda0_over_rft"}
    assert ratios["ogls_context_over_opsd"] > 0 and ratios["ogls_global_over_opsd"] is None
    rows = [l for l in lines if l.startswith("| ogls_context |") or l.startswith("| opsd |")]
    assert len(rows) == 2
    for row in rows:  # every phase measured, and the phases add up to the total
        cells = [float(c) for c in row.strip("|").split("|")[1:]]
        assert all(c >= 0 for c in cells) and abs(sum(cells[:4]) - cells[4]) < 0.01 + 0.01 * cells[4]


def test_ratios_are_medians_of_per_round_ratios():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import step_time
    finally:
        sys.path.pop(0)
    times = {"grpo": [{"total": t} for t in (2.0, 9.0, 3.0)], "trl_grpo": [{"total": t} for t in (1.0, 10.0, 4.0)]}
    out = step_time.ratios(times)
    assert out["grpo_over_trl_grpo"] == 0.9  # per round 2.0, 0.9, 0.75 (the ratio of medians would be 0.75)
    assert out["ogls_context_over_opsd"] is None
