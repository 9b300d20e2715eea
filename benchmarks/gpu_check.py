"""One-shot GPU check: what a CPU-only project cannot see, measured in one run of a few minutes.

    bash benchmarks/gpu_check.sh --out gpu_check.md                 # on a machine with a GPU
    bash benchmarks/gpu_check.sh --wheels DIR --out gpu_check.md    # offline: install DIR/*.whl first
    bash benchmarks/gpu_check.sh --dry-run                          # the same code on CPU, tiny sizes

Sections (each its own rows in the table; one that fails or runs past its time cap prints
`FAILED: reason` and the run goes on):
  1 tests      tests/test_device.py on the device (tiny checkpoints), in a subprocess
  2 bf16       bf16 logits on the device against float32 on CPU, per family
  3 nf4        `load_backbone(load_in_4bit=True)` and a forward on the device, per family
  4 decode     LLaDA-8B-shaped random-init model in bf16: tokens/s at batch 1 and 16, gen 256,
               block 32, prompt 512: cache=none one token per step (timed over a few steps)
               against cache=dual,threshold=0.9 (whole run)
  6 likelihood requests/s at mc_batch_size 1 and 32, mc_num 128 (the preset default)
  5 memory     MetaState (default size) and the MemDLM inner loop as % of decode time, gen 128,
               on the 8B shape; then MemDLM on a LLaDA-MoE-7B-A1B shape if time is left
Every row carries the peak GPU memory of its measurement (torch.cuda.max_memory_allocated) next
to the weight bytes. Without a GPU (and without --dry-run) it prints one line and exits 0.

Only the public API runs here (load_backbone, generate, DecodeConfig, loglikelihood, MetaState,
FastWeightMemory); the random full-size models are our own backbone classes built from the
config that `make_tiny_checkpoint` writes, with the released models' sizes.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field

import torch

from lm_eval_dlmem.memory.base import MemoryWrapper
from lm_eval_dlmem.memory_plan import human_bytes as gib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ("llada", "dream", "llada_moe")

# Released shapes (shared reference: backbones.md, section 1.1).
LLADA_8B = dict(d_model=4096, n_heads=32, n_kv_heads=32, n_layers=32, mlp_hidden_size=12288,
                max_sequence_length=4096)
LLADA_8B_VOCAB = 126464
MOE_7B = dict(hidden_size=2048, num_attention_heads=16, num_key_value_heads=16, num_hidden_layers=16,
              expert_intermediate_size=1024, dense_intermediate_size=8192, num_experts=64, num_experts_per_tok=8)
MOE_7B_VOCAB = 157184
# Tiny checkpoints with peaked logits (as in tests/test_device.py): top-1 is not a near-tie.
# MoE: 32 experts of width 64, not the tiny default 4 of width 32: bitsandbytes' CPU NF4 kernel
# (the --dry-run) fails on a router of 4 outputs and on 32-wide experts; the released model has 64
# experts of width 1024.
PEAKED = {"llada": {"init_std": 0.3}, "dream": {"initializer_range": 0.3},
          "llada_moe": {"initializer_range": 0.3, "num_experts": 32, "expert_intermediate_size": 64}}


@dataclass(frozen=True)
class Plan:
    """Sizes, time caps (seconds) and the device of one run."""

    device: str
    dtype: torch.dtype
    llada: dict
    llada_vocab: int
    moe: dict
    moe_vocab: int
    prompt: int
    gen: int
    block: int
    batches: tuple[int, ...]
    official_steps: int  # cache=none forwards timed per batch size (every step costs the same)
    overhead_gen: int
    ll_requests: int
    ll_batches: tuple[int, ...]
    mc_num: int
    pytest_k: str | None
    caps: dict = field(default_factory=dict)


def full_plan(device: str) -> Plan:
    return Plan(device=device, dtype=torch.bfloat16, llada=LLADA_8B, llada_vocab=LLADA_8B_VOCAB, moe=MOE_7B,
                moe_vocab=MOE_7B_VOCAB, prompt=512, gen=256, block=32, batches=(1, 16), official_steps=8,
                overhead_gen=128, ll_requests=8, ll_batches=(1, 32), mc_num=128, pytest_k=None,
                caps=dict(tests=110, bf16=40, nf4=40, decode=100, likelihood=45, memory=50, memory_moe=60))


def dry_plan() -> Plan:
    from lm_eval_dlmem.testing import TINY_SIZES

    # float32: bf16 matmuls on CPU are slow enough to break the minute (section 2 still runs bf16)
    return Plan(device="cpu", dtype=torch.float32, llada=TINY_SIZES["llada"], llada_vocab=512,
                moe=TINY_SIZES["llada_moe"], moe_vocab=512, prompt=16, gen=16, block=8, batches=(1, 4),
                official_steps=4, overhead_gen=16, ll_requests=3, ll_batches=(1, 32), mc_num=128,
                pytest_k="forward_matches_cpu_float32 and llada-float32",
                caps=dict(tests=40, bf16=20, nf4=20, decode=20, likelihood=20, memory=20, memory_moe=20))


# ---- the table ----------------------------------------------------------------------------------

COLUMNS = ("section", "check", "result", "peak GPU mem", "memory model", "weights", "note")


class Report:
    """Rows in arrival order; printed as they come (stderr) and rewritten to `out` after each, so
    a run cut short still leaves the rows it finished."""

    def __init__(self, out: str | None, title: str):
        self.rows: list[tuple[str, ...]] = []
        self.out, self.title = out, title

    def add(self, section, check, result, peak="", weights="", note="", predicted="") -> None:
        row = tuple(str(v) for v in (section, check, result, peak, predicted, weights, note))
        self.rows.append(row)
        print(" | ".join(row), file=sys.stderr, flush=True)
        self.write()

    def markdown(self) -> str:
        lines = [self.title, "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
        lines += ["| " + " | ".join(v.replace("|", "/") for v in row) + " |" for row in self.rows]
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        if self.out:
            with open(self.out, "w") as f:
                f.write(self.markdown())


class SectionTimeout(Exception):
    pass


@contextlib.contextmanager
def time_cap(seconds: float):
    """Raise SectionTimeout in this (main) thread after `seconds` (checked between Python ops)."""
    def expire(signum, frame):
        raise SectionTimeout(f"over its {seconds:.0f} s time cap")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.01))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def failure(e: BaseException) -> str:
    """The `FAILED: reason` cell (the traceback goes to stderr)."""
    traceback.print_exception(e, file=sys.stderr)
    message = (str(e).strip().splitlines() or [""])[0][:200]
    return f"FAILED: {type(e).__name__}: {message}"


def run_section(name: str, fn, ctx: "Context") -> None:
    """Run one section under its cap and the run's remaining budget; any failure becomes a row."""
    left = ctx.deadline - time.monotonic()
    if left < 5:
        ctx.report.add(name, "-", "FAILED: skipped, the run's time budget is spent")
        return
    start, ctx.doing = time.monotonic(), "-"
    try:
        with time_cap(min(ctx.plan.caps[name], left)):
            fn(ctx)
    except Exception as e:  # a check script: one section's failure must not stop the others
        ctx.report.add(name, ctx.doing, failure(e))
    finally:
        ctx.release()
        print(f"[{name}: {time.monotonic() - start:.0f} s]", file=sys.stderr, flush=True)


