"""Load :class:`~ogls_sd.data.example.Example` s from local files, the Hugging Face hub, and the
optional reasoning-gym / CHAMP packages, with row-level validation.

Local formats: ``.jsonl`` (one JSON object per line), ``.json`` (a list of objects), ``.parquet``
and ``.csv`` (with a header row). Any other string that is not an existing path is taken as a
Hugging Face hub dataset id and loaded with ``datasets.load_dataset(id, name=config, split=split)``;
an existing directory is also handed to ``datasets.load_dataset``.

Row validation (per mapped field): missing, null, empty (``problem`` and ``answer`` only; an
empty or absent ``reference`` is allowed), wrong type (anything but a string or a finite number;
numbers become strings, ``3.0`` -> ``"3"``), longer than ``max_chars``, invalid UTF-8 (a ``.jsonl``
line is decoded strictly on its own; elsewhere undecodable bytes and lone surrogates are flagged
on the field that holds them), malformed JSON line, line that is not an object. With
``policy="error"`` the first bad row raises :class:`DataError` naming the file, the 1-based row
(the line number for ``.jsonl``, the element / data-row / row index otherwise) and the field; with
``policy="skip"`` bad rows are dropped, counted and described in :attr:`LoadResult.skip_reasons`
(:meth:`LoadResult.describe_skips`: the most common reasons with counts).

CSV quoting: a quoted field may span lines (multi-line references are fine). A record is an
*unterminated quote* when the strict CSV grammar rejects it (a quote opened and never closed
before the end of the file, or a closing quote followed by anything but a delimiter or the end of
the line: the stray quote ran into a later field's opening quote), or when it spans several lines
and has fewer cells than the header. Such a record is reported at the physical ``line`` where it
starts (file line numbers, the header is line 1), only that line is dropped, and reading resumes
on the next line, so the rows the quote would have swallowed are read on their own. (A stray
quote whose run happens to end in a well-formed closing quote with the right number of cells is
valid CSV and cannot be told from a genuine multi-line field.)

Duplicates (``dedupe=True``, the default): rows whose ``problem`` is the same after Unicode NFKC
normalisation and whitespace collapsing (case is kept) are one problem; a duplicate could land in
both the training and the held-out split. The first occurrence is kept; later ones are dropped
under either ``policy`` (real data sets repeat problems; that is not a broken row), counted in
:attr:`LoadResult.duplicates` and described in :attr:`LoadResult.duplicate_notes` (which row they
repeat, and a conflicting answer if there is one).

Problems with the file as a whole (missing file, unsupported format, JSON that is not a list,
unreadable parquet, a CSV header that cannot be read, hub errors) always raise.
"""

from __future__ import annotations

import csv
import io
import json
import math
import numbers
import os
import re
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from .example import Example

__all__ = [
    "DEFAULT_COLUMNS",
    "RESERVED_COLUMNS",
    "DataError",
    "LoadResult",
    "load_champ",
    "load_examples",
    "load_reasoning_gym",
    "load_rows",
    "normalise_problem",
    "require_examples",
    "simplify_champ_answer",
]

Policy = Literal["error", "skip"]
FIELDS = ("problem", "reference", "answer")
REQUIRED = ("problem", "answer")
LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv")
DEFAULT_COLUMNS: dict[str, str | None] = {"problem": "problem", "reference": "reference", "answer": "answer"}
DEFAULT_MAX_CHARS = 100_000
# Names a reward function receives for every example (its fields, and its prompts and completions):
# a source column of the same name that is not mapped to the field is not kept in Example.extra.
RESERVED_COLUMNS = ("problem", "reference", "answer", "id", "prompts", "completions")
_DATA_EXTRA_HINT = "pip install 'ogls-sd[data]'"


class DataError(ValueError):
    """A data file or row is unusable.

    Attributes:
        file: the path or hub id.
        row: 1-based line (``.jsonl``) or row number, or None for file-level errors.
        field: the offending example field (``problem``/``reference``/``answer``/``id``), or None.
        problem: what is wrong, without the location.
    """

    def __init__(self, file: str, problem: str, row: int | None = None, field: str | None = None, unit: str = "row"):
        self.file, self.row, self.field, self.problem = file, row, field, problem
        where = file
        if row is not None:
            where += f": {unit} {row}"
        if field is not None:
            where += f": field {field!r}"
        super().__init__(f"{where}: {problem}")


