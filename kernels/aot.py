"""Ahead-of-time builds of exactly what the launchers launch, for a GPU that is not here (sm_90, sm_80).

A launch's cubin depends on more than the kernel and its constexprs: Triton specialises each argument at launch
(a pointer known 16-byte aligned and an int divisible by 16 get `tt.divisibility = 16`; an int equal to 1, such
as a unit stride, becomes a constant), which changes vector widths, pipelining and shared memory. So the AOT
build runs the real launchers on CPU tensors laid out as a GPU launch would see them (contiguous, 16-aligned),
records each launch instead of running it (every autotune config of it), and turns a recorded launch into a
compile with Triton's own code path: `JITFunction`'s binder and `_pack_args` for the target's backend, as
`JITFunction.run` does before it compiles.
"""
import contextlib
import itertools
from dataclasses import dataclass

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.autotuner import Autotuner
from triton.runtime.jit import JITFunction, create_function_from_signature


@dataclass(frozen=True)
class Launch:
    """One kernel launch as `JITFunction.run` would receive it: the kernel, its arguments, its keyword
    arguments (constexprs and the autotune config's blocks, num_warps, num_stages)."""
    kernel: JITFunction
    args: tuple
    kwargs: dict

    def compile_inputs(self, arch: int):
        """(ASTSource, target, options) that a launch of this on an sm_`arch` GPU compiles."""
        target = GPUTarget("cuda", arch, 32)
        backend = make_backend(target)
        binder = create_function_from_signature(self.kernel.signature, self.kernel.params, backend)
        bound_args, specialization, options = binder(*self.args, **self.kwargs)
        options, signature, constexprs, attrs = self.kernel._pack_args(backend, dict(self.kwargs), bound_args,
                                                                       specialization, options)
        return ASTSource(self.kernel, signature, constexprs, attrs), target, options.__dict__

    def key(self, arch: int) -> str:
        """What tells two launches' builds apart: the kernel, its specialised signature, constexprs, attributes and
        options (launches that differ only in values a build does not depend on share one build)."""
        src, _, options = self.compile_inputs(arch)
        return repr((self.kernel.fn.__module__, self.kernel.fn.__qualname__, arch, sorted(src.signature.items()),
                     sorted(map(repr, src.constants.items())), sorted(map(repr, src.attrs.items())),
                     sorted(options.items())))


@contextlib.contextmanager
def recording(modules):
    """Within it, launches of the kernels of `modules` on CPU tensors are recorded (one per autotune config)
    instead of run: the launchers take the compiled kernels, as on CUDA tensors."""
    launches = []

    def record_jit(kernel, *args, grid, warmup, **kwargs):
        launches.append(Launch(kernel, args, kwargs))

    def record_autotuned(tuner, *args, **kwargs):
        for config in tuner.configs:
            tuner.fn.run(*args, **{**kwargs, **config.all_kwargs()})

    patches = [(JITFunction, "run", record_jit), (Autotuner, "run", record_autotuned)]
    patches += [(module, "interpreting", lambda t: False) for module in modules if hasattr(module, "interpreting")]
    originals = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        yield launches
    finally:
        for owner, name, value in originals:
            setattr(owner, name, value)


def combinations(dimensions: dict, every: bool) -> list:
    """Keyword sets for a family's `aot_launch`: the full cross product of `dimensions` (name -> values, worst
    case first) when `every`, else a covering set: each dimension's every value once, the others at their worst
    case (so every value is built, not every combination)."""
    names = list(dimensions)
    if every:
        return [dict(zip(names, values)) for values in itertools.product(*dimensions.values())]
    worst = {name: values[0] for name, values in dimensions.items()}
    return [worst] + [{**worst, name: value} for name, values in dimensions.items() for value in values[1:]]


def build(launch: Launch, arch: int):
    """The compiled kernel (PTX, cubin, metadata) of a recorded launch for sm_`arch`."""
    src, target, options = launch.compile_inputs(arch)
    return triton.compile(src, target=target, options=options)


def module_kernels(module) -> list:
    """The `*_kernel` jit functions a kernels/ module defines."""
    return [value for name, value in vars(module).items()
            if isinstance(value, JITFunction) and name.endswith("_kernel") and value.fn.__module__ == module.__name__]

