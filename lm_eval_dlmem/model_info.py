"""What lm-eval writes about the model into a results file's `config` (`DlmLM.get_model_info`).

lm-eval sets `config.model_args` to what the user passed and then merges `get_model_info()` into
`config`, so nothing here may reuse that key: our resolved args go to `dlmem_model_args`. The other
fields follow HFLM's (`model_num_parameters`, `model_dtype`, `model_revision`, `model_sha`,
`peft_sha`) so a leaderboard reads both kinds of runs alike, plus `metastate_sha`.

A checkpoint's sha (`checkpoint_sha`) is what tells two runs' weights apart:
- a hub id: the commit of the snapshot the files were loaded from (the hub cache's
  `snapshots/<commit>/` folder; no network), as HFLM's `model_sha` is;
- a local directory (and the embedded tiny checkpoints): `sha256:` + the SHA-256 over the names
  and contents of its files (hidden entries such as `.cache/` skipped); it reads the weights once
  more (about 10 s per 16 GB from a local SSD);
- a model passed loaded from Python: "" (its weights need not match any files).
"""

from __future__ import annotations

import hashlib
import os

CHUNK = 1 << 20


def model_info(lm) -> dict:
    """`get_model_info()` of a DlmLM: HFLM's fields, ours beside them."""
    a, model = lm.args, lm.backbone.model
    loaded = "pretrained" in a.objects
    info = {
        "family": lm.backbone.family,
        "pretrained": a.pretrained,
        "memory": type(lm.memory).__name__,
        "args_fingerprint": lm.fingerprint(),
        "dlmem_model_args": {k: v for k, v in a.fingerprint_fields().items() if v is not None},
        "model_num_parameters": sum(p.numel() for p in model.parameters()),
        "model_dtype": str(next(model.parameters()).dtype),
        "model_revision": a.revision or "main",
        "model_sha": "" if loaded else checkpoint_sha(a.pretrained, a.revision),
    }
    if a.adapter:
        info["peft_sha"] = checkpoint_sha(a.adapter)
    if a.metastate:
        info["metastate_sha"] = checkpoint_sha(a.metastate)
    return info


def checkpoint_sha(name: str, revision: str | None = None) -> str:
    """The identity of a checkpoint's files (see the module docstring); "" when it cannot be
    found (a hub id that is not in the local cache)."""
    from .embedded import resolve_embedded

    path = resolve_embedded(name) or os.path.expanduser(name)
    if os.path.isdir(path):
        return directory_sha(path)
    return hub_commit(name, revision)


def directory_sha(path: str) -> str:
    """`sha256:<hex>` over the relative names and contents of a directory's files, sorted."""
    digest = hashlib.sha256()
    for rel in sorted(_files(path)):
        digest.update(rel.encode() + b"\0")
        with open(os.path.join(path, rel), "rb") as f:
            while block := f.read(CHUNK):
                digest.update(block)
        digest.update(b"\0")
    return "sha256:" + digest.hexdigest()


def _files(root: str):
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in files:
            if not name.startswith("."):
                yield os.path.relpath(os.path.join(folder, name), root)


def hub_commit(repo_id: str, revision: str | None = None) -> str:
    """The commit of the cached snapshot of a hub model (what `from_pretrained` loaded offline)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    except Exception:  # not a valid repo id
        return ""
    if not isinstance(found, str):
        return ""
    return os.path.basename(os.path.dirname(found))
