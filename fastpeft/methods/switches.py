"""Switching adapter layers off for `disable_adapters`: every method's layers carry a `disabled` flag."""
from typing import Callable, Iterable


def switch_off(layers: Iterable) -> Callable[[], None]:
    """Set `disabled` on every layer; returns the function that puts each flag back as it was."""
    layers = list(layers)
    before = [layer.disabled for layer in layers]
    for layer in layers:
        layer.disabled = True

    def undo():
        for layer, was in zip(layers, before):
            layer.disabled = was
    return undo
