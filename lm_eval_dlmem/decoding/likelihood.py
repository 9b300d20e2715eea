"""Monte Carlo log-likelihood of a continuation under a masked diffusion LM.

The estimator is the one of LLaDA's official evaluator: mask only continuation tokens, draw the
number of masked tokens stratified over `b` samples (`x_i = round(linspace(k, k + (b-1) T/b))`,
wrapped into 1..T, with k uniform in 1..T), mask a random subset of that size, and average
`sum_masked CE / (x_i / T)` over the `mc_num` samples: log p ~= -mean loss (an ELBO bound).

Batching: requests are length-sorted and packed `batch_size // b` at a time into one forward of
`b` samples each, so small `mc_num` (e.g. 1 for MMLU-style tasks) fills the forward with several
requests. Every request draws its masks from its own generator (`seeds[i]`), so the numbers do
not depend on which other requests share its forwards.

Shapes: R requests in a forward group, b samples per request per forward, L padded length.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..memory.base import NoMemory, StepInfo


def stratified_masks(target_len: int, b: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """One stratum of b samples: bool masks [b, T] over the continuation and mask ratios [b]."""
    T = target_len
    k = int(torch.randint(1, T + 1, (), generator=gen))
    counts = torch.round(torch.linspace(float(k), k + (b - 1) * (T / b), steps=b)).long()
    counts = ((counts - 1) % T) + 1
    base = torch.arange(T)
    masks = torch.stack([(base < counts[i])[torch.randperm(T, generator=gen)] for i in range(b)])
    return masks, counts.float() / T


def _cfg_logits(backbone, ids, attn, prompt_mask, cfg_scale):
    """Logits [rows, L, V] float32, with classifier-free guidance when cfg_scale > 0."""
    if cfg_scale <= 0:
        return backbone.logits(ids, attn).float()
    uncond = ids.masked_fill(prompt_mask, backbone.spec.mask_id)
    both = backbone.logits(torch.cat([ids, uncond]), None if attn is None else torch.cat([attn, attn])).float()
    cond, un = both.chunk(2)
    return un + (cfg_scale + 1) * (cond - un)


def _pack(requests, order, width):
    """Left-padded canvas [R, L] of prefix+target, attention mask and prefix mask."""
    rows = [list(requests[i][0]) + list(requests[i][1]) for i in order]
    L = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), L, dtype=torch.long)
    attn = torch.zeros(len(rows), L, dtype=torch.long)
    prompt = torch.zeros(len(rows), L, dtype=torch.bool)
    target = torch.zeros(len(rows), L, dtype=torch.bool)
    for r, i in enumerate(order):
        n, p = len(rows[r]), len(requests[i][0])
        ids[r, L - n:] = torch.tensor(rows[r])
        attn[r, L - n:] = 1
        prompt[r, L - n:L - n + p] = True
        target[r, L - n + p:] = True
    return ids, attn, prompt, target


def loglikelihood(backbone, requests, *, mc_num: int = 128, batch_size: int = 32, seeds=None,
                  cfg_scale: float = 0.0, check_greedy: bool = False, memory=None, progress=None):
    """Score continuations.

    Args:
        backbone: a loaded `Backbone`.
        requests: list of (prefix token ids, continuation token ids); the prefix must be non-empty.
        mc_num: Monte Carlo samples per request.
        batch_size: rows per forward; also the stratum size b = min(batch_size, mc_num).
        seeds: one seed per request (default: its index).
        cfg_scale: classifier-free guidance (unconditional pass with the prefix masked).
        check_greedy: also decide whether greedy unmasking reproduces the continuation.
        memory: a `Memory` (begun on each forward group's contexts).
        progress: optional callable(n) or tqdm, advanced per finished request.

    Returns:
        list of (log-likelihood estimate, is_greedy) in request order.
    """
    if any(len(p) == 0 for p, _ in requests):
        raise ValueError("Every likelihood request needs a non-empty prefix (use a BOS/EOS token).")
    memory = memory or NoMemory()
    seeds = list(seeds) if seeds is not None else list(range(len(requests)))
    b = max(1, min(batch_size, mc_num))
    groups = max(1, math.ceil(mc_num / b))
    per_forward = max(1, batch_size // b)
    order = sorted(range(len(requests)), key=lambda i: (-(len(requests[i][0]) + len(requests[i][1])), i))
    out: list = [None] * len(requests)
    for start in range(0, len(order), per_forward):
        chunk = order[start:start + per_forward]
        scores = _score_group(backbone, requests, chunk, seeds, b, groups, cfg_scale, memory)
        greedy = _greedy_group(backbone, requests, chunk, cfg_scale, memory) if check_greedy else [False] * len(chunk)
        for i, s, g in zip(chunk, scores, greedy):
            out[i] = (s, g)
        _advance(progress, len(chunk))
    return out


def _advance(progress, n):
    if progress is None:
        return
    (progress.update if hasattr(progress, "update") else progress)(n)


def _score_group(backbone, requests, chunk, seeds, b, groups, cfg_scale, memory):
    device = backbone.device
    ids, attn, prompt, target = _pack(requests, chunk, None)
    R, L = ids.shape
    gens = [torch.Generator().manual_seed(int(seeds[i])) for i in chunk]
    # rows of a forward: request r's b samples are rows r*b .. r*b+b-1 (same layout every forward)
    layout = torch.arange(R).repeat_interleave(b)
    ids_d, attn_d, prompt_d = ids.to(device), attn.to(device), prompt.to(device)
    rows_attn = attn_d[layout] if bool((attn == 0).any()) else None
    memory.begin(backbone, ids_d, attn_d, prompt_d, [int(seeds[i]) for i in chunk])
    try:
        memory.select(layout.to(device))
        total = torch.zeros(R, dtype=torch.float64)
        for g in range(groups):
            noisy = ids[layout].clone()
            ratio = torch.empty(R * b)
            for r in range(R):
                T = int(target[r].sum())
                masks, ratios = stratified_masks(T, b, gens[r])
                rows = slice(r * b, (r + 1) * b)
                block = noisy[rows]
                block[:, L - T:] = block[:, L - T:].masked_fill(masks, backbone.spec.mask_id)
                noisy[rows] = block
                ratio[rows] = ratios
            noisy = noisy.to(device)
            masked = noisy == backbone.spec.mask_id
            info = StepInfo(step=g, mask_ratio=ratio.to(device), window=(0, L), input_ids=noisy, full=True)
            memory.before_forward(info)
            logits = _cfg_logits(backbone, noisy, rows_attn, prompt_d[layout], cfg_scale)
            memory.after_forward(info)
            ce = F.cross_entropy(logits[masked], ids_d[layout][masked], reduction="none")
            row_of = masked.nonzero()[:, 0]
            per_row = torch.zeros(R * b, device=device).index_add_(0, row_of, ce) / ratio.to(device)
            total += per_row.view(R, b).sum(-1).double().cpu()
    finally:
        memory.end()
    return (-(total / (groups * b))).tolist()


def _greedy_group(backbone, requests, chunk, cfg_scale, memory):
    """LLaDA's suffix_greedy_prediction: unmask the most confident position one at a time."""
    device = backbone.device
    ids, attn, prompt, target = _pack(requests, chunk, None)
    mask_id = backbone.spec.mask_id
    x = ids.masked_fill(target, mask_id).to(device)
    attn_d = attn.to(device) if bool((attn == 0).any()) else None
    prompt_d = prompt.to(device)
    memory.begin(backbone, x, attn.to(device), prompt_d, None)
    try:
        for step in range(int(target.sum(-1).max())):
            masked = x == mask_id
            if not bool(masked.any()):
                break
            ratio = masked.sum(-1).float() / target.sum(-1).clamp_min(1).to(device)
            info = StepInfo(step=step, mask_ratio=ratio, window=(0, x.shape[1]), input_ids=x, full=True)
            memory.before_forward(info)
            logits = _cfg_logits(backbone, x, attn_d, prompt_d, cfg_scale)
            memory.after_forward(info)
            conf, pred = logits.softmax(-1).max(-1)
            conf = conf.masked_fill(~masked, -1.0)
            pos = conf.argmax(-1)
            rows = torch.arange(x.shape[0], device=device)
            has = masked.any(-1)
            x[rows[has], pos[has]] = pred[rows[has], pos[has]]
    finally:
        memory.end()
    return [bool(torch.equal(x[r].cpu()[target[r]], ids[r][target[r]])) for r in range(len(chunk))]


def loglikelihood_rolling(backbone, token_lists, *, max_length: int, mc_num: int = 128, batch_size: int = 32,
                          seeds=None, memory=None, progress=None):
    """Log-likelihood of whole texts: disjoint windows of at most `max_length` tokens, each scored
    given the previous tokens (lm-eval's rolling windows), summed per text."""
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    spec = backbone.spec
    prefix_token = spec.bos_id if spec.bos_id is not None else spec.eos_id
    seeds = list(seeds) if seeds is not None else list(range(len(token_lists)))
    pairs, owner, pair_seeds = [], [], []
    for i, tokens in enumerate(token_lists):
        windows = get_rolling_token_windows(token_list=list(tokens), prefix_token=prefix_token,
                                            max_seq_len=max_length, context_len=1)
        for w, window in enumerate(map(make_disjoint_window, windows)):
            pairs.append(window)
            owner.append(i)
            pair_seeds.append(int(seeds[i]) * 10_007 + w)
    scores = loglikelihood(backbone, pairs, mc_num=mc_num, batch_size=batch_size, seeds=pair_seeds,
                           memory=memory) if pairs else []
    totals = [0.0] * len(token_lists)
    for i, (s, _) in zip(owner, scores):
        totals[i] += s
    _advance(progress, len(token_lists))
    return totals
