"""Bad input: arbitrary data files load or fail with DataError (never hang, never another error);
prompts that cannot fit the context are a clear error; training with policy=skip reports skips."""

import json
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ogls_sd.config import Config
from ogls_sd.data.files import DataError, load_examples
from ogls_sd.trainer import train

from conftest import TINY_OVERRIDES


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)), max_size=12))
def test_arbitrary_jsonl_bytes_load_or_raise_dataerror(tmp_path, lines):
    p = tmp_path / "x.jsonl"
    p.write_bytes(b"\n".join(lines))
    for policy in ("error", "skip"):
        t = time.monotonic()
        try:
            res = load_examples(p, policy=policy)
            assert all(ex.problem and ex.answer for ex in res.examples)
        except DataError as e:
            assert "x.jsonl" in str(e)
        assert time.monotonic() - t < 5


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.dictionaries(st.sampled_from(["problem", "solution", "answer", "x"]),
                                st.one_of(st.none(), st.integers(), st.floats(), st.text(max_size=30),
                                          st.lists(st.integers(), max_size=2))), max_size=8))
def test_arbitrary_json_rows_load_or_raise_dataerror_naming_row(tmp_path, rows):
    p = tmp_path / "rows.json"
    p.write_text(json.dumps(rows))
    try:
        res = load_examples(p, policy="error")
        assert len(res.examples) + res.duplicates == len(rows)
    except DataError as e:
        assert "rows.json" in str(e) and "row" in str(e)
    res = load_examples(p, policy="skip")
    assert len(res.examples) + res.skipped + res.duplicates == len(rows)


def _cfg(tmp_path, *extra):
    return Config.load(None, TINY_OVERRIDES + [f"warmstart.cache_dir={tmp_path / 'ws'}", f"train.output_dir={tmp_path / 'run'}",
                                               "eval.before_after=false", *extra])


def test_prompt_longer_than_context_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"exceeds the model's context of \d+ tokens"):
        train(_cfg(tmp_path, "rollout.max_new_tokens=100000"))


def test_training_on_a_file_with_every_7th_row_broken(tmp_path):
    p = tmp_path / "d.jsonl"
    lines = []
    for i in range(1, 50):
        row = {"problem": f"{i}+{i}", "solution": f"{i}+{i}={2 * i}", "answer": str(2 * i)}
        if i % 7 == 0:
            row.pop("answer")
        lines.append(json.dumps(row))
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"d\.jsonl.*line 7.*answer"):
        train(_cfg(tmp_path, f"data.task={p}"))
    summary = train(_cfg(tmp_path, f"data.task={p}", "data.policy=skip", "templates.task_defaults=false"))
    assert summary["data_skipped"] == 7


def test_warm_start_built_concurrently_elsewhere_is_used_and_tmp_removed(tmp_path, tiny_cfg, monkeypatch):
    """Two processes (e.g. on two nodes sharing the cache) build the same warm start: the second
    to finish finds the first one's directory, keeps it and removes its own temporary copy."""
    import shutil

    from transformers import PreTrainedModel

    from ogls_sd.tasks.arith import TEMPLATES, ArithTask
    from ogls_sd.warmstart import cache_key, warm_start

    cfg = tiny_cfg()
    final = tmp_path / "ws" / cache_key(cfg)
    real_save = PreTrainedModel.save_pretrained

    def save_then_lose_the_race(self, d, *a, **k):
        real_save(self, d, *a, **k)
        if not final.exists():  # the other process finishes first, with its own copy
            real_save(self, final, *a, **k)
            (final / "other.txt").write_text("the other process's copy")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", save_then_lose_the_race)
    model, _, path = warm_start(cfg, ArithTask(), TEMPLATES)
    assert path == final and (final / "other.txt").is_file()  # the first finished copy is kept
    assert [p.name for p in final.parent.iterdir()] == [final.name]  # no temporary directory left
    assert sum(p.numel() for p in model.parameters()) > 0
    shutil.rmtree(final.parent)
