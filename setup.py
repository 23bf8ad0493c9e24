"""Packaging. `kernels/` installs as `fastpeft.kernels`, `csrc/` as `fastpeft/csrc`.

`kernels/` has no `__init__.py`, so the repository root on `sys.path` (pytest, `python -m bench.x`) never shadows an
installed top-level `kernels` package (Hugging Face's, which transformers imports): a namespace portion always loses
to a regular package. The package reaches it through the relative symlink `fastpeft/kernels -> ../kernels`, a
namespace subpackage that `find_namespace_packages` finds and a wheel copies as plain files; an editable install
resolves it in place.

The CPU extension (`csrc/*.cpp`) is built ahead of time when torch is importable at build time
(`pip install --no-build-isolation -e .`); otherwise `fastpeft._ext` compiles it with ninja on first use.
"""
import glob
import os
import platform

from setuptools import find_namespace_packages, setup

packages = find_namespace_packages(include=["fastpeft*"], exclude=["*.__pycache__"]) + ["fastpeft.csrc"]
# csrc/ ships as fastpeft/csrc so an installed package can still JIT-compile the extension.
package_dir = {"fastpeft.csrc": "csrc"}


def extension_build():
    if os.environ.get("FASTPEFT_NO_EXT") == "1":
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # isolated build without torch: JIT on first use instead
        return {}
    sources = sorted(glob.glob("csrc/*.cpp"))
    # The flags of fastpeft/_ext.py's JIT build (-ffp-contract=off keeps results bit-exact with torch's).
    cflags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    if platform.machine().lower() in ("x86_64", "amd64"):
        cflags.append("-march=x86-64-v2")
    ext = CppExtension("fastpeft._C", sources, extra_compile_args=cflags, extra_link_args=["-fopenmp"])
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(packages=packages, package_dir=package_dir,
      package_data={"fastpeft": ["data/*"], "fastpeft.csrc": ["*.cpp", "*.h"]}, **extension_build())
