"""What an ahead-of-time build tells about the GPU code, read from its PTX: register spills (from `ptxas -v`,
run with the ptxas that Triton ships) and which instructions sit inside a loop (a tensor-core GEMM must issue
`wgmma` in its main K loop on sm_90; a `tl.dot` in the epilogue alone would leave the loop on slower code)."""
import json
import re
import subprocess
import tempfile

from triton.backends.nvidia.compiler import get_ptxas, sm_arch_from_capability
from triton.runtime.cache import get_cache_manager

_USAGE = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")
_LABEL = re.compile(r"^(\$\w+):", re.MULTILINE)
_USAGE_FILE = "ptxas-usage.json"


def ptxas_usage(compiled, arch: int) -> dict:
    """Registers, stack frame and spill bytes of a compiled kernel, as `ptxas -v` reports them for its PTX; kept
    beside the kernel in Triton's cache, so that a build that hits the cache runs no ptxas either."""
    cache = get_cache_manager(compiled.hash)
    path = cache.get_file(_USAGE_FILE)
    if path is None:
        path = cache.put(json.dumps(_run_ptxas(compiled.asm["ptx"], arch)), _USAGE_FILE, binary=False)
    with open(path) as usage:
        return json.load(usage)


def _run_ptxas(ptx: str, arch: int) -> dict:
    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as source:
        source.write(ptx)
        source.flush()
        log = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name={sm_arch_from_capability(arch)}",
                              source.name, "-o", "/dev/null"], capture_output=True, text=True, check=True).stderr
    stack, stores, loads = map(int, _USAGE.search(log).groups())
    return {"registers": int(_REGISTERS.search(log).group(1)), "stack": stack, "spill_stores": stores,
            "spill_loads": loads}


def loop_bodies(ptx: str) -> list:
    """The text of every loop in `ptx`: from a label to the last branch back to it (PTX's loops are a label and a
    conditional backward `bra`)."""
    bodies = []
    for match in _LABEL.finditer(ptx):
        branches = [b.start() for b in re.finditer(rf"\bbra(?:\.uni)?\s+{re.escape(match.group(1))};", ptx)]
        if branches and branches[-1] > match.end():
            bodies.append(ptx[match.end():branches[-1]])
    return bodies


def in_a_loop(ptx: str, instruction: str) -> bool:
    """Whether `instruction` (e.g. "wgmma.mma_async") is issued inside some loop of `ptx`."""
    return any(instruction in body for body in loop_bodies(ptx))
