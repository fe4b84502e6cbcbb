"""nodepert_dist/files.py: the one atomic writer and reader of JSON / JSON lines / CSV, and that
no other module writes a file its own way."""

import ast
import errno
import json
import math
import os
import pathlib

import pytest

from nodepert_dist import files

REPO = pathlib.Path(__file__).resolve().parents[1]


def _listing(folder):
    return sorted(os.listdir(folder))


# ----------------------------------------------------------------------------- atomic writes


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "config.json"
    files.write_json(path, {"lr": 0.1})
    with pytest.raises(RuntimeError):
        with files.atomic_open(path) as f:
            f.write('{"lr": 0.')  # half a file, then the writer dies
            raise RuntimeError("killed")
    assert json.loads(path.read_text()) == {"lr": 0.1}
    assert _listing(tmp_path) == ["config.json"]


@pytest.mark.parametrize("broken", ["fsync", "replace"])
def test_a_failing_disk_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, broken):
    path = tmp_path / "summary.csv"
    files.write_csv(path, [{"lr": 0.1, "acc": 0.9}])
    before = path.read_bytes()

    def full_disk(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, broken, full_disk)
    with pytest.raises(OSError, match="No space left"):
        files.write_csv(path, [{"lr": 0.2, "acc": 0.5}])
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert _listing(tmp_path) == ["summary.csv"]


def test_a_value_json_cannot_hold_fails_before_the_file_is_touched(tmp_path):
    path = tmp_path / "outcome.json"
    files.write_json(path, {"status": "finished"})
    with pytest.raises(TypeError):
        files.write_json(path, {"status": object()})
    assert files.read_json(path) == {"status": "finished"}
    assert _listing(tmp_path) == ["outcome.json"]


def test_new_files_get_the_mode_plain_open_gives(tmp_path):
    mask = os.umask(0o027)
    try:
        files.write_text(tmp_path / "a.txt", "x")
        with open(tmp_path / "b.txt", "w") as f:
            f.write("x")
    finally:
        os.umask(mask)
    assert (tmp_path / "a.txt").stat().st_mode == (tmp_path / "b.txt").stat().st_mode


def test_the_folder_is_created(tmp_path):
    path = tmp_path / "new" / "deeper" / "rows.jsonl"
    files.write_jsonl(path, [{"a": 1}, {"a": 2}])
    assert files.read_jsonl(path) == [{"a": 1}, {"a": 2}]


# ----------------------------------------------------------------------------- values


def test_non_finite_floats_are_null_in_json_and_empty_in_csv(tmp_path):
    row = {"loss": math.nan, "acc": math.inf, "nested": {"x": [1.5, -math.inf]}, "ok": 0.5}
    files.write_json(tmp_path / "r.json", row)
    text = (tmp_path / "r.json").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {"loss": None, "acc": None, "nested": {"x": [1.5, None]}, "ok": 0.5}
    files.write_jsonl(tmp_path / "r.jsonl", [row])
    files.append_jsonl(tmp_path / "r.jsonl", [row])
    assert files.read_jsonl(tmp_path / "r.jsonl")[1]["acc"] is None
    files.write_csv(tmp_path / "r.csv", [{"loss": math.nan, "acc": None, "ok": 0.5}])
    assert (tmp_path / "r.csv").read_text().splitlines() == ["loss,acc,ok", ",,0.5"]


def test_csv_columns_in_first_seen_order_or_as_given(tmp_path):
    rows = [{"a": 1}, {"b": 2, "a": 3}]
    files.write_csv(tmp_path / "x.csv", rows)
    assert files.read_csv(tmp_path / "x.csv") == [{"a": "1", "b": ""}, {"a": "3", "b": "2"}]
    files.write_csv(tmp_path / "y.csv", rows, columns=["b"])
    assert files.read_csv(tmp_path / "y.csv") == [{"b": ""}, {"b": "2"}]  # "a" dropped
    files.append_csv(tmp_path / "z.csv", rows[:1], ["a"])
    files.append_csv(tmp_path / "z.csv", rows[1:], ["a"])
    assert (tmp_path / "z.csv").read_text().splitlines() == ["a", "1", "3"]  # one header


# ----------------------------------------------------------------------------- reading


def test_a_byte_order_mark_is_fine(tmp_path):
    (tmp_path / "c.json").write_bytes(b"\xef\xbb\xbf" + b'{"lr": 0.1}')
    assert files.read_json(tmp_path / "c.json") == {"lr": 0.1}
    (tmp_path / "c.csv").write_bytes(b"\xef\xbb\xbf" + b"lr,acc\r\n0.1,0.9\r\n")
    assert files.read_csv(tmp_path / "c.csv") == [{"lr": "0.1", "acc": "0.9"}]
    (tmp_path / "c.jsonl").write_bytes(b"\xef\xbb\xbf" + b'{"a": 1}\n')
    assert files.read_jsonl(tmp_path / "c.jsonl") == [{"a": 1}]


