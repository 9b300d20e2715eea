"""Monte Carlo log-likelihood of a continuation under a masked diffusion LM.

The estimator is the one of LLaDA's official evaluator (`eval_llada.py`, `get_log_likelihood`):
mask only continuation tokens; within a stratum of b samples draw k uniform in 1..T and mask
`x_i = round(linspace(k, k + (b-1) T/b))` tokens (wrapped into 1..T) at random positions; the
sample's loss is `sum_masked CE / (x_i / T)`; log p ~= -mean loss over `mc_num` samples (an ELBO
bound). The official stratum is its `batch_size`; here it is `stratum` (default 32, its default),
so the estimate does not change with how rows are packed into forwards.

Batching: every request's samples are drawn up front from its own generator (`seeds[i]`), in
the official order (k, then one permutation per sample). The (request, sample) rows of all
requests, length-sorted, are then packed into forwards of `batch_size` rows, so small `mc_num`
(1 for MMLU-style tasks) still fills a forward and the results do not depend on batch size or
request order. Samples of one request that drew the same mask are forwarded once and weighted
by their count (the estimate is unchanged; a one-token continuation needs a single row whatever
`mc_num` is). The LM head runs only over the continuation span (`keep`).

Block-causal families (LLaDA2.x, `FamilySpec.block_causal`): neither the official LLaDA2
pipelines (dllm has no LLaDA2 evaluator; its block-diffusion evaluator refuses likelihood) nor
MemDLM (`memdlm/eval/llada21.py` scores with LLaDA's estimator under a full bidirectional 4-D mask,
an attention pattern the block-diffusion samplers never use) give a block-causal estimator, so it is
built from the chain rule over blocks. The canvas is laid out as in decoding: blocks of
`block_length` tokens from the prefix's first token, attention block-causal. The continuation is
cut at block boundaries into segments c_1..c_m (the first shares its block with the prefix's end),
and log p(c | x) = sum_j log p(c_j | x, c_<j); each term gets the estimator above with masks drawn
only over c_j's tokens (its own strata, `mc_num` samples, ratio over |c_j|). A row masks a single
segment, so every block before it is clean and every block after it is invisible: each
conditional is computed under exactly the attention and context the samplers decode that block
with. Costs `mc_num` samples per block the continuation touches (one-token continuations: one).

Shapes: n rows in a forward, R distinct requests among them, L padded length, T continuation
length (T_max the longest in the forward), V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..memory.base import NoMemory
from .forward import forward_step
from .seeds import row_seeds, window_seed
from .strategies import low_confidence


def stratified_masks(target_len: int, b: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One stratum of b samples: bool masks [b, T] over the continuation and mask ratios [b].
    Draws from `gen` exactly what the official `_forward_process` draws from the global RNG."""
    T = target_len
    k = torch.randint(1, T + 1, (), generator=gen)
    # the end point is a float32 tensor expression, as in the reference (rounding matches)
    counts = torch.round(torch.linspace(float(k), k + (b - 1) * (T / b), steps=b)).long()
    counts = ((counts - 1) % T) + 1
    base = torch.arange(T)
    masks = torch.stack([(base < counts[i])[torch.randperm(T, generator=gen)] for i in range(b)])
    return masks, counts.float() / T


def draw_samples(target_len: int, mc_num: int, stratum: int, gen: torch.Generator):
    """All `mc_num` samples of one request: masks [mc_num, T], ratios [mc_num]; strata of
    `stratum` samples (the last one smaller when `stratum` does not divide `mc_num`)."""
    masks, ratios = [], []
    for start in range(0, mc_num, stratum):
        m, r = stratified_masks(target_len, min(stratum, mc_num - start), gen)
        masks.append(m)
        ratios.append(r)
    return torch.cat(masks), torch.cat(ratios)


