"""nodepert_dist.sweep (and launch/sweep.py, its command): grid x seeds expansion, job-array rows,
local runs and the summary CSV."""

import csv
import json
import os
import pathlib
import subprocess
import sys

import _fake_slurm
import pytest

from nodepert_dist import sweep, sweep_launch, sweep_report

REPO = pathlib.Path(__file__).resolve().parents[1]


def make_spec(tmp_path, command=("nodepert-train",), **extra):
    spec = {
        "command": list(command),
        "root": str(tmp_path / "runs"),
        "base": {"num_epochs": 3, "hl_size": 32},
        "grid": {"update_rule": ["np", "sgd"], "lr": [0.01, 0.001]},
        "seeds": 2,
        **extra,
    }
    path = tmp_path / "spec.json"
    path.write_text(json.dumps(spec))
    return str(path)


def test_grid_times_seeds_gives_distinct_runs(tmp_path):
    runs = sweep.expand(sweep.load_spec(make_spec(tmp_path)))
    assert len(runs) == 8
    assert len({r["workdir"] for r in runs}) == 8
    combos = {
        (r["settings"]["update_rule"], r["settings"]["lr"], r["settings"]["seed"]) for r in runs
    }
    assert combos == {(u, lr, s) for u in ("np", "sgd") for lr in (0.01, 0.001) for s in (0, 1)}
    # Row order: grid in spec order, seed innermost; each row's flags carry its settings.
    r5 = runs[5]
    assert r5["settings"] == {"update_rule": "sgd", "lr": 0.01, "seed": 1}
    assert os.path.basename(r5["workdir"]) == "update_rule=sgd,lr=0.01,seed=1"
    assert r5["argv"] == [
        "nodepert-train",
        "--num_epochs=3",
        "--hl_size=32",
        "--update_rule=sgd",
        "--lr=0.01",
        "--seed=1",
        f"--workdir={r5['workdir']}",
    ]


def test_python_spec_and_explicit_seed_list(tmp_path):
    path = tmp_path / "spec.py"
    path.write_text(
        "SPEC = {'grid': {'noise': ['gaussian', 'sign']}, 'seeds': [3, 7],"
        " 'base': {'eval_train': False}}\n"
    )
    runs = sweep.expand(sweep.load_spec(str(path)))
    assert [(r["settings"]["noise"], r["settings"]["seed"]) for r in runs] == [
        ("gaussian", 3),
        ("gaussian", 7),
        ("sign", 3),
        ("sign", 7),
    ]
    assert "--noeval_train" in runs[0]["argv"]


def fake_slurm_env(tmp_path, **extra):
    _fake_slurm.install(tmp_path / "bin")
    return {
        **os.environ,
        "PATH": f"{tmp_path / 'bin'}:{os.environ['PATH']}",
        "FAKE_SLURM_DIR": str(tmp_path),
        "SLURM_JOB_ID": "977",
        **extra,
    }