# ---- shared helpers -----------------------------------------------------------------------------

@dataclass
class Context:
    plan: Plan
    report: Report
    deadline: float
    tmp: str
    models: dict = field(default_factory=dict)
    doing: str = "-"  # the check in progress, named in a FAILED row

    def attempt(self, section: str, what: str, fn) -> None:
        """Run one check of a section; a failure becomes its row and the section goes on (a
        time-cap expiry still ends the section)."""
        self.doing = what
        try:
            fn()
        except SectionTimeout:
            raise
        except Exception as e:  # see run_section
            self.report.add(section, what, failure(e))

    @property
    def cuda(self) -> bool:
        return torch.device(self.plan.device).type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def reset_peak(self) -> None:
        if self.cuda:
            self.sync()
            torch.cuda.reset_peak_memory_stats()

    def peak(self) -> str:
        if not self.cuda:
            return "n/a (cpu)"
        return gib(torch.cuda.max_memory_allocated())

    def timed(self, fn):
        """(result, wall seconds) with the device synchronised on both sides."""
        self.sync()
        start = time.perf_counter()
        out = fn()
        self.sync()
        return out, time.perf_counter() - start

    def release(self, *names: str) -> None:
        """Drop the named models (all when none named) and return their memory to the device."""
        for name in names or list(self.models):
            self.models.pop(name, None)
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()