def pack(requests, order, pad_id: int, fill_id: int | None = None):
    """Left-padded canvases [R, L] of prefix+continuation for `order`: ids, attention mask (None
    without padding), prompt mask; the continuation replaced by `fill_id` when given."""
    rows = [(list(requests[i][0]), list(requests[i][1])) for i in order]
    L = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), L), pad_id, dtype=torch.long)
    attn = torch.zeros(len(rows), L, dtype=torch.long)
    prompt = torch.zeros(len(rows), L, dtype=torch.bool)
    for r, (p, c) in enumerate(rows):
        n = len(p) + len(c)
        ids[r, L - n:] = torch.tensor(p + c)
        attn[r, L - n:] = 1
        prompt[r, L - n:L - len(c)] = True
        if fill_id is not None and c:
            ids[r, L - len(c):] = fill_id
    return ids, (None if bool(attn.all()) else attn), prompt


def attention_blocks(backbone, block_length) -> int | None:
    """The block length the estimator attends with: `block_length` for a block-causal family
    (LLaDA2.x), None (bidirectional, the argument ignored) for the others.

    Raises:
        ValueError: a block-causal family without a positive block length.
    """
    if not backbone.spec.block_causal:
        return None
    if block_length is None or int(block_length) < 1:
        raise ValueError(
            f"block_length={block_length}: {backbone.spec.name} checkpoints attend block-causally, so "
            "likelihood scoring needs the block length they decode with (block_length=32 for the "
            "released LLaDA2.x models).")
    return int(block_length)


def segments(prefix_len: int, target_len: int, block_length: int | None) -> list[tuple[int, int]]:
    """Continuation slices [s, e) that lie in one block of a canvas whose blocks start at the
    prefix's first token; one slice (the whole continuation) without blocks."""
    if block_length is None or target_len == 0:
        return [(0, target_len)]
    cuts = [t for t in range(1, target_len) if (prefix_len + t) % block_length == 0]
    bounds = [0, *cuts, target_len]
    return list(zip(bounds[:-1], bounds[1:]))


@torch.no_grad()
def loglikelihood(backbone, requests, *, mc_num: int = 128, batch_size: int = 32, seeds=None,
                  cfg_scale: float = 0.0, check_greedy: bool = False, memory=None, progress=None,
                  stratum: int = 32, block_length: int | None = None) -> list[tuple[float, bool]]:
    """Score continuations.

    Args:
        backbone: a loaded `Backbone`.
        requests: list of (prefix token ids, continuation token ids); the prefix must be non-empty.
        mc_num: Monte Carlo samples per request.
        batch_size: (request, sample) rows per forward (doubled under CFG); a speed knob only.
        seeds: one seed per request (default: its index); request i draws only from `seeds[i]`.
        cfg_scale: classifier-free guidance (unconditional pass with the prefix masked).
        check_greedy: also decide, for continuations of two or more tokens, whether greedy
            one-at-a-time unmasking reproduces the continuation (LLaDA's
            `suffix_greedy_prediction`, one forward per token). A one-token continuation is
            always decided: its fully masked Monte Carlo row is that single greedy step.
        memory: a `Memory`, begun per forward on the distinct requests' prompts (continuation
            masked) and expanded to the sample rows with `select`; inside its `adapt_once`
            scope (MemDLM) a request whose rows span several forwards adapts once.
        progress: optional callable(n) or tqdm, advanced per finished request.
        stratum: samples sharing one stratified draw of mask counts (the official batch_size).
        block_length: a block-causal family's block length (LLaDA2.x: required; the estimator
            runs per block, see the module docstring); ignored by bidirectional families.

    Returns:
        list of (log-likelihood estimate, is_greedy) in request order; is_greedy is None where
        it was not computed (a continuation of two or more tokens without check_greedy).
    """
    blocks = attention_blocks(backbone, block_length)
    for name, value in (("mc_num", mc_num), ("batch_size", batch_size), ("stratum", stratum)):
        if int(value) < 1:
            raise ValueError(f"{name}={value} must be >= 1.")
    if any(len(p) == 0 for p, _ in requests):
        raise ValueError("Every likelihood request needs a non-empty prefix (use a BOS/EOS token).")
    seeds = _seeds(seeds, len(requests))
    memory = memory if memory is not None else NoMemory()
    greedy = [True if len(c) == 0 else None for _, c in requests]
    longer = [i for i, (_, c) in enumerate(requests) if len(c) > 1]
    if check_greedy and longer:
        checked = greedy_check(backbone, [requests[i] for i in longer], batch_size=batch_size,
                               cfg_scale=cfg_scale, memory=memory, block_length=blocks)
        for i, ok in zip(longer, checked):
            greedy[i] = ok
    with memory.adapt_once():
        scores = mc_scores(backbone, requests, mc_num, batch_size, stratum, seeds, cfg_scale, memory,
                           lambda i: _advance(progress, 1), greedy, blocks)
    return [(s, g) for s, g in zip(scores, greedy)]


