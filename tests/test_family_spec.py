"""Family facts live in `FamilySpec`: a family the rest of the code has never heard of works
through the spec alone, and no module outside `backbones/` tests a family's name."""

import dataclasses
import pathlib
import re
import types

import pytest

from lm_eval_dlmem.backbones import loading
from lm_eval_dlmem.backbones.llada import LLaDAModelLM
from lm_eval_dlmem.backbones.spec import DREAM, FAMILIES, LLADA, LLADA_MOE
from lm_eval_dlmem.cli import cmd_make_tiny
from lm_eval_dlmem.testing import make_tiny_checkpoint

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "lm_eval_dlmem"


@pytest.fixture
def new_family(monkeypatch):
    """A family known only by its spec: LLaDA's modules under another name and other defaults."""
    spec = dataclasses.replace(LLADA, name="llada_x", default_max_length=1234, max_length_keys=(),
                               bos_by_default=True, tiny_sizes=dict(LLADA.tiny_sizes, n_layers=1))
    monkeypatch.setitem(FAMILIES, "llada_x", spec)
    return spec


def test_a_new_family_is_built_and_written_from_its_spec_alone(new_family, tmp_path):
    assert loading.model_class("llada_x") is LLaDAModelLM
    path = make_tiny_checkpoint("llada_x", tmp_path / "x")
    model = LLaDAModelLM.from_pretrained(path)
    assert model.config.n_layers == 1  # the spec's tiny sizes
    assert cmd_make_tiny(["llada_x", str(tmp_path / "cli")]) == 0


@pytest.mark.parametrize("spec, config, expected", [
    (LLADA, dict(max_sequence_length=4096), 4096),
    (LLADA, dict(), 4096),
    (DREAM, dict(max_position_embeddings=131072), 2048),  # RoPE range, not a trained length
    (LLADA_MOE, dict(max_position_embeddings=8192), 8192),
    (LLADA_MOE, dict(), 8192),
])
def test_context_length_comes_from_the_spec(spec, config, expected):
    assert spec.max_length(types.SimpleNamespace(**config)) == expected


def test_harness_reads_bos_and_context_length_from_the_spec(new_family, tiny_ckpts, monkeypatch):
    from lm_eval_dlmem.harness import DlmLM

    real = loading.prepare_tokenizer
    monkeypatch.setattr(loading, "prepare_tokenizer",
                        lambda tok, spec: dataclasses.replace(real(tok, spec), **{
                            f: getattr(new_family, f) for f in ("name", "default_max_length", "max_length_keys",
                                                                "bos_by_default")}))
    lm = DlmLM(pretrained=tiny_ckpts["llada"], device="cpu")
    assert lm.max_length == 1234
    assert lm.tok_encode("The sky")[0] == lm.spec.bos_id  # LLaDA's own spec adds no BOS


def test_no_module_outside_backbones_tests_a_family_name():
    # `family == "dream"`, `spec.name != "llada"`, or a dict keyed by family names
    pattern = re.compile(r"""(family|spec\.name)\s*[!=]=\s*["']|(^|[{,])\s*["'](llada|dream|llada_moe|llada2)["']\s*:""")
    found = [f"{path.relative_to(PACKAGE)}:{n}: {line.strip()}"
             for path in sorted(PACKAGE.rglob("*.py")) if "backbones" not in path.parts
             for n, line in enumerate(path.read_text().splitlines(), 1)
             if pattern.search(line) and "Strategy(" not in line]  # registry entries: strategy names that match family names
    assert found == [], "family facts belong in FamilySpec:\n" + "\n".join(found)
