"""`python -m nodepert_dist.experiments NAME [--flags]`; `... NAME --help` lists NAME's flags."""

import importlib
import sys

from absl import app, flags

from nodepert_dist.experiments import EXPERIMENTS


def usage() -> str:
    width = max(map(len, EXPERIMENTS))
    return (
        "usage: python -m nodepert_dist.experiments NAME [--flags]   (NAME --help: its flags)\n"
        "experiments:\n" + "\n".join(f"  {n:<{width}}  {d}" for n, (_, d) in EXPERIMENTS.items())
    )


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help", "help"):
        print(usage())
        return
    name = sys.argv[1]
    if name not in EXPERIMENTS:
        raise SystemExit(
            f"error: unknown experiment {name!r}; choose one of "
            f"{', '.join(EXPERIMENTS)} (see nodepert-experiment --help)"
        )
    module = importlib.import_module(f"nodepert_dist.experiments.{EXPERIMENTS[name][0]}")
    sys.argv = [f"{sys.argv[0]} {name}"] + sys.argv[2:]
    # --help / --helpshort show the experiment's docstring and its own and the shared flags
    # (--helpfull adds every training flag)
    sys.modules["__main__"].__doc__ = module.__doc__
    from nodepert_dist import cli
    from nodepert_dist.experiments import common

    flags.adopt_module_key_flags(module)
    flags.adopt_module_key_flags(common)
    app.run(module.main, flags_parser=cli.flags_parser(f"nodepert-experiment {name}"))


if __name__ == "__main__":
    main()
