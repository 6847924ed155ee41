"""Local-file / hub / optional-package loaders and the benchmark registry."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

from ogls_sd.data.benchmarks import (
    BENCHMARKS,
    get_benchmark,
    gsm8k_final_answer,
    gsm8k_reference,
    load_benchmark,
)
from ogls_sd.data.example import Example
from ogls_sd.data.files import DataError, LoadResult, load_champ, load_examples, load_reasoning_gym, simplify_champ_answer

ROWS = [
    {"problem": "What is 1+1?", "reference": "1+1=2", "answer": "2"},
    {"problem": "What is 2*3?", "reference": "2*3=6", "answer": 6},
    {"problem": "Half of 1?", "reference": "", "answer": 0.5},
]
EXPECTED = [
    Example("What is 1+1?", "1+1=2", "2", ""),
    Example("What is 2*3?", "2*3=6", "6", ""),
    Example("Half of 1?", "", "0.5", ""),
]


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_json(path: Path, rows: list) -> Path:
    path.write_text(json.dumps(rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list, fields=("problem", "reference", "answer")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow(r)
    return path


def write_parquet(path: Path, rows: list) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    cols = sorted({k for r in rows for k in r})
    table = pa.table({c: pa.array([None if r.get(c) is None else str(r[c]) for r in rows], type=pa.string()) for c in cols})
    pq.write_table(table, path)
    return path


WRITERS = {"jsonl": write_jsonl, "json": write_json, "csv": write_csv, "parquet": write_parquet}


def strip_ids(exs):
    return [Example(e.problem, e.reference, e.answer, "") for e in exs]


# ------------------------------------------------------------------------------- happy paths


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_all_four_formats_load(tmp_path, fmt):
    path = WRITERS[fmt](tmp_path / f"data.{fmt}", ROWS)
    res = load_examples(path)
    assert isinstance(res, LoadResult) and res.skipped == 0 and res.skip_reasons == []
    assert strip_ids(res.examples) == EXPECTED
    assert [e.id for e in res.examples] == [f"data.{fmt}:{i}" for i in (1, 2, 3)]


def test_column_mapping_optional_reference_and_id(tmp_path):
    rows = [{"question": "Q1", "final": 7, "key": "a"}, {"question": "Q2", "final": "x+1", "key": "b"}]
    path = write_jsonl(tmp_path / "m.jsonl", rows)
    res = load_examples(path, columns={"problem": "question", "reference": None, "answer": "final", "id": "key"})
    assert res.examples == [Example("Q1", "", "7", "a"), Example("Q2", "", "x+1", "b")]


def test_missing_reference_column_is_allowed(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [{"problem": "P", "answer": "1"}])
    assert load_examples(path).examples[0].reference == ""


def test_limit_and_transforms(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"problem": f"P{i}", "answer": f" {i} "} for i in range(10)])
    res = load_examples(path, limit=3, transforms={"answer": str.strip})
    assert [e.answer for e in res.examples] == ["0", "1", "2"]


# ---------------------------------------------------------------------------------- bad rows


def test_malformed_row_error_names_file_row_and_field(tmp_path):
    rows = [ROWS[0], ROWS[1], {"problem": "no answer here"}]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError) as ei:
        load_examples(path)
    e = ei.value
    assert (e.file, e.row, e.field) == (str(path), 3, "answer")
    assert str(path) in str(e) and "line 3" in str(e) and "'answer'" in str(e) and "missing" in str(e)


def test_invalid_utf8_line_is_named(tmp_path):
    path = tmp_path / "enc.jsonl"
    path.write_bytes(
        (json.dumps(ROWS[0]) + "\n").encode() + b'{"problem": "caf\xe9", "answer": "1"}\n' + (json.dumps(ROWS[1]) + "\n").encode()
    )
    with pytest.raises(DataError) as ei:
        load_examples(path)
    assert ei.value.row == 2 and "invalid UTF-8" in str(ei.value) and "line 2" in str(ei.value)
    res = load_examples(path, policy="skip")
    assert res.skipped == 1 and len(res.examples) == 2


@pytest.mark.parametrize(
    "bad, field, words",
    [
        ({"problem": "", "answer": "1"}, "problem", "empty"),
        ({"problem": "   ", "answer": "1"}, "problem", "empty"),
        ({"problem": "P", "answer": None}, "answer", "null"),
        ({"problem": "P", "answer": ["1"]}, "answer", "wrong type"),
        ({"problem": "P", "answer": True}, "answer", "wrong type"),
        ({"problem": {"x": 1}, "answer": "1"}, "problem", "wrong type"),
        ({"problem": "P" * 101, "answer": "1"}, "problem", "too long"),
        ({"problem": "P", "answer": "1", "reference": 3.5e400}, "reference", "finite"),
        ({"problem": "P\ud800", "answer": "1"}, "problem", "invalid UTF-8"),
    ],
)
def test_each_kind_of_bad_value(tmp_path, bad, field, words):
    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(bad) + "\n", encoding="utf-8")
    with pytest.raises(DataError) as ei:
        load_examples(path, max_chars=100)
    assert ei.value.row == 2 and ei.value.field == field and words in str(ei.value)


def test_malformed_json_line_and_non_object(tmp_path):
    path = tmp_path / "j.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n{not json\n[1, 2]\n\n" + json.dumps(ROWS[1]) + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 2: malformed JSON"):
        load_examples(path)
    res = load_examples(path, policy="skip")
    assert res.skipped == 2 and len(res.examples) == 2
    assert "line 3" in res.skip_reasons[1] and "not a JSON object" in res.skip_reasons[1]


def _every_7th_broken(n: int, fmt: str) -> tuple[list, list[str]]:
    """Rows 7, 14, ... are broken (rotating kinds; row 7 is a missing answer) -> (rows, fields)."""
    rows, fields = [], []
    kinds = ["missing_answer", "empty_problem", "too_long", "wrong_type", "null_answer", "empty_answer", "bad_utf8"]
    k = 0
    for i in range(1, n + 1):
        if i % 7:
            rows.append({"problem": f"Problem {i}", "reference": f"ref {i}", "answer": str(i)})
            continue
        kind = kinds[k % len(kinds)]
        k += 1
        if fmt in ("csv", "parquet") and kind in ("wrong_type", "bad_utf8"):
            kind = "empty_answer"  # not expressible in a string-typed table
        if kind == "missing_answer":
            rows.append({"problem": f"Problem {i}", "reference": "r"} if fmt in ("jsonl", "json") else {"problem": f"Problem {i}", "reference": "r", "answer": None})
            fields.append("answer")
        elif kind == "empty_problem":
            rows.append({"problem": "", "reference": "r", "answer": "1"})
            fields.append("problem")
        elif kind == "too_long":
            rows.append({"problem": "P", "reference": "x" * 500, "answer": "1"})
            fields.append("reference")
        elif kind == "wrong_type":
            rows.append({"problem": "P", "reference": "r", "answer": {"value": 1}})
            fields.append("answer")
        elif kind in ("null_answer", "empty_answer"):
            rows.append({"problem": "P", "reference": "r", "answer": None if kind == "null_answer" and fmt != "csv" else ""})
            fields.append("answer")
        else:  # bad_utf8: lone surrogate in JSON text
            rows.append({"problem": "P\udcff", "reference": "r", "answer": "1"})
            fields.append("problem")
    return rows, fields


@pytest.mark.parametrize("fmt", sorted(WRITERS))
def test_every_seventh_row_broken(tmp_path, fmt):
    n = 50
    rows, fields = _every_7th_broken(n, fmt)
    path = tmp_path / f"broken.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    elif fmt == "json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    else:
        WRITERS[fmt](path, rows)
    n_bad = n // 7

    res = load_examples(path, policy="skip", max_chars=200)
    assert res.skipped == n_bad == len(res.skip_reasons)
    assert len(res.examples) == n - n_bad
    assert all(int(e.answer) % 7 for e in res.examples)
    for j, (msg, fld) in enumerate(zip(res.skip_reasons, fields)):
        assert str(path) in msg and f" {7 * (j + 1)}:" in msg and f"'{fld}'" in msg

    with pytest.raises(DataError) as ei:
        load_examples(path, policy="error", max_chars=200)
    e = ei.value
    assert (e.file, e.row, e.field) == (str(path), 7, "answer")
    assert str(path) in str(e) and (" 7:" in str(e)) and "'answer'" in str(e)


def test_csv_invalid_utf8_cell_is_flagged(tmp_path):
    path = tmp_path / "enc.csv"
    path.write_bytes(b"problem,answer\nP1,1\nP\xff2,2\nP3,3\n")
    with pytest.raises(DataError) as ei:
        load_examples(path)
    assert (ei.value.row, ei.value.field) == (2, "problem") and "invalid UTF-8" in str(ei.value)
    assert load_examples(path, policy="skip").skipped == 1


# ------------------------------------------------------------------------------ file-level errors


def test_file_level_errors(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_examples(tmp_path / "missing.jsonl")
    odd = tmp_path / "data.txt"
    odd.write_text("hello")
    with pytest.raises(DataError, match="unsupported file type"):
        load_examples(odd)
    not_list = tmp_path / "obj.json"
    not_list.write_text('{"problem": "P"}')
    with pytest.raises(DataError, match="expected a JSON list"):
        load_examples(not_list)
    with pytest.raises(ValueError):
        load_examples(not_list, policy="ignore")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        load_examples(not_list, columns={"answer": None})
    with pytest.raises(ValueError):
        load_examples(not_list, columns={"solution": "x"})


def test_hub_id_goes_through_datasets_and_fails_clearly(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        raise ConnectionError("Couldn't reach the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    with pytest.raises(DataError) as ei:
        load_examples("someone/some-dataset", split="test", config="main")
    assert calls == [("someone/some-dataset", "main", "test")]
    assert "someone/some-dataset" in str(ei.value) and "split 'test'" in str(ei.value)


def test_hub_rows_are_validated(monkeypatch):
    import datasets

    rows = [{"question": "Q", "answer": "#### 5"}, {"question": "", "answer": "#### 6"}]
    monkeypatch.setattr(datasets, "load_dataset", lambda path, name=None, split=None: rows)
    res = load_benchmark("gsm8k", policy="skip")
    assert [e.answer for e in res.examples] == ["5"] and res.skipped == 1
    assert res.examples[0].id == "gsm8k:1"


@pytest.mark.skipif(not os.environ.get("HF_DATASETS_OFFLINE"), reason="needs offline mode (no network calls)")
def test_real_hub_call_in_offline_mode():
    with pytest.raises(DataError, match="could not load hub dataset"):
        load_examples("HuggingFaceH4/MATH-500", split="test")


# ------------------------------------------------------------------------------ optional packages


def test_reasoning_gym_loader():
    pytest.importorskip("reasoning_gym")
    res = load_reasoning_gym("gsm_symbolic", size=4, seed=3)
    assert len(res.examples) == 4 and res.skipped == 0
    for i, e in enumerate(res.examples):
        assert e.problem and e.answer and e.id == f"rg:gsm_symbolic:3:{i}"
        assert "####" in e.reference  # answer_cot: step-by-step solution ending in '#### answer'
    again = load_reasoning_gym("gsm_symbolic", size=4, seed=3)
    assert again.examples == res.examples  # deterministic


def test_champ_loader():
    pytest.importorskip("champ_dataset")
    res = load_champ()
    assert len(res.examples) == 270 and res.skipped == 0
    e = next(x for x in res.examples if x.id == "champ:P_Combinatorics_2")
    assert e.answer == "252" and "C(10, 5)" in e.reference
    only = load_champ(categories=["Sequence"], simplify_answers=False)
    assert len(only.examples) == 50 and all(x.id.startswith("champ:P_Sequence") for x in only.examples)


def test_simplify_champ_answer():
    assert simplify_champ_answer("C(10, 5), or equivalently 252") == "252"
    assert simplify_champ_answer("5/14, or approximately 35.7%") == "5/14"
    assert simplify_champ_answer("C(n, 4), or an equivalent form such as n(n-1)") == "C(n, 4)"
    assert simplify_champ_answer(" 2^(n-1) ") == "2^(n-1)"


# -------------------------------------------------------------------------------------- benchmarks


def test_registry_has_the_benchmarks():
    assert set(BENCHMARKS) == {"math500", "aime24", "aime25", "hmmt_feb25", "amc23", "gsm8k", "amo_bench", "beyond_aime"}
    for b in BENCHMARKS.values():
        assert "/" in b.hub_id and b.split and b.columns["problem"] and b.columns["answer"]
    assert get_benchmark("MATH-500").hub_id == "HuggingFaceH4/MATH-500"
    assert get_benchmark("AIME 2024").name == "aime24"
    assert get_benchmark("HMMT Feb 2025").name == "hmmt_feb25"
    assert get_benchmark("AMO-Bench").name == "amo_bench"
    assert get_benchmark("BeyondAIME").name == "beyond_aime"
    assert get_benchmark("gsm8k").config == "main"
    with pytest.raises(KeyError, match="known"):
        get_benchmark("imo2030")


def test_gsm8k_transforms():
    sol = "He has 3+4=<<3+4=7>>7 apples.\nThen 7*2=<<7*2=14>>14.\n#### 1,014"
    assert gsm8k_final_answer(sol) == "1014"
    assert gsm8k_reference(sol) == "He has 3+4=7 apples.\nThen 7*2=14."
    with pytest.raises(ValueError):
        gsm8k_final_answer("no marker")


def test_load_benchmark_from_local_file(tmp_path):
    math500 = write_jsonl(
        tmp_path / "math500.jsonl",
        [{"problem": "Compute 1/2+1/4.", "solution": "It is $\\boxed{\\frac34}$.", "answer": "\\frac34", "subject": "Algebra", "unique_id": "test/algebra/1.json"}],
    )
    res = load_benchmark("math500", path=math500)
    assert res.examples == [Example("Compute 1/2+1/4.", "It is $\\boxed{\\frac34}$.", "\\frac34", "math500:test/algebra/1.json")]

    gsm = write_csv(tmp_path / "gsm8k.csv", [{"question": "Q?", "answer": "2+2=<<2+2=4>>4\n#### 4"}], fields=("question", "answer"))
    res = load_benchmark("gsm8k", path=gsm)
    assert res.examples == [Example("Q?", "2+2=4", "4", "gsm8k:1")]

    aime = write_parquet(tmp_path / "aime25.parquet", [{"problem_idx": 1, "problem": "Find N.", "answer": 70}])
    res = load_benchmark("aime25", path=aime)
    assert res.examples == [Example("Find N.", "", "70", "aime25:1")]