@pytest.mark.parametrize("task_id", [0, 5, 7])
def test_job_array_index_runs_its_row(tmp_path, task_id):
    spec_path = make_spec(tmp_path, command=["echo"])  # the array task prints its command line
    script = subprocess.run(
        [sys.executable, str(REPO / "launch" / "sweep.py"), f"--spec={spec_path}", "--mode=slurm"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert "#SBATCH --array=0-7" in script
    (tmp_path / "job.sbatch").write_text(script)
    res = subprocess.run(
        ["bash", str(tmp_path / "job.sbatch")],
        capture_output=True,
        text=True,
        timeout=30,
        env=fake_slurm_env(tmp_path, SLURM_ARRAY_TASK_ID=str(task_id)),
        cwd=tmp_path,
    )
    assert res.returncode == 0, res.stderr
    row = sweep.expand(sweep.load_spec(spec_path))[task_id]
    assert res.stdout.splitlines()[-1] == " ".join(row["argv"][1:])
    # --mode=print --index=i gives the same row.
    printed = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "sweep.py"),
            f"--spec={spec_path}",
            f"--index={task_id}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    assert printed.split() == row["argv"]


def write_run(run, epochs_done, num_epochs=3):
    os.makedirs(run["workdir"], exist_ok=True)
    with open(os.path.join(run["workdir"], "config.json"), "w") as f:
        json.dump({"num_epochs": num_epochs, **run["settings"]}, f)
    with open(os.path.join(run["workdir"], "metrics.jsonl"), "w") as f:
        for e in range(epochs_done + 1):
            f.write(
                json.dumps(
                    {
                        "epoch": e,
                        "step": 10 * e,
                        "test_acc": 0.1 * e + run["index"] / 100,
                        "test_loss": 1.0 / (e + 1),
                    }
                )
                + "\n"
            )


def _summary(spec_path, out, *flags) -> str:
    """launch/sweep.py --mode=summary into `out`; its stdout (it must exit 0)."""
    res = subprocess.run(
        [
            sys.executable,
            str(REPO / "launch" / "sweep.py"),
            f"--spec={spec_path}",
            *flags,
            "--mode=summary",
            f"--out={out}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert res.returncode == 0, res.stderr
    return res.stdout


def test_summary_has_finished_runs_only(tmp_path):
    spec_path = make_spec(tmp_path)
    runs = sweep.expand(sweep.load_spec(spec_path))
    finished = {0, 3, 6}
    for run in runs:
        if run["index"] in finished:
            write_run(run, 3)
        elif run["index"] in (1, 4):
            write_run(run, 1)  # stopped after epoch 1
        elif run["index"] == 2:
            write_run(run, 2, num_epochs=2)  # ran with a different num_epochs: its config counts
    out = tmp_path / "summary.csv"
    assert "4 finished run(s), 4 unfinished skipped" in _summary(spec_path, out)
    rows = list(csv.DictReader(open(out)))
    assert [int(r["index"]) for r in rows] == [0, 2, 3, 6]
    by_index = {int(r["index"]): r for r in rows}
    for i in finished:
        r = by_index[i]
        assert (r["update_rule"], float(r["lr"]), int(r["seed"])) == (
            runs[i]["settings"]["update_rule"],
            runs[i]["settings"]["lr"],
            runs[i]["settings"]["seed"],
        )
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
        "print('trained', a['workdir'])\n"
    )
    spec_path = make_spec(tmp_path, command=[sys.executable, str(fake)])
    runs = sweep.expand(sweep.load_spec(spec_path))
    log = []
    assert sweep_launch.run_local(runs[:3], parallel=2, skip_finished=True, log=log.append) == 0
    assert all(sweep.final_row(r) is not None for r in runs[:3])
    assert all(sweep.final_row(r) is None for r in runs[3:])
    assert "trained" in open(os.path.join(runs[0]["workdir"], "run.log")).read()
    log.clear()
    assert sweep_launch.run_local(runs, parallel=2, skip_finished=True, log=log.append) == 0
    assert "[sweep] skipping 3 finished run(s)" in log
    assert sum(line.startswith("[sweep] start") for line in log) == 5


def test_variants_are_named_flag_sets_outermost(tmp_path):
    """Options that go together (a flag set per variant) without a product over every flag."""
    path = make_spec(
        tmp_path,
        variants={"plain": {}, "jvp": {"np_delta": "jvp", "sigma": 0.1}},
        grid={"lr": [0.01, 0.001]},
        seeds=1,
    )
    runs = sweep.expand(sweep.load_spec(path))
    assert [r["settings"] for r in runs] == [
        {"variant": v, "lr": lr, "seed": 0} for v in ("plain", "jvp") for lr in (0.01, 0.001)
    ]
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
                f.write(
                    json.dumps(
                        {
                            "epoch": e,
                            "test_acc": acc,
                            "epoch_time": 2.0 * e,
                            "examples_per_s": 100.0 * e,
                        }
                    )
                    + "\n"
                )
    lines = sweep_report.table(runs).splitlines()
    assert len(lines) == 4, lines
    cells = [c.strip() for c in lines[2].split("|")[1:-1]]
    # final 94/96 -> 95.0 ± 1.0; 90%: seed 0 at epoch 2 (2+4 s), seed 1 at epoch 2 (6 s); 93%:
    # epoch 3 (12 s) and epoch 2 (6 s) -> 9; 95%: seed 0 never -> '-'
    assert cells[:8] == [
        "lr=0.1",
        "3",
        "95.0 ± 1.0",
        "95.0 ± 1.0",
        "6 (2)",
        "9 (2.5)",
        "-",
        "200",
    ], cells
    assert cells[8] == "2" and cells[9].startswith("`nodepert-train ") and "--lr=0.1" in cells[9]
    assert [c.strip() for c in lines[3].split("|")[1:-1]][8] == "1"  # lr=0.2: one seed finished


# ----------------------------------------------------------------------------- issue 17


def sbatch_options(script: str) -> dict:
    """The #SBATCH options as sbatch's parser reads them: quotes group, a backslash escapes, an
    unquoted # starts a comment."""
    import shlex

    opts = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH"):
            words = shlex.split(line[len("#SBATCH") :], comments=True)
            assert len(words) == 1, line
            key, _, value = words[0].partition("=")
            opts[key] = value
    return opts


def slurm_script_of(spec_path) -> str:
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / "sweep.py"), f"--spec={spec_path}", "--mode=slurm"],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout


