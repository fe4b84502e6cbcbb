"""The docs are true and whole. Every command in README.md, WORKSPACE.md, launch/README.md and
docs/**/*.md parses as written (flags, presets, scripts, files), and plots only plot runs their
block made; every link between them resolves (file and heading); every result is stamped; no file
points outside the repository. The docs cannot drift."""

import collections
import json
import re
import shlex
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

DOCS = [
    "README.md",
    "WORKSPACE.md",
    "launch/README.md",
    *sorted(str(p.relative_to(REPO)) for p in (REPO / "docs").rglob("*.md")),
]
HELPER = str(REPO / "tests" / "_parse_commands.py")
# Commands that need no check beyond existing (set-up, shell, test runner).
IGNORED = {"source", "mkdir", "cd", "python3 -m venv", "pip", "pytest", "echo", "ruff"}
# Fenced blocks with one of these info strings are shell; others (```text: formulas, code) are not.
SHELL_INFO = {"", "sh", "bash", "shell", "console"}


def code_blocks(text):
    """Shell blocks: fenced ones (no info string, or a shell's; in lists too), and 4-space
    indented blocks that follow a blank line in a file without fences (launch/README)."""
    blocks = [
        textwrap.dedent(body)
        for info, body in re.findall(r"^ *```([^\n]*)\n(.*?)^ *```", text, flags=re.M | re.S)
        if info.strip() in SHELL_INFO
    ]
    indented, current, previous_blank = [], [], True
    for line in text.splitlines():
        if (
            line.startswith("    ")
            and (current or previous_blank)
            and not line.lstrip().startswith(("-", "|"))
        ):
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
            return [("launch/local.py", args[:inner] + ["--", "true"]), *nested(args[inner + 1 :])]
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
            return "nodepert_dist.train", cmd[cmd.index(script) + 1 :]
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
    by_target, docs = collections.defaultdict(list), collections.defaultdict(list)
    n = 0
    for doc, _, cmd in all_commands():
        for target, argv in nested(cmd):
            by_target[target].append(argv)
            docs[target].append(doc)
            n += 1
    assert n >= 25, n  # the extraction found the docs' commands
    assert {
        "nodepert_dist.train",
        "nodepert_dist.plot",
        "launch/local.py",
        "launch/sweep.py",
        "benchmarks/throughput.py",
    } <= set(by_target)

    # One process checks every program, each alone (tests/_parse_commands.py).
    out = subprocess.run(
        [sys.executable, HELPER],
        input=json.dumps(by_target),
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    checked = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(checked) == set(by_target)
    problems = [
        f"{doc}: {target} {' '.join(argv)}: {error}"
        for target, errors in checked.items()
        for doc, argv, error in zip(docs[target], by_target[target], errors, strict=True)
        if error
    ]
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
                        doc == "launch/README.md"
                        and "(`source .venv/bin/activate`)" in (REPO / doc).read_text()
                    ), f"{doc}: {' '.join(cmd)} without .venv"


@pytest.mark.parametrize(
    "line, expected",
    [
        ("a --x=1 && b # c", [["a", "--x=1"], ["b"]]),
        (
            "python launch/sweep.py --mode=slurm > sweep.sbatch && sbatch sweep.sbatch",
            [["python", "launch/sweep.py", "--mode=slurm"], ["sbatch", "sweep.sbatch"]],
        ),
    ],
)
def test_command_splitting(line, expected):
    assert commands(line) == expected


def test_docs_are_found():
    # The new docs are under test: a moved or renamed docs file cannot silently drop out.
    assert {
        "docs/usage.md",
        "docs/data.md",
        "docs/experiments.md",
        "docs/design/estimator.md",
        "docs/design/distributed.md",
        "docs/design/checkpoints.md",
        "docs/design/reliability.md",
        "docs/results/README.md",
        "docs/results/variance.md",
    } <= set(DOCS)


def test_readme_is_the_front_door():
    assert len((REPO / "README.md").read_text().splitlines()) <= 200


def slug(heading):
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(text):
    found, seen = set(), collections.Counter()
    for heading in re.findall(r"^#{1,6} (.+)$", prose(text), flags=re.M):
        base = slug(heading)
        found.add(base if not seen[base] else f"{base}-{seen[base]}")
        seen[base] += 1
    return found


