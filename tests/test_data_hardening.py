"""Data and evaluation hardening: the context rule in held-out accuracy and the eval harness,
unterminated CSV quotes, duplicate problems, and the message when every row of a file is bad."""

import json
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ogls_sd.config import Config
from ogls_sd.data.example import Example
from ogls_sd.data import files
from ogls_sd.data.files import DataError, load_examples
from ogls_sd.tasks import get_task
from ogls_sd.tasks.dataset import DatasetTask
from ogls_sd.trainer import train

from conftest import TINY_OVERRIDES


def _cfg(tmp_path, *extra):
    return Config.load(None, TINY_OVERRIDES + [f"warmstart.cache_dir={tmp_path / 'ws'}", f"train.output_dir={tmp_path / 'run'}",
                                               "templates.task_defaults=false", *extra])


def _rows(n: int) -> list[dict]:
    return [{"problem": f"What is {i}+{i}?", "solution": f"{i}+{i}={2 * i}", "answer": str(2 * i)} for i in range(1, n + 1)]


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


LONG = "Add the numbers. " + "1+" * 1500 + "1"  # ~3000 characters: ~3000 tokens, context 1024


# ------------------------------------------------------------------ 11. one context rule everywhere


def _file_with_long_heldout_problem(tmp_path) -> Path:
    """12 problems; one of those the task holds out (2: data.eval_fraction_max=0.2 caps data.eval_size=4) is 3000 characters long."""
    p = tmp_path / "d.jsonl"
    rows = _rows(12)
    split = DatasetTask([Example(r["problem"], "", r["answer"], str(i)) for i, r in enumerate(rows)], test_size=4, max_test_fraction=0.2,
                        name=str(p))  # as get_task splits it (data.eval_fraction_max=0.2)
    held_out = int(split.examples(4, seed=0, split="test")[0].id)
    rows[held_out]["problem"] = LONG
    return _write_jsonl(p, rows)


@pytest.mark.parametrize("when", [["eval.before_after=true"], ["eval.before_after=false", "eval.every=1"]],
                         ids=["before_after", "every"])
def test_held_out_problem_longer_than_context_is_a_clear_error_before_training(tmp_path, when):
    p = _file_with_long_heldout_problem(tmp_path)
    # the tiny model's warm start checks its formats first (with its own budget), then training its held-out set
    with pytest.raises(ValueError, match=r"(held-out|warm-start check) example .*student prompt has \d+ tokens; with "
                                         r"(eval\.max_new_tokens=12|the warm-start budget=\d+) it exceeds the model's "
                                         r"context of 1024 tokens"):
        train(_cfg(tmp_path, f"data.task={p}", *when))
    assert not (tmp_path / "run" / "metrics.jsonl").is_file() or not (tmp_path / "run" / "metrics.jsonl").read_text()


def test_evaluate_accuracy_checks_the_context(tok, tiny_model):
    from ogls_sd.accuracy import evaluate_accuracy
    from ogls_sd.templates import PromptBuilder

    pb = PromptBuilder(tok, Config().templates, None)
    task = DatasetTask([Example("1+1", "", "2", "a"), Example(LONG, "", "2", "b")])
    with pytest.raises(ValueError, match=r"held-out example 'b': the student prompt has \d+ tokens.*eval\.max_new_tokens=8"):
        evaluate_accuracy(tiny_model, tok, pb, task, task.all_examples, max_new_tokens=8)
    assert evaluate_accuracy(tiny_model, tok, pb, task, task.all_examples[:1], max_new_tokens=8).n == 1
    # the generation limit alone can be too long as well
    with pytest.raises(ValueError, match="exceeds the model's context of 1024"):
        evaluate_accuracy(tiny_model, tok, pb, task, task.all_examples[:1], max_new_tokens=1024)


