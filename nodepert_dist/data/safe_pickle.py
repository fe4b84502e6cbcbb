"""The one way the package reads a pickle: a restricted unpickler that builds data, never code.

Dataset pickles (`mnist.pkl.gz`, the CIFAR batches) hold numpy arrays, numpy scalars and plain
containers. A pickle names every callable it wants called, so an ordinary `pickle.load` of a
hostile file runs whatever it names (`os.system`...). Here only the constructors those files
need resolve, under every spelling pickle and numpy write them:

- numpy 1.x (`numpy.core.*`) and 2.x (`numpy._core.*`) array reconstruction: `_reconstruct`
  (protocols 0-4) and `_frombuffer` (protocol 5), `ndarray`, `dtype`, `scalar` (numpy scalars);
- `_codecs.encode`, Python 3's spelling of bytes at protocols 0-2 (latin-1 only);
- `bytes`, `bytearray`, `set`, `frozenset`, `complex` (also as `__builtin__.*`), `OrderedDict`.

Anything else is refused with an error naming the global. Python 2 strings decode as latin-1
(numpy's own rule for its Python 2 pickles), so keys come back as `str` whichever Python wrote
the file; `str_keys` makes bytes keys `str` as well.
"""

from __future__ import annotations

import collections
import importlib
import io
import pickle

import numpy as np

from nodepert_dist.data.raw import DataError


class Refused(pickle.UnpicklingError):
    """The pickle names a global that is not data: `name` is its `module.name`."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def _first(*paths: str):
    """The first `module:name` that imports (numpy 2 moved numpy.core to numpy._core)."""
    for path in paths:
        module, name = path.split(":")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"none of {', '.join(paths)}")


def _latin1_encode(text, encoding="latin1"):
    """`_codecs.encode` as Python 3 pickles bytes at protocols 0-2: latin-1 text only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise Refused(f"_codecs.encode(..., {encoding!r})")
    return text.encode("latin1")


_RECONSTRUCT = _first("numpy._core.multiarray:_reconstruct", "numpy.core.multiarray:_reconstruct")
_SCALAR = _first("numpy._core.multiarray:scalar", "numpy.core.multiarray:scalar")
_FROMBUFFER = _first("numpy._core.numeric:_frombuffer", "numpy.core.numeric:_frombuffer")

ALLOWED = {  # (module, name) as written in the pickle -> what it builds
    **{
        (f"numpy.{core}.{module}", name): obj
        for core in ("core", "_core")
        for module, name, obj in (
            ("multiarray", "_reconstruct", _RECONSTRUCT),
            ("multiarray", "scalar", _SCALAR),
            ("numeric", "_frombuffer", _FROMBUFFER),
        )
    },
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("collections", "OrderedDict"): collections.OrderedDict,
    **{
        (module, t.__name__): t
        for module in ("builtins", "__builtin__")
        for t in (bytes, bytearray, set, frozenset, complex)
    },
}


class _Unpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in ALLOWED:
            raise Refused(f"{module}.{name}")
        return ALLOWED[(module, name)]


def loads(data: bytes, where: str, kind: str = "dataset file"):
    """The object pickled in `data` (read from `where`). DataError naming `where`: "refused ..."
    for a global that is not data, "corrupt ..." when the bytes are not a whole pickle."""
    try:
        return _Unpickler(io.BytesIO(data), encoding="latin1").load()
    except Refused as e:
        raise DataError(
            f"{where}: refused to unpickle {e.name} (a {kind} may hold only numpy "
            f"arrays and plain values; loading this could run code); re-save it "
            f"with arrays, lists and dicts, or fetch the published file"
        ) from None
    except Exception as e:  # truncated, not a pickle, or garbage inside one: a damaged file
        raise DataError(
            f"corrupt {kind} {where} ({type(e).__name__}: {e}); fetch or copy it again"
        ) from None


def str_keys(obj: dict) -> dict:
    """A dict's bytes keys as str (Python 3 re-saves of Python 2 dicts keep bytes keys)."""
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}
