"""Issue 23's first-hour surprises: a default checkpoint cadence, `eval --help` with only what eval
reads, one suffix on generations files, no FutureWarning on LoRA / gradient-checkpointing runs,
`compare` in a log file (plain lines, no bar frames, no wrapping at 80 columns), and README/docs
links that lead somewhere."""

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ogls_sd.cli import app
from ogls_sd.config import Config

from conftest import TINY_OVERRIDES

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
QUIET = ["eval.every=0", "eval.before_after=false", "train.report_to=none", "steering.no_positive=reference"]


# ------------------------------------------------------------------ a killed run can always resume
def test_default_cadence_leaves_a_checkpoint_before_the_end(tiny_cfg, tmp_path):
    from ogls_sd.trainer import train

    assert Config().train.save_every == 10
    train(tiny_cfg("train.steps=11", "train.keep_last=0", *QUIET))  # train.save_every left at its default
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step_000010", "step_000011"]  # killed during step 11, the run resumes from step 10


# ------------------------------------------------------------------ eval --help
def test_eval_help_lists_only_what_eval_reads():
    runner = CliRunner()
    ev = runner.invoke(app, ["eval", "--help"], env={"COLUMNS": "200"}).output
    tr = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"}).output
    listed = set(re.findall(r"^  ([a-z_]+\.[a-z_0-9]+) \(default", ev, re.M))
    assert {"model.name", "data.task", "templates.student", "rollout.temperature", "rollout.top_p", "rollout.top_k",
            "eval.max_new_tokens", "eval.batch_size", "warmstart.steps"} <= listed
    assert not {k for k in listed if k.split(".")[0] in ("train", "loss", "steering", "grpo", "teacher", "reward")}
    assert "rollout.num_generations" not in listed and "eval.every" not in listed
    assert "train.lr (default" in tr and "loss.divergence (default" in tr  # train still lists everything
    assert "have no effect here" in ev


# ------------------------------------------------------------------ generations file names
def test_generations_file_name_has_one_suffix(tmp_path, monkeypatch, tiny_model, tok):
    from ogls_sd.eval_harness import BenchmarkSpec, evaluate_benchmarks, generations_file
    from ogls_sd.tasks import get_task, task_templates

    assert generations_file("data/gsm60.jsonl") == "generations_data_gsm60.jsonl"
    assert generations_file("math500") == "generations_math500.jsonl"
    assert generations_file("sub/x.parquet") == "generations_sub_x.jsonl"
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    rows = [{"problem": f"What is {i} + {i}?", "answer": str(2 * i), "solution": f"\\boxed{{{2 * i}}}"} for i in range(8)]
    (tmp_path / "data" / "gsm60.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = Config.load(None, ["data.task=data/gsm60.jsonl", "data.eval_size=2", "eval.max_new_tokens=4"])
    task = get_task(cfg.data)
    evaluate_benchmarks(cfg, tiny_model, tok, task, task_templates(task), [BenchmarkSpec.parse("task")], 1, 0,
                        tmp_path / "out", {"name": "tiny"})
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["generations_data_gsm60.jsonl", "results.json"]


# ------------------------------------------------------------------ no FutureWarning
def test_lora_with_gradient_checkpointing_warns_nothing(tiny_cfg, tiny_model, tok):
    """peft reads transformers' deprecated ``is_gradient_checkpointing`` (a FutureWarning on every LoRA
    run); loading, a forward and a backward pass under LoRA + checkpointing now warn nothing."""
    from ogls_sd.models import load_policy

    cfg = tiny_cfg("model.lora=true", "model.lora_r=4", "model.lora_alpha=8", "model.gradient_checkpointing=true",
                   "model.lora_target_modules=q_proj,v_proj")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        policy, *_ = load_policy(cfg, model=tiny_model, tokenizer=tok)
        policy.train()
        ids = torch.randint(3, len(tok), (2, 6))
        policy(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert policy.base_model.model.is_activation_checkpointing  # the setting took effect
    bad = [f"{w.category.__name__}: {w.message}" for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    assert bad == []


# ------------------------------------------------------------------ compare in a log file
def test_compare_in_a_log_file_prints_whole_plain_lines(tmp_path):
    out = tmp_path / ("a_directory_name_long_enough_that_the_final_line_passes_eighty_columns_" + "x" * 20)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", OMP_NUM_THREADS="1", TERM="xterm-256color")
    for k in ("COLUMNS", "FORCE_COLOR", "OGLS_SD_DEBUG", "RANK", "WORLD_SIZE"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "ogls_sd.cli", "compare", "-o", str(out), "--methods", "opsd", "--seed-list", "0",
           "--steps", "1", "--eval-every", "1", "--style", "plain", *TINY_OVERRIDES,
           f"warmstart.cache_dir={tmp_path / 'ws'}", "train.report_to=none"]
    with open(tmp_path / "compare.log", "w") as log:
        res = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=tmp_path, timeout=600)
    text = (tmp_path / "compare.log").read_text()
    assert res.returncode == 0, text
    assert "\x1b[" not in text and "\r" not in text and "━" not in text, text  # no escape codes, no bar frames
    assert "[1/1] opsd seed 0: running" in text and "[1/1] opsd seed 0: done" in text, text
    final = [ln for ln in text.splitlines() if ln.startswith("compare: 1 runs in")]
    assert len(final) == 1 and final[0].endswith(f"report: {out / 'report.md'}") and len(final[0]) > 120, text


# ------------------------------------------------------------------ README / docs links
def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    h = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", h).replace(" ", "-")


def _anchors(md: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)
    return {_slug(m) for m in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def _headings(md: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)
    return {re.sub(r"[`*]", "", m).strip() for m in re.findall(r"^#{1,6} (.+)$", text, re.M)}


DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


@pytest.mark.parametrize("md", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_and_section_references_lead_somewhere(md):
    text = md.read_text()
    bad = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists():
            bad.append(f"{target}: no file {dest}")
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            bad.append(f"{target}: no section #{anchor} in {dest.name}")
    # prose references: `docs/x.md`, "Section" (README) / `x.md`, "Section"
    for path, title in re.findall(r"`((?:docs/)?[\w/.-]+\.md)`, [\"']([^\"']+)[\"']", text):
        dest = (ROOT / path) if path.startswith("docs/") else (md.parent / path)
        if not dest.is_file():
            bad.append(f"`{path}`: no such file")
        elif title not in _headings(dest):
            bad.append(f"`{path}`, \"{title}\": no such section")
    for path in re.findall(r"`(docs/[\w/.-]+\.(?:md|json|png))`", text):
        if not (ROOT / path).is_file():
            bad.append(f"`{path}`: no such file")
    assert bad == [], "\n".join(bad)


def test_compare_on_a_terminal_draws_its_bars_and_table(tmp_path):
    import io

    from rich.console import Console

    from ogls_sd.compare import run_compare

    buf = io.StringIO()
    extra = [*TINY_OVERRIDES, f"warmstart.cache_dir={tmp_path / 'ws'}", "train.report_to=none"]
    run_compare(tmp_path / "out", ["opsd"], [0], style="plain", steps=1, eval_every=1, extra=extra,
                console=Console(file=buf, force_terminal=True, width=120))
    text = buf.getvalue()
    assert "all runs" in text and "━" in text and "opsd" in text and "[1/1]" not in text
    assert json.loads((tmp_path / "out" / "compare.json").read_text())["status"] == {"opsd/seed0": "done"}
