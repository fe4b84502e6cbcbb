"""Verified HTTP(S) download with a progress line, written through a temporary file."""

from __future__ import annotations

import hashlib
import http.client
import os
import time
import urllib.error
import urllib.request

from absl import logging

from nodepert_dist import files
from nodepert_dist.data.raw import DataError

# Errors a failed transfer can raise: the caller tries the next mirror.
TRANSFER_ERRORS = (OSError, urllib.error.URLError, http.client.HTTPException, DataError)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def download_verified(
    url: str, dest: str, sha256: str, timeout: float = 30.0, size: int | None = None
) -> None:
    """Downloads `url` to `dest`, logging progress; raises on any failure or wrong digest.

    The bytes go to a temporary file beside `dest` (files.atomic_open) that is renamed only
    once complete and verified, and removed on any failure: `dest` is either absent or correct.
    """
    digest, got = hashlib.sha256(), 0
    with files.atomic_open(dest, "wb") as out:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or size
            logging.info(
                "downloading %s (%s) -> %s", url, _mib(total) if total else "size unknown", dest
            )
            last = time.monotonic()
            for chunk in iter(lambda: resp.read(1 << 20), b""):
                out.write(chunk)
                digest.update(chunk)
                got += len(chunk)
                if time.monotonic() - last > 2.0:
                    last = time.monotonic()
                    share = f" ({100 * got / total:.0f}%)" if total else ""
                    logging.info(
                        "  %s: %s of %s%s",
                        os.path.basename(dest),
                        _mib(got),
                        _mib(total) if total else "?",
                        share,
                    )
        if total and got != total:
            raise DataError(f"{url}: transfer interrupted after {got} of {total} bytes")
        if digest.hexdigest() != sha256:
            raise DataError(
                f"{url}: SHA-256 {digest.hexdigest()} does not match the pinned {sha256}"
            )
        logging.info("  %s: %s, SHA-256 verified", os.path.basename(dest), _mib(got))
