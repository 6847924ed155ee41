"""Registry of evaluation benchmarks: where each lives on the Hugging Face hub and how its columns
map onto :class:`~ogls_sd.data.example.Example` fields.

``load_benchmark(name)`` loads from the hub (needs network or a warm HF cache);
``load_benchmark(name, path=...)`` loads a local export (``.jsonl``/``.json``/``.parquet``/``.csv``)
with the same column mapping and answer transforms, which is how offline machines use them.

Hub ids, splits and field names were checked against public dataset cards and public code that
loads them (see ``BENCHMARKS[...].notes``); they can change upstream, so a local file is the
reproducible path.
"""

from __future__ import annotations

import dataclasses
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .files import LoadResult, Policy, load_examples

__all__ = ["BENCHMARKS", "Benchmark", "benchmark_names", "get_benchmark", "gsm8k_final_answer", "gsm8k_reference", "load_benchmark"]


def gsm8k_final_answer(text: str) -> str:
    """The value after the last ``####`` of a GSM8K solution, without thousands separators.

    Raises ValueError when there is no ``####``.
    """
    pos = text.rfind("####")
    if pos < 0:
        raise ValueError("no '####' final-answer marker")
    return text[pos + 4 :].strip().replace(",", "")


_CALC = re.compile(r"<<[^<>]{0,500}>>")


def gsm8k_reference(text: str) -> str:
    """A GSM8K solution without its ``#### answer`` line and ``<<calculator>>`` annotations."""
    pos = text.rfind("####")
    body = text if pos < 0 else text[:pos]
    return _CALC.sub("", body).strip()


@dataclass(frozen=True)
class Benchmark:
    """One benchmark.

    Attributes:
        name: registry key.
        hub_id: Hugging Face dataset id.
        split: split to evaluate on.
        columns: ``problem``/``reference``/``answer`` (and optional ``id``) -> source column;
            ``reference: None`` when the benchmark has no worked solutions.
        config: hub configuration name, if any.
        transforms: per-field string transforms (e.g. GSM8K's ``####`` answers).
        answer_mode: suggested :class:`~ogls_sd.rewards.verifier.Verifier` mode (``"exact"`` for
            integer-only answers, ``"math"`` otherwise).
        confirmed: whether id, split and fields were confirmed from a public dataset card/code.
        notes: provenance and caveats.
    """

    name: str
    hub_id: str
    split: str
    columns: Mapping[str, str | None]
    config: str | None = None
    transforms: Mapping[str, Callable[[str], str]] = field(default_factory=dict)
    answer_mode: str = "math"
    confirmed: bool = True
    notes: str = ""


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in [
        Benchmark(
            name="math500",
            hub_id="HuggingFaceH4/MATH-500",
            split="test",
            columns={"problem": "problem", "reference": "solution", "answer": "answer", "id": "unique_id"},
            notes="500 MATH test problems (Lightman et al.); fields problem/solution/answer/subject/level/unique_id.",
        ),
        Benchmark(
            name="aime24",
            hub_id="HuggingFaceH4/aime_2024",
            split="train",
            columns={"problem": "problem", "reference": "solution", "answer": "answer", "id": "id"},
            answer_mode="exact",
            notes="30 problems of AIME 2024 I+II; dataset card lists id/problem/solution/answer/url/year, split train.",
        ),
        Benchmark(
            name="aime25",
            hub_id="MathArena/aime_2025",
            split="train",
            columns={"problem": "problem", "reference": None, "answer": "answer", "id": "problem_idx"},
            answer_mode="exact",
            notes="30 problems of AIME 2025 I+II (MathArena); fields problem_idx/problem/answer, split train; no solutions.",
        ),
        Benchmark(
            name="hmmt_feb25",
            hub_id="MathArena/hmmt_feb_2025",
            split="train",
            columns={"problem": "problem", "reference": None, "answer": "answer", "id": "problem_idx"},
            notes="30 problems of HMMT February 2025 (MathArena); fields problem_idx/problem/answer/problem_type; "
            "answers are LaTeX expressions.",
        ),
        Benchmark(
            name="amc23",
            hub_id="math-ai/amc23",
            split="test",
            columns={"problem": "question", "reference": None, "answer": "answer", "id": "id"},
            notes="40 problems of AMC 2023; fields question/answer (answers may be stored as floats; "
            "numbers are converted to strings, 27.0 -> '27').",
        ),
        Benchmark(
            name="gsm8k",
            hub_id="openai/gsm8k",
            config="main",
            split="test",
            columns={"problem": "question", "reference": "answer", "answer": "answer"},
            transforms={"reference": gsm8k_reference, "answer": gsm8k_final_answer},
            answer_mode="exact",
            notes="1319 test problems; config 'main'; the 'answer' column is a worked solution ending in "
            "'#### <number>' (reference = the solution without that line and <<calc>> annotations).",
        ),
        Benchmark(
            name="amo_bench",
            hub_id="meituan-longcat/AMO-Bench",
            split="test",
            columns={"problem": "prompt", "reference": "solution", "answer": "answer", "id": "question_id"},
            notes="50 olympiad problems; fields question_id/prompt/solution/answer/answer_type. Answers of "
            "answer_type 'description' need a grader model; math-verify only handles the others.",
        ),
        Benchmark(
            name="beyond_aime",
            hub_id="ByteDance-Seed/BeyondAIME",
            split="test",
            columns={"problem": "problem", "reference": None, "answer": "answer"},
            answer_mode="exact",
            notes="100 problems with integer answers; fields problem/answer (from public loaders; "
            "the dataset card itself was not seen).",
        ),
    ]
}

