"""RecBole atomic `.inter` reader (TSV with a typed header, optionally gzipped), via pyarrow.

Required fields: user_id:token, item_id:token, domain:token (an integer), timestamp:float.
Extra fields are ignored. Errors name the file, and the line where pyarrow reports one.
"""
import os
import re

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as csv

REQUIRED = {"user_id": "token", "item_id": "token", "domain": "token", "timestamp": "float"}


class DataError(ValueError):
    """Bad input data, phrased for the user (file, line, what was expected)."""


def _read_header(path):
    opener = __import__("gzip").open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            line = f.readline()
    except (OSError, EOFError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read the file: {err}") from None
    if not line.strip():
        raise DataError(f"{path}: empty file (expected a header line "
                        f"'user_id:token<TAB>item_id:token<TAB>domain:token<TAB>timestamp:float')")
    fields = line.rstrip("\n\r").split("\t")
    names, types = [], {}
    for position, field in enumerate(fields, start=1):
        if ":" not in field:
            raise DataError(f"{path}: line 1, column {position}: header field '{field}' has no "
                            f"type; expected NAME:TYPE like 'item_id:token'")
        name, kind = field.split(":", 1)
        names.append(name)
        types[name] = kind
    for name, kind in REQUIRED.items():
        if name not in types:
            raise DataError(f"{path}: line 1: header lacks the field '{name}:{kind}' "
                            f"(found {', '.join(fields)})")
        if types[name] != kind:
            raise DataError(f"{path}: line 1: field '{name}' has type '{types[name]}', "
                            f"expected '{kind}'")
    return names


def _pyarrow_line(message):
    """pyarrow reports 'Row #N' counting data rows from 1; the file line is N + 1."""
    match = re.search(r"[Rr]ow #(\d+)", message)
    return int(match.group(1)) + 1 if match else None


def _first_line_with_wrong_width(path, width):
    """Slow scan, only on the error path, to tell the user which line is malformed."""
    opener = __import__("gzip").open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip() and line.rstrip("\n\r").count("\t") + 1 != width:
                return number
    return None


def _first_line_failing(path, index, parse):
    """Slow scan, only on the error path: first data line whose field `index` fails parse."""
    opener = __import__("gzip").open if path.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        next(f)
        for number, line in enumerate(f, start=2):
            fields = line.rstrip("\n\r").split("\t")
            try:
                parse(fields[index])
            except (ValueError, IndexError):
                return number
    return None


def read_inter(path):
    """Return a dict in file order: user and item as pyarrow string arrays (tokens), domain
    (int64 numpy) and timestamp (float64 numpy)."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    names = _read_header(path)
    column_types = {"user_id": pa.string(), "item_id": pa.string(), "domain": pa.string(),
                    "timestamp": pa.float64()}
    try:
        table = csv.read_csv(
            path,
            read_options=csv.ReadOptions(column_names=names, skip_rows=1, block_size=1 << 24),
            parse_options=csv.ParseOptions(delimiter="\t", quote_char=False),
            convert_options=csv.ConvertOptions(column_types=column_types,
                                               include_columns=list(REQUIRED),
                                               strings_can_be_null=False,
                                               quoted_strings_can_be_null=False),
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError) as err:
        message = str(err)
        line = _pyarrow_line(message)
        where = f"line {line}: " if line else ""
        if "columns" in message and "Expected" in message:
            line = line or _first_line_with_wrong_width(path, len(names))
            where = f"line {line}: " if line else ""
            raise DataError(f"{path}: {where}wrong number of columns: expected {len(names)} "
                            f"tab-separated fields as in the header ({message})") from None
        column = re.search(r"column #(\d+)", message)
        if not line and column and "conversion" in message:
            index = int(column.group(1))
            line = _first_line_failing(path, index, float)
            where = f"line {line}: " if line else ""
            message = f"field '{names[index]}' must be a number ({message})"
        raise DataError(f"{path}: {where}{message}") from None
    if table.num_rows == 0:
        raise DataError(f"{path}: no interactions after the header")
    if table.column("timestamp").null_count:
        first = pc.index(pc.is_null(table.column("timestamp")), True).as_py()
        raise DataError(f"{path}: line {first + 2}: timestamp is empty; expected a number")
    domain_text = table.column("domain")
    is_int = pc.match_substring_regex(domain_text, r"^-?[0-9]+$")
    if not pc.all(is_int).as_py():
        first = pc.index(is_int, False).as_py()
        raise DataError(f"{path}: line {first + 2}: domain '{domain_text[first].as_py()}' is not "
                        f"an integer")
    return {
        "user": table.column("user_id"),
        "item": table.column("item_id"),
        "domain": pc.cast(domain_text, pa.int64()).to_numpy(),
        "timestamp": table.column("timestamp").to_numpy(),
    }