def predicted(bb, config=None, batch: int = 1, prompt: int = 0, memory=None, mc_batch_size: int = 0) -> str:
    """The memory model's peak (`lm_eval_dlmem.memory_plan`) for a row: decoding `config` at
    `batch` (with `memory`), or a likelihood forward of `mc_batch_size` rows when that is given.
    Its failure shows in the cell, not as a lost section."""
    try:
        import lm_eval_dlmem.memory_plan as mp

        shape = mp.Shape.from_config(bb.config.to_dict(), bb.family)
        precision = str(next(bb.model.parameters()).dtype).removeprefix("torch.")
        cost = mp.MemoryCost() if memory is None else mp.MemoryCost.of(memory)
        if mc_batch_size:
            return gib(mp.likelihood_peak(shape, mp.RunPlan(precision=precision, prompt=prompt, gen_length=6,
                                                            mc_batch_size=mc_batch_size, memory=cost)))
        run = mp.RunPlan(precision=precision, prompt=prompt, gen_length=config.gen_length,
                         block_length=config.block_length, cache=config.cache, cfg=config.cfg_scale > 0, memory=cost)
        return gib(mp.decode_peak(shape, run, batch))
    except Exception as e:  # noqa: BLE001 - reported in the table
        return f"error: {type(e).__name__}: {e}"[:80]


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of parameters and buffers as stored (packed uint8 for NF4)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def random_backbone(family: str, sizes: dict, vocab: int, device: str, dtype: torch.dtype, seed: int = 0):
    """A random-init `Backbone` of the given shape built directly on `device` in `dtype` (no
    checkpoint files): the config `make_tiny_checkpoint` writes, with `sizes` overriding it.
    The tokenizer is the tiny one; prompts are random ids and nothing is decoded to text."""
    from lm_eval_dlmem.backbones.loading import Backbone, model_class, prepare_tokenizer
    from lm_eval_dlmem.backbones.spec import get_spec
    from lm_eval_dlmem.testing import build_tokenizer, tiny_config

    tokenizer = build_tokenizer(family)
    cls = model_class(family)
    config = cls.config_class(**tiny_config(family, vocab, tokenizer, **sizes))
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls._from_config(config, dtype=dtype)
    model.eval()  # as load_backbone leaves it
    param = next(model.parameters())
    if param.device.type != torch.device(device).type or param.dtype != dtype:
        raise RuntimeError(f"the model was built on {param.device} in {param.dtype}, not {device} in {dtype}")
    spec = prepare_tokenizer(tokenizer, get_spec(family))
    return Backbone(model=model, tokenizer=tokenizer, spec=spec, family=family)


