"""The error every data reader raises for a file it cannot parse, and the JSON-lines reading
that raises it."""

from __future__ import annotations

import json
import os
from typing import Any, Iterator, Optional

from reckoning_ray.core.errors import InputError


class DataFormatError(InputError, ValueError):
    """A data file that cannot be parsed.

    The message names the file, the (1-based) line, optionally the column, and what was expected,
    e.g. ``data/dev.jsonl, line 12: expected a JSON object (one theory per line) ...``.
    """

    def __init__(self, path: str | os.PathLike, line: Optional[int], expected: str, column: Optional[str] = None):
        self.path = str(path)
        self.line = line
        self.column = column
        self.expected = expected
        where = self.path
        if line is not None:
            where += f", line {line}"
        if column is not None:
            where += f", column {column}"
        super().__init__(f"{where}: {expected}")


def jsonl_objects(path: str | os.PathLike, what: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """(1-based line number, object) of every non-blank line of a JSON-lines file whose lines are
    JSON objects (``what`` each line holds, e.g. "one ProofWriter theory per line", for the error)."""
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataFormatError(path, line_no, f"expected a JSON object ({what}): {exc.msg} at character "
                                                     f"{exc.pos}") from None
            if not isinstance(item, dict):
                raise DataFormatError(path, line_no, f"expected a JSON object ({what}), got {type(item).__name__}")
            yield line_no, item
