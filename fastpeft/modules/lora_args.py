"""Checks of LoRA's hyper-parameters, shared by `LoraLinear` and `LoraConfig` so that both refuse the same values
with the same message. `name` is the argument as the caller knows it (e.g. `rank_pattern['q']`)."""
import math


def check_rank(name: str, value) -> int:
    # bool is an int subclass: r=True would silently be rank 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} (a LoRA rank) must be an int >= 1, got {value!r}")
    return value


def check_alpha(name: str, value) -> float:
    """Negative alpha (a sign-flipped update) is allowed, as in PEFT; 0 would train an adapter that does nothing."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value == 0 \
            or (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(f"{name} must be a finite non-zero number, got {value!r}")
    return float(value)


def check_dropout(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
        raise ValueError(f"{name} must be a float in [0, 1), got {value!r}")
    return float(value)
