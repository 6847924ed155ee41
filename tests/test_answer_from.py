"""Answers derived from reference solutions (issue 14 item 1): ``data.answer_from=reference_boxed``
takes the last non-empty outermost ``\\boxed{}`` of the reference column, so OpenThoughts-shaped
data (``problem``, ``solution``, no answer column) trains as shipped in the Qwen presets."""

import json
from pathlib import Path

import pytest

from ogls_sd.config import Config, ConfigError
from ogls_sd.data.files import DataError
from ogls_sd.tasks import answer_extractor, get_task

from conftest import TINY_OVERRIDES

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def _openthoughts(path: Path, n: int = 20, unboxed: tuple[int, ...] = ()) -> Path:
    rows = []
    for i in range(n):
        a, b = 10 + i, 3 * i + 1
        sol = f"We add {a} and {b}.\nFirst {a}+{b}={a + b}.\nSo the answer is $\\boxed{{{a + b}}}$. \\boxed{{}}"
        if i in unboxed:
            sol = f"We add {a} and {b} and get {a + b}."
        rows.append({"source": "synthetic", "problem": f"What is {a}+{b}?", "solution": sol, "correct": True})
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_answers_come_from_the_last_box_of_the_reference(tmp_path):
    p = _openthoughts(tmp_path / "ot.jsonl", unboxed=(3,))
    cfg = Config.load(None, [f"data.task={p}", "data.answer_from=reference_boxed", "data.policy=skip"])
    task = get_task(cfg.data)
    exs = task.all_examples
    assert len(exs) == 19 and task.skipped == 1  # the row without a box is skipped and counted
    assert {e.problem: e.answer for e in exs}["What is 12+7?"] == "19"  # the empty box after it is ignored
    with pytest.raises(DataError) as ei:  # policy=error names the row and the field
        get_task(Config.load(None, [f"data.task={p}", "data.answer_from=reference_boxed"]).data)
    assert ei.value.row == 4 and ei.value.field == "answer" and "boxed" in str(ei.value)
    # without the option the same file fails on the missing answer column, as before
    with pytest.raises(DataError, match="answer"):
        get_task(Config.load(None, [f"data.task={p}"]).data)


def test_a_hedged_box_is_a_bad_row():
    f = answer_extractor("reference_boxed")
    assert f(r"so $\boxed{\frac{1}{2}}$") == r"\frac{1}{2}"
    with pytest.raises(ValueError, match="hedge"):
        f(r"\boxed{12 \text{ or } \boxed{13}}")


def test_answer_from_accepts_a_user_extractor_and_rejects_nonsense(tmp_path, monkeypatch):
    (tmp_path / "myext.py").write_text("def last_line(text):\n    return text.strip().splitlines()[-1].split()[-1].rstrip('.')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    p = _openthoughts(tmp_path / "ot.jsonl", n=6, unboxed=tuple(range(6)))
    task = get_task(Config.load(None, [f"data.task={p}", "data.answer_from=myext:last_line"]).data)
    assert {e.problem: e.answer for e in task.all_examples}["What is 11+4?"] == "15"
    with pytest.raises(ConfigError, match="data.answer_from"):
        Config.load(None, ["data.answer_from=boxed please"])
    with pytest.raises(ConfigError, match="reference_column"):
        Config.load(None, ["data.answer_from=reference_boxed", "data.reference_column="])


def test_the_ogls_preset_data_section_trains_on_openthoughts_shaped_data(tmp_path):
    """configs/ogls_sd_qwen3_1.7b.yaml's data section unchanged except data.task (a local
    OpenThoughts-shaped file without an answer column), with the tiny model, one step."""
    from ogls_sd.trainer import train

    p = _openthoughts(tmp_path / "ot.jsonl")
    preset = Config.load(CONFIGS / "ogls_sd_qwen3_1.7b.yaml")
    assert preset.data.answer_from == "reference_boxed" and preset.data.policy == "error"
    tiny = [o for o in TINY_OVERRIDES if not o.startswith("data.")] + [
        f"data.task={p}", "model.name=tiny", "model.lora=false", "model.dtype=float32", "train.mixed_precision=no",
        "train.device=cpu", "train.report_to=none", "eval.before_after=false", "train.micro_batch_size=8",
        f"warmstart.cache_dir={tmp_path / 'ws'}", f"train.output_dir={tmp_path / 'run'}"]
    cfg = Config.load(CONFIGS / "ogls_sd_qwen3_1.7b.yaml", tiny)
    data_keys = {k: v for k, v in cfg.data.__dict__.items() if k != "task"}
    assert data_keys == {k: v for k, v in preset.data.__dict__.items() if k != "task"}  # data section as shipped
    summary = train(cfg)
    assert summary["steps"] == 1
    rec = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if l.strip()]
    assert any(r.get("step") == 1 for r in rec)
