"""`build_memory`: the memory the model args ask for, on the backbone decoding will use."""

from lm_eval_dlmem.backbones.loading import load_backbone
from lm_eval_dlmem.memory.base import NoMemory
from lm_eval_dlmem.memory.build import build_memory, memdlm_config
from lm_eval_dlmem.model_args import ModelArgs


def test_adapter_gives_the_backbone_that_the_memory_and_the_harness_use():
    """Kills: an adapter= that only reaches the memory (the harness decoding on the un-adapted
    backbone, or its spec/tokenizer taken from the old one), and inner_* args not reaching the
    inner loop's config."""
    from lm_eval_dlmem.harness import DlmLM

    args = ModelArgs.from_kwargs(pretrained="tiny-llada", adapter="tiny-llada-memdlm", inner_steps=1,
                                 inner_lr=0.05, inner_rank=4, inner_targets="ffn", seed=7)
    plain = load_backbone(args.pretrained)
    backbone, memory = build_memory(args, plain)
    assert backbone is not plain and type(backbone.model).__name__ == "PeftModel"
    assert memory.backbone is backbone
    assert memory.config == memdlm_config(args)
    cfg = memory.config
    assert (cfg.inner_steps, cfg.inner_lr, cfg.inner_rank, cfg.inner_targets, cfg.seed) == (1, 0.05, 4, "ffn", 7)

    lm = DlmLM(pretrained="tiny-llada", adapter="tiny-llada-memdlm", device="cpu")
    assert type(lm.backbone.model).__name__ == "PeftModel" and isinstance(lm.memory, NoMemory)
    assert lm.spec is lm.backbone.spec and lm.tokenizer is lm.backbone.tokenizer