def test_eval_harness_checks_the_context(tmp_path, tok, tiny_model):
    from ogls_sd.eval_harness import BenchmarkSpec, evaluate_benchmarks

    bench = _write_jsonl(tmp_path / "bench.jsonl", _rows(2) + [{"problem": LONG, "answer": "1501"}])
    cfg = Config.load(None, TINY_OVERRIDES)
    with pytest.raises(ValueError, match=r"bench example 'bench\.jsonl:3': the student prompt has \d+ tokens; "
                                         r"with eval\.max_new_tokens=12"):
        evaluate_benchmarks(cfg, tiny_model, tok, None, None, [BenchmarkSpec.parse(str(bench))], 2, 0,
                            tmp_path / "out", {})
    assert not (tmp_path / "out" / "generations_bench.jsonl").exists()  # nothing was generated


# ------------------------------------------------------------------ 12a. unterminated CSV quotes

HEADER = "problem,answer\n"


@pytest.mark.parametrize("body, bad_line, kept, skipped", [
    # a quote opened on line 2 and never closed: the old reader made the rest of the file one field
    ('"What is 1+1?,2\nP2,4\nP3,6\n', 2, ["P2", "P3"], 1),
    # closed by the opening quote of a later field: one example whose problem swallowed line 3
    ('"What is 1+1?,2\nP2,4\n"P3",6\nP4,8\n', 2, ["P2", "P3", "P4"], 1),
    # in the answer: one "valid" example whose answer is '2\nP2,4\nP3,6"'
    ('P1,"2\nP2,4\nP3,"6"\nP4,8\n', 2, ["P2", "P3", "P4"], 1),
    # closed at a line end: a record over lines 3-4 with one cell for two columns (line 4, read on
    # its own, has no answer either)
    ('P1,2\n"P2,4\nP3 is 5 inches"\nP4,8\n', 3, ["P1", "P4"], 2),
])
def test_unterminated_csv_quote_is_reported_at_its_line_and_swallows_nothing(tmp_path, body, bad_line, kept, skipped):
    path = tmp_path / "q.csv"
    path.write_text(HEADER + body)
    with pytest.raises(DataError) as ei:
        load_examples(path)
    e = ei.value
    assert (e.file, e.row) == (str(path), bad_line)
    assert f"q.csv: line {bad_line}: unterminated quote" in str(e)
    res = load_examples(path, policy="skip")
    assert res.skipped == skipped and f"line {bad_line}: unterminated quote" in res.skip_reasons[0]
    assert [ex.problem for ex in res.examples] == kept
    assert all("\n" not in ex.problem and "\n" not in ex.answer for ex in res.examples)


def test_well_formed_csv_quotes_and_multiline_fields_still_load(tmp_path):
    path = tmp_path / "ok.csv"
    path.write_text('problem,reference,answer\n"Sum, then double: 1+2","step 1: 1+2=3\nstep 2: 3*2=6",6\n'
                    'He said "hi" twice,,2\n"A ""quoted"" word",,3\n\nP4,r,4\n')
    res = load_examples(path)
    assert [(e.problem, e.reference, e.answer) for e in res.examples] == [
        ("Sum, then double: 1+2", "step 1: 1+2=3\nstep 2: 3*2=6", "6"), ('He said "hi" twice', "", "2"),
        ('A "quoted" word', "", "3"), ("P4", "r", "4")]
    assert [e.id for e in res.examples] == ["ok.csv:1", "ok.csv:2", "ok.csv:3", "ok.csv:4"]


def test_unterminated_quote_in_the_header_is_a_file_error(tmp_path):
    path = tmp_path / "h.csv"
    path.write_text('"problem,answer\nP1,1\n')
    with pytest.raises(DataError, match=r"h\.csv: line 1: unreadable CSV header"):
        load_examples(path, policy="skip")


# ------------------------------------------------------------------ 12b. duplicates


def test_duplicates_are_dropped_counted_and_reported(tmp_path):
    rows = _rows(6)
    rows.insert(3, dict(rows[1]))  # an exact duplicate
    rows.append({**rows[0], "problem": "  What is 1+1? ", "answer": "3"})  # whitespace, conflicting answer
    rows.append({**rows[2], "problem": "What\u00a0is 3+3?"})  # a no-break space (NFKC: a space)
    p = _write_jsonl(tmp_path / "dup.jsonl", rows)
    for policy in ("skip", "error"):  # a repeated problem is not a broken row: dropped under either policy
        res = load_examples(p, policy=policy)
        assert [e.problem for e in res.examples] == [r["problem"] for r in _rows(6)]
        assert res.duplicates == 3 and res.skipped == 0
        assert "line 4: duplicate of line 2" in res.duplicate_notes[0]
        assert "duplicate of line 1" in res.duplicate_notes[1] and "answer there is '2', here '3'" in res.duplicate_notes[1]
    assert len(load_examples(p, dedupe=False).examples) == 9
    assert files.normalise_problem(" a\u00a0 b\n") == "a b"


