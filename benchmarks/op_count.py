"""How many aten ops one denoising forward dispatches: the frozen backbone, + MetaState, + MemDLM.

    python benchmarks/op_count.py                    # LLaDA (32 layers) and Dream (28), bf16 and float32
    python benchmarks/op_count.py --family llada --dtype bfloat16 --layers 2 --out /tmp/ops

Why ops and not FLOPs: on a GPU at batch 1 a decode step is launch-bound (benchmarks/gpu_profile.py
on the LLaDA-8B shape, H200: a dual-cache step is 9.3 ms of GPU time but 45 ms of wall time, about
1150 small kernels per forward), so what a memory adds to a forward's wall time there is set by
the number of ops it dispatches, not by their size. The count does not depend on the model's
width, so a tiny random checkpoint at the released depth gives the full-size model's count on CPU
(the same ops; a GPU may run some of them as other kernels, e.g. the attention backend).

Counted with a `TorchDispatchMode`: every aten op that reaches the dispatcher below autograd
(composite ops such as `linear` arrive decomposed, e.g. `t` + `mm` + `_unsafe_view`). "kernels"
leaves out view ops (`view`, `t`, `expand`, `slice`, ...), which launch no GPU kernel but still
cost a dispatch on the CPU side. Each op is attributed to the innermost function of this package
on the Python stack (`site`), so the table shows which MetaState stage emits it.

Setup: `make_tiny_checkpoint` (random, hidden 64, the released depth unless `--layers`), batch 1,
prompt 24 tokens, gen 32, block 16, `cache=dual`, LLaDA's low-confidence schedule; MetaState is `MetaState.init_for(backbone)`
(default sizes, float32 as always), MemDLM is `FastWeightMemory` with the released inner-loop
defaults. A dual-cache decode has two kinds of forward: the block refresh (whole canvas, fills the
cache) and the window step (the block only, against the cache); the window step is the common one
(steps per block - 1 of them), so it is the headline figure. The session's first forward (a
refresh) is shown apart: it also pays what a memory prepares once per decode.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lm_eval_dlmem.memory import MemoryWrapper

PACKAGE = os.sep + "lm_eval_dlmem" + os.sep
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class OpCounter(TorchDispatchMode):
    """Counts the aten ops dispatched while active, per call site.

    `ops` / `kernels`: totals (kernels = ops that are not views). `sites`: Counter of
    (site, op name) -> count, site = "file.py:Qualname" of the innermost frame in lm_eval_dlmem.
    """

    def __init__(self):
        super().__init__()
        self.ops = 0
        self.kernels = 0
        self.sites: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.kernels += not func.is_view
        self.sites[(_site(), func.overloadpacket.__name__)] += 1
        return func(*args, **(kwargs or {}))


def _site() -> str:
    """The innermost frame of this package on the stack, as `file.py:Qualname`."""
    frame = sys._getframe(2)
    while frame is not None:
        path = frame.f_code.co_filename
        if PACKAGE in path:
            return f"{os.path.basename(path)}:{_qualname(frame)}"
        frame = frame.f_back
    return "(outside lm_eval_dlmem)"


def _qualname(frame) -> str:
    """`Class.method` of a frame (Python 3.11's `co_qualname`; before it, from `self`)."""
    code = frame.f_code
    if hasattr(code, "co_qualname"):
        return code.co_qualname
    owner = frame.f_locals.get("self")
    return f"{type(owner).__name__}.{code.co_name}" if owner is not None else code.co_name


class CountingMemory(MemoryWrapper):
    """`inner` with every forward's ops counted: from before its `before_forward` to after its
    `after_forward`, so the memory's own work around the forward is in the count. `begin`
    (MemDLM's inner loop) is counted apart.

    Attributes:
        forwards: (full, OpCounter) per forward, full = a refresh (or no-cache) forward.
        begin_ops: one OpCounter per `begin`.
    """

    def __init__(self, inner):
        super().__init__(inner)
        self.forwards: list[tuple[bool, OpCounter]] = []
        self.begin_ops: list[OpCounter] = []
        self._counter: OpCounter | None = None

    def begin(self, *args, **kwargs) -> None:
        with OpCounter() as counter:
            super().begin(*args, **kwargs)
        self.begin_ops.append(counter)

    def before_forward(self, info) -> None:
        self._counter = OpCounter().__enter__()
        super().before_forward(info)

    def after_forward(self, info) -> None:
        super().after_forward(info)
        self._counter.__exit__(None, None, None)
        self.forwards.append((bool(info.full), self._counter))


def tiny_backbone(family: str, root: str, dtype: str, layers: int):
    """A random tiny checkpoint of `family` with `layers` decoder layers, loaded in `dtype` on CPU."""
    from lm_eval_dlmem.backbones import load_backbone
    from lm_eval_dlmem.backbones.spec import get_spec
    from lm_eval_dlmem.testing import make_tiny_checkpoint

    layer_key = get_spec(family).size_keys.layers
    path = make_tiny_checkpoint(family, os.path.join(root, family), seed=0, **{layer_key: layers})
    return load_backbone(path, device="cpu", dtype=dtype)


def make_memory(kind: str, backbone):
    """`frozen` / `metastate` (default sizes) / `memdlm` (released inner-loop defaults)."""
    from lm_eval_dlmem.memory import FastWeightMemory, MemDLMConfig, MetaState, NoMemory

    if kind == "frozen":
        return NoMemory()
    if kind == "metastate":
        torch.manual_seed(0)
        return MetaState.init_for(backbone)
    if kind == "memdlm":
        return FastWeightMemory(backbone, MemDLMConfig())
    raise ValueError(f"memory={kind!r} is not one of frozen, metastate, memdlm.")


def decode_counts(backbone, memory, *, prompt: int = 24, gen: int = 32, block: int = 16) -> CountingMemory:
    """Run one batch-1 dual-cache decode with `memory`, counting every forward's ops."""
    from lm_eval_dlmem.decoding.config import DecodeConfig
    from lm_eval_dlmem.decoding.engine import generate

    counting = CountingMemory(memory)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 200, (1, prompt), generator=g)
    cfg = DecodeConfig(gen_length=gen, steps=gen, block_length=block, cache="dual", stop_early=False)
    generate(backbone, ids, None, cfg, counting)
    return counting


