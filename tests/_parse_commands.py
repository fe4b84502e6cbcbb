"""Test helper: parses command lines of one program without running it (tests/test_docs.py).

    python tests/_parse_commands.py < commands.json

stdin holds a JSON object {TARGET: [argument list, ...]}; TARGET is a module
(`nodepert_dist.train`) or a script path (`benchmarks/throughput.py`). Every target is checked in
this one process, each alone: the absl flags a target defined are deleted, and the target
forgotten, before the next is loaded. absl programs: the module is imported (defining its
flags) and each argument list parsed into the flags; nodepert-train's also resolves --config.
argparse programs: main() runs until its parser returns, then stops. Prints one JSON list: for
each argument list, null or the error: {TARGET: [null or error, ...]}.
"""

import argparse
import importlib
import importlib.util
import inspect
import json
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _Parsed(Exception):
    pass


def _load(target):
    if target.endswith(".py"):
        sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
        spec = importlib.util.spec_from_file_location("docs_check_target", target)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    module = importlib.import_module(target)
    if hasattr(module, "define_flags"):  # a command that defines its flags when it runs (plot)
        module.define_flags()
    return module


def check(module, target, argv):
    from absl import flags

    # argparse programs (argparse.ArgumentParser or nodepert_dist.cli's one-line-error subclass)
    if "ArgumentParser(" in inspect.getsource(module) and "app" not in vars(module):
        original = argparse.ArgumentParser.parse_args

        def parse_then_stop(self, args=None, namespace=None):
            original(self, args, namespace)
            raise _Parsed

        argparse.ArgumentParser.parse_args = parse_then_stop
        sys.argv = [target, *argv]
        try:
            module.main(argv) if module.main.__code__.co_argcount else module.main()
        except _Parsed:
            return None
        except SystemExit as e:
            return f"argparse exit {e.code}"
        return "main() returned without parsing its arguments"
    if argv == ["--help"] and target in ("nodepert_dist.train", "nodepert_dist.plot"):
        return None  # their flags_parser (nodepert_dist/cli.py) answers it; test_config tests it
    flags.FLAGS.unparse_flags()
    try:
        rest = flags.FLAGS([target, *argv])
    except flags.Error as e:
        return str(e)
    if target == "nodepert_dist.data.__main__":
        from nodepert_dist.data import store

        if rest[1:2] != ["fetch"] or not set(rest[2:]) <= set(store.DATASETS) or not rest[2:]:
            return f"not 'fetch NAME...': {rest[1:]}"
        return None
    if target == "nodepert_dist.train":
        if rest[1:]:
            return f"unexpected arguments {rest[1:]}"
        from nodepert_dist import config

        try:
            config.from_flags().validate()
        except ValueError as e:
            return str(e)
    return None


def main():
    from absl import flags

    results = {}
    for target, argvs in json.load(sys.stdin).items():
        before, modules, path = set(flags.FLAGS), set(sys.modules), list(sys.path)
        module = _load(target)
        results[target] = [check(module, target, argv) for argv in argvs]
        for name in set(flags.FLAGS) - before:
            delattr(flags.FLAGS, name)
        for name in set(sys.modules) - modules:  # this checkout's modules go, libraries stay
            file = getattr(sys.modules[name], "__file__", None) or ""
            if file.startswith(REPO) and "site-packages" not in file:
                del sys.modules[name]
        sys.path[:] = path
    print(json.dumps(results))


if __name__ == "__main__":
    main()
