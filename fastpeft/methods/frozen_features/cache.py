"""`FeatureCache`: a frozen module's outputs by its inputs, so that inputs that come back (the same batches every
epoch, an evaluation set) run the module once. A bounded LRU of `size` entries keyed by a BLAKE2 digest of the call:
its structure, every tensor's dtype, shape and bytes, and the other arguments' values. A call with an argument it
cannot key (an object that is not a tensor, number, string or None) is not cached. Outputs are stored and handed out
as clones, so that a caller changing one in place cannot change the cache. The cache trusts the module's weights
not to change: `clear()` it if they do."""
import hashlib
from collections import OrderedDict

import torch
from torch.utils._pytree import tree_flatten, tree_map_only

PLAIN = (type(None), bool, int, float, str)


def clone(outputs):
    return tree_map_only(torch.Tensor, torch.clone, outputs)


class FeatureCache:
    def __init__(self, size: int):
        self.size = size
        self.entries: OrderedDict[bytes, object] = OrderedDict()
        self.hits = self.misses = 0

    def key(self, args: tuple, kwargs: dict) -> bytes | None:
        leaves, structure = tree_flatten((args, kwargs))
        digest = hashlib.blake2b(str(structure).encode(), digest_size=32)
        for leaf in leaves:
            if isinstance(leaf, torch.Tensor):
                digest.update(f"{leaf.dtype}{tuple(leaf.shape)}{leaf.device}".encode())
                digest.update(leaf.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes())
            elif isinstance(leaf, PLAIN):
                digest.update(repr(leaf).encode())
            else:
                return None
        return digest.digest()

    def get(self, key: bytes):
        """The outputs stored for `key` (a clone), or None."""
        if key not in self.entries:
            self.misses += 1
            return None
        self.hits += 1
        self.entries.move_to_end(key)
        return clone(self.entries[key])

    def put(self, key: bytes, outputs) -> None:
        self.entries[key] = clone(outputs)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)

    def clear(self) -> None:
        self.entries.clear()
