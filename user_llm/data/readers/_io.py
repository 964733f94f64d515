"""Shared low-level parsing: delimited text and JSON lines into Arrow tables with line numbers.

Both parsers try one fast vectorized pass (pyarrow) and only on failure re-parse slowly to find
the offending line, so good files are fast and bad files get an exact ``file:line`` error (or,
in lenient mode, lose exactly the bad lines, counted in the report).
"""

from __future__ import annotations

import gzip
import io
import json
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.json as pjson

from user_llm.data.tables import DataError, ParseReport, shown

_WHITESPACE = np.array([9, 10, 13, 32], dtype=np.uint8)


# What a corrupt or truncated .gz raises while reading (and zipfile for a bad member).
DECOMPRESSION_ERRORS = (EOFError, gzip.BadGzipFile, zlib.error, zipfile.BadZipFile)


def corrupt_file(path: str | Path, line: int | None, error: Exception) -> DataError:
    """The error for a file that cannot be decompressed: lenient mode cannot skip it."""
    return DataError(
        str(path),
        line,
        f"corrupt or truncated compressed file ({type(error).__name__}: {str(error)[:200]}); "
        "fetch or copy it again",
    )


def open_binary(path: Path) -> io.BufferedIOBase:
    """Opens a plain or gzip-compressed file (by magic bytes, not by name)."""
    f = open(path, "rb")  # noqa: SIM115
    magic = f.peek(2)[:2] if hasattr(f, "peek") else b""
    if magic == b"\x1f\x8b":
        f.close()
        return gzip.open(path, "rb")
    return f


def strip_bad_utf8(data: bytes, name: str, first_line: int, report: ParseReport, lenient: bool):
    """Checks UTF-8; a bad line raises (strict) or is blanked out and counted (lenient).

    Blanking (rather than deleting) keeps every later line number right.
    """
    while True:
        try:
            data.decode("utf-8")
            return data
        except UnicodeDecodeError as e:
            line = first_line + data.count(b"\n", 0, e.start)
            if not lenient:
                raise DataError(name, line, f"invalid UTF-8 byte {data[e.start]:#04x}") from None
            report.skip("invalid_utf8")
            start = data.rfind(b"\n", 0, e.start) + 1
            end = data.find(b"\n", e.start)
            end = len(data) if end < 0 else end
            data = data[:start] + data[end:]


def line_numbers_of_nonblank(data: bytes, first_line: int) -> np.ndarray:
    """1-based line numbers of the lines that hold anything but whitespace (vectorized)."""
    arr = np.frombuffer(data, dtype=np.uint8)
    newlines = np.flatnonzero(arr == 10)
    starts = np.concatenate([[0], newlines + 1])
    ends = np.concatenate([newlines, [len(arr)]])
    keep = starts < ends
    starts, ends = starts[keep], ends[keep]
    line_idx = np.flatnonzero(keep)
    nonspace = np.concatenate([[0], np.cumsum(~np.isin(arr, _WHITESPACE), dtype=np.int64)])
    has_content = nonspace[ends] - nonspace[starts] > 0
    return first_line + line_idx[has_content]


# ----------------------------------------------------------------------------- JSON lines


def _iter_chunks(path: Path, chunk_bytes: int) -> Iterator[tuple[bytes, int]]:
    """Yields (chunk ending on a line boundary, 1-based number of its first line)."""
    line = 1
    with open_binary(path) as f:
        while True:
            try:
                data = f.read(chunk_bytes)
                if data and not data.endswith(b"\n"):
                    data += f.readline()
            except DECOMPRESSION_ERRORS as e:
                raise corrupt_file(path, line, e) from None
            if not data:
                return
            yield data, line
            line += data.count(b"\n")


def _type_ok(value, typ: pa.DataType) -> bool:
    if value is None:
        return True
    if pa.types.is_floating(typ):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if pa.types.is_integer(typ):  # within the column's range: no overflow later
        info = np.iinfo(typ.to_pandas_dtype())
        ok = isinstance(value, int) and not isinstance(value, bool)
        return ok and info.min <= value <= info.max
    if pa.types.is_string(typ):
        return isinstance(value, str)
    if pa.types.is_list(typ):
        return isinstance(value, list) and all(
            _type_ok(v, typ.value_type) and v is not None for v in value
        )
    return True