def random_prompts(backbone, batch: int, length: int, seed: int = 0) -> torch.Tensor:
    """[batch, length] random token ids from the tokenizer's ordinary range, on the model's device."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, len(backbone.tokenizer) - 16, (batch, length), generator=g).to(backbone.device)


class StopDecoding(Exception):
    pass


class StepLimit(MemoryWrapper):
    """A `Memory` that counts the decoder's forwards around an inner memory and, with `limit`,
    stops the decode after that many (cache=none costs the same every step, so a prefix times it)."""

    def __init__(self, inner=None, limit: int | None = None):
        super().__init__(inner)
        self.limit, self.forwards = limit, 0

    def before_forward(self, info):
        if self.limit is not None and self.forwards >= self.limit:
            raise StopDecoding
        self.forwards += 1
        self.inner.before_forward(info)


def decode(ctx: Context, backbone, ids, config, memory=None, limit=None):
    """Run `generate`; returns (tokens committed per row, forwards, seconds)."""
    from lm_eval_dlmem import generate

    counter = StepLimit(memory, limit)

    def run():
        try:
            return generate(backbone, ids, None, config, counter).shape[1]
        except StopDecoding:
            return counter.forwards  # one token per row per step (cache=none, llada schedule)

    tokens, seconds = ctx.timed(run)
    return tokens, counter.forwards, seconds


def official_config(gen: int, block: int):
    from lm_eval_dlmem import DecodeConfig

    return DecodeConfig(gen_length=gen, block_length=block, steps=gen, cache="none", stop_early=False)


def fast_config(gen: int, block: int):
    from lm_eval_dlmem import DecodeConfig

    return DecodeConfig(gen_length=gen, block_length=block, steps=gen, strategy="threshold", threshold=0.9,
                        cache="dual", stop_early=False)


# ---- sections -----------------------------------------------------------------------------------

def section_tests(ctx: Context) -> None:
    """tests/test_device.py with DLMEM_TEST_DEVICE set, in a subprocess (the cap kills it)."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-rf", "-p", "no:cacheprovider", os.path.join("tests", "test_device.py")]
    if ctx.plan.pytest_k:
        cmd += ["-k", ctx.plan.pytest_k]
    env = dict(os.environ, DLMEM_TEST_DEVICE=ctx.plan.device)
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    lines = done.stdout.strip().splitlines()
    summary = lines[-1].strip("= ") if lines else "no output"
    failed = [ln.split(" ", 2)[1] for ln in lines if ln.startswith("FAILED ")]
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-6000:] + done.stderr[-3000:])
        ctx.report.add("tests", f"tests/test_device.py on {ctx.plan.device}", f"FAILED: {summary}",
                       note=", ".join(failed)[:300])
        return
    ctx.report.add("tests", f"tests/test_device.py on {ctx.plan.device}", summary, note="tiny checkpoints; in a subprocess")


def peaked_checkpoint(ctx: Context, family: str) -> str:
    """The tiny peaked checkpoint of `family` (made once per run)."""
    from lm_eval_dlmem import make_tiny_checkpoint

    path = os.path.join(ctx.tmp, "peaked", family)
    return path if os.path.isdir(path) else make_tiny_checkpoint(family, path, seed=1, **PEAKED[family])


def agreement_cases(ctx: Context) -> list:
    """(name, () -> checkpoint path) the bf16 and NF4 sections compare: each family's tiny peaked
    checkpoint (made on first use) and the trained tiny-llada."""
    cases = [(f, lambda f=f: peaked_checkpoint(ctx, f)) for f in FAMILIES]
    return cases + [("llada (trained tiny-llada)", lambda: "tiny-llada")]


@torch.no_grad()
def against_cpu_float32(ctx: Context, path: str, **load):
    """(logits on the device loaded with `load`, float32 logits on CPU, the device backbone, the
    CPU one) for 4 random prompts of 64 tokens."""
    from lm_eval_dlmem import load_backbone

    ref_bb = load_backbone(path, dtype="float32", device="cpu")
    ids = random_prompts(ref_bb, 4, 64, seed=1)
    ref = ref_bb.logits(ids)
    ctx.reset_peak()
    bb = load_backbone(path, device=ctx.plan.device, **load)
    got = bb.logits(ids.to(bb.device)).float().cpu()
    if not torch.isfinite(got).all():
        raise RuntimeError("the logits are not all finite")
    return got, ref, bb, ref_bb


def agreement(got: torch.Tensor, ref: torch.Tensor) -> str:
    diff = (got - ref).abs().max().item()
    top1 = (got.argmax(-1) == ref.argmax(-1)).float().mean().item()
    return f"max abs diff {diff:.3g} ({diff / ref.abs().max().item():.1%} of max logit); top-1 agree {top1:.1%}"


