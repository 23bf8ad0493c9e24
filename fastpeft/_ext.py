"""The compiled CPU extension (`csrc/*.cpp`), loaded on first use.

`load()` returns `torch.ops.fastpeft` with the extension's ops registered, e.g.
`load().dropout_forward(x, seed, p)`, or None when there is no extension (one warning says why).
It takes the ahead-of-time build `fastpeft._C` (made by setup.py when torch is there at build time),
else compiles the sources with ninja into a cache under `TORCH_EXTENSIONS_DIR` (default
~/.cache/torch_extensions); later processes reuse that build, and torch's file lock in the build
directory makes concurrent first builds wait for each other. `FASTPEFT_NO_EXT=1` turns it off.
"""
import functools
import importlib.util
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path

import torch

_PACKAGE = Path(__file__).resolve().parent
# -ffp-contract=off keeps `a + b * c` two roundings, as torch computes it, so results are bit-exact.
# x86-64-v2 (SSE4.2) vectorizes the uint32 hash and still runs on any x86-64 machine of the last 15 years.
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off"] + (
    ["-march=x86-64-v2"] if platform.machine().lower() in ("x86_64", "amd64") else [])
LD_FLAGS = ["-fopenmp"]


def sources_dir() -> Path | None:
    """`fastpeft/csrc` in an installed package, the repository's `csrc/` in a checkout; None if neither."""
    for folder in (_PACKAGE / "csrc", _PACKAGE.parent / "csrc"):
        if any(folder.glob("*.cpp")):
            return folder
    return None


def _sources() -> list[Path]:
    folder = sources_dir()
    return sorted(folder.glob("*.cpp")) if folder else []


def _aot_library() -> str | None:
    """Path of the built `fastpeft._C`, unless a checkout's sources are newer than it (then it is stale)."""
    spec = importlib.util.find_spec("fastpeft._C")
    if spec is None or not spec.origin:
        return None
    sources = _sources()
    if sources and sources[0].parent == _PACKAGE.parent / "csrc":
        headers = list(sources[0].parent.glob("*.h"))
        if max(s.stat().st_mtime for s in sources + headers) > os.path.getmtime(spec.origin):
            return None
    return spec.origin


def _jit_build() -> None:
    """Compile (or reuse the cached build of) the sources and load the library into torch.ops."""
    from torch.utils import cpp_extension

    sources = _sources()
    if not sources:
        raise RuntimeError(f"no C++ sources found in {_PACKAGE / 'csrc'} or {_PACKAGE.parent / 'csrc'}")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler: {compiler!r} is not on PATH (set CXX or install g++)")
    if not cpp_extension.is_ninja_available():
        raise RuntimeError("ninja is not installed (pip install ninja)")
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root()
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_torch{torch.__version__}"
    build_dir = os.path.join(root, f"fastpeft_{tag}")
    os.makedirs(build_dir, exist_ok=True)
    cpp_extension.load(name="fastpeft_ext", sources=[str(s) for s in sources], extra_cflags=CXX_FLAGS,
                       extra_ldflags=LD_FLAGS, build_directory=build_dir, is_python_module=False)


@functools.cache
def load():
    """`torch.ops.fastpeft` with the compiled ops loaded, or None (warned once) if they cannot be had."""
    if os.environ.get("FASTPEFT_NO_EXT") == "1":
        return None
    causes = []
    if _load_library(causes):
        return torch.ops.fastpeft
    warnings.warn(f"fastpeft: compiled CPU extension unavailable, using the torch backend: {''.join(causes)}",
                  RuntimeWarning, stacklevel=2)
    return None


def _load_library(causes: list[str]) -> bool:
    """Load the ahead-of-time build, else the JIT build; False (with what went wrong added to `causes`) if neither."""
    library = _aot_library()
    if library is not None:
        try:
            torch.ops.load_library(library)
            return True
        except OSError as error:  # e.g. built against another torch
            causes.append(f"the built {library} does not load ({error}); ")
    try:
        _jit_build()
        return True
    except Exception as error:  # any build failure means: no extension, say why
        message = str(error).strip()
        if len(message) > 2000:
            message = message[:1000] + "\n...\n" + message[-1000:]
        causes.append(f"JIT build failed: {type(error).__name__}: {message}")
    return False


def available() -> bool:
    """Whether the compiled CPU extension could be loaded."""
    return load() is not None