@pytest.mark.parametrize(
    "content, words",
    [
        (
            b'{"lr": 0.1,}',
            "is not valid JSON: Expecting property name enclosed in double quotes at "
            "line 1 column 12",
        ),
        (b'{"lr": "\xff"}', "is not UTF-8 text (invalid start byte at byte 8)"),
    ],
)
def test_a_bad_json_file_is_one_line_naming_it(tmp_path, content, words):
    path = tmp_path / "spec.json"
    path.write_bytes(content)
    with pytest.raises(files.FileFormatError) as e:
        files.read_json(path)
    assert str(e.value) == f"{path} {words}"
    assert isinstance(e.value, ValueError)


def test_jsonl_skips_a_torn_last_line_but_not_a_damaged_middle(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert files.read_jsonl(path) == []  # no file yet: no rows
    with pytest.raises(FileNotFoundError):
        files.read_jsonl(path, missing_ok=False)
    path.write_text('{"epoch": 0}\n{"epoch": 1}\n{"epo')  # killed mid-append
    assert files.read_jsonl(path) == [{"epoch": 0}, {"epoch": 1}]
    path.write_text('{"epoch": 0}\n{"epo\n{"epoch": 2}\n')
    with pytest.raises(files.FileFormatError, match=f"^{path} line 2 is not valid JSON"):
        files.read_jsonl(path)


# ----------------------------------------------------------------------------- one writer

# Writes that are not a file's contents published through a temporary name: each is a folder
# rename (a folder made whole elsewhere and published in one rename, or moved aside), a lock
# file created exclusively, or a log stream. Counted per module, so a new hand-written copy in
# one of these modules fails the test too.
_OTHER_WRITES = {
    "nodepert_dist/checkpoint.py": 1,  # commit: the step folder renamed into place
    "nodepert_dist/checkpoint_layout.py": 2,  # step folders set aside / renamed away to delete
    "nodepert_dist/crash_guard.py": 1,  # rollback: step folders moved aside
    "nodepert_dist/metrics.py": 1,  # a fresh start: earlier run's files moved aside
    "nodepert_dist/data/store.py": 3,  # arrays into a temp folder, published whole (old out)
    "nodepert_dist/experiments/crash_timing.py": 1,  # the replay folder published
    "nodepert_dist/workdir_lock.py": 5,  # the lock: exclusive create + holder (x2), takeover
    "nodepert_dist/sweep_launch.py": 1,  # each run's run.log, a stream
}


def _writes(path: pathlib.Path) -> int:
    """Calls in `path` that write, publish or move files, outside `with files.atomic_open(...)`
    blocks: open()/os.fdopen() for writing, os.replace/os.rename, json.dump, and numpy's or
    matplotlib's save*/savefig/tofile."""
    tree = ast.parse(path.read_text())
    inside = set()  # nodes within a `with files.atomic_open(...)` block
    for node in ast.walk(tree):
        if isinstance(node, ast.With) and any(
            isinstance(i.context_expr, ast.Call)
            and ast.unparse(i.context_expr.func) == "files.atomic_open"
            for i in node.items
        ):
            inside |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
    count = 0
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or id(node) in inside:
            continue
        name = ast.unparse(node.func)
        last = name.rpartition(".")[2]
        given = node.args[1:2] + [k.value for k in node.keywords if k.arg == "mode"]
        modes = [a.value for a in given if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        if name in ("open", "os.fdopen", "io.open") and any(set(m) & set("wax") for m in modes):
            count += 1
        elif name in ("os.replace", "os.rename", "json.dump"):
            count += 1
        elif node.args and (
            name in ("np.save", "np.savez", "np.savez_compressed") or last in ("savefig", "tofile")
        ):
            count += 1
    return count


def test_no_module_writes_a_file_its_own_way():
    found = {}
    for folder in ("nodepert_dist", "launch", "benchmarks"):
        for path in sorted((REPO / folder).rglob("*.py")):
            rel = path.relative_to(REPO).as_posix()
            n = _writes(path)
            if rel != "nodepert_dist/files.py" and n != _OTHER_WRITES.get(rel, 0):
                found[rel] = n
    assert not found, (
        "modules that write files outside nodepert_dist/files.py (write through "
        f"files.atomic_open / write_json / write_csv / append_jsonl): {found}"
    )


def test_the_write_finder_sees_a_hand_written_copy(tmp_path):
    path = tmp_path / "m.py"
    path.write_text(
        "import json, os\n"
        "def save(p, obj):\n"
        "    with open(p + '.tmp', 'w') as f:\n"
        "        json.dump(obj, f)\n"
        "    os.replace(p + '.tmp', p)\n"
        "def read(p):\n"
        "    with open(p) as f:\n"
        "        return f.read()\n"
    )
    assert _writes(path) == 3
    path.write_text(
        "import numpy as np\n"
        "from nodepert_dist import files\n"
        "with files.atomic_open('a.npy', 'wb') as f:\n"
        "    np.save(f, 1)\n"
        "np.save('b.npy', 1)\n"
    )
    assert _writes(path) == 1  # the second: a path written in place
