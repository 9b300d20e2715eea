"""The start-up registration: `lm_eval_dlmem.pth` + `lm_eval_dlmem._autoload`.

The .pth line runs in every Python process of an environment, so it must stay inert (import
nothing of ours) unless the process is the lm-eval CLI, and must never raise.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from lm_eval_dlmem import _autoload

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PTH = os.path.join(REPO, "lm_eval_dlmem.pth")
PY = "/usr/bin/python3"
OURS = ("metastate-llada", "metastate-dream", "memdlm-llada-moe", "memdlm-llada2")

# (sys.argv[0] as the .pth sees it, sys.orig_argv)
LM_EVAL = [
    ("/venv/bin/lm_eval", [PY, "/venv/bin/lm_eval", "run", "--model", "hf"]),
    ("/venv/bin/lm-eval", [PY, "/venv/bin/lm-eval", "ls", "tasks"]),
    ("C:\\venv\\Scripts\\lm_eval.exe", ["C:\\venv\\Scripts\\lm_eval.exe", "run"]),
    ("-m", [PY, "-m", "lm_eval", "run"]),
    ("-m", [PY, "-m", "lm_eval.__main__"]),
    ("-m", [PY, "-u", "-m", "lm_eval", "--model", "dummy"]),  # how accelerate / torchrun start workers
    ("-m", [PY, "-um", "lm_eval"]),
    ("-m", [PY, "-mlm_eval"]),
    ("-m", [PY, "-W", "ignore", "-X", "faulthandler", "-B", "-m", "lm_eval"]),
]
OTHER = [
    ("-c", [PY, "-c", "pass"]),
    ("", [PY]),  # the REPL
    ("-c", [PY, "-c", "import lm_eval", "-m", "lm_eval"]),  # arguments of the command, not options
    ("/venv/bin/pytest", [PY, "/venv/bin/pytest", "-m", "lm_eval"]),  # pytest's marker option
    ("/venv/bin/accelerate", [PY, "/venv/bin/accelerate", "launch", "-m", "lm_eval"]),  # the launcher
    ("-m", [PY, "-m", "pip", "install", "lm_eval"]),
    ("-m", [PY, "-m", "lm_eval_dlmem.cli", "eval"]),  # registers by itself
    ("/work/run_lm_eval.py", [PY, "/work/run_lm_eval.py"]),
]


@pytest.mark.parametrize("argv0,orig_argv", LM_EVAL)
def test_gate_accepts_the_lm_eval_cli(argv0, orig_argv):
    assert _autoload.is_lm_eval_process(argv0, orig_argv)


@pytest.mark.parametrize("argv0,orig_argv", OTHER)
def test_gate_rejects_other_processes(argv0, orig_argv):
    assert not _autoload.is_lm_eval_process(argv0, orig_argv)


def _run_pth_line(monkeypatch, orig_argv, flag="0") -> bool:
    """Execute the .pth line as site.py does; True when it imported our autoload module."""
    monkeypatch.setattr(sys, "orig_argv", orig_argv)
    monkeypatch.delitem(sys.modules, "lm_eval_dlmem._autoload", raising=False)
    monkeypatch.delattr("lm_eval_dlmem._autoload", raising=False)
    # only "1" forces the import; "0" also keeps the gate below from registering in this process
    monkeypatch.setenv("LM_EVAL_DLMEM_AUTOLOAD", flag)
    with open(PTH) as f:
        lines = [line for line in f if line.startswith(("import ", "import\t"))]
    assert len(lines) == 1
    exec(lines[0], {})
    return "lm_eval_dlmem._autoload" in sys.modules


def test_pth_line_imports_nothing_in_unrelated_processes(monkeypatch):
    for _, orig_argv in OTHER[:2] + [("", [PY, "-m", "http.server"]), ("", [PY, "/srv/app.py", "--port", "8"])]:
        assert not _run_pth_line(monkeypatch, orig_argv), orig_argv


def test_pth_line_hands_lm_eval_processes_to_the_gate(monkeypatch):
    for _, orig_argv in LM_EVAL:
        assert _run_pth_line(monkeypatch, orig_argv), orig_argv
    assert _run_pth_line(monkeypatch, [PY, "-c", "pass"], flag="1")  # LM_EVAL_DLMEM_AUTOLOAD=1 forces it


def _registry():
    import lm_eval.models  # noqa: F401
    from lm_eval.api.registry import model_registry

    return model_registry


def test_register_is_idempotent_and_keeps_the_builtins():
    import importlib.util

    from lm_eval.api.registry import get_model

    _autoload.register()
    _autoload.register()
    registry = _registry()
    for name, target in _autoload.MODELS.items():
        # a lazy "module:Class" string until lm-eval first builds the model
        assert registry._objs[name] == target or registry._objs[name] is registry.get(name)
        assert importlib.util.find_spec(target.split(":")[0]) is not None
    assert get_model("dummy").__name__ == "DummyLM"
    # hf resolves as before (materialising it would import torch + transformers: seconds)
    hf = registry._objs["hf"]
    assert hf == "lm_eval.models.huggingface:HFLM" or getattr(hf, "__name__", "") == "HFLM"
    assert importlib.util.find_spec("lm_eval.models.huggingface") is not None


def test_never_raises_when_lm_eval_cannot_be_imported(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "lm_eval.models", None)  # makes `import lm_eval.models` fail
    monkeypatch.setenv("LM_EVAL_DLMEM_AUTOLOAD", "1")
    monkeypatch.setenv("LM_EVAL_DLMEM_DEBUG", "1")
    _autoload._autoload()
    assert "autoload skipped" in capsys.readouterr().err
    monkeypatch.delenv("LM_EVAL_DLMEM_DEBUG")
    _autoload._autoload()
    assert capsys.readouterr().err == ""


# A fresh interpreter that processes a site dir holding only our .pth, as if the process had been
# started as `orig_argv`; reports what got imported and registered.
_PROBE = textwrap.dedent("""
    import json, site, sys
    sys.modules.pop("lm_eval_dlmem._autoload", None)
    before = "lm_eval" in sys.modules
    sys.argv[0], sys.orig_argv = ARGV0, ORIG_ARGV
    site.addsitedir(SITE_DIR)
    out = {"lm_eval_imported_before": before, "autoload_imported": "lm_eval_dlmem._autoload" in sys.modules,
           "lm_eval_imported": "lm_eval" in sys.modules}
    if out["lm_eval_imported"]:
        from lm_eval.api.registry import model_registry as r
        out["names"] = sorted(r)
    print(json.dumps(out))
