"""launch/sweep.py: grid x seeds expansion, job-array rows, local runs and the summary CSV."""

import csv
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sweep", REPO / "launch" / "sweep.py")
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def make_spec(tmp_path, command=("nodepert-train",), **extra):
    spec = {"command": list(command), "root": str(tmp_path / "runs"),
            "base": {"num_epochs": 3, "hl_size": 32},
            "grid": {"update_rule": ["np", "sgd"], "lr": [0.01, 0.001]}, "seeds": 2, **extra}
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return str(path)


def test_grid_times_seeds_gives_distinct_runs(tmp_path):
    runs = sweep.expand(sweep.load_spec(make_spec(tmp_path)))
    assert len(runs) == 8
    assert len({r["workdir"] for r in runs}) == 8
    combos = {(r["settings"]["update_rule"], r["settings"]["lr"], r["settings"]["seed"]) for r in runs}
    assert combos == {(u, lr, s) for u in ("np", "sgd") for lr in (0.01, 0.001) for s in (0, 1)}
    # Row order: grid in spec order, seed innermost; each row's flags carry its settings.
    r5 = runs[5]
    assert r5["settings"] == {"update_rule": "sgd", "lr": 0.01, "seed": 1}
    assert os.path.basename(r5["workdir"]) == "update_rule=sgd,lr=0.01,seed=1"
    assert r5["argv"] == ["nodepert-train", "--num_epochs=3", "--hl_size=32", "--update_rule=sgd",
                          "--lr=0.01", "--seed=1", f"--workdir={r5['workdir']}"]


def test_python_spec_and_explicit_seed_list(tmp_path):
    path = tmp_path / "spec.py"
    path.write_text("SPEC = {'grid': {'noise': ['gaussian', 'sign']}, 'seeds': [3, 7],"
                    " 'base': {'eval_train': False}}\n")
    runs = sweep.expand(sweep.load_spec(str(path)))
    assert [(r["settings"]["noise"], r["settings"]["seed"]) for r in runs] == [
        ("gaussian", 3), ("gaussian", 7), ("sign", 3), ("sign", 7)]
    assert "--eval_train=false" in runs[0]["argv"]