def _seeds(seeds, n: int) -> list[int]:
    seeds = row_seeds(0, n) if seeds is None else [int(s) for s in seeds]
    if len(seeds) != n:
        raise ValueError(f"Got {len(seeds)} seeds for {n} requests; pass one per request.")
    return seeds


def _advance(progress, n):
    if progress is not None:
        (progress.update if hasattr(progress, "update") else progress)(n)


def mc_scores(backbone, requests, mc_num, batch_size, stratum, seeds, cfg_scale, memory, on_done, greedy=None,
              block_length=None):
    """-mean sample loss per request (summed over its segments); `on_done(i)` once request i's
    last row is scored. When a list `greedy` is given, greedy[i] of a one-token continuation is
    set from its row. `block_length`: block-causal attention, one segment per block."""
    order = sorted(range(len(requests)), key=lambda i: (-(len(requests[i][0]) + len(requests[i][1])), i))
    totals = torch.zeros(len(requests), dtype=torch.float64, device=backbone.device)
    rows = []  # (request, mask [T], ratio, multiplicity, is its last row)
    for i in order:
        T = len(requests[i][1])
        if T == 0:  # log p(empty continuation) = 0
            on_done(i)
            continue
        gen = torch.Generator().manual_seed(seeds[i])
        parts = segments(len(requests[i][0]), T, block_length)
        for j, (s, e) in enumerate(parts):
            masks = torch.zeros(mc_num, T, dtype=torch.bool)
            masks[:, s:e] = draw_samples(e - s, mc_num, stratum, gen)[0]
            # Samples with the same mask give the same loss: forward each distinct mask once and
            # weight it by its multiplicity (exact; short continuations repeat a lot: T=1 has one).
            patterns, counts = torch.unique(masks, dim=0, return_counts=True)
            ratios = patterns.sum(-1) / (e - s)
            n, last = len(patterns), j == len(parts) - 1
            rows.extend((i, patterns[r], ratios[r], counts[r], last and r == n - 1) for r in range(n))
            while len(rows) >= batch_size:
                _forward_rows(backbone, requests, rows[:batch_size], totals, cfg_scale, memory, seeds, on_done,
                              greedy, block_length)
                rows = rows[batch_size:]
    if rows:
        _forward_rows(backbone, requests, rows, totals, cfg_scale, memory, seeds, on_done, greedy, block_length)
    return (-(totals / mc_num)).tolist()