def _slow_json_lines(
    data: bytes, first_line: int, schema: pa.Schema, name: str, report: ParseReport, lenient: bool
) -> tuple[bytes, np.ndarray]:
    """Per-line check of a chunk the fast parser rejected: returns its good lines only."""
    good, numbers = [], []
    for offset, raw in enumerate(data.split(b"\n")):
        if not raw.strip():
            continue
        line = first_line + offset
        try:
            obj = json.loads(raw)
        except ValueError as e:
            reason = f"malformed JSON ({e.msg})"
            obj = None
        else:
            reason = None if isinstance(obj, dict) else "a JSON line that is not an object"
        if reason is None:
            for field in schema:
                if not _type_ok(obj.get(field.name), field.type):
                    value = shown(obj.get(field.name))
                    reason = f"field {field.name!r} has the wrong type or range: {value}"
                    break
        if reason is not None:
            if not lenient:
                raise DataError(name, line, reason)
            report.skip("malformed_json" if obj is None else "mistyped_field")
            continue
        good.append(raw)
        numbers.append(line)
    return b"\n".join(good) + b"\n", np.asarray(numbers, dtype=np.int64)


def read_json_lines(
    path: Path,
    schema: pa.Schema,
    report: ParseReport,
    lenient: bool,
    chunk_bytes: int = 64 << 20,
) -> pa.Table:
    """Reads only ``schema``'s fields of a JSON-lines file (.json/.jsonl, optionally gzipped).

    Returns a table with those fields plus ``_line`` (1-based line number); absent fields are
    null. Other fields are ignored unparsed, which keeps big metadata files cheap.
    """
    name = str(path)
    opts = pjson.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
    tables = []
    for data, first_line in _iter_chunks(path, chunk_bytes):
        data = strip_bad_utf8(data, name, first_line, report, lenient)
        lines = line_numbers_of_nonblank(data, first_line)
        if len(lines) == 0:
            continue
        block = max(1 << 20, min(len(data) + 1, 1 << 30))
        read_opts = pjson.ReadOptions(block_size=block)
        try:
            table = pjson.read_json(io.BytesIO(data), read_options=read_opts, parse_options=opts)
            if table.num_rows != len(lines):
                raise pa.ArrowInvalid("row count does not match line count")
        except pa.ArrowInvalid:
            data, lines = _slow_json_lines(data, first_line, schema, name, report, lenient)
            if len(lines) == 0:
                continue
            try:
                table = pjson.read_json(
                    io.BytesIO(data), read_options=read_opts, parse_options=opts
                )
            except pa.ArrowInvalid as e:
                raise DataError(name, int(lines[0]), f"unparseable JSON lines: {e}") from None
        tables.append(table.append_column("_line", pa.array(lines)))
    if not tables:
        return pa.table(
            {f.name: pa.array([], type=f.type) for f in schema}
            | {"_line": pa.array([], pa.int64())}
        )
    return pa.concat_tables(tables)


# ----------------------------------------------------------------------------- delimited text


def check_final_newline(data: bytes, name: str, report: ParseReport, lenient: bool) -> bytes:
    """``data`` if it ends with a newline (or is empty); else a clear error, or (lenient) the
    data without its unterminated last line, counted as ``unterminated_last_line``."""
    if not data or data.endswith(b"\n") or not data.strip():
        return data
    if not lenient:
        raise DataError(
            name,
            data.count(b"\n") + 1,
            "the file does not end with a newline, so its last line may be cut short (an "
            "interrupted copy or download?); pass lenient=True to drop that line and count it",
        )
    report.skip("unterminated_last_line")
    return data[: data.rfind(b"\n") + 1]


def read_delimited(
    data: bytes,
    name: str,
    columns: list[str],
    types: dict[str, pa.DataType],
    report: ParseReport,
    lenient: bool,
    *,
    delimiter: str = ",",
    header: bool = True,
    quoting: bool = True,
) -> pa.Table:
    """Parses delimited text whose records are one per line, with a ``_line`` column.

    ``columns`` names every column in the file; only those in ``types`` are returned. Rows with
    the wrong number of fields or values that do not convert raise ``DataError`` with their line
    (strict), or are dropped and counted (lenient). Blank lines are ignored. A file that does
    not end with a newline may have lost the end of its last line (``1\t10\t4\t8812`` is still
    a valid row): strict mode refuses it, lenient mode drops that line and counts it.
    """
    data = check_final_newline(data, name, report, lenient)
    first_line = 2 if header else 1
    read_opts = pcsv.ReadOptions(column_names=columns, skip_rows=1 if header else 0)
    parse = dict(delimiter=delimiter, quote_char='"' if quoting else False)
    wanted = list(types)
    try:
        table = pcsv.read_csv(
            io.BytesIO(data),
            read_options=read_opts,
            parse_options=pcsv.ParseOptions(ignore_empty_lines=False, **parse),
            convert_options=pcsv.ConvertOptions(
                column_types=types, include_columns=wanted, strings_can_be_null=False
            ),
        )
        numeric = [c for c in wanted if not pa.types.is_string(types[c])]
        if any(table[c].null_count for c in numeric):
            raise pa.ArrowInvalid("nulls: take the slow path")
        lines = np.arange(first_line, first_line + table.num_rows, dtype=np.int64)
        return table.append_column("_line", pa.array(lines))
    except pa.ArrowInvalid:
        pass
    return _slow_delimited(data, name, columns, types, report, lenient, read_opts, parse)


