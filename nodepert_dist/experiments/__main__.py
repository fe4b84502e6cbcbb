"""`python -m nodepert_dist.experiments NAME [--flags]`; `... NAME --help` lists NAME's flags."""

import importlib
import sys

from absl import app

from nodepert_dist.experiments import EXPERIMENTS


def usage() -> str:
    width = max(map(len, EXPERIMENTS))
    return ("usage: python -m nodepert_dist.experiments NAME [--flags]   (NAME --help: its flags)\n"
            "experiments:\n" + "\n".join(f"  {n:<{width}}  {d}" for n, (_, d) in EXPERIMENTS.items()))


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] in ("-h", "--help", "help"):
        print(usage())
        return
    name = sys.argv[1]
    if name not in EXPERIMENTS:
        raise SystemExit(f"error: unknown experiment {name!r}\n{usage()}")
    module = importlib.import_module(f"nodepert_dist.experiments.{EXPERIMENTS[name][0]}")
    sys.argv = [f"{sys.argv[0]} {name}"] + sys.argv[2:]
    app.run(module.main)


if __name__ == "__main__":
    main()
