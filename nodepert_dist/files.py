"""The one reader and the one atomic writer of the project's files: JSON, JSON lines, CSV.

Writing (`write_text`, `write_json`, `write_csv`, or `atomic_open` for any other format, e.g. a
PNG or .npy): into a temporary file in the destination's folder (so the rename never crosses a
file system), flushed and fsynced, then `os.replace`d over the destination, and the folder
fsynced so the rename survives a power cut. A reader sees the old file or the new one, never a
half-written one; a failed write removes its temporary file and leaves the old file as it was.
Temporary files are named `.<name>.<random>.tmp` and get the umask's usual mode.

Values: JSON has no NaN or Infinity, so non-finite floats are written as null (anywhere in the
object; `json.dumps` would write the non-standard `NaN`, which jq, browsers and pandas' strict
readers reject). In CSV, None and non-finite floats are empty cells.

Appending (`append_jsonl`, `append_csv`): for logs that grow a row at a time (metrics.jsonl).
A process killed mid-append can leave a torn last line; `read_jsonl` ignores it (and only it).

Reading (`read_json`, `read_jsonl`, `read_csv`): UTF-8 with or without a byte-order mark
(Windows editors add one); a file that is not valid is a `FileFormatError` (a ValueError) whose
one-line message names the file and the place.

Standard library only: the sweep launcher imports it without jax.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import secrets
from collections.abc import Callable, Iterable
from typing import Any


class FileFormatError(ValueError):
    """A file that is not what its reader expects (one line naming the file and the place)."""


# ----------------------------------------------------------------------------- writing


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w", **kwargs):
    """`open(path, mode)` that publishes the file only when the block ends without an error.

    `mode` is "w" or "wb" (plus open()'s keyword arguments, e.g. newline="").
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes whole files (mode 'w' or 'wb'), not {mode!r}")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(4)}.tmp")
    # O_EXCL: never another writer's file; 0o666 & ~umask: the mode plain open() gives
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        if "b" not in mode:
            kwargs.setdefault("encoding", "utf-8")
        with open(fd, mode, **kwargs) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(folder)


def fsync_dir(path: str) -> None:
    """Makes the folder's entries (a rename into it) durable; a no-op where folders cannot be
    opened (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename itself is still atomic
    finally:
        os.close(fd)


def write_text(path: str, text: str) -> str:
    with atomic_open(path) as f:
        f.write(text)
    return path


def finite(obj: Any, default: Callable[[Any], Any] | None = None) -> Any:
    """`obj` with every non-finite float (anywhere in dicts, lists, tuples) as None; `default`
    turns other objects (e.g. numpy scalars) into JSON types first."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v, default) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v, default) for v in obj]
    if obj is None or isinstance(obj, (str, int)) or default is None:
        return obj
    return finite(default(obj), default)


def json_text(obj: Any, indent: int | None = 1, default=None) -> str:
    """`obj` as JSON text (keys sorted, non-finite floats as null), one line when indent=None."""
    return json.dumps(
        finite(obj, default), indent=indent, sort_keys=indent is not None, allow_nan=False
    )


def write_json(path: str, obj: Any, *, indent: int = 1, default=None) -> str:
    """`obj` as JSON (keys sorted; `default` converts other types, as in json.dump)."""
    return write_text(path, json_text(obj, indent, default) + "\n")


def write_jsonl(path: str, rows: Iterable[dict]) -> str:
    """A whole JSON-lines file, one row per line."""
    return write_text(path, "".join(json_text(r, None) + "\n" for r in rows))


def _cell(v):
    return "" if v is None or (isinstance(v, float) and not math.isfinite(v)) else v


def _csv_rows(f, rows, columns, header: bool) -> None:
    w = csv.DictWriter(f, columns, extrasaction="ignore")
    if header:
        w.writeheader()
    w.writerows({k: _cell(r.get(k)) for k in columns} for r in rows)


def write_csv(path: str, rows: Iterable[dict], columns: list | None = None) -> str:
    """A CSV with a header: `columns` (keys outside them dropped), or every key in first-seen
    order."""
    rows = list(rows)
    columns = (
        list(columns) if columns is not None else list(dict.fromkeys(k for r in rows for k in r))
    )
    with atomic_open(path, newline="") as f:
        _csv_rows(f, rows, columns, header=True)
    return path


def append_jsonl(path: str, rows: Iterable[dict]) -> None:
    """Appends rows to a JSON-lines file (created if missing), flushed."""
    text = "".join(json_text(r, None) + "\n" for r in rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)


def append_csv(path: str, rows: Iterable[dict], columns: list) -> None:
    """Appends rows to a CSV (the header first when the file is new or empty)."""
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="", encoding="utf-8") as f:
        _csv_rows(f, list(rows), list(columns), header=new)


# ----------------------------------------------------------------------------- reading


def _text(path: str) -> str:
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise FileFormatError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def read_json(path: str) -> Any:
    """The JSON value in `path` (OSError if it cannot be opened)."""
    try:
        return json.loads(_text(path))
    except json.JSONDecodeError as e:
        raise FileFormatError(
            f"{path} is not valid JSON: {e.msg} at line {e.lineno} column {e.colno}"
        ) from None


def read_jsonl(path: str, missing_ok: bool = True) -> list:
    """The rows of a JSON-lines file ([] if it does not exist and `missing_ok`). A torn last
    line (a process killed mid-append) is left out; a bad line before the end is an error."""
    if missing_ok and not os.path.exists(path):
        return []
    lines = _text(path).splitlines()
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number == len(lines):
                break  # torn by a kill mid-write: the row was never complete
            raise FileFormatError(
                f"{path} line {number} is not valid JSON ({e.msg}); the file is "
                f"damaged: remove that line"
            ) from None
    return rows


def read_csv(path: str) -> list[dict]:
    """The rows of a CSV with a header, as dicts of strings."""
    try:
        return list(csv.DictReader(io.StringIO(_text(path), newline="")))
    except csv.Error as e:
        raise FileFormatError(f"{path} is not a valid CSV file: {e}") from None