@dataclass
class LoadResult:
    """What a loader returns.

    Attributes:
        examples: the valid rows, in file order (the first occurrence of each problem).
        skipped: number of bad rows dropped (``policy="skip"``; always 0 with ``policy="error"``).
        skip_reasons: one message per skipped row, formatted like :class:`DataError` messages.
        duplicates: rows dropped because their problem repeats an earlier row's (any policy).
        duplicate_notes: one message per dropped duplicate.
        skip_kinds: one short reason per skipped row, without its location (counted by
            :meth:`reason_counts`).
    """

    examples: list[Example]
    skipped: int = 0
    skip_reasons: list[str] = field(default_factory=list)
    duplicates: int = 0
    skip_kinds: list[str] = field(default_factory=list)
    duplicate_notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    def reason_counts(self) -> list[tuple[str, int]]:
        """``(reason, rows)`` of the skipped rows, most common first."""
        return Counter(self.skip_kinds).most_common()

    def describe_skips(self, top: int = 3) -> str:
        """``"7 rows skipped: 4 x field 'answer': empty; 2 x malformed JSON; 1 other"``."""
        if not self.skipped:
            return "no rows skipped"
        counts = self.reason_counts()
        parts = [f"{n} x {kind}" for kind, n in counts[:top]]
        rest = sum(n for _, n in counts[top:])
        if rest:
            parts.append(f"{rest} other")
        first = f"; first: {self.skip_reasons[0]}" if self.skip_reasons else ""
        return f"{self.skipped} row{'s' if self.skipped != 1 else ''} skipped: {'; '.join(parts)}{first}"


def require_examples(result: LoadResult, source: str) -> LoadResult:
    """``result`` when it has examples; otherwise a :class:`DataError` saying why there are none
    (an empty source, or every row skipped: how many and the most common reasons)."""
    if result.examples:
        return result
    if result.skipped:
        raise DataError(source, f"no usable rows: all {result.describe_skips()}")
    raise DataError(source, "no rows")


# --------------------------------------------------------------------------- value validation


_DUPLICATE = "duplicate problem"


class _RowError(Exception):
    """A bad row. ``row``/``unit`` override the reader's location (a CSV quote error is reported at
    its physical line); ``kind`` is the short reason counted in :meth:`LoadResult.reason_counts`."""

    def __init__(self, field: str | None, problem: str, *, row: int | None = None, unit: str | None = None,
                 kind: str | None = None):
        super().__init__(problem)
        self.field, self.problem, self.row, self.unit = field, problem, row, unit
        if kind is None:
            kind = re.sub(r"\d+", "N", re.sub(r"\s*\(.*$", "", problem, flags=re.DOTALL))
        self.duplicate = kind == _DUPLICATE
        self.kind = (f"field {field!r}: " if field else "") + kind


def normalise_problem(text: str) -> str:
    """The key duplicates are found by: Unicode NFKC, whitespace runs as one space, stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).split())


def _has_lone_surrogate(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _to_text(value: Any, name: str, required: bool, max_chars: int) -> str:
    """Validate one raw cell and return its string form (see the module docstring)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        if required:
            raise _RowError(name, "empty (null)")
        return ""
    if isinstance(value, bool):
        raise _RowError(name, f"wrong type: expected a string or number, got bool ({value!r})")
    if isinstance(value, numbers.Integral):  # int, numpy integers
        text = str(int(value))
    elif isinstance(value, numbers.Real):  # float, numpy floats
        value = float(value)
        if not math.isfinite(value):
            raise _RowError(name, f"not a finite number ({value!r})")
        text = str(int(value)) if value.is_integer() and abs(value) < 1e16 else repr(value)
    elif isinstance(value, str):
        text = value
    else:
        type_name = type(value).__name__
        raise _RowError(name, f"wrong type: expected a string or number, got {type_name}")
    if _has_lone_surrogate(text):
        raise _RowError(name, "invalid UTF-8 (undecodable bytes or a lone surrogate)")
    if len(text) > max_chars:
        raise _RowError(name, f"too long ({len(text)} > {max_chars} characters)")
    if required and not text.strip():
        raise _RowError(name, "empty")
    return text