def _forward_rows(backbone, requests, rows, totals, cfg_scale, memory, seeds, on_done, greedy=None,
                  block_length=None):
    """One forward over sample rows: adds each row's `sum CE / ratio` to `totals[request]`; sets
    `greedy[request]` for one-token continuations (their only row is fully masked, so the
    argmax at that position is the whole greedy decode)."""
    device, mask_id = backbone.device, backbone.spec.mask_id
    reqs = list(dict.fromkeys(row[0] for row in rows))  # distinct requests, in row order
    ids, attn, prompt = pack(requests, reqs, backbone.spec.eos_id)
    L, T_max = ids.shape[1], max(len(requests[r][1]) for r in reqs)
    layout = torch.tensor([reqs.index(row[0]) for row in rows])
    noisy = ids[layout]
    for j, (r, m, _, _, _) in enumerate(rows):
        T = len(requests[r][1])
        noisy[j, L - T:] = noisy[j, L - T:].masked_fill(m, mask_id)
    ratio = torch.stack([row[2] for row in rows]).to(device)
    noisy, layout = noisy.to(device), layout.to(device)
    clean = ids.to(device)[layout][:, L - T_max:]
    masked = (noisy == mask_id)[:, L - T_max:]
    attn_d = None if attn is None else attn.to(device)
    prompt = prompt.to(device)
    with _session(memory, backbone, requests, reqs, attn_d, prompt, [seeds[r] for r in reqs]):
        memory.select(layout)
        logits = forward_step(backbone, memory, noisy, None if attn_d is None else attn_d[layout], step=0,
                              mask_ratio=ratio, cfg_scale=cfg_scale, uncond_mask=prompt[layout],
                              keep=(L - T_max, L), upcast=True, block_length=block_length)
    ce = F.cross_entropy(logits[masked], clean[masked], reduction="none")
    per_row = torch.zeros(len(rows), device=device).index_add_(0, masked.nonzero()[:, 0], ce) / ratio
    per_row = per_row * torch.stack([row[3] for row in rows]).to(device)
    totals.index_add_(0, torch.tensor([row[0] for row in rows], device=device), per_row.double())
    if greedy is not None:
        for j, (r, *_) in enumerate(rows):
            if len(requests[r][1]) == 1:
                greedy[r] = bool(logits[j, -1].argmax() == clean[j, -1])
    for r, _, _, _, last in rows:
        if last:
            on_done(r)


def _session(memory, backbone, requests, reqs, attn, prompt, seeds):
    """The memory's session on the requests' prompts with their continuations masked (it must
    not see the tokens being scored). attn [R, L] or None, prompt [R, L]."""
    begun = pack(requests, reqs, backbone.spec.eos_id, fill_id=backbone.spec.mask_id)[0].to(prompt.device)
    return memory.session(backbone, begun, attn if attn is not None else torch.ones_like(begun), prompt, seeds)


@torch.no_grad()
def greedy_check(backbone, requests, *, batch_size: int = 32, cfg_scale: float = 0.0, memory=None,
                 block_length: int | None = None) -> list[bool]:
    """LLaDA's `suffix_greedy_prediction`, batched over requests: starting from a fully masked
    continuation, commit the single most confident position per step (argmax token, float32
    softmax confidence); True when the result equals the continuation. A block-causal family
    (`block_length`, see `loglikelihood`) attends block-causally and picks only among the masked
    positions of the earliest block that still has any, as its samplers decode."""
    blocks = attention_blocks(backbone, block_length)
    memory = memory if memory is not None else NoMemory()
    order = sorted(range(len(requests)), key=lambda i: (-(len(requests[i][0]) + len(requests[i][1])), i))
    out = [True] * len(requests)
    for start in range(0, len(order), batch_size):
        chunk = [i for i in order[start:start + batch_size] if requests[i][1]]
        if chunk:
            for i, ok in zip(chunk, _greedy_chunk(backbone, requests, chunk, cfg_scale, memory, blocks)):
                out[i] = ok
    return out