""")


def _probe(tmp_path, argv0, orig_argv):
    site_dir = tmp_path / "site"
    site_dir.mkdir(exist_ok=True)
    (site_dir / "lm_eval_dlmem.pth").write_text(open(PTH).read())
    code = (_PROBE.replace("ARGV0", repr(argv0)).replace("ORIG_ARGV", repr(orig_argv))
            .replace("SITE_DIR", repr(str(site_dir))))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LM_EVAL_DLMEM")}
    env["PYTHONPATH"] = os.pathsep.join([REPO, env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_fresh_interpreter_registers_for_accelerate_workers(tmp_path):
    out = _probe(tmp_path, "-m", [sys.executable, "-u", "-m", "lm_eval", "run"])
    assert not out["lm_eval_imported_before"]
    assert out["autoload_imported"] and out["lm_eval_imported"]
    assert set(OURS) <= set(out["names"]) and {"hf", "dummy", "vllm"} <= set(out["names"])


def test_fresh_interpreter_stays_inert_for_other_processes(tmp_path):
    out = _probe(tmp_path, "/srv/app.py", [sys.executable, "/srv/app.py"])
    assert out == {"lm_eval_imported_before": False, "autoload_imported": False, "lm_eval_imported": False}


@pytest.mark.parametrize("package", ["lm-eval", "bitsandbytes"])
def test_dependencies_we_reach_into_are_bounded_to_the_tested_versions(package):
    """lm-eval internals (cache_hook.dbdict, the request-cache key) and bitsandbytes' CPU 4-bit
    packing change between releases: pyproject.toml bounds both above, and the versions this
    suite runs on are inside the bounds."""
    import tomllib
    from importlib.metadata import version
    from pathlib import Path

    from packaging.requirements import Requirement

    deps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    (req,) = [Requirement(d) for d in deps if Requirement(d).name == package]
    assert any(s.operator in ("<", "<=", "==", "~=") for s in req.specifier), f"{req} has no upper bound"
    assert req.specifier.contains(version(package)), f"installed {package} {version(package)} is outside {req}"


# A plain script: the .pth autoload is off, so only `import lm_eval_dlmem` can register the names.
_SCRIPT = textwrap.dedent("""
    IMPORTS
    import json
    from lm_eval.tasks import TaskManager
    from lm_eval_dlmem.tasks import tasks_path
    tm = TaskManager(include_path=tasks_path(), include_defaults=False)
    out = lm_eval.simple_evaluate(model="metastate-llada", model_args="pretrained=tiny-llada",
                                  tasks=["dlmem_demo_gen"], limit=2, device="cpu", task_manager=tm)
    print(json.dumps(sorted(out["results"]["dlmem_demo_gen"])))
""")


@pytest.mark.parametrize("imports", ["import lm_eval, lm_eval_dlmem", "import lm_eval_dlmem, lm_eval",
                                     "import lm_eval.api.registry, lm_eval_dlmem, lm_eval"])
def test_import_registers_the_names_for_simple_evaluate_from_a_plain_script(imports):
    """`lm_eval.simple_evaluate(model="metastate-llada")` from `python -c` (a script, a notebook):
    not the lm-eval CLI, so the start-up autoload stays out and `import lm_eval_dlmem` must register,
    whether lm-eval's registry is loaded before or after it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LM_EVAL_DLMEM")}
    env.update(LM_EVAL_DLMEM_AUTOLOAD="0", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([REPO, env.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _SCRIPT.replace("IMPORTS", imports)], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "exact_match,strip" in json.loads(done.stdout.strip().splitlines()[-1])


def test_importing_the_package_stays_cheap():
    """`import lm_eval_dlmem` imports neither lm-eval nor torch (nor our model code); the names
    are registered when lm-eval's registry loads."""
    code = ("import sys, lm_eval_dlmem; heavy = [m for m in ('lm_eval', 'torch', 'transformers', "
            "'lm_eval_dlmem.harness') if m in sys.modules]; "
            "from lm_eval.api.registry import model_registry as r; "
            "print(sorted(set(lm_eval_dlmem._autoload.MODELS) - set(r)), heavy)")
    env = {**os.environ, "LM_EVAL_DLMEM_AUTOLOAD": "0", "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[] []"


def test_the_demo_runs_each_preset_on_its_own_family():
    """`lm-eval-dlmem demo --random --model X` builds the tiny checkpoint of X's family (read
    from the preset, so a new preset needs no edit there)."""
    from lm_eval_dlmem.demo import demo_family

    got = {m: demo_family(m) for m in (*OURS, "dlm")}
    assert got == {"metastate-llada": "llada", "metastate-dream": "dream", "memdlm-llada-moe": "llada_moe",
                   "memdlm-llada2": "llada2", "dlm": "llada"}