def _build_example(
    row: Mapping[str, Any],
    columns: Mapping[str, str | None],
    max_chars: int,
    default_id: str,
    transforms: Mapping[str, Callable[[str], str]] | None,
) -> Example:
    values: dict[str, str] = {}
    for name in FIELDS:
        column = columns.get(name)
        required = name in REQUIRED
        if column is None:
            if required:
                raise _RowError(name, "no column mapped to a required field")
            values[name] = ""
            continue
        if column not in row:
            if required:
                raise _RowError(name, f"missing (no column {column!r})")
            values[name] = ""
            continue
        text = _to_text(row[column], name, required, max_chars)
        if transforms and name in transforms and text:
            try:
                text = transforms[name](text)
            except Exception as e:  # noqa: BLE001 - a transform failing is a row problem
                raise _RowError(name, f"transform failed: {e}") from e
            if required and not text.strip():
                raise _RowError(name, "empty after transform")
        values[name] = text
    ex_id = default_id
    id_column = columns.get("id")
    if id_column is not None and id_column in row and row[id_column] is not None:
        ex_id = _to_text(row[id_column], "id", False, max_chars) or default_id
    mapped = {c for c in columns.values() if c is not None}
    extra = {k: v for k, v in row.items() if k not in mapped and k not in RESERVED_COLUMNS}
    return Example(problem=values["problem"], reference=values["reference"], answer=values["answer"], id=ex_id,
                   extra=extra)


# ------------------------------------------------------------------------------- row readers
# Each reader yields (row_number, row_dict_or_RowError). A _RowError stands for a row that could
# not even be read (bad UTF-8, malformed JSON); file-level problems raise DataError directly.


def _iter_jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                line = raw.decode("utf-8", errors="strict")
            except UnicodeDecodeError as e:
                yield lineno, _RowError(None, f"invalid UTF-8 at byte {e.start} of the line")
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, _RowError(None, f"malformed JSON ({e.msg} at column {e.colno})")
                continue
            except (ValueError, RecursionError) as e:  # a > 4300-digit integer, nesting too deep
                yield lineno, _RowError(None, f"unreadable JSON ({_json_limit(e)})")
                continue
            if not isinstance(obj, dict):
                yield lineno, _RowError(None, f"not a JSON object (got {type(obj).__name__})")
                continue
            yield lineno, obj


def _json_limit(e: BaseException) -> str:
    """What a JSON parser limit means, in a few words."""
    if isinstance(e, RecursionError):
        return "nested too deeply"
    if "digits" in str(e):
        return "an integer with more than 4300 digits"
    return " ".join(str(e).split())[:120]


def _decode_file(path: Path) -> str:
    """Whole-file UTF-8 decode; undecodable bytes become lone surrogates (flagged per field)."""
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    return data.decode("utf-8", errors="surrogateescape")


def _iter_json(path: Path) -> Iterator[tuple[int, Any]]:
    text = _decode_file(path)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(str(path), f"malformed JSON ({e.msg})", row=e.lineno, unit="line") from e
    except (ValueError, RecursionError) as e:
        raise DataError(str(path), f"unreadable JSON ({_json_limit(e)})") from None
    if isinstance(obj, dict) and isinstance(obj.get("data"), list):  # {"data": [...]} wrapper
        obj = obj["data"]
    if not isinstance(obj, list):
        raise DataError(str(path), f"expected a JSON list of objects, got {type(obj).__name__}")
    for i, item in enumerate(obj, start=1):
        if not isinstance(item, dict):
            yield i, _RowError(None, f"not a JSON object (got {type(item).__name__})")
        else:
            yield i, item