_ALIASES = {
    "math500": "math500", "math": "math500",
    "aime24": "aime24", "aime2024": "aime24",
    "aime25": "aime25", "aime2025": "aime25",
    "hmmtfeb25": "hmmt_feb25", "hmmtfeb2025": "hmmt_feb25", "hmmt25": "hmmt_feb25", "hmmt2025": "hmmt_feb25", "hmmt": "hmmt_feb25",
    "amc23": "amc23", "amc2023": "amc23",
    "gsm8k": "gsm8k",
    "amobench": "amo_bench", "amo": "amo_bench",
    "beyondaime": "beyond_aime",
}


def benchmark_names() -> list[str]:
    """Registry keys, in registry order."""
    return list(BENCHMARKS)


def get_benchmark(name: str) -> Benchmark:
    """Look up a benchmark by key or a common spelling (case, ``-``, ``_``, spaces ignored:
    ``"MATH-500"``, ``"AIME 2024"``, ``"HMMT Feb 2025"``, ``"AMO-Bench"``, ``"BeyondAIME"``).

    Raises:
        KeyError: unknown name (the message lists the known ones).
    """
    key = re.sub(r"[\s_\-]+", "", name.strip().lower())
    canonical = _ALIASES.get(key)
    if canonical is None:
        raise KeyError(f"unknown benchmark {name!r}; known: {', '.join(BENCHMARKS)}")
    return BENCHMARKS[canonical]


def load_benchmark(
    name: str,
    path: str | os.PathLike[str] | None = None,
    *,
    policy: Policy = "error",
    limit: int | None = None,
    max_chars: int = 200_000,
) -> LoadResult:
    """Load a benchmark's examples.

    With ``path``, read that local file (same column mapping and transforms as the hub copy);
    otherwise ``datasets.load_dataset(hub_id, name=config, split=split)``, which raises a
    :class:`~ogls_sd.data.files.DataError` naming the id when the hub is unreachable (offline).
    Example ids are ``{name}:{row}``, or ``{name}:{value}`` when the benchmark maps an id column.
    """
    bench = get_benchmark(name)
    source = bench.hub_id if path is None else path
    result = load_examples(
        source,
        columns=bench.columns,
        split=bench.split,
        policy=policy,
        max_chars=max_chars,
        config=bench.config if path is None else None,
        limit=limit,
        transforms=bench.transforms,
        id_prefix=bench.name,
        dedupe=False,  # a benchmark is scored as published, repeats included
    )
    prefix = bench.name + ":"
    result.examples = [
        ex if ex.id.startswith(prefix) else dataclasses.replace(ex, id=prefix + ex.id) for ex in result.examples
    ]
    return result
