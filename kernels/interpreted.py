"""Interpreted twins of jit kernels: one process runs a kernel compiled on CUDA tensors and through Triton's
interpreter on CPU tensors (the CPU test suite), so no TRITON_INTERPRET environment variable decides for both.

Triton makes an `InterpretedFunction` instead of a `JITFunction` only when TRITON_INTERPRET=1 is set before the
kernel is decorated, which also turns triton.language's own jit functions (`tl.zeros`, `tl.sigmoid`, the combine
functions of `tl.sum`, ...) into interpreted ones. Here a twin is made on first use from the jit function's code.
A kernel calls its `@triton.jit` helpers by their global names and the interpreter cannot call a compiled helper,
so a twin runs in a copy of its module's globals in which every jit function is replaced by its own twin; and
while an interpreted kernel runs, triton.language's jit functions read as their twins too.
"""
import contextlib
import importlib
import types

import torch
from triton.runtime.interpreter import InterpretedFunction, InterpreterError, _patch_lang
from triton.runtime.jit import JITFunction, mangle_type

_twins: dict = {}  # JITFunction -> its InterpretedFunction
_scopes: dict = {}  # id of a module's globals -> their copy with twins
_LANGUAGE = ("triton.language", "triton.language.standard", "triton.language.random")  # where tl's jit functions live


def interpreting(t: torch.Tensor) -> bool:
    """Whether a kernel launched on `t` runs in the interpreter: for real CPU tensors. CUDA tensors, and the fake
    tensors of tracing (FakeTensorMode, torch.compile), take the compiled kernel."""
    from torch._subclasses.fake_tensor import is_fake

    return t.device.type == "cpu" and not is_fake(t)


def twin(kernel: JITFunction) -> InterpretedFunction:
    """The interpreted twin of a jit function, made once."""
    if kernel not in _twins:
        fn = kernel.fn
        code = types.FunctionType(fn.__code__, _scope(fn.__globals__), fn.__name__, fn.__defaults__, fn.__closure__)
        _twins[kernel] = _Twin(code)
    return _twins[kernel]


def _scope(module_globals: dict) -> dict:
    """A copy of a module's globals with its jit functions replaced by their twins (registered before it is filled,
    so modules whose kernels call each other end the recursion)."""
    key = id(module_globals)
    if key not in _scopes:
        scope = _scopes[key] = dict(module_globals)
        for name, value in module_globals.items():
            if isinstance(value, JITFunction):
                scope[name] = twin(value)
    return _scopes[key]


class _Twin(InterpretedFunction):
    """An interpreted kernel that sees triton.language's jit functions as their twins while it runs."""

    def run(self, *args, **kwargs):
        with _language_twins():
            return super().run(*args, **kwargs)

    def __call__(self, *args, **kwargs):
        """A call from inside an interpreted kernel (a helper, or tl.zeros' twin). Triton's own patches the language
        for the helper's globals (e.g. triton.language.core, which the kernel's globals may not hold) and never undoes
        it, which would leave later compiled kernels built with the interpreter's semantics; undone here."""
        scope = _patch_lang(self.fn)
        try:
            return self.rewrite()(*args, **kwargs)
        except Exception as e:
            raise InterpreterError(repr(e)) from e
        finally:
            scope.restore()


@contextlib.contextmanager
def _language_twins():
    """triton.language's jit functions replaced by their twins, for the duration of an interpreted launch only
    (compiled kernels need the jit functions)."""
    mangle_type(0)  # its first call imports Triton modules that read tl's jit functions: not while they are twins
    modules = [importlib.import_module(name) for name in _LANGUAGE]
    originals = [(module, name, value) for module in modules for name, value in vars(module).items()
                 if isinstance(value, JITFunction)]
    for module, name, value in originals:
        setattr(module, name, twin(value))
    try:
        yield
    finally:
        for module, name, value in originals:
            setattr(module, name, value)