def test_sweep_rows_are_preempted_and_requeued_like_single_runs(tmp_path):
    _fake_slurm.install(tmp_path / "bin")
    spec_path = make_spec(tmp_path, command=[str(tmp_path / "bin" / "nodepert-train")], seeds=1)
    script = slurm_script_of(spec_path)
    opts = sbatch_options(script)
    assert (
        opts["--signal"] == "USR1@120" and "--requeue" in opts and opts["--open-mode"] == "append"
    )
    (tmp_path / "job.sbatch").write_text(script)
    env = fake_slurm_env(
        tmp_path, SLURM_ARRAY_TASK_ID="2", FAKE_OUTCOMES="75,0", SLURM_OPEN_MODE="a"
    )
    codes = []
    for attempt in range(2):  # preempted, then finished
        if attempt:
            env["SLURM_RESTART_COUNT"] = str(attempt)
        codes.append(
            subprocess.run(
                ["bash", str(tmp_path / "job.sbatch")],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
            ).returncode
        )
    assert codes == [75, 0]
    assert _fake_slurm.requeued(tmp_path) == ["977"]


def test_values_in_the_job_script_are_quoted(tmp_path):
    root = tmp_path / "runs" / "NP vs SGD"
    spec_path = make_spec(
        tmp_path,
        command=["echo"],
        root=str(root),
        grid={"lr": [0.5]},
        seeds=1,
        slurm={"job-name": "np vs sgd", "comment": 'say "hi" #1'},
    )
    script = slurm_script_of(spec_path)
    opts = sbatch_options(script)
    assert opts["--job-name"] == "np vs sgd"
    assert opts["--comment"] == 'say "hi" #1'
    assert opts["--output"] == f"{root}/slurm-%A_%a.out"
    (tmp_path / "job.sbatch").write_text(script)
    res = subprocess.run(
        ["bash", str(tmp_path / "job.sbatch")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
        env=fake_slurm_env(tmp_path, SLURM_ARRAY_TASK_ID="0"),
    )
    assert res.returncode == 0, res.stderr
    assert root.is_dir()
    assert res.stdout.splitlines()[-1] == (
        f"--num_epochs=3 --hl_size=32 --lr=0.5 --seed=0 --workdir={root}/lr=0.5,seed=0"
    )


def test_boolean_flags_render_the_way_absl_reads_them(tmp_path):
    from absl import flags as absl_flags

    spec = sweep.load_spec(
        make_spec(
            tmp_path,
            base={"noeval_train": True, "crash_guard": False, "resume": True},
            grid={"lr": [0.1]},
            seeds=1,
        )
    )
    argv = sweep.expand(spec)[0]["argv"]
    assert argv[1:4] == ["--noeval_train", "--nocrash_guard", "--resume"]
    fv = absl_flags.FlagValues()
    for name in ("eval_train", "crash_guard", "resume"):
        absl_flags.DEFINE_boolean(name, None, "", flag_values=fv)
    for name in ("lr", "seed", "workdir"):
        absl_flags.DEFINE_string(name, None, "", flag_values=fv)
    fv(["prog"] + argv[1:])  # absl itself accepts every flag the row passes
    assert (fv.eval_train, fv.crash_guard, fv.resume) == (False, False, True)


def run_sweep(args, cwd):
    return subprocess.run(
        [sys.executable, str(REPO / "launch" / "sweep.py"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=30,
    )


def assert_one_error_line(res, *words):
    assert res.returncode != 0
    assert "Traceback" not in res.stderr, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    for word in words:
        assert word in lines[0], lines[0]


def test_spec_with_a_byte_order_mark_is_read(tmp_path):
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"grid": {"lr": [0.1, 0.2]}}).encode())
    res = run_sweep([f"--spec={path}", "--mode=print"], tmp_path)
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.splitlines()) == 2