def prose(text):
    """The text without fenced blocks and inline code (where brackets are not links)."""
    text = re.sub(r"^ *```.*?^ *```", "", text, flags=re.M | re.S)
    return re.sub(r"`[^`\n]*`", "", text)


def broken_links(doc, text):
    """Relative links of one markdown file whose file, or heading, does not exist."""
    here = (REPO / doc).parent
    problems = []
    for target in re.findall(r"\]\(([^)\s]+)\)", prose(text)):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto: not checked here (no network)
        path, _, anchor = target.partition("#")
        file = (here / path).resolve() if path else REPO / doc
        if not file.exists():
            problems.append(f"{doc}: link to missing {target}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
            problems.append(f"{doc}: link to missing heading {target}")
    return problems


def test_links_between_docs_resolve():
    problems, n = [], 0
    for doc in DOCS:
        text = (REPO / doc).read_text()
        n += len(re.findall(r"\]\(", prose(text)))
        problems += broken_links(doc, text)
    assert n >= 40, n  # the extraction found the docs' links
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    "text, broken",
    [
        ("[a](docs/usage.md) [b](docs/design/estimator.md#the-update)", []),
        ("[a](nowhere/nothing.md)", ["README.md: link to missing nowhere/nothing.md"]),
        (
            "[a](docs/usage.md#no-such-heading)",
            ["README.md: link to missing heading docs/usage.md#no-such-heading"],
        ),
        ("`[addr]:port` and [x](https://example.org/nothing)", []),
    ],
)
def test_link_check_catches_broken_links(text, broken):
    assert broken_links("README.md", text) == broken


def test_every_result_is_stamped():
    # Each study says which command, date, machine and commit produced it.
    for path in sorted((REPO / "docs" / "results").glob("*.md")):
        if path.name == "README.md":
            continue
        text = path.read_text()
        for what, pattern in [
            ("provenance", r"Provenance"),
            ("date", r"\b20\d\d-\d\d-\d\d\b"),
            ("commit", r"`[0-9a-f]{7,40}`"),
            ("machine", r"CPU|GPU"),
        ]:
            assert re.search(pattern, text), f"{path.name}: no {what}"


SOURCES = [
    p
    for top in ("nodepert_dist", "launch", "benchmarks", "tests", ".ci")
    for p in sorted((REPO / top).rglob("*"))
    if p.is_file() and p.suffix != ".pyc"
]
OUTSIDE = ("DESIGN" + ".md", "../" + "shared")  # spelled apart so this file does not match


@pytest.mark.parametrize("top", ["nodepert_dist", "launch", "benchmarks", "tests", ".ci", "docs"])
def test_nothing_points_outside_the_repository(top):
    files = [p for p in sorted((REPO / top).rglob("*")) if p.is_file() and p.suffix != ".pyc"]
    if top == "docs":
        files += [REPO / "README.md", REPO / "WORKSPACE.md"]
    assert files
    found = [
        f"{p.relative_to(REPO)}: {word}"
        for p in files
        for word in OUTSIDE
        if word in p.read_text(errors="replace")
    ]
    assert not found, "\n".join(found)


def test_pointers_into_docs_exist():
    # Comments and help texts name docs/ files; a moved or renamed one leaves them dangling.
    problems = []
    for p in SOURCES:
        for target in re.findall(r"\bdocs/[\w./-]*\w", p.read_text(errors="replace")):
            if not (REPO / target).exists():
                problems.append(f"{p.relative_to(REPO)}: {target}")
    assert not problems, "\n".join(problems)


def test_files_the_docs_name_exist():
    # A renamed or moved script, module or spec leaves no stale name in the docs' prose (commands
    # in code blocks are checked above; generated outputs under benchmarks/results/ are exempt).
    n, problems = 0, []
    named = re.compile(
        r"(?<![\w./<-])((?:nodepert_dist|launch|benchmarks|tests|docs|\.ci)/"
        r"[\w./-]*\.(?:py|sh|sbatch|json|md|ini))\b"
    )
    for doc in DOCS:
        for path in named.findall((REPO / doc).read_text()):
            n += 1
            if not path.startswith("benchmarks/results/") and not (REPO / path).exists():
                problems.append(f"{doc}: {path}")
    assert n >= 30, n
    assert not problems, "\n".join(problems)