class _Lines:
    """The physical lines of a text (as ``csv`` splits them) with a rewindable position."""

    def __init__(self, text: str):
        self.lines = io.StringIO(text, newline="").readlines()
        self.pos = 0  # 0-based index of the next line to hand out

    def __iter__(self):
        return self

    def __next__(self) -> str:
        if self.pos >= len(self.lines):
            raise StopIteration
        self.pos += 1
        return self.lines[self.pos - 1]


def _csv_records(src: _Lines, resume: list[int]) -> Iterator[tuple[int, int, list[str] | csv.Error]]:
    """``(first line, last line, cells or the csv.Error)`` per record, 1-based physical lines,
    under the strict CSV grammar. After an error, reading resumes on the line after the broken
    record's first line; so it does after a record the consumer rejects by appending that
    record's first line to ``resume``."""
    reader = csv.reader(src, strict=True)
    while True:
        start = src.pos
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            resume.append(start + 1)
            yield start + 1, src.pos, e
        else:
            if cells:  # blank lines are no records
                yield start + 1, src.pos, cells
        if resume:
            src.pos = resume.pop()  # the 0-based index of the line after the record's first
            resume.clear()
            reader = csv.reader(src, strict=True)  # a fresh parser state


def _quote_error(first: int, what: str) -> _RowError:
    return _RowError(None, f"unterminated quote: {what}; this line was skipped and reading resumed on line "
                           f"{first + 1}", row=first, unit="line", kind="unterminated quote")


def _iter_csv(path: Path) -> Iterator[tuple[int, Any]]:
    text = _decode_file(path)
    resume: list[int] = []
    records = _csv_records(_Lines(text), resume)
    fieldnames = None
    for first, last, cells in records:
        if isinstance(cells, csv.Error):
            raise DataError(str(path), f"unreadable CSV header: unterminated quote ({cells})", row=first, unit="line")
        fieldnames = cells
        break
    if fieldnames is None:
        raise DataError(str(path), "empty CSV file (no header row)")
    n = len(fieldnames)
    for i, (first, last, cells) in enumerate(records, start=1):
        if isinstance(cells, csv.Error):
            if "unexpected end of data" in str(cells):
                yield i, _quote_error(first, "a quote opened on this line is never closed (the rest of the file "
                                             "would be one field)")
            elif "expected after" in str(cells):
                yield i, _quote_error(first, f"a quoted field that starts on this line closes on line {last} with "
                                             f"text after the closing quote ({cells})")
            else:  # e.g. a field over csv.field_size_limit()
                yield i, _RowError(None, f"unreadable CSV record ({cells}) starting on this line; reading resumed on "
                                         f"line {first + 1}", row=first, unit="line", kind="unreadable CSV record")
            continue
        if last > first and len(cells) < n:
            resume.append(first)  # read the lines it swallowed on their own
            yield i, _quote_error(first, f"the record spans lines {first}-{last} but has only {len(cells)} of {n} cells")
            continue
        if len(cells) > n:  # more cells than header columns
            yield i, _RowError(None, f"{len(cells)} cells for {n} columns")
            continue
        yield i, dict(zip(fieldnames, cells + [None] * (n - len(cells))))


