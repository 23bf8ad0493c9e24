"""Comparing fastpeft's adapter_config.json dicts with those the installed peft writes. fastpeft writes one peft
release's layout (PEFT_FORMAT_VERSION): with that release installed the dicts must be equal; with another, they must
agree on every key both have, but for the two that move between releases by design: peft_version, and
modules_to_save where peft adds its default task heads (0.22 added `pre_classifier`). A key one release adds at a
default that changes nothing (0.22's `astra_config`) is then left out of the comparison."""
import peft

from fastpeft.methods.config import PEFT_FORMAT_VERSION

MOVING_KEYS = ("peft_version", "modules_to_save")


def comparable(ours: dict, theirs: dict) -> tuple[dict, dict]:
    if peft.__version__ == PEFT_FORMAT_VERSION:
        return ours, theirs
    shared = (ours.keys() & theirs.keys()) - set(MOVING_KEYS)
    return {key: ours[key] for key in shared}, {key: theirs[key] for key in shared}