def test_duplicates_never_land_in_both_splits_and_are_in_the_summary(tmp_path):
    rows = _rows(10)
    rows += [dict(r) for r in rows[:6]]  # 6 problems twice
    p = _write_jsonl(tmp_path / "dup.jsonl", rows)
    cfg = _cfg(tmp_path, f"data.task={p}", "data.policy=skip", "eval.before_after=false")
    task = get_task(cfg.data)
    train_set = {e.problem for e in task.examples(50, seed=0)}
    held_out = {e.problem for e in task.examples(4, seed=0, split="test")}
    assert len(task.all_examples) == 10 and not train_set & held_out
    summary = train(cfg)
    assert summary["data_duplicates"] == 6 and "data_skipped" not in summary
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["data_duplicates"] == 6


def test_benchmarks_keep_repeated_problems(tmp_path):
    from ogls_sd.data.benchmarks import load_benchmark

    p = _write_jsonl(tmp_path / "gsm.jsonl", [{"question": "Q?", "answer": "x\n#### 1"}] * 2)
    assert len(load_benchmark("gsm8k", p).examples) == 2


# ------------------------------------------------------------------ 12c. every row bad


def test_a_file_whose_every_row_is_bad_says_how_many_and_why(tmp_path):
    lines = [json.dumps({"problem": f"P{i}", "answer": ""}) for i in range(5)]
    lines += ["{not json", json.dumps({"problem": "P9"}), "[1, 2]", json.dumps({"problem": "P4", "answer": ""})]
    p = tmp_path / "bad.jsonl"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError) as ei:
        get_task(_cfg(tmp_path, f"data.task={p}", "data.policy=skip").data)
    msg = str(ei.value)
    assert "bad.jsonl: no usable rows: all 9 rows skipped" in msg
    assert "6 x field 'answer': empty; 1 x malformed JSON; 1 x field 'answer': missing; 1 other" in msg
    assert "first: " in msg and "line 1: field 'answer': empty" in msg


def test_an_empty_file_says_so(tmp_path):
    p = tmp_path / "empty.jsonl"
    p.write_text("\n")
    with pytest.raises(DataError, match=r"empty\.jsonl: no rows"):
        get_task(_cfg(tmp_path, f"data.task={p}", "data.policy=skip").data)


def test_eval_harness_file_whose_every_row_is_bad_says_why(tmp_path):
    from ogls_sd.eval_harness import BenchmarkSpec, load_eval_examples

    p = _write_jsonl(tmp_path / "b.jsonl", [{"problem": "P", "answer": ""}] * 2)
    cfg = Config.load(None, ["data.policy=skip"])
    with pytest.raises(DataError, match=r"b\.jsonl: no usable rows: all 2 rows skipped: 2 x field 'answer': empty"):
        load_eval_examples(BenchmarkSpec.parse(str(p)), cfg, None)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.text(alphabet='ab,"\n\r x', max_size=30), max_size=10))
def test_arbitrary_csv_text_loads_or_raises_dataerror_and_every_row_is_accounted_for(tmp_path, lines):
    p = tmp_path / "fuzz.csv"
    p.write_text("problem,answer\n" + "\n".join(lines), newline="")
    t = time.monotonic()
    for policy in ("error", "skip"):
        try:
            res = load_examples(p, policy=policy)
        except DataError as e:
            assert "fuzz.csv" in str(e)
            continue
        assert all(ex.problem.strip() and ex.answer.strip() for ex in res.examples)
        assert len(res.skip_reasons) == res.skipped
    assert time.monotonic() - t < 5
