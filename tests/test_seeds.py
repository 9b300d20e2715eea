"""Seed derivation: the numbers are pinned (changing one changes every sampled result the package
has published), and no module derives a seed outside `decoding/seeds.py`."""

import pathlib
import re

from lm_eval_dlmem.decoding import seeds as S


def test_derived_seeds_keep_their_published_values():
    """Kills: a changed stride or modulus, or an argument order swapped in a derivation."""
    assert S.request_seed(0, b'["abc"]') == 996063595
    assert S.request_seed(7, b"x") == (7 * 1_000_003 + 2363233923) % (2**31 - 1)
    assert S.memory_seed(3, 5) == 3_000_014
    assert S.memory_seed(2**62, 1) == (2**62 * 1_000_003 + 1) % 2**63
    assert S.window_seed(4, 2) == 40_030
    assert S.ratio_seed(11, 3) == 11_102
    assert S.step_seed(2, 5) == 2_000_011
    assert S.step_seed(2, 5, rank=1, stride=4) == 2_000_027
    assert S.step_seed(1, 3, rank=2, stride=S.RANK_STRIDE) == 1_000_003 + 3 * 7919 + 2
    assert S.row_seeds(10, 3) == [10, 11, 12] and S.row_seeds(10, 2, offset=5) == [15, 16]


def test_no_module_derives_a_seed_of_its_own():
    """Kills: a seed formula with a magic stride written again outside decoding/seeds.py."""
    root = pathlib.Path(S.__file__).parents[1]
    magic = re.compile(r"1_000_003|1000003|10_007|\b7919\b|\b1009\b|crc32")
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if p.name != "seeds.py" and magic.search(p.read_text())]
    assert offenders == []