def _slow_delimited(data, name, columns, types, report, lenient, read_opts, parse) -> pa.Table:
    first_line = 2 if read_opts.skip_rows else 1
    invalid: list[int] = []
    errors: list[DataError] = []

    def on_invalid(row):
        if not row.text.strip():
            invalid.append(row.number)
            return "skip"
        if not lenient:
            # Exceptions cannot cross pyarrow's callback: remember it, stop the parse.
            errors.append(
                DataError(
                    name,
                    row.number,
                    f"expected {row.expected_columns} fields, got {row.actual_columns}",
                )
            )
            return "error"
        report.skip("wrong_field_count")
        invalid.append(row.number)
        return "skip"

    read_opts = pcsv.ReadOptions(
        column_names=read_opts.column_names, skip_rows=read_opts.skip_rows, use_threads=False
    )
    try:
        table = pcsv.read_csv(
            io.BytesIO(data),
            read_options=read_opts,
            parse_options=pcsv.ParseOptions(
                ignore_empty_lines=False, invalid_row_handler=on_invalid, **parse
            ),
            convert_options=pcsv.ConvertOptions(
                column_types={c: pa.string() for c in columns},
                include_columns=list(types),
                strings_can_be_null=False,
            ),
        )
    except pa.ArrowInvalid as e:
        if errors:
            raise errors[0] from None
        raise DataError(name, None, f"unparseable delimited text: {e}") from None
    total = table.num_rows + len(invalid)
    lines = np.setdiff1d(
        np.arange(first_line, first_line + total, dtype=np.int64), np.asarray(invalid, np.int64)
    )
    # Blank lines parse as rows of empty fields: drop them silently.
    blank = np.ones(table.num_rows, dtype=bool)
    for c in types:
        blank &= np.asarray(table[c].to_numpy(zero_copy_only=False) == "")
    table = table.filter(pa.array(~blank))
    lines = lines[~blank]
    out = {}
    bad_any = np.zeros(table.num_rows, dtype=bool)
    for c, typ in types.items():
        col = table[c]
        if pa.types.is_string(typ):
            out[c] = col
            continue
        text = np.asarray(col.to_numpy(zero_copy_only=False), dtype=object)
        values = _to_numeric(text)
        bad = np.isnan(values)
        if pa.types.is_integer(typ):  # digits only: "1e3" or "7.0" is not an id
            bad |= ~_plain_integers(text)
        new_bad = bad & ~bad_any
        if new_bad.any() and not lenient:
            i = int(np.flatnonzero(new_bad)[0])
            raise DataError(name, int(lines[i]), f"field {c!r} is not a number: {shown(text[i])}")
        report.skip("mistyped_field", int(new_bad.sum()))
        bad_any |= bad
        out[c] = values
    keep = ~bad_any
    result = {}
    for c, typ in types.items():
        v = out[c]
        if isinstance(v, np.ndarray) and pa.types.is_integer(typ):  # exact, beyond 2^53 too
            result[c] = pa.array([int(t) for t in table[c].filter(pa.array(keep)).to_pylist()], typ)
        elif isinstance(v, np.ndarray):
            v = np.where(keep, v, 0)[keep]
            result[c] = pa.array(v.astype(typ.to_pandas_dtype()))
        else:
            result[c] = v.filter(pa.array(keep))
    result["_line"] = pa.array(lines[keep])
    return pa.table(result)


def _plain_integers(text: np.ndarray) -> np.ndarray:
    import pandas as pd

    return (
        pd.Series(text, dtype=object).str.fullmatch(r"\s*[+-]?\d+\s*").fillna(False).to_numpy(bool)
    )


def _to_numeric(text: np.ndarray) -> np.ndarray:
    import pandas as pd

    return pd.to_numeric(pd.Series(text, dtype=object).str.strip(), errors="coerce").to_numpy(
        dtype=np.float64, na_value=np.nan
    )


def decode_text(data: bytes) -> str:
    """UTF-8 if valid, else latin-1 (older MovieLens releases are latin-1)."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return data.decode("latin-1")
