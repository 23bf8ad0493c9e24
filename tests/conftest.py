"""Test set-up: the Triton interpreter on CPU, hypothesis profiles, the `gpu` marker."""
import os

# Must precede any import of triton: kernels then run on the CPU through the interpreter.
if os.environ.get("FASTPEFT_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")

import inspect  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import HealthCheck, settings  # noqa: E402


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


if os.environ.get("TRITON_INTERPRET") == "1":
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
