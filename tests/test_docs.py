"""Every command in README.md, WORKSPACE.md and launch/README.md parses as written (flags,
presets, scripts, files), and plots only plot runs their block made. The docs cannot drift."""

import collections
import json
import re
import shlex
import subprocess
import sys

import pytest

from conftest import REPO

DOCS = ["README.md", "WORKSPACE.md", "launch/README.md"]
HELPER = str(REPO / "tests" / "_parse_commands.py")
# Commands that need no check beyond existing (set-up, shell, test runner).
IGNORED = {"source", "mkdir", "cd", "python3 -m venv", "pip", "pytest", "echo"}


def code_blocks(text):
    """Fenced blocks, and 4-space indented blocks that follow a blank line (launch/README)."""
    blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S)
    indented, current, previous_blank = [], [], True
    for line in text.splitlines():
        if line.startswith("    ") and (current or previous_blank) and not line.lstrip().startswith(("-", "|")):
            current.append(line[4:])
        elif current and line.strip():
            indented.append("\n".join(current))
            current = []
        previous_blank = not line.strip()
    if current:
        indented.append("\n".join(current))
    if "```" not in text:
        blocks += indented
    return blocks


def commands(block):
    """Simple commands (token lists) of a shell block: continuations joined, comments dropped,
    split at && ; | and redirections."""
    out = []
    for line in block.replace("\\\n", " ").splitlines():
        tokens = shlex.split(line, comments=True)
        current = []
        for t in tokens + [";"]:
            if t in ("&&", ";", "|", "||", ">", ">>"):
                if current:
                    out.append(current)
                current = [] if t not in (">", ">>") else None
            elif current is not None:
                current.append(t)
    return out


def classify(cmd):
    """(target, argv) to parse, or None for a command that needs no parsing."""
    while cmd and re.fullmatch(r"[A-Z_]+=.*", cmd[0]):
        cmd = cmd[1:]
    prog = cmd[0].removeprefix(".venv/bin/")
    if prog in ("python", "python3"):
        if cmd[1] == "-m":
            module, args = cmd[2], cmd[3:]
            if module in ("venv", "pytest"):
                return None
            if module == "nodepert_dist.experiments":
                return experiment(args)
            return (f"{module}.__main__" if module == "nodepert_dist.data" else module), args
        script, args = cmd[1], cmd[2:]
        assert (REPO / script).exists(), f"no script {script}"
        if script == "launch/local.py":
            inner = args.index("--")
            return [("launch/local.py", args[:inner] + ["--", "true"]), *nested(args[inner + 1:])]
        return script, args
    if prog == "nodepert-train":
        return "nodepert_dist.train", cmd[1:]
    if prog == "nodepert-plot":
        return "nodepert_dist.plot", cmd[1:]
    if prog == "nodepert-experiment":
        return experiment(cmd[1:])
    if prog == "sbatch":
        script = next((t for t in cmd[1:] if t.endswith(".sbatch")), None)
        if script and script.startswith("launch/"):
            assert (REPO / script).exists(), f"no script {script}"
            return "nodepert_dist.train", cmd[cmd.index(script) + 1:]
        return None  # a generated one (sweep.sbatch)
    if prog == "bash":
        assert (REPO / cmd[1]).exists(), f"no script {cmd[1]}"
        return None
    if prog in IGNORED or " ".join(cmd[:3]) in IGNORED:
        return None
    raise AssertionError(f"unclassified command in the docs: {' '.join(cmd)}")


def experiment(args):
    """`nodepert-experiment NAME FLAGS`: the flags of that experiment's module."""
    from nodepert_dist.experiments import EXPERIMENTS
    assert args and args[0] in EXPERIMENTS, f"no experiment {args[:1]}"
    return f"nodepert_dist.experiments.{EXPERIMENTS[args[0]][0]}", args[1:]


def nested(cmd):
    found = classify(cmd)
    return [] if found is None else ([found] if isinstance(found, tuple) else found)


def all_commands():
    for doc in DOCS:
        for i, block in enumerate(code_blocks((REPO / doc).read_text())):
            for cmd in commands(block):
                yield doc, i, cmd


def test_every_documented_command_parses():
    by_target = collections.defaultdict(list)
    n = 0
    for doc, _, cmd in all_commands():
        for target, argv in nested(cmd):
            by_target[target].append((doc, argv))
            n += 1
    assert n >= 25, n  # the extraction found the docs' commands
    assert {"nodepert_dist.train", "nodepert_dist.plot", "launch/local.py",
            "launch/sweep.py", "benchmarks/throughput.py"} <= set(by_target)
    problems = []
    for target, items in by_target.items():
        out = subprocess.run([sys.executable, HELPER, target], input=json.dumps(
            [argv for _, argv in items]), capture_output=True, text=True, timeout=120, cwd=REPO)
        assert out.returncode == 0, out.stderr[-2000:]
        errors = json.loads(out.stdout.strip().splitlines()[-1])
        problems += [f"{doc}: {target} {' '.join(argv)}: {error}"
                     for (doc, argv), error in zip(items, errors) if error]
    assert not problems, "\n".join(problems)


def test_plots_only_plot_runs_their_block_made():
    for doc in DOCS:
        for block in code_blocks((REPO / doc).read_text()):
            made = set()
            for cmd in commands(block):
                made |= {t.split("=", 1)[1] for t in cmd if t.startswith("--workdir=")}
                for t in cmd:
                    if t.startswith("--workdirs="):
                        missing = set(t.split("=", 1)[1].split(",")) - made
                        assert not missing, f"{doc}: plots {missing} before making them"


def test_commands_use_the_venv():
    # Bare console scripts need the venv on PATH: a block using one must activate it first
    # (launch/README.md says once, at its top, that its commands assume it).
    for doc in DOCS:
        for block in code_blocks((REPO / doc).read_text()):
            cmds = commands(block)
            for j, cmd in enumerate(cmds):
                if cmd[0] in ("nodepert-train", "nodepert-plot"):
                    assert any(c[:2] == ["source", ".venv/bin/activate"] for c in cmds[:j]) or (
                        doc == "launch/README.md" and "(`source .venv/bin/activate`)" in
                        (REPO / doc).read_text()), f"{doc}: {' '.join(cmd)} without .venv"


@pytest.mark.parametrize("line, expected", [
    ("a --x=1 && b # c", [["a", "--x=1"], ["b"]]),
    ("python launch/sweep.py --mode=slurm > sweep.sbatch && sbatch sweep.sbatch",
     [["python", "launch/sweep.py", "--mode=slurm"], ["sbatch", "sweep.sbatch"]]),
])
def test_command_splitting(line, expected):
    assert commands(line) == expected
