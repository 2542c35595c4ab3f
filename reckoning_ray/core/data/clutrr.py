"""Reader of the original CLUTRR files (Sinha et al. 2019): CSV files as written by pandas, one
story per row. ``read_clutrr`` reads a directory with one file per split, or one file split by
story id (``splits.split_by_group``).
"""

from __future__ import annotations

import ast
import csv
import os
import re
from pathlib import Path
from typing import Any, Iterator

from reckoning_ray.core.data.errors import DataFormatError
from reckoning_ray.core.data.schema import Record, make_record
from reckoning_ray.core.data.splits import Splits, read_splits

# File names that a directory source may use for each split, in order of preference.
CLUTRR_SPLIT_FILES = {
    "train": ("train.csv",),
    "validation": ("valid.csv", "validation.csv", "dev.csv"),
    "test": ("test.csv",),
}
CLUTRR_COLUMNS = ("id", "story", "query", "target_text", "task_name", "edge_types")
_NAME_BRACKETS = re.compile(r"\[([^\[\]]*)\]")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_TASK_NAME = re.compile(r"task_(\d+)\.(\d+)")


def clutrr_sentences(story: str) -> list[str]:
    """Split a CLUTRR story into sentences and drop the ``[Name]`` brackets.

    ``"[Scott] and [Lewis] are brothers. [Jason] is father of their father"`` ->
    ``["Scott and Lewis are brothers.", "Jason is father of their father"]``.
    """
    text = _NAME_BRACKETS.sub(r"\1", story).strip()
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def clutrr_question(query: tuple[str, str]) -> str:
    """Question for a CLUTRR ``query`` (A, B).

    CLUTRR's ``target_text`` is the relation of query[1] to query[0]: for query ('Jason', 'Lewis')
    with target grandson, Lewis is Jason's grandson (the story says Jason is the father of Lewis'
    father). So the question asks how B is related to A, and "B is A's <answer>" is its reading.
    """
    first, second = query
    return f"How is {second} related to {first}?"




class _Row:
    """One CSV row of a CLUTRR file; its errors name the file, the line and the column."""

    def __init__(self, row: list[str], index: dict[str, int], path: Path, line_no: int):
        self.row, self.index, self.path, self.line_no = row, index, path, line_no

    def cell(self, name: str) -> str:
        return self.row[self.index[name]]

    def fail(self, name: str, expected: str) -> DataFormatError:
        return DataFormatError(self.path, self.line_no, f"expected {expected}, got {self.cell(name)[:80]!r}",
                               column=f"{self.index[name] + 1} ({name})")

    def literal(self, name: str, expected: str, types: tuple[type, ...]) -> Any:
        """The cell as a Python literal of one of ``types`` (pandas writes tuples and lists so)."""
        try:
            value = ast.literal_eval(self.cell(name))
        except (ValueError, SyntaxError):
            raise self.fail(name, expected) from None
        if not isinstance(value, types):
            raise self.fail(name, expected)
        return value


def _csv_header(reader: Any, path: Path) -> list[str]:
    """The header row, checked to name every CLUTRR column."""
    try:
        header = next(reader)
    except StopIteration:
        raise DataFormatError(path, 1, f"expected a CSV header with columns {list(CLUTRR_COLUMNS)}, the file is empty") from None
    missing = [c for c in CLUTRR_COLUMNS if c not in header]
    if missing:
        raise DataFormatError(path, 1, f"expected CLUTRR columns {list(CLUTRR_COLUMNS)} in the header; missing {missing}")
    return header


def _csv_rows(reader: Any, path: Path, width: int) -> Iterator[tuple[int, list[str]]]:
    """(line the row starts on, row) of every non-blank row after the header, each ``width``
    fields wide."""
    while True:
        line_no = reader.line_num + 1  # the line this row starts on
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise DataFormatError(path, line_no, f"expected a well-formed CSV row: {exc}") from None
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != width:
            raise DataFormatError(path, line_no, f"expected {width} fields as in the header, got {len(row)}")
        yield line_no, row


def _row_hops(row: _Row) -> int:
    """k of the row's ``task_1.k``, checked against the number of its ``edge_types``."""
    edge_types = row.literal("edge_types", "a Python list of relation names like \"['son', 'brother']\"", (list, tuple))
    match = _TASK_NAME.fullmatch(row.cell("task_name").strip())
    if not match:
        raise row.fail("task_name", "a CLUTRR task name like 'task_1.3'")
    hops = int(match.group(2))
    if hops != len(edge_types):
        raise row.fail("task_name", f"k of task_1.k to equal the number of edge_types ({len(edge_types)})")
    return hops


def _row_record(row: _Row, seen_ids: set[str]) -> Record:
    """The record of one row; its id must not be in ``seen_ids`` (it is added)."""
    query_names = "a Python tuple of two names like \"('Jason', 'Lewis')\""
    query = row.literal("query", query_names, (tuple, list))
    if not (len(query) == 2 and all(isinstance(q, str) for q in query)):
        raise row.fail("query", query_names)
    hops = _row_hops(row)
    answer = row.cell("target_text").strip()
    if not answer:
        raise row.fail("target_text", "a relation word such as 'grandson'")
    sentences = clutrr_sentences(row.cell("story"))
    if not sentences:
        raise row.fail("story", "a non-empty story")
    rid = row.cell("id").strip()
    if not rid:
        raise row.fail("id", "a non-empty story id")
    if rid in seen_ids:
        raise row.fail("id", "a story id not used by an earlier row")
    seen_ids.add(rid)
    return make_record(
        id=rid,
        family="clutrr",
        source="clutrr",
        knowledge=sentences,
        facts=sentences,
        question=clutrr_question((query[0].strip(), query[1].strip())),
        answer=answer,
        hops=hops,
    )


def read_clutrr_file(path: str | os.PathLike) -> list[Record]:
    """All rows of a CLUTRR CSV (pandas-written: the first, unnamed column is the row index).

    knowledge = facts = the story's sentences (the ``task_1.k`` tasks have no noise sentences),
    question from ``query``, answer = ``target_text``, hops = k of ``task_1.k`` (checked against
    the number of ``edge_types``). Raises DataFormatError naming file, line and column.
    """
    path = Path(path)
    records: list[Record] = []
    with open(path, encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle)
        header = _csv_header(reader, path)
        index = {name: header.index(name) for name in CLUTRR_COLUMNS}
        seen_ids: set[str] = set()
        for line_no, row in _csv_rows(reader, path, len(header)):
            records.append(_row_record(_Row(row, index, path, line_no), seen_ids))
    if not records:
        raise DataFormatError(path, None, "expected at least one CLUTRR row after the header, the file has none")
    return records


def read_clutrr(path: str | os.PathLike, validation_fraction: float = 0.1, test_fraction: float = 0.1,
                seed: int = 0) -> Splits:
    """CLUTRR splits from a directory (train.csv, valid|validation|dev.csv, test.csv) or from one
    file split by story id."""
    return read_splits(path, read_clutrr_file, CLUTRR_SPLIT_FILES, lambda r: str(r["id"]),
                       validation_fraction, test_fraction, seed, "CLUTRR")
