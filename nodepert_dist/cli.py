"""absl command lines made friendlier: `--help` shows the program's own flags by group (absl's
default prints "Try --helpfull", which lists ~160 flags of absl and its libraries), and a bad
flag is one line on stderr instead of absl's usage dump or traceback (absl raises a plain
ValueError, not a flags.Error, for `--noflag=value`). `ArgumentParser` does the same for the
argparse scripts."""

from __future__ import annotations

import argparse
import re
import sys

from absl import flags


def help_text(program: str, doc: str, groups: dict) -> str:
    """`doc`, then the flags of each group; `groups`: {title: module the flags were defined in}
    (flags.DEFINE_*(..., module_name=...) names a group directly)."""
    parts = [doc.strip(), "", f"usage: {program} [flags]   (every flag: --helpfull)"]
    for title, module in groups.items():
        text = flags.FLAGS.module_help(module)
        if text.strip():
            parts.append(text.replace(f"\n{module}:", f"\n{title}:", 1))
    return "\n".join(parts) + "\n"


def flag_error(e: Exception) -> str:
    """absl's parse error as one line; `--noX=value` gets the spellings absl does accept."""
    text = (
        "; ".join(line.strip() for line in str(e).splitlines() if line.strip()) or type(e).__name__
    )
    negated = re.match(r"--no(\w+)=(\S*) does not take an argument", text)
    if negated:
        name, value = negated.groups()
        return (
            f"--no{name}={value}: a --no<flag> takes no value; write --no{name}, or "
            f"--{name}=true / --{name}=false"
        )
    return text


def parse_flags(
    argv: list[str], program: str, doc: str | None = None, groups: dict | None = None
) -> list[str]:
    """An absl `flags_parser` for app.run: a flag error is one line (exit 2). With `groups`,
    --help is ours (exit 0); without, absl's help flags (module docstring) stay."""
    if groups is not None and any(a in ("-h", "--help", "-?", "--helpshort") for a in argv[1:]):
        sys.stdout.write(help_text(program, doc or "", groups))
        sys.exit(0)
    try:
        return flags.FLAGS(argv)
    except (flags.Error, ValueError) as e:
        sys.stderr.write(f"error: {flag_error(e)} (see {program} --help)\n")
        sys.exit(2)


def flags_parser(program: str):
    """`parse_flags` for `app.run(main, flags_parser=...)` keeping absl's own --help."""
    return lambda argv: parse_flags(argv, program)


def check_list(name: str, choices=None, pattern: str | None = None, what: str = "") -> None:
    """Validates each item of the comma-list flag `name` at parse time (one-line error before
    any work): one of `choices`, or a full match of `pattern` (described by `what`)."""

    def check(values):
        for v in values or []:
            if choices is not None and v not in choices:
                raise flags.ValidationError(f"{v!r} is not one of {', '.join(choices)}")
            if pattern is not None and not re.fullmatch(pattern, v):
                raise flags.ValidationError(f"{v!r} is not {what}")
        return True

    flags.register_validator(name, check)


POSITIVE_INT = r"[1-9]\d*"


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like the absl programs'."""

    def error(self, message):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")
