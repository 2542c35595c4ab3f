"""The error every data reader raises for a file it cannot parse."""

from __future__ import annotations

import os
from typing import Optional

from reckoning_ray.core.config import InputError


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
