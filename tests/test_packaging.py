"""Packaging: optional dependencies live in extras and a missing one names itself; the extras in
pyproject.toml match the import sites; the sdist carries what the README links to; the code stays
within Python 3.10."""

import re
import shutil
import subprocess
import sys

import pytest
from packaging.requirements import Requirement

from _packaging import REPO, pyproject
from lm_eval_dlmem.extras import EXTRAS, MissingExtraError, require


def _missing(monkeypatch, module):
    """Make `import module` fail as when it is not installed."""
    for name in [m for m in sys.modules if m == module or m.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)


def _call_wonderwords():
    from lm_eval_dlmem.tasks import text

    text.wonderwords_list.cache_clear()
    text.wonderwords_list("nounlist.txt")


def _call_nltk():
    from lm_eval_dlmem.tasks import text

    text.split_sentences.cache_clear()
    text.split_sentences("One sentence. Another one, not cached.")


def _call_jieba():
    from lm_eval_dlmem.tasks import metrics

    metrics._jieba_cut("中文")


def _call_matplotlib(tmp_path):
    from lm_eval_dlmem.leaderboard.plot import plot_lengths
    from lm_eval_dlmem.leaderboard.results import Run, parse_metrics

    run = Run(label="a", source="a", files=[], model="m", model_args={}, config={})
    run.scores = {f"dlmem_ruler_niah_single_1_{n}k": parse_metrics({"score,none": 0.5}) for n in (1, 2)}
    plot_lengths([run], str(tmp_path / "p.png"))


def _call_bitsandbytes():
    from lm_eval_dlmem.backbones.loading import quantization_config

    quantization_config(True, "auto")


SITES = {"wonderwords": _call_wonderwords, "nltk": _call_nltk, "jieba": _call_jieba,
         "matplotlib": _call_matplotlib, "bitsandbytes": _call_bitsandbytes}


@pytest.mark.parametrize("module", sorted(SITES))
def test_a_missing_extra_names_itself_at_its_import_site(module, monkeypatch, tmp_path):
    """Each feature that needs an optional package says which extra installs it."""
    _missing(monkeypatch, module)
    call = SITES[module]
    with pytest.raises(MissingExtraError) as err:
        call(tmp_path) if module == "matplotlib" else call()
    extra = EXTRAS[module][1]
    assert f"pip install 'lm-eval-dlmem[{extra}]'" in str(err.value)


def test_require_passes_other_import_errors_through(monkeypatch):
    """A broken dependency *of* the optional package is its own error, not 'install the extra'."""
    import importlib

    def broken(name, *a, **k):
        raise ModuleNotFoundError("No module named 'somedep'", name="somedep")

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(ModuleNotFoundError) as err:
        require("nltk", "x")
    assert not isinstance(err.value, MissingExtraError)


def test_cli_reports_a_missing_extra_as_one_line(monkeypatch, capsys, tmp_path):
    from lm_eval_dlmem import cli

    _missing(monkeypatch, "matplotlib")
    out = tmp_path / "run"
    out.mkdir()
    (out / "results_2025-01-01T00-00-00.json").write_text(
        '{"config": {"model": "m", "model_args": {}}, "results": {"dlmem_ruler_niah_single_1_1k": {"score,none": 1.0},'
        ' "dlmem_ruler_niah_single_1_2k": {"score,none": 0.5}}}')
    assert cli.main(["compare", str(out), "--plot", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert "lm-eval-dlmem[plot]" in err and "Traceback" not in err


def test_extras_in_pyproject_match_the_import_sites():
    """Every optional import is in the extra its error names, none is a core dependency, and
    `[all]` / `[test]` take every extra (the test command installs what the tests import)."""
    project = pyproject()["project"]
    extras = project["optional-dependencies"]
    core = {Requirement(d).name for d in project["dependencies"]}
    for module, (dist, extra) in EXTRAS.items():
        assert dist in {Requirement(d).name for d in extras[extra]}, f"{dist} is not in [{extra}]"
        assert dist not in core, f"{dist} is a core dependency, but only [{extra}] needs it"
    (everything,) = [Requirement(d) for d in extras["all"]]
    assert everything.extras == set(extras) - {"all", "test"}
    assert "lm-eval-dlmem[all]" in extras["test"]


def test_the_sdist_includes_what_the_readme_links_to():
    """README links (docs/, examples/, benchmarks/) resolve in an unpacked sdist too."""
    include = pyproject()["tool"]["hatch"]["build"]["targets"]["sdist"]["include"]
    readme = (REPO / "README.md").read_text()
    links = set(re.findall(r"\]\(((?!https?:)[^)#\s]+)", readme)) | set(re.findall(r"`((?:examples|docs)/[^`\s]+)`", readme))
    assert links
    for link in links:
        assert (REPO / link).exists(), f"README links to {link}, which does not exist"
        assert link.split("/")[0] in include, f"README links to {link}, which the sdist leaves out"
    for name in ("LICENSE", "THIRD_PARTY_NOTICES.md"):
        assert (REPO / name).is_file() and name in include


def test_the_package_needs_no_newer_python_than_requires_python():
    """`requires-python = ">=3.10"`: vermin finds no 3.11-only syntax or stdlib use in the package
    or its tests (benchmarks/ are scripts for our own machines and may use newer Python)."""
    vermin = shutil.which("vermin")
    if vermin is None:
        pytest.skip("vermin is not installed (pip install -e '.[test]' installs it)")
    floor = pyproject()["project"]["requires-python"].removeprefix(">=")
    done = subprocess.run([vermin, f"--target={floor}-", "--no-tips", "--violations", "--eval-annotations",
                           str(REPO / "lm_eval_dlmem"), str(REPO / "tests")], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
