"""CSV that a spreadsheet opens without running anything: every CSV ``audit`` writes goes through here.

A spreadsheet evaluates a cell that begins with ``=``, ``+``, ``-`` or ``@`` as a
formula (``=HYPERLINK(...)`` leaks data, DDE runs commands), and some also after a
leading tab, carriage return or NUL. File, folder and class names, reviewers and
reasons are user-controlled, so following OWASP's CSV-injection guidance (and
ASVS 1.2.10):

* a text cell beginning with one of ``= + - @``, tab, CR, LF or NUL gets a single
  quote ``'`` in front (spreadsheets show it as text; the quote is not part of the
  value);
* a text cell is double-quoted (embedded quotes doubled) unless it consists only of
  ASCII letters, digits, spaces and ``_ . / : -`` (not first, nor a trailing space),
  so no separator inside a cell can start a new cell in any locale;
* numbers (and booleans, dates) are written as they are: ``-0.5`` stays a number.

These files are for people and spreadsheets. The lossless, machine-readable forms
are JSON: ``labels.jsonl`` / ``classes.jsonl`` in an export, ``--format json`` on
the CLI. An image path is neutralised with ``./`` instead of a quote
(:func:`path_cell`): ``./=x.jpg`` names the same file, so an exported
``labels.csv`` still loads back as a label file.
"""

from __future__ import annotations

import csv
import io
import math
import numbers
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import pandas as pd

__all__ = ["FORMULA_START", "frame_to_csv", "path_cell", "rows_to_csv", "text_cell"]

# First characters that make a spreadsheet read a cell as a formula (OWASP, ASVS 1.2.10; LF for good measure).
FORMULA_START = frozenset("=+-@\t\r\n\0")
_PLAIN = re.compile(r"[A-Za-z0-9_./:][A-Za-z0-9_./: -]*")


def text_cell(value: str) -> str:
    """A text value as one CSV cell, neutralised and quoted as the module docstring says."""
    if not value:
        return ""
    if value[0] in FORMULA_START:
        value = "'" + value
    elif _PLAIN.fullmatch(value) and not value.endswith(" "):
        return value
    return '"' + value.replace('"', '""') + '"'


def path_cell(rel: str) -> str:
    """An image path (relative to the dataset root) as a value that names the same file and starts no formula.

    A path beginning with a formula character, or with white space (which a
    label-file reader strips), becomes ``./<path>``; :func:`rows_to_csv` then
    quotes it like any text.
    """
    if rel and (rel[0] in FORMULA_START or rel[0].isspace()):
        return "./" + rel
    return rel


def _number(value: Any) -> str | None:
    """The cell for a number, bool or missing value; None for anything that is text."""
    if value is None or value is pd.NA:
        return ""
    if isinstance(value, bool | np.bool_):
        return str(bool(value))
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return "" if math.isnan(value) else repr(float(value))
    return None


def _cell(value: Any) -> str:
    num = _number(value)
    return num if num is not None else text_cell(str(value))


def rows_to_csv(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> bytes:
    """CSV bytes (``\\n`` line ends) of a header and rows of str / int / float / None cells.

    Text cells are neutralised (:func:`text_cell`); pass a path through
    :func:`path_cell` first when it should stay a path.
    """
    lines = [",".join(_cell(h) for h in header)]
    lines += [",".join(_cell(v) for v in r) for r in rows]
    return ("\n".join(lines) + "\n").encode()


def frame_to_csv(df: pd.DataFrame) -> str:
    """A DataFrame as spreadsheet-safe CSV: pandas formats the values, text columns are neutralised.

    Numeric, boolean and datetime columns keep pandas' rendering (so ``-0.5`` stays
    a number); every other column is text.
    """
    raw = df.to_csv(index=False, lineterminator="\n")
    parsed = list(csv.reader(io.StringIO(raw, newline="")))
    types = pd.api.types
    text = [
        not (types.is_numeric_dtype(dt) or types.is_bool_dtype(dt) or types.is_datetime64_any_dtype(dt))
        for dt in df.dtypes
    ]
    out = [",".join(text_cell(h) for h in parsed[0])] if parsed else []
    for r in parsed[1:]:
        out.append(",".join(text_cell(c) if t else _minimal(c) for c, t in zip(r, text, strict=True)))
    return "\n".join(out) + "\n" if out else ""


def _minimal(cell: str) -> str:
    # A number or date as pandas wrote it; quoted only if it holds a separator (it never should).
    return '"' + cell.replace('"', '""') + '"' if any(ch in cell for ch in ',"\n\r') else cell