def section_bf16(ctx: Context) -> None:
    """bf16 on the device against float32 on CPU, per family and on the trained tiny-llada."""
    cases = agreement_cases(ctx)
    for name, path in cases:
        what = f"{name}: bf16 on {ctx.plan.device} vs fp32 on cpu"

        def check():
            got, ref, bb, _ = against_cpu_float32(ctx, path(), dtype="bfloat16")
            ctx.report.add("bf16", what, agreement(got, ref), ctx.peak(), gib(weight_bytes(bb.model)),
                           f"4 x 64 positions, vocab {ref.shape[-1]}")

        ctx.attempt("bf16", what, check)


def section_nf4(ctx: Context) -> None:
    """NF4 (bitsandbytes) loading and a forward on the device, against float32 on CPU."""
    cases = agreement_cases(ctx)
    for name, path in cases:
        what = f"{name}: load_in_4bit + forward on {ctx.plan.device}"

        def check():
            got, ref, bb, ref_bb = against_cpu_float32(ctx, path(), load_in_4bit=True)
            quantized = sum(type(m).__name__ == "Linear4bit" for m in bb.model.modules())
            ctx.report.add("nf4", what, f"{quantized} Linear4bit; {agreement(got, ref)}", ctx.peak(),
                           f"{gib(weight_bytes(bb.model))} (fp32 {gib(weight_bytes(ref_bb.model))})",
                           "tiny: 4-bit rounding of width-64 layers moves random logits far; see the trained row")

        ctx.attempt("nf4", what, check)


def llada_8b(ctx: Context):
    """The LLaDA-8B-shaped random model, built once and shared by the sections that need it."""
    if "llada" not in ctx.models:
        p = ctx.plan
        ctx.models["llada"] = random_backbone("llada", p.llada, p.llada_vocab, p.device, p.dtype)
    return ctx.models["llada"]


def section_decode(ctx: Context) -> None:
    """tokens/s of cache=none (timed over the first steps) and of dual + threshold 0.9 (whole run)."""
    p = ctx.plan
    ctx.reset_peak()
    ctx.doing = "build LLaDA-8B shape"
    bb, build_s = ctx.timed(lambda: llada_8b(ctx))
    weights = gib(weight_bytes(bb.model))
    shape = f"prompt {p.prompt}, gen {p.gen}, block {p.block}"
    ctx.report.add("decode", "build LLaDA-8B shape, random init, on device", f"{build_s:.1f} s", ctx.peak(), weights,
                   f"{sum(t.numel() for t in bb.model.parameters()) / 1e9:.2f}B parameters, {p.dtype}")
    for B in p.batches:
        ctx.doing = f"batch {B}: cache=none, 1 token/step"
        ids = random_prompts(bb, B, p.prompt)
        decode(ctx, bb, ids, official_config(p.gen, p.block), limit=1)  # warm-up: kernels, allocator
        ctx.reset_peak()
        steps, _, seconds = decode(ctx, bb, ids, official_config(p.gen, p.block), limit=p.official_steps)
        ctx.report.add("decode", f"batch {B}: cache=none, 1 token/step", f"{B * steps / seconds:.1f} tok/s", ctx.peak(),
                       weights, f"{shape}; first {steps} of {p.gen} steps timed",
                       predicted(bb, official_config(p.gen, p.block), B, p.prompt))
        ctx.doing = f"batch {B}: cache=dual, threshold=0.9"
        decode(ctx, bb, ids, fast_config(p.gen, p.block), limit=2)
        ctx.reset_peak()
        tokens, forwards, seconds = decode(ctx, bb, ids, fast_config(p.gen, p.block))
        ctx.report.add("decode", f"batch {B}: cache=dual, threshold=0.9", f"{B * tokens / seconds:.1f} tok/s",
                       ctx.peak(), weights,
                       f"{shape}; whole run, {tokens / forwards:.2f} tokens/forward; lower bound: random weights "
                       f"rarely pass the threshold (target >= {400 if B == 1 else 3000} tok/s on trained weights)",
                       predicted(bb, fast_config(p.gen, p.block), B, p.prompt))