FORWARDS = ("window", "refresh", "first")


def per_forward(counting: CountingMemory, kind: str) -> OpCounter:
    """The OpCounter of one forward of `kind`: `first` (the session's first forward, a refresh:
    it also pays what a memory sets up once per session), or a later `refresh` / `window`
    forward; every later forward of a kind dispatches the same ops (checked)."""
    if kind == "first":
        return counting.forwards[0][1]
    same = [c for full, c in counting.forwards[1:] if full == (kind == "refresh")]
    if not same:
        raise RuntimeError(f"The decode ran no {kind} forward after its first.")
    if len({(c.ops, c.kernels) for c in same}) != 1:
        raise RuntimeError(f"{kind} forwards differ in op count: {sorted({c.ops for c in same})}; "
                           "the per-forward figure would be ambiguous.")
    return same[0]


def extra_ops(backbone, memory: str, forward: str = "window") -> tuple[int, int]:
    """(ops, kernels) that `memory` adds to one dual-cache `forward` (see `per_forward`) of
    `backbone` at batch 1."""
    base = per_forward(decode_counts(backbone, make_memory("frozen", backbone)), forward)
    mem = per_forward(decode_counts(backbone, make_memory(memory, backbone)), forward)
    return mem.ops - base.ops, mem.kernels - base.kernels


def layer_counts(backbone) -> OpCounter:
    """Ops of one decoder layer in a window forward: layer 0, dual cache, batch 1 (the same for
    every layer of a dense backbone)."""
    from lm_eval_dlmem.backbones.common import DiffusionCache

    layer, counter = backbone.layers[0], OpCounter()
    ids = torch.randint(10, 200, (1, 40), generator=torch.Generator().manual_seed(0))
    cache = DiffusionCache()
    with torch.no_grad():
        backbone.logits(ids, None, cache=cache)  # fills the cache

        def counted(*args, **kwargs):
            with counter:
                return forward(*args, **kwargs)

        forward, layer.forward = layer.forward, counted
        try:
            backbone.logits(ids, None, cache=cache, window=(24, 40), keep=(24, 40))
        finally:
            del layer.forward  # back to the class's forward
    return counter


