"""Wheels for `gpu_check.sh --wheels DIR` on an offline GPU machine that has torch, transformers,
peft, accelerate, safetensors and tokenizers but not lm-eval, datasets or bitsandbytes.

    python benchmarks/gpu_check_wheels.py DIR                  # download (PyPI), slim, verify
    python benchmarks/gpu_check_wheels.py DIR --verify-only

Versions are the ones installed here. Target: CPython 3.12, manylinux x86_64. After the download
it checks that every requirement of every wheel in DIR is either in DIR or in BOX (what the GPU
machine has, with everything those need), and prints the total size.

bitsandbytes ships one CUDA library per toolkit (43 MB in all); the copy in DIR keeps only the
libraries of `--cuda` (the torch build's CUDA version, `torch.version.cuda`) and the CPU one.
"""

from __future__ import annotations

import argparse
import glob
import os
import re
import subprocess
import sys
import zipfile
from importlib.metadata import PackageNotFoundError, requires, version

# Needed at import time by lm-eval, by `lm_eval_dlmem` and by its task code, and absent on the box.
SHIP = ["lm-eval", "bitsandbytes", "datasets", "evaluate", "dill", "multiprocess", "requests", "urllib3",
        "certifi", "charset-normalizer", "pytablewriter", "dataproperty", "mbstrdecoder", "pathvalidate",
        "tabledata", "tcolorpy", "typepy", "chardet", "absl-py", "nltk", "more-itertools", "wonderwords",
        "rapidfuzz", "defusedxml"]
# Pure-Python packages that PyPI serves as source only: built into py3-none-any wheels here.
BUILD = ["rouge-score", "sqlitedict", "word2number"]
# Not shipped, and why (none is imported unless the feature named runs).
SKIP = {
    "jieba": "Chinese LongBench scoring only, imported lazily; PyPI has no wheel (sdist only)",
    "matplotlib": "plots only (leaderboard, exposure-bias analysis), imported lazily; 8 MB with its dependencies",
}
# What the GPU machine has (and therefore everything these require).
BOX = ["torch", "transformers", "peft", "accelerate", "safetensors", "numpy", "pytest", "pytest-xdist", "pandas",
       "pyarrow", "scikit-learn", "sacrebleu", "xxhash", "tqdm", "pyyaml", "jinja2", "tokenizers"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64"]
PYTHON = {"python_version": "3.12", "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
          "implementation_name": "cpython", "platform_python_implementation": "CPython", "os_name": "posix",
          "python_full_version": "3.12.0", "extra": ""}


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def download(directory: str) -> None:
    pins = [f"{name}=={version(name)}" for name in SHIP]
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                    "3.12", "--implementation", "cp", *platforms, "-d", directory, *pins], check=True)
    built = [f"{name}=={version(name)}" for name in BUILD]
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", directory, *built], check=True)
    for path in glob.glob(os.path.join(directory, "*.whl")):
        if not installable(os.path.basename(path)):
            raise SystemExit(f"{path} is not a wheel CPython 3.12 on Linux x86_64 can install.")


def installable(filename: str) -> bool:
    """A tag of the wheel fits CPython 3.12 on manylinux x86_64."""
    from packaging.utils import parse_wheel_filename

    tags = parse_wheel_filename(filename)[3]
    return any(t.interpreter in ("py3", "py312", "cp312") and t.abi in ("none", "abi3", "cp312")
               and (t.platform == "any" or re.fullmatch(r"manylinux\w*_x86_64", t.platform)) for t in tags)


def slim_bitsandbytes(directory: str, cuda: str) -> None:
    """Rewrite the bitsandbytes wheel without the CUDA/ROCm/XPU libraries of other toolkits."""
    keep = {f"libbitsandbytes_cuda{cuda.replace('.', '')}.so", "libbitsandbytes_cpu.so"}
    for path in glob.glob(os.path.join(directory, "bitsandbytes-*.whl")):
        with zipfile.ZipFile(path) as src:
            names = src.namelist()
            drop = {n for n in names if re.fullmatch(r"bitsandbytes/libbitsandbytes_\w+\.so", n) and os.path.basename(n) not in keep}
            if not drop:
                continue
            tmp = path + ".tmp"
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
                for n in names:
                    if n in drop:
                        continue
                    data = src.read(n)
                    if n.endswith(".dist-info/RECORD"):
                        data = b"".join(line for line in data.splitlines(True) if line.split(b",")[0].decode() not in drop)
                    dst.writestr(src.getinfo(n), data)
        os.replace(tmp, path)
        print(f"bitsandbytes: kept {sorted(keep)}, dropped {len(drop)} libraries of other toolkits")


def wheel_requirements(path: str) -> tuple[str, list[str]]:
    """(distribution name, names it requires on CPython 3.12 Linux without extras)."""
    from packaging.requirements import Requirement

    with zipfile.ZipFile(path) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    name = re.search(r"^Name: (.+)$", meta, re.M).group(1).strip()
    needed = []
    for line in re.findall(r"^Requires-Dist: (.+)$", meta, re.M):
        req = Requirement(line)
        if req.marker is None or req.marker.evaluate(PYTHON):
            needed.append(canonical(req.name))
    return canonical(name), needed


def box_closure() -> set[str]:
    """BOX and, transitively, what those distributions require (names, from this environment)."""
    from packaging.requirements import Requirement

    seen, stack = set(), [canonical(n) for n in BOX]
    while stack:
        name = stack.pop()
        if name in seen:
            continue
        seen.add(name)
        try:
            reqs = requires(name) or []
        except PackageNotFoundError:
            continue
        stack += [canonical(Requirement(r).name) for r in reqs
                  if Requirement(r).marker is None or Requirement(r).marker.evaluate(PYTHON)]
    return seen


def verify(directory: str) -> int:
    wheels = sorted(glob.glob(os.path.join(directory, "*.whl")))
    shipped = dict(wheel_requirements(w) for w in wheels)
    have = set(shipped) | box_closure()
    missing = {name: sorted(set(reqs) - have) for name, reqs in shipped.items() if set(reqs) - have}
    forbidden = sorted(set(shipped) & {canonical(n) for n in ("torch", "transformers", "peft", "accelerate",
                                                                "tokenizers", "safetensors")})
    size = sum(os.path.getsize(w) for w in wheels)
    print(f"{len(wheels)} wheels, {size / 2**20:.1f} MiB in {directory}")
    for name, why in SKIP.items():
        print(f"not shipped: {name} ({why})")
    for name, names in missing.items():
        print(f"MISSING: {name} requires {names}, neither shipped nor on the GPU machine")
    if forbidden:
        print(f"FORBIDDEN: {forbidden} must come from the GPU machine's own install")
    return 1 if missing or forbidden else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("directory", help="where the wheels go (created)")
    p.add_argument("--cuda", default="13.0", help="CUDA version of the GPU machine's torch (bitsandbytes library kept)")
    p.add_argument("--verify-only", action="store_true", help="only check the wheels already in the directory")
    args = p.parse_args(argv)
    os.makedirs(args.directory, exist_ok=True)
    if not args.verify_only:
        download(args.directory)
        slim_bitsandbytes(args.directory, args.cuda)
    return verify(args.directory)


if __name__ == "__main__":
    sys.exit(main())
