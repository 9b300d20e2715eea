"""What identifies a run's results: checkpoint signatures, the model-args fingerprint, and the
`--use_cache` namespacing built on it.

lm-eval keys its `--use_cache` database by (method, request) only, so two runs that differ in
`metastate=`, in decoding args or in a checkpoint retrained in place would share answers. The
harness gives every fingerprint a table of its own; the sweep (`leaderboard/sweep.py`) uses the
same checkpoint signature to decide whether a finished run still counts.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

# Model args whose local files change the model's outputs (the harness fingerprint hashes them).
CHECKPOINT_KEYS = ("pretrained", "tokenizer", "metastate", "adapter")


def checkpoint_signature(path: Path) -> str:
    """Digest of every file under a local checkpoint (or of one file): relative path, size, mtime (ns).

    Size and mtime, not contents: hashing 16 GB of weights per run would cost minutes, and
    retraining or copying over a checkpoint rewrites its files. Hidden entries (.cache, .git)
    are skipped: tools touch them without changing the weights.
    """
    rows = [[f.relative_to(path).as_posix() if f != path else f.name, f.stat().st_size, f.stat().st_mtime_ns]
            for f in _visible_files(path)]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]


def local_signature(value) -> str | None:
    """`checkpoint_signature` of a model-arg value that names a local path; None for hub ids and unset args."""
    if not isinstance(value, str) or not value:
        return None
    path = Path(os.path.expanduser(value))
    return checkpoint_signature(path) if path.exists() else None


def _visible_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = []
    for root, dirs, names in os.walk(path, followlinks=True):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(root) / n for n in sorted(names) if not n.startswith(".")]
    return files


def fingerprint(fields: dict) -> str:
    """Hash of the model args that can change an output (`ModelArgs.fingerprint_fields`) and of
    the files of the local checkpoints they name, so a checkpoint retrained in place (same path,
    new weights) is a new configuration."""
    files = {k: local_signature(fields.get(k)) for k in CHECKPOINT_KEYS}
    blob = json.dumps([fields, files], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def namespace_cache_hook(cache_hook, fingerprint: str) -> None:
    """`namespace_cache` on the db of lm-eval's `CacheHook` (none without --use_cache): lm-eval's
    cache key is only (method, request), so two runs that differ in metastate= or decoding args
    would otherwise share answers."""
    db = getattr(cache_hook, "dbdict", None)
    if db is not None:
        namespace_cache(db, fingerprint)


def namespace_cache(db, fingerprint: str) -> None:
    """Point lm-eval's SqliteDict cache at a table of its own for this model configuration.

    lm-eval's `CachingLM` and the `CacheHook` it hands the model share one `SqliteDict` object
    (`dbdict`), and the hook does not reach back to the `CachingLM`: switching that object's table
    is the one place that redirects both the cache reads and the model's partial writes.
    """
    table = f"dlmem_{fingerprint}"
    try:
        from sqlitedict import SqliteDict

        SqliteDict(db.filename, tablename=table, autocommit=True).close()  # creates the table
        db.tablename = table
    except Exception as e:  # an unknown cache backend must not silently mix configurations
        raise RuntimeError(
            f"Could not namespace the --use_cache database by model args ({e!r}); run without --use_cache "
            "or use one cache path per configuration."
        ) from e