def by_site(counter: OpCounter, contains: str | None = None) -> list[tuple[str, int, str]]:
    """(site, ops, the op names with counts) sorted by ops, for sites whose file contains `contains`."""
    ops: collections.Counter = collections.Counter()
    names: dict = collections.defaultdict(collections.Counter)
    for (site, name), n in counter.sites.items():
        if contains is None or contains in site:
            ops[site] += n
            names[site][name] += n
    return [(s, n, ", ".join(f"{k} {v}" for k, v in names[s].most_common())) for s, n in ops.most_common()]


def report(family: str, dtype: str, layers: int) -> dict:
    """Counts for one family and dtype (see the module docstring)."""
    with tempfile.TemporaryDirectory() as root:
        bb = tiny_backbone(family, root, dtype, layers)
        runs = {kind: decode_counts(bb, make_memory(kind, bb)) for kind in ("frozen", "metastate", "memdlm")}
        layer = layer_counts(bb)
    out = dict(family=family, dtype=dtype, layers=layers, forwards={}, layer=dict(ops=layer.ops, kernels=layer.kernels,
               sites=by_site(layer)))
    for kind, counting in runs.items():
        rows = {}
        for name in FORWARDS:
            c = per_forward(counting, name)
            rows[name] = dict(ops=c.ops, kernels=c.kernels)
        rows["metastate_sites"] = by_site(per_forward(counting, "window"), "metastate.py") if kind == "metastate" else None
        rows["memdlm_sites"] = by_site(per_forward(counting, "window"), "fast_weights.py") if kind == "memdlm" else None
        rows["begin_ops"] = sum(c.ops for c in counting.begin_ops)
        out["forwards"][kind] = rows
    return out


def markdown(r: dict) -> str:
    """The tables of one `report`."""
    f = r["forwards"]
    lines = [f"## {r['family']}, backbone {r['dtype']}, {r['layers']} layers, batch 1, cache=dual", "",
             "| forward | frozen ops (kernels) | +MetaState | +MemDLM |", "|---|---:|---:|---:|"]
    for kind in FORWARDS:
        base = f["frozen"][kind]
        cells = [f"{base['ops']} ({base['kernels']})"]
        for mem in ("metastate", "memdlm"):
            m = f[mem][kind]
            cells.append(f"{m['ops']} ({m['kernels']}): +{m['ops'] - base['ops']} (+{m['kernels'] - base['kernels']})")
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    lines += ["", f"MemDLM inner loop (once per request, in `begin`): {f['memdlm']['begin_ops']} ops", "",
              f"one decoder layer, window forward: {r['layer']['ops']} ops ({r['layer']['kernels']} kernels)"]
    for title, sites in (("MetaState ops per window forward, by function", f["metastate"]["metastate_sites"]),
                         ("MemDLM ops per window forward, by function", f["memdlm"]["memdlm_sites"]),
                         ("one decoder layer, by function", r["layer"]["sites"])):
        lines += ["", f"{title}:", "", "| site | ops | aten ops |", "|---|---:|---|"]
        lines += [f"| `{site}` | {n} | {names} |" for site, n, names in sites]
    return "\n".join(lines) + "\n"


RELEASED_DEPTH = {"llada": 32, "dream": 28}  # LLaDA-8B, Dream-7B


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", nargs="+", default=["llada", "dream"], choices=["llada", "dream"], help="tiny backbone families")
    p.add_argument("--dtype", nargs="+", default=["bfloat16", "float32"], choices=["bfloat16", "float32"],
                   help="backbone dtypes (the H200 runs bfloat16; MetaState stays float32)")
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers of the tiny backbone (default: the released depth, LLaDA-8B 32, Dream-7B 28)")
    p.add_argument("--out", default=os.path.join(REPO, "benchmarks", "results", "op_count"),
                   help="results prefix (.json and .md are written)")
    args = p.parse_args(argv)
    if args.layers is not None and args.layers <= 0:
        p.error(f"--layers={args.layers} must be a positive number of decoder layers.")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    torch.set_num_threads(1)
    results = [report(fam, dt, args.layers or RELEASED_DEPTH[fam]) for fam in args.family for dt in args.dtype]
    text = "\n".join(markdown(r) for r in results)
    print(text)
    with open(args.out + ".json", "w") as f:
        json.dump(results, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write(f"MetaState / MemDLM ops per denoising forward (CPU, tiny random checkpoints); command: "
                f"python benchmarks/op_count.py {' '.join(argv if argv is not None else sys.argv[1:])}\n\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