def _iter_parquet(path: Path) -> Iterator[tuple[int, Any]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001
        raise DataError(str(path), f"unreadable parquet file: {e}") from e
    i = 0
    for batch in pf.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            i += 1
            yield i, row


_READERS: dict[str, Callable[[Path], Iterator[tuple[int, Any]]]] = {
    ".jsonl": _iter_jsonl,
    ".json": _iter_json,
    ".csv": _iter_csv,
    ".parquet": _iter_parquet,
}


def _iter_hub(path_or_id: str, split: str, config: str | None) -> Iterator[tuple[int, Any]]:
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a runtime dependency
        raise DataError(path_or_id, "the 'datasets' package is needed to load hub data sets") from e
    try:
        ds = datasets.load_dataset(path_or_id, name=config, split=split)
    except Exception as e:  # noqa: BLE001 - datasets raises many types (ConnectionError, ...)
        offline = any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
        hint = (
            " Offline mode is on (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE): download the data set into the"
            " Hugging Face cache first, or pass a local .jsonl/.json/.parquet/.csv file."
            if offline
            else " Pass a local .jsonl/.json/.parquet/.csv file instead if the hub is unreachable."
        )
        what = f"hub dataset {path_or_id!r}" + (f" (config {config!r})" if config else "") + f", split {split!r}"
        raise DataError(path_or_id, f"could not load {what}: {type(e).__name__}: {e}.{hint}") from e
    for i, row in enumerate(ds, start=1):
        yield i, row


# ---------------------------------------------------------------------------------- main loader


def _collect(
    rows: Iterable[tuple[int, Any]],
    source: str,
    unit: str,
    columns: Mapping[str, str | None],
    policy: Policy,
    max_chars: int,
    id_prefix: str,
    transforms: Mapping[str, Callable[[str], str]] | None,
    limit: int | None,
    dedupe: bool = True,
) -> LoadResult:
    result = LoadResult(examples=[])
    seen: dict[str, tuple[int, str, Example]] = {}  # normalised problem -> (row, unit, example)
    for rownum, row in rows:
        if limit is not None and len(result.examples) >= limit:
            break
        try:
            if isinstance(row, _RowError):
                raise row
            ex = _build_example(row, columns, max_chars, f"{id_prefix}:{rownum}", transforms)
            if dedupe:
                key = normalise_problem(ex.problem)
                if key in seen:
                    first, first_unit, kept = seen[key]
                    clash = f"; its answer there is {kept.answer!r}, here {ex.answer!r}" if kept.answer != ex.answer else ""
                    result.duplicates += 1
                    result.duplicate_notes.append(
                        f"{source}: {unit} {rownum}: duplicate of {first_unit} {first} (the same problem after "
                        f"normalising Unicode and whitespace{clash}); dropped, the first is kept")
                    continue
                seen[key] = (rownum, unit, ex)
            result.examples.append(ex)
        except _RowError as e:
            err = DataError(source, e.problem, row=e.row if e.row is not None else rownum, field=e.field,
                            unit=e.unit or unit)
            if policy == "error":
                raise err from None
            result.skipped += 1
            result.skip_reasons.append(str(err))
            result.skip_kinds.append(e.kind)
            result.duplicates += e.duplicate
    return result


def load_examples(
    path_or_id: str | os.PathLike[str],
    columns: Mapping[str, str | None] | None = None,
    split: str = "train",
    policy: Policy = "error",
    max_chars: int = DEFAULT_MAX_CHARS,
    *,
    config: str | None = None,
    limit: int | None = None,
    transforms: Mapping[str, Callable[[str], str]] | None = None,
    id_prefix: str | None = None,
    dedupe: bool = True,
) -> LoadResult:
    """Load and validate examples from a local file or a Hugging Face hub dataset.

    Args:
        path_or_id: a ``.jsonl``/``.json``/``.parquet``/``.csv`` file, a local directory, or a hub
            dataset id (anything that is not an existing path and has none of those suffixes).
        columns: maps ``problem``/``reference``/``answer`` (and optionally ``id``) to source
            column names; a ``None`` value means "not present" (``reference`` -> ``""``). Keys not
            given fall back to :data:`DEFAULT_COLUMNS`. A missing ``reference`` column is allowed.
        split: hub split (ignored for local files).
        policy: ``"error"`` raises :class:`DataError` at the first bad row; ``"skip"`` drops bad
            rows and reports them in the result.
        max_chars: maximum length of any field (characters).
        config: hub configuration name (e.g. ``"main"`` for ``openai/gsm8k``).
        limit: stop after this many valid examples.
        transforms: per-field functions applied to the validated string (e.g. take the text after
            ``####`` for GSM8K answers); an exception marks the row bad.
        id_prefix: prefix of generated ids (``{prefix}:{row}``); default the file name or hub id.
        dedupe: treat a row whose problem repeats an earlier one (see :func:`normalise_problem`)
            as bad: ``policy="error"`` raises, ``"skip"`` drops and counts it
            (:attr:`LoadResult.duplicates`). Off for benchmarks, which are evaluated as published.

    Returns:
        A :class:`LoadResult`.

    Raises:
        DataError: a bad row under ``policy="error"``, or any file-level problem.
        ValueError: an invalid ``policy`` or ``columns`` mapping.
    """
    if policy not in ("error", "skip"):
        raise ValueError(f"policy must be 'error' or 'skip', got {policy!r}")
    if max_chars <= 0:
        raise ValueError("max_chars must be > 0")
    cols: dict[str, str | None] = dict(DEFAULT_COLUMNS)
    if columns is not None:
        unknown = set(columns) - set(FIELDS) - {"id"}
        if unknown:
            raise ValueError(f"unknown column mapping keys {sorted(unknown)}; expected {FIELDS + ('id',)}")
        cols.update(columns)
    for name in REQUIRED:
        if cols.get(name) is None:
            raise ValueError(f"columns[{name!r}] must name a column")

    source = os.fspath(path_or_id)
    path = Path(source)
    suffix = path.suffix.lower()
    if path.is_file():
        reader = _READERS.get(suffix)
        if reader is None:
            raise DataError(source, f"unsupported file type {suffix or '(none)'!r}; expected one of {LOCAL_SUFFIXES}")
        rows: Iterable[tuple[int, Any]] = reader(path)
        unit = "line" if suffix == ".jsonl" else "row"
        prefix = id_prefix if id_prefix is not None else path.name
    elif suffix in LOCAL_SUFFIXES:
        raise DataError(source, "no such file")
    else:  # a hub id, or a local directory datasets can read
        rows = _iter_hub(source, split, config)
        unit = "row"
        prefix = id_prefix if id_prefix is not None else f"{source}:{split}"
    return _collect(rows, source, unit, cols, policy, max_chars, prefix, transforms, limit, dedupe)


def load_rows(
    rows: Iterable[Mapping[str, Any]],
    columns: Mapping[str, str | None] | None = None,
    policy: Policy = "error",
    max_chars: int = DEFAULT_MAX_CHARS,
    *,
    source: str = "data",
    transforms: Mapping[str, Callable[[str], str]] | None = None,
) -> LoadResult:
    """:func:`load_examples` for rows already in memory: a list of dicts or a ``datasets.Dataset``
    (the Python API's ``train(cfg, data=...)``), with the same column mapping, validation, ``policy``
    and duplicate rule. Rows are numbered from 1 in errors (``data: row 3: field 'answer': empty``);
    ``source`` names them."""
    cols: dict[str, str | None] = {**DEFAULT_COLUMNS, **(columns or {})}
    numbered = ((i, row if isinstance(row, Mapping) else _RowError(None, f"not a mapping (got {type(row).__name__})"))
                for i, row in enumerate(rows, start=1))
    return _collect(numbered, source, "row", cols, policy, max_chars, source, transforms, None)


# -------------------------------------------------------------------------- optional packages


def _missing_extra(package: str, e: ImportError) -> ImportError:
    return ImportError(f"the optional package {package!r} is not installed; install it with {_DATA_EXTRA_HINT}")


def load_reasoning_gym(
    task: str = "gsm_symbolic",
    size: int = 500,
    seed: int = 0,
    *,
    reference_key: str = "answer_cot",
    **task_config: Any,
) -> LoadResult:
    """Generate ``size`` problems of a `reasoning-gym <https://github.com/open-thought/reasoning-gym>`_
    task (``reasoning_gym.create_dataset(task, size=size, seed=seed, **task_config)``).

    Each generated entry is a dict ``{"question", "answer", "metadata"}``. The example is
    ``Example(problem=question, reference=metadata[reference_key] or "", answer=answer,
    id=f"rg:{task}:{seed}:{index}")``. ``gsm_symbolic`` exposes a step-by-step solution as
    ``metadata["answer_cot"]`` (ending in ``#### <answer>``); most other tasks have no worked
    solution, and their reference is ``""``. ``Example.extra`` keeps the generated ``entry`` and its
    ``metadata``: the ``reasoning_gym`` reward function (``reward.funcs``) scores with the task's own
    ``score_answer(answer, entry)``. Entries whose question or answer is empty, and repeated
    questions (see :func:`normalise_problem`), are skipped and reported. Deterministic for a given
    ``(task, size, seed, task_config)``.

    Raises:
        ImportError: reasoning-gym is not installed (``pip install 'ogls-sd[data]'``).
    """
    try:
        import reasoning_gym
    except ImportError as e:
        raise _missing_extra("reasoning-gym", e) from e
    dataset = reasoning_gym.create_dataset(task, size=size, seed=seed, **task_config)
    rows = []
    for i, entry in enumerate(dataset):
        meta = entry.get("metadata") or {}
        reference = meta.get(reference_key) if isinstance(meta, dict) else None
        rows.append(
            (i + 1, {"problem": entry.get("question"), "answer": entry.get("answer"),
                     "reference": reference if isinstance(reference, str) else "", "id": f"rg:{task}:{seed}:{i}",
                     "entry": entry, "metadata": meta})  # kept in Example.extra: its own scorer reads them
        )
    cols = {"problem": "problem", "reference": "reference", "answer": "answer", "id": "id"}
    return _collect(rows, f"reasoning-gym:{task}", "row", cols, "skip", DEFAULT_MAX_CHARS, f"rg:{task}", None, None)


_CHAMP_EQUIV = re.compile(r"^(.*?),?\s+or\s+equivalently\s+(.+)$", re.DOTALL)
_CHAMP_APPROX = re.compile(r"^(.*?),?\s+or\s+approximately\s+.+$", re.DOTALL)
_CHAMP_FORM = re.compile(r"^(.*?),?\s+or\s+an\s+equivalent\s+form.*$", re.DOTALL)


def simplify_champ_answer(answer: str) -> str:
    """Reduce a CHAMP free-form answer to one verifiable expression.

    ``"C(10, 5), or equivalently 252"`` -> ``"252"``; ``"5/14, or approximately 35.7%"`` ->
    ``"5/14"``; ``"C(n, 4), or an equivalent form such as ..."`` -> ``"C(n, 4)"``. Other answers are
    returned stripped and unchanged.
    """
    s = answer.strip()
    m = _CHAMP_EQUIV.match(s)
    if m:
        return m.group(2).strip()
    for pattern in (_CHAMP_APPROX, _CHAMP_FORM):
        m = pattern.match(s)
        if m:
            return m.group(1).strip()
    return s


def load_champ(
    version: str = "v0",
    categories: Iterable[str] | None = None,
    simplify_answers: bool = True,
) -> LoadResult:
    """The CHAMP competition-math problems (package ``champ-dataset``; 270 problems in ``v0``).

    Uses ``champ_dataset.load(version)``; for each ``Problem``: ``problem = p.text``, ``reference``
    = its solution steps (``p.solution.steps[*].text``) joined by newlines, ``answer = p.answer``
    (passed through :func:`simplify_champ_answer` when ``simplify_answers``), ``id =
    f"champ:{p.identifier}"``. ``categories`` filters on ``p.category`` (``Combinatorics``,
    ``Inequality``, ``Number-Theory``, ``Polynomial``, ``Sequence``). Many CHAMP answers are
    symbolic or free-form (``"No"``, ``"2^(n-1)"``), so verify them in ``"math"`` mode.

    Raises:
        ImportError: champ-dataset is not installed (``pip install 'ogls-sd[data]'``).
    """
    try:
        import champ_dataset
    except ImportError as e:
        raise _missing_extra("champ-dataset", e) from e
    dataset = champ_dataset.load(version)
    wanted = set(categories) if categories is not None else None
    rows = []
    for i, (identifier, p) in enumerate(dataset.problems.items(), start=1):
        if wanted is not None and p.category not in wanted:
            continue
        steps = getattr(getattr(p, "solution", None), "steps", None) or []
        reference = "\n".join(s.text for s in steps if isinstance(getattr(s, "text", None), str))
        answer = p.answer
        if simplify_answers and isinstance(answer, str):
            answer = simplify_champ_answer(answer)
        rows.append((i, {"problem": p.text, "reference": reference, "answer": answer, "id": f"champ:{identifier}"}))
    cols = {"problem": "problem", "reference": "reference", "answer": "answer", "id": "id"}
    return _collect(rows, f"champ:{version}", "row", cols, "skip", DEFAULT_MAX_CHARS, f"champ:{version}", None, None)
