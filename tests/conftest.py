"""Test set-up: the Triton interpreter's scalar fix for old Triton, hypothesis profiles, the `gpu` marker.

No TRITON_INTERPRET: the Triton launchers run a kernel compiled on CUDA tensors and its interpreted twin on CPU
tensors (kernels/interpreted.py), so `pytest` and `pytest -m gpu` both pass on a machine with a GPU."""
import inspect
import os

import pytest
import torch
from hypothesis import HealthCheck, settings


def _squeeze_scalars_in_old_interpreters() -> None:
    """Triton's interpreter before 3.7 turns a scalar kernel argument (a 1-element array) into a Python int with
    int(array), which numpy >= 2.4 refuses ("only 0-dimensional arrays can be converted"), so every `range(0, K, ..)`
    over a runtime size failed (triton 3.6, the GPU image's, under the interpreter). Newer Triton squeezes first; do
    the same there. Interpreter only: compiled kernels never run this code."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return
    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or "squeeze" in inspect.getsource(original):
        return

    def patched(tensor, scope):
        original(tensor, scope)
        tensor.__index__ = lambda self: int(self.handle.data.squeeze())  # scope restores the original after the run

    interpreter._patch_lang_tensor = patched


_squeeze_scalars_in_old_interpreters()

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