@pytest.mark.parametrize("task_id", [0, 5, 7])
def test_job_array_index_runs_its_row(tmp_path, task_id):
    spec_path = make_spec(tmp_path, command=["echo"])  # the array task prints its command line
    script = subprocess.run([sys.executable, str(REPO / "launch" / "sweep.py"), f"--spec={spec_path}",
                             "--mode=slurm"], capture_output=True, text=True, timeout=30, check=True).stdout
    assert "#SBATCH --array=0-7" in script
    (tmp_path / "job.sbatch").write_text(script)
    res = subprocess.run(["bash", str(tmp_path / "job.sbatch")], capture_output=True, text=True,
                         timeout=30, env={**os.environ, "SLURM_ARRAY_TASK_ID": str(task_id)},
                         cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    row = sweep.expand(sweep.load_spec(spec_path))[task_id]
    assert res.stdout.splitlines()[-1] == " ".join(row["argv"][1:])
    # --mode=print --index=i gives the same row.
    printed = subprocess.run([sys.executable, str(REPO / "launch" / "sweep.py"), f"--spec={spec_path}",
                              f"--index={task_id}"], capture_output=True, text=True, timeout=30).stdout
    assert printed.split() == row["argv"]


def write_run(run, epochs_done, num_epochs=3):
    os.makedirs(run["workdir"], exist_ok=True)
    with open(os.path.join(run["workdir"], "config.json"), "w") as f:
        json.dump({"num_epochs": num_epochs, **run["settings"]}, f)
    with open(os.path.join(run["workdir"], "metrics.jsonl"), "w") as f:
        for e in range(epochs_done + 1):
            f.write(json.dumps({"epoch": e, "step": 10 * e, "test_acc": 0.1 * e + run["index"] / 100,
                                "test_loss": 1.0 / (e + 1)}) + "\n")


def test_summary_has_finished_runs_only(tmp_path):
    spec_path = make_spec(tmp_path)
    runs = sweep.expand(sweep.load_spec(spec_path))
    finished = {0, 3, 6}
    for run in runs:
        if run["index"] in finished:
            write_run(run, 3)
        elif run["index"] in (1, 4):
            write_run(run, 1)       # stopped after epoch 1
        elif run["index"] == 2:
            write_run(run, 2, num_epochs=2)  # ran with a different num_epochs: its config counts
    out = tmp_path / "summary.csv"
    res = subprocess.run([sys.executable, str(REPO / "launch" / "sweep.py"), f"--spec={spec_path}",
                          "--mode=summary", f"--out={out}"], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert "4 finished run(s), 4 unfinished skipped" in res.stdout
    rows = list(csv.DictReader(open(out)))
    assert [int(r["index"]) for r in rows] == [0, 2, 3, 6]
    by_index = {int(r["index"]): r for r in rows}
    for i in finished:
        r = by_index[i]
        assert (r["update_rule"], float(r["lr"]), int(r["seed"])) == (
            runs[i]["settings"]["update_rule"], runs[i]["settings"]["lr"], runs[i]["settings"]["seed"])
        assert int(r["epoch"]) == 3
        assert float(r["test_acc"]) == pytest.approx(0.3 + i / 100)


def test_local_mode_runs_every_row_and_skips_finished(tmp_path):
    # A stand-in trainer: writes config.json and the metrics of num_epochs epochs to its workdir.
    fake = tmp_path / "fake_train.py"
    fake.write_text(
        "import json, os, sys\n"
        "a = dict(x[2:].split('=', 1) for x in sys.argv[1:])\n"
        "os.makedirs(a['workdir'], exist_ok=True)\n"
        "json.dump({'num_epochs': int(a['num_epochs'])}, open(os.path.join(a['workdir'], 'config.json'), 'w'))\n"
        "with open(os.path.join(a['workdir'], 'metrics.jsonl'), 'w') as f:\n"
        "    for e in range(int(a['num_epochs']) + 1):\n"
        "        f.write(json.dumps({'epoch': e, 'test_acc': float(a['lr'])}) + '\\n')\n"
        "print('trained', a['workdir'])\n")
    spec_path = make_spec(tmp_path, command=[sys.executable, str(fake)])
    runs = sweep.expand(sweep.load_spec(spec_path))
    log = []
    assert sweep.run_local(runs[:3], parallel=2, skip_finished=True, log=log.append) == 0
    assert all(sweep.final_row(r) is not None for r in runs[:3])
    assert all(sweep.final_row(r) is None for r in runs[3:])
    assert "trained" in open(os.path.join(runs[0]["workdir"], "run.log")).read()
    log.clear()
    assert sweep.run_local(runs, parallel=2, skip_finished=True, log=log.append) == 0
    assert "[sweep] skipping 3 finished run(s)" in log
    assert sum(line.startswith("[sweep] start") for line in log) == 5


def test_variants_are_named_flag_sets_outermost(tmp_path):
    """Options that go together (a flag set per variant) without a product over every flag."""
    path = make_spec(tmp_path, variants={"plain": {}, "jvp": {"np_delta": "jvp", "sigma": 0.1}},
                     grid={"lr": [0.01, 0.001]}, seeds=1)
    runs = sweep.expand(sweep.load_spec(path))
    assert [r["settings"] for r in runs] == [
        {"variant": v, "lr": lr, "seed": 0} for v in ("plain", "jvp") for lr in (0.01, 0.001)]
    assert os.path.basename(runs[2]["workdir"]) == "variant=jvp,lr=0.01,seed=0"
    assert "--np_delta=jvp" in runs[2]["argv"] and "--sigma=0.1" in runs[2]["argv"]
    assert not any(a.startswith("--variant") for r in runs for a in r["argv"])
    assert not any("np_delta" in a for a in runs[0]["argv"])


def test_table_pools_seeds_and_times_thresholds(tmp_path):
    runs = sweep.expand(sweep.load_spec(make_spec(tmp_path, grid={"lr": [0.1, 0.2]})))
    accs = {0: [0.85, 0.91, 0.94], 1: [0.89, 0.93, 0.96], 2: [0.5, 0.6, 0.7]}  # run 3 unfinished
    for run in runs[:3]:
        os.makedirs(run["workdir"])
        with open(os.path.join(run["workdir"], "config.json"), "w") as f:
            json.dump({"num_epochs": 3}, f)
        with open(os.path.join(run["workdir"], "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"epoch": 0, "test_acc": 0.1}) + "\n")
            for e, acc in enumerate(accs[run["index"]], 1):
                f.write(json.dumps({"epoch": e, "test_acc": acc, "epoch_time": 2.0 * e,
                                    "examples_per_s": 100.0 * e}) + "\n")
    lines = sweep.table(runs).splitlines()
    assert len(lines) == 4, lines
    cells = [c.strip() for c in lines[2].split("|")[1:-1]]
    # final 94/96 -> 95.0 ± 1.0; 90%: seed 0 at epoch 2 (2+4 s), seed 1 at epoch 2 (6 s); 93%:
    # epoch 3 (12 s) and epoch 2 (6 s) -> 9; 95%: seed 0 never -> '-'
    assert cells[:8] == ["lr=0.1", "3", "95.0 ± 1.0", "95.0 ± 1.0", "6 (2)", "9 (2.5)", "-",
                         "200"], cells
    assert cells[8] == "2" and cells[9].startswith("`nodepert-train ") and "--lr=0.1" in cells[9]
    assert [c.strip() for c in lines[3].split("|")[1:-1]][8] == "1"  # lr=0.2: one seed finished