def _greedy_chunk(backbone, requests, chunk, cfg_scale, memory, block_length=None) -> list[bool]:
    device, mask_id = backbone.device, backbone.spec.mask_id
    clean, attn, prompt = pack(requests, chunk, backbone.spec.eos_id)
    x = pack(requests, chunk, backbone.spec.eos_id, fill_id=mask_id)[0].to(device)
    clean, prompt = clean.to(device), prompt.to(device)
    attn = None if attn is None else attn.to(device)
    L, T = x.shape[1], torch.tensor([len(requests[i][1]) for i in chunk], device=device)
    T_max = int(T.max())
    rows = torch.arange(len(chunk), device=device)
    block = span_blocks(requests, chunk, L, T_max, block_length, device)
    with _session(memory, backbone, requests, chunk, attn, prompt, None):
        for step in range(T_max):  # one commit per step; shorter continuations finish early
            masked = (x == mask_id)[:, L - T_max:]
            ratio = masked.sum(-1).float() / T
            logits = forward_step(backbone, memory, x, attn, step=step, mask_ratio=ratio, cfg_scale=cfg_scale,
                                  uncond_mask=prompt, keep=(L - T_max, L), upcast=True, block_length=block_length)
            x0 = logits.argmax(-1)
            candidates = masked & (block == block.masked_fill(~masked, T_max + L).min(-1, keepdim=True).values)
            pos = low_confidence(logits, x0, candidates).argmax(-1)  # the surest masked position
            live = masked.any(-1)
            x[rows[live], L - T_max + pos[live]] = x0[rows[live], pos[live]]
    return (x[:, L - T_max:] == clean[:, L - T_max:]).all(-1).tolist()


def span_blocks(requests, chunk, L: int, T_max: int, block_length: int | None, device) -> torch.Tensor:
    """[R, T_max] block index of each column of the continuation span [L - T_max, L) of the
    left-packed canvas (blocks from each row's first token); all zeros without blocks."""
    if block_length is None:
        return torch.zeros(len(chunk), T_max, dtype=torch.long, device=device)
    pad = torch.tensor([L - len(requests[i][0]) - len(requests[i][1]) for i in chunk], device=device)
    columns = torch.arange(L - T_max, L, device=device)
    return torch.div(columns[None] - pad[:, None], block_length, rounding_mode="floor")


@torch.no_grad()
def loglikelihood_rolling(backbone, token_lists, *, max_length: int, mc_num: int = 128, batch_size: int = 32,
                          seeds=None, cfg_scale: float = 0.0, memory=None, progress=None,
                          stratum: int = 32, block_length: int | None = None) -> list[float]:
    """Log-likelihood of whole texts: lm-eval's disjoint rolling windows of at most `max_length`
    tokens, each scored given the tokens before it with the same estimator, summed per text.

    Args:
        backbone, mc_num, batch_size, cfg_scale, memory, stratum, block_length: as for
            `loglikelihood` (the
            windows of all texts are packed into forwards together; under CFG a window's
            unconditional row masks its context).
        token_lists: the texts' token ids.
        max_length: window length (context + predicted tokens).
        seeds: one per text (default: its index); window w of text i uses a seed derived from both.
        progress: optional callable(n) or tqdm, advanced per finished text.

    Returns:
        list of summed log-likelihood estimates, one per text.
    """
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    blocks = attention_blocks(backbone, block_length)
    spec = backbone.spec
    prefix_token = spec.bos_id if spec.bos_id is not None else spec.eos_id
    seeds = _seeds(seeds, len(token_lists))
    pairs, owner, pair_seeds = [], [], []
    for i, tokens in enumerate(token_lists):
        windows = get_rolling_token_windows(token_list=list(tokens), prefix_token=prefix_token,
                                            max_seq_len=max_length, context_len=1)
        for w, window in enumerate(map(make_disjoint_window, windows)):
            pairs.append(window)
            owner.append(i)
            pair_seeds.append(window_seed(seeds[i], w))
    left = [owner.count(i) for i in range(len(token_lists))]
    for i, n in enumerate(left):
        if n == 0:
            _advance(progress, 1)

    def window_done(j):
        left[owner[j]] -= 1
        if left[owner[j]] == 0:
            _advance(progress, 1)

    memory = memory if memory is not None else NoMemory()
    with memory.adapt_once():
        scores = mc_scores(backbone, pairs, mc_num, batch_size, stratum, pair_seeds, cfg_scale, memory, window_done,
                           block_length=blocks)
    totals = [0.0] * len(token_lists)
    for i, s in zip(owner, scores):
        totals[i] += s
    return totals