@pytest.mark.parametrize(
    "text, words",
    [
        (None, ["not found"]),
        ('{"grid": {"lr": [0.1, 0.2],}}', ["not valid JSON", "line 1"]),
        ('{"command": "nodepert-train --lr=1"}', ['"command" must be a non-empty list']),
        ('{"seeds": 0}', ['"seeds"']),
        ('{"base": {"lr": null}}', ["'lr'"]),
        ("[1, 2]", ["must be a JSON object"]),
    ],
)
def test_bad_specs_are_one_error_line(tmp_path, text, words):
    path = tmp_path / "spec.json"
    if text is not None:
        path.write_text(text)
    assert_one_error_line(run_sweep([f"--spec={path}", "--mode=print"], tmp_path), *words)


def test_mistyped_command_is_one_error_line_before_any_run(tmp_path):
    spec_path = make_spec(tmp_path, command=["nodepert-trian"])
    res = run_sweep([f"--spec={spec_path}", "--mode=local"], tmp_path)
    assert_one_error_line(res, "nodepert-trian", '"command"')
    assert not (tmp_path / "runs").exists()  # no empty run.log left for a later look to trust


def test_a_row_that_cannot_start_is_a_failure_and_the_rest_still_run(tmp_path):
    spec_path = make_spec(tmp_path, command=[str(tmp_path / "gone")], seeds=1)
    runs = sweep.expand(sweep.load_spec(spec_path))
    log = []
    assert sweep_launch.run_local(runs, parallel=1, skip_finished=False, log=log.append) == len(
        runs
    )
    assert sum(line.startswith("[sweep] FAILED") for line in log) == len(runs)
    for run in runs:
        assert "error: could not start" in open(os.path.join(run["workdir"], "run.log")).read()