@torch.no_grad()
def section_likelihood(ctx: Context) -> None:
    """requests/s of `loglikelihood` at each mc_batch_size, and how far the estimates move with it."""
    from lm_eval_dlmem.decoding.likelihood import loglikelihood

    p = ctx.plan
    bb = llada_8b(ctx)
    g = torch.Generator().manual_seed(3)
    prompts = random_prompts(bb, p.ll_requests, p.prompt // 2, seed=3).cpu()
    requests = [(row.tolist(), torch.randint(10, 300, (3 + i % 4,), generator=g).tolist()) for i, row in enumerate(prompts)]
    loglikelihood(bb, requests[:1], mc_num=p.mc_num, batch_size=max(p.ll_batches))  # warm-up
    scores = {}
    for B in p.ll_batches:
        ctx.doing = f"mc_batch_size {B}"
        ctx.reset_peak()
        scores[B], seconds = ctx.timed(lambda: loglikelihood(bb, requests, mc_num=p.mc_num, batch_size=B))
        ctx.report.add("likelihood", f"mc_batch_size {B}", f"{len(requests) / seconds:.2f} requests/s", ctx.peak(),
                       gib(weight_bytes(bb.model)),
                       f"{len(requests)} requests, prefix {p.prompt // 2}, continuation 3-6 tokens, mc_num {p.mc_num}",
                       predicted(bb, prompt=p.prompt // 2, mc_batch_size=B))
    a, b = (scores[B] for B in p.ll_batches[:2])
    moved = max(abs(x[0] - y[0]) for x, y in zip(a, b))
    ctx.report.add("likelihood", f"estimates at batch {p.ll_batches[0]} vs {p.ll_batches[1]}",
                   f"max abs diff {moved:.3g} nats", note=f"same masks; what differs is {p.dtype} kernel numerics")


def overhead_rows(ctx: Context, section: str, bb, modes: dict, with_metastate: bool) -> None:
    """Per decode mode (batch 1, gen `overhead_gen`): frozen decode time, then MetaState (default
    size) and MemDLM (inner loop alone, and the whole decode with it) as % of it."""
    from lm_eval_dlmem.memory import FastWeightMemory, MemDLMConfig, MetaState

    p = ctx.plan
    ids = random_prompts(bb, 1, p.prompt, seed=4)
    G = p.overhead_gen
    canvas = torch.cat([ids, torch.full((1, G), bb.spec.mask_id, device=ids.device)], 1)
    prompt_mask = torch.zeros_like(canvas, dtype=torch.bool)
    prompt_mask[:, : p.prompt] = True
    weights = gib(weight_bytes(bb.model))
    memdlm = FastWeightMemory(bb, MemDLMConfig())

    def inner_loop():
        memdlm.begin(bb, canvas, torch.ones_like(canvas), prompt_mask, [0])
        memdlm.end()

    inner_loop()  # warm-up (autograd, kernels)
    for mode, config in modes.items():
        ctx.doing = f"{mode}: frozen decode, + MetaState, MemDLM"
        decode(ctx, bb, ids, config, limit=2)
        ctx.reset_peak()
        _, _, base = decode(ctx, bb, ids, config)
        ctx.report.add(section, f"{mode}: frozen decode, gen {G}", f"{base:.2f} s", ctx.peak(), weights, f"batch 1, prompt {p.prompt}",
                       predicted(bb, config, 1, p.prompt))
        if with_metastate:
            ms = MetaState.init_for(bb)
            decode(ctx, bb, ids, config, ms, limit=2)  # warm-up: its fp32 kernels
            ctx.reset_peak()
            _, _, t = decode(ctx, bb, ids, config, ms)
            n = sum(w.numel() for w in ms.parameters())
            ctx.report.add(section, f"{mode}: + MetaState (default size)", f"{t / base - 1:+.1%} decode time", ctx.peak(),
                           f"{weights} + {gib(n * 4)}", f"{n / 1e6:.1f}M parameters (fp32); target <= 5%",
                           predicted(bb, config, 1, p.prompt, ms))
            del ms
        ctx.reset_peak()
        _, t_inner = ctx.timed(inner_loop)
        ctx.report.add(section, f"{mode}: MemDLM inner loop", f"{t_inner / base:.1%} of decode time ({t_inner:.2f} s)",
                       ctx.peak(), weights, f"{memdlm.config.inner_steps} SGD steps on the prompt; target <= 15%",
                       predicted(bb, config, 1, p.prompt, memdlm))
        decode(ctx, bb, ids, config, memdlm, limit=2)  # warm-up: the fast-weight shapes
        ctx.reset_peak()
        _, _, t = decode(ctx, bb, ids, config, memdlm)
        ctx.report.add(section, f"{mode}: decode with MemDLM", f"{t / base - 1:+.1%} decode time", ctx.peak(), weights,
                       "inner loop + fast weights on every step", predicted(bb, config, 1, p.prompt, memdlm))


def section_memory(ctx: Context) -> None:
    p = ctx.plan
    modes = {"cache=none": official_config(p.overhead_gen, p.block), "dual+threshold": fast_config(p.overhead_gen, p.block)}
    overhead_rows(ctx, "memory", llada_8b(ctx), modes, with_metastate=True)


def section_memory_moe(ctx: Context) -> None:
    """MemDLM on its own backbone shape (LLaDA-MoE-7B-A1B), in its evaluation setting (cache=none)."""
    p = ctx.plan
    ctx.release()  # the 8B model is done with
    ctx.reset_peak()
    ctx.doing = "build LLaDA-MoE-7B-A1B shape"
    bb, build_s = ctx.timed(lambda: random_backbone("llada_moe", p.moe, p.moe_vocab, p.device, p.dtype))
    ctx.models["moe"] = bb
    ctx.report.add("memory_moe", "build LLaDA-MoE-7B-A1B shape, random init", f"{build_s:.1f} s", ctx.peak(),
                   gib(weight_bytes(bb.model)), f"{sum(t.numel() for t in bb.model.parameters()) / 1e9:.2f}B parameters")
    overhead_rows(ctx, "memory_moe", bb, {"MoE cache=none": official_config(p.overhead_gen, p.block)}, with_metastate=False)


SECTIONS = [("tests", section_tests), ("bf16", section_bf16), ("nf4", section_nf4), ("decode", section_decode),
            ("likelihood", section_likelihood), ("memory", section_memory), ("memory_moe", section_memory_moe)]


# ---- main ---------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="run every section on CPU with tiny sizes (< 60 s)")
    p.add_argument("--out", default=None, help="also write the table as markdown to this file")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds for all sections together (default 320 on a GPU, 150 for --dry-run)")
    p.add_argument("--device", default="cuda", help="the GPU to check (default cuda)")
    p.add_argument("--sections", default=",".join(name for name, _ in SECTIONS),
                   help="comma-separated subset of: " + ", ".join(name for name, _ in SECTIONS))
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    wanted = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(wanted) - {name for name, _ in SECTIONS})
    if unknown:
        raise SystemExit(f"gpu_check: --sections has unknown name(s) {unknown}; choose from {[n for n, _ in SECTIONS]}.")
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible to torch (torch.cuda.is_available() is False); nothing to check "
              "(--dry-run runs the same code on CPU with tiny sizes).")
        return 0
    plan = dry_plan() if args.dry_run else full_plan(args.device)
    if args.dry_run:
        torch.set_num_threads(1)  # tiny matmuls on a shared CPU: more threads only contend
    budget = args.budget if args.budget is not None else (150 if args.dry_run else 320)
    where = "CPU dry run, tiny sizes" if args.dry_run else torch.cuda.get_device_name(torch.device(args.device))
    title = (f"GPU check ({where}; torch {torch.__version__}, "
             f"transformers {__import__('transformers').__version__}; budget {budget:.0f} s)")
    report = Report(args.out, title)
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        ctx = Context(plan=plan, report=report, deadline=start + budget, tmp=tmp)
        for name, fn in SECTIONS:
            if name in wanted:
                run_section(name, fn, ctx)
    report.title += f"; ran {time.monotonic() - start:.0f} s"
    report.write()
    print(report.markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
