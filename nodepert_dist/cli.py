"""absl command lines made friendlier: `--help` shows the program's own flags by group (absl's
default prints "Try --helpfull", which lists ~160 flags of absl and its libraries), and a bad
flag is one line on stderr instead of absl's usage dump."""

from __future__ import annotations

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


def parse_flags(argv: list[str], program: str, doc: str, groups: dict) -> list[str]:
    """An absl `flags_parser` for app.run: our --help (exit 0); a flag error is one line (exit 2)."""
    if any(a in ("-h", "--help", "-?", "--helpshort") for a in argv[1:]):
        sys.stdout.write(help_text(program, doc, groups))
        sys.exit(0)
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.stderr.write(f"error: {e} (see {program} --help)\n")
        sys.exit(2)