def test_table_reads_guarded_runs_event_rows_and_null_accuracy(tmp_path):
    """A crash-guarded run's metrics.jsonl holds event rows (no accuracy) and may hold a null
    accuracy (a non-finite value): the table pools the epoch rows and skips neither run."""
    runs = sweep.expand(sweep.load_spec(make_spec(tmp_path, grid={"lr": [0.1]})))
    for run, middle in zip(
        runs,
        (
            {"event": "rollback", "reason": "accuracy", "resume_step": 3},
            {"epoch": 1, "test_acc": None, "epoch_time": 1.0, "examples_per_s": 50.0},
        ),
    ):
        os.makedirs(run["workdir"])
        with open(os.path.join(run["workdir"], "config.json"), "w") as f:
            json.dump({"num_epochs": 2}, f)
        rows = [
            {"epoch": 0, "test_acc": 0.1},
            {"epoch": 1, "test_acc": 0.9, "epoch_time": 1.0, "examples_per_s": 100.0},
            middle,
            {"epoch": 2, "test_acc": 0.96, "epoch_time": 1.0, "examples_per_s": 100.0},
        ]
        with open(os.path.join(run["workdir"], "metrics.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    lines = sweep_report.table(runs).splitlines()
    assert len(lines) == 3, lines
    cells = [c.strip() for c in lines[2].split("|")[1:-1]]
    assert cells[1:4] == ["2", "96.0 ± 0.0", "96.0 ± 0.0"] and cells[8] == "2", cells


def test_the_sweep_library_imports_no_jax():
    """The launcher stays light: the sweep modules (and what they import) are standard library."""
    code = (
        "import sys; import nodepert_dist.sweep, nodepert_dist.sweep_launch, "
        "nodepert_dist.sweep_report; "
        "heavy = sorted(m for m in ('jax', 'numpy', 'absl', 'flax') if m in sys.modules); "
        "print(heavy)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_a_bad_spec_is_a_sweep_error_in_the_library(tmp_path):
    """The library raises (the grid experiments turn it into their one line); the command exits."""
    path = tmp_path / "spec.json"
    path.write_text('{"grid": {"lr": []}}')
    with pytest.raises(sweep.SweepError, match="grid entry 'lr' must be a non-empty list"):
        sweep.load_spec(str(path))


def test_as_population_makes_one_trainer_job_per_non_member_setting(tmp_path):
    """update_rule x lr x 2 seeds (8 rows) -> 2 jobs, each an lr x seed --population in the
    order population.members lists its members, so member i is that row."""
    from nodepert_dist import population, train

    spec = sweep.load_spec(make_spec(tmp_path))
    runs = sweep.expand(spec)
    jobs = sweep.populations(runs, spec)
    assert [j["index"] for j in jobs] == [0, 1]
    assert [j["settings"] for j in jobs] == [{"update_rule": "np"}, {"update_rule": "sgd"}]
    np_job = jobs[0]
    assert os.path.basename(np_job["workdir"]) == "update_rule=np,population"
    assert np_job["argv"] == [
        "nodepert-train",
        "--num_epochs=3",
        "--hl_size=32",
        "--update_rule=np",
        "--population=lr:0.01,0.001;seed:0,1",
        f"--workdir={np_job['workdir']}",
    ]
    cfg = train.Config(update_rule="np", population="lr:0.01,0.001;seed:0,1")
    for job in jobs:
        assert [r["member"] for r in job["members"]] == [0, 1, 2, 3]
        for run, member in zip(job["members"], population.members(cfg)):
            assert run["workdir"] == job["workdir"]
            assert {k: run["settings"][k] for k in member} == member
    # a row alone in its group stays a solo job; a command other than the trainer is refused
    one = dict(spec, grid={"update_rule": ["np", "sgd"]}, seeds=1)
    assert sweep.populations(sweep.expand(one), one) == [
        dict(r, index=i) for i, r in enumerate(sweep.expand(one))
    ]
    other = dict(spec, command=["python", "my_train.py"])
    with pytest.raises(sweep.SweepError, match="is not nodepert-train"):
        sweep.populations(sweep.expand(other), other)


def test_summary_reads_each_member_out_of_its_population(tmp_path):
    """One population workdir holds every member's rows; the summary gives a finished member its
    own last row and leaves out a member frozen by a crash, as a crashed solo run is left out."""
    spec_path = make_spec(tmp_path, grid={"lr": [0.01, 0.1]})
    spec = sweep.load_spec(spec_path)
    runs = sweep.expand(spec)
    (job,) = sweep.populations(runs, spec)
    os.makedirs(job["workdir"])
    lines = []
    for epoch in range(4):
        for m in range(4):
            lines.append(dict(epoch=epoch, member=m, test_acc=0.5 + m / 10 + epoch / 100))
        if epoch == 2:
            lines.append(dict(event="member_crashed", member=2, epoch=2, step=20))
    with open(os.path.join(job["workdir"], "metrics.jsonl"), "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in lines))
    out = tmp_path / "summary.csv"
    assert "3 finished run(s), 1 unfinished skipped" in _summary(spec_path, out, "--as_population")
    rows = {int(r["index"]): r for r in csv.DictReader(open(out))}
    assert sorted(rows) == [0, 1, 3]
    for i in (0, 1, 3):  # row i is member i: its own accuracy, not the last member's
        assert float(rows[i]["test_acc"]) == pytest.approx(0.5 + i / 10 + 0.03)
        assert rows[i]["workdir"] == job["workdir"]
