"""The repository root must not shadow installed packages.

pytest and `python -m bench.x` put the repository root first on `sys.path`. A folder there that is a regular package
(`kernels/__init__.py`, as before) then wins over an installed package of the same name: transformers 5.25 imports
Hugging Face's `kernels` and broke on ours. Each check resolves names in a child process, as a user's run would.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Import names that are ours: the package itself and the benchmarks, run as `python -m bench.<name>`.
OWN = {"fastpeft", "bench"}

RESOLVE = """
import importlib.util, json, sys
out = {}
for name in sys.argv[1:]:
    spec = importlib.util.find_spec(name)
    out[name] = None if spec is None else [spec.origin, sorted(spec.submodule_search_locations or [])]
print(json.dumps(out))
"""


def top_level_names():
    """Every name `import X` could find at the root: folders (regular or namespace packages) and `*.py` modules."""
    names = {p.name for p in ROOT.iterdir() if p.is_dir() and p.name.isidentifier()}
    names |= {p.stem for p in ROOT.glob("*.py") if p.stem.isidentifier()}
    return sorted(names)


def resolve(names, cwd, extra_path=None):
    env = None if extra_path is None else dict(os.environ, PYTHONPATH=str(extra_path))
    proc = subprocess.run([sys.executable, "-c", RESOLVE, *names], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=120, check=True)
    return json.loads(proc.stdout)


def test_root_names_include_the_kernels_folder():
    assert "kernels" in top_level_names() and (ROOT / "kernels").is_dir()


def test_installed_packages_resolve_the_same_from_the_repository_root(tmp_path):
    names = top_level_names()
    installed = resolve(names, cwd=tmp_path)
    from_root = resolve(names, cwd=ROOT)
    shadowed = {name: from_root[name] for name, spec in installed.items() if spec is not None
                and from_root[name] != spec}
    assert not shadowed, f"the repository root shadows installed packages: {shadowed} (installed: {installed})"


@pytest.mark.parametrize("name", sorted(set(top_level_names()) - OWN - {"setup"}))
def test_an_installed_regular_package_wins_over_the_root_folder(tmp_path, name):
    """With a regular package of the same name installed (on PYTHONPATH, after the root as site-packages is)."""
    (tmp_path / name).mkdir()
    (tmp_path / name / "__init__.py").write_text("")
    found = resolve([name], cwd=ROOT, extra_path=tmp_path)[name]
    assert found[0] == str(tmp_path / name / "__init__.py"), f"{name!r} resolves to {found}, not the installed one"


def test_the_installed_package_reaches_the_kernels_as_fastpeft_kernels(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import fastpeft.kernels.layout as m; print(m.__file__)"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120, check=True)
    assert Path(proc.stdout.strip()).resolve() == (ROOT / "kernels" / "layout.py").resolve()
