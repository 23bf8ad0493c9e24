"""Packaging. `kernels/` installs as `fastpeft.kernels`.

The CPU extension (`csrc/*.cpp`) is built ahead of time when torch is importable at build time
(`pip install --no-build-isolation -e .`); otherwise `fastpeft._ext` compiles it with ninja on first use.
"""
import glob
import os

from setuptools import setup

packages = ["fastpeft", "fastpeft.ops", "fastpeft.modules", "fastpeft.kernels"]
package_dir = {"fastpeft.kernels": "kernels"}


def extension_build():
    if os.environ.get("FASTPEFT_NO_EXT") == "1":
        return {}
    try:
        from torch.utils.cpp_extension import BuildExtension, CppExtension
    except ImportError:  # isolated build without torch: JIT on first use instead
        return {}
    sources = sorted(glob.glob("csrc/*.cpp"))
    ext = CppExtension("fastpeft._C", sources, extra_compile_args=["-O3", "-fopenmp", "-march=x86-64-v2"],
                       extra_link_args=["-fopenmp"])
    return {"ext_modules": [ext], "cmdclass": {"build_ext": BuildExtension.with_options(use_ninja=True)}}


setup(packages=packages, package_dir=package_dir, package_data={"fastpeft": ["data/*"]}, **extension_build())
