"""Processes agreeing: values from process 0, all/any over processes, and the jax.distributed
coordination service's key-value store (for threads that must not run collectives).

With one process every function is local and free. The collectives (`everywhere`, `anywhere`,
`from_process_0`) must be called by every process at the same point, like any collective.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.experimental import multihost_utils


def everywhere(ok: bool) -> bool:
    """True when `ok` holds on every process."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def anywhere(flag: bool) -> bool:
    """True when `flag` holds on some process."""
    if jax.process_count() == 1:
        return flag
    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def from_process_0(value: int) -> int:
    """Process 0's integer `value`, on every process."""
    if jax.process_count() == 1:
        return value
    return int(multihost_utils.broadcast_one_to_all(np.int64(value)))


def _client():
    """The coordination-service client (None with one process)."""
    if jax.process_count() == 1:
        return None
    from jax._src import distributed  # the client jax's own multihost_utils use

    return distributed.global_state.client


_LOCAL: dict = {}


def kv_set(key: str, value: str) -> None:
    """Publishes `value` under `key` (once per key) for every process; no collective."""
    client = _client()
    if client is None:
        _LOCAL[key] = value
    else:
        client.key_value_set(key, value)


def kv_get(key: str, timeout_s: float) -> str | None:
    """The value under `key` once some process set it; None if not within `timeout_s`.
    With one process the value must already be set (nothing else could set it)."""
    client = _client()
    if client is None:
        return _LOCAL.pop(key, None)
    try:
        return client.blocking_key_value_get(key, max(1, int(timeout_s * 1000)))
    except Exception as e:  # jax raises its runtime error for DEADLINE_EXCEEDED
        if "DEADLINE_EXCEEDED" in str(e) or "timed out" in str(e).lower():
            return None
        raise
