"""What the configs of the non-LoRA methods share: they are saved as adapter_config.json holding
{"method": <the method's name>, <the dataclass's fields>} and read back with every value validated again."""
from dataclasses import MISSING, asdict, fields, replace


def refuse_nulls(cls, config: dict, source: str, allowed: tuple[str, ...] = ()) -> None:
    """A JSON null is a value only for a field whose default is None: elsewhere it would silently become the default
    (`"lora_alpha": null` read as alpha 8), so it is an error naming the fields."""
    nulls = sorted(f.name for f in fields(cls) if f.name in config and config[f.name] is None
                   and f.name not in allowed and (f.default is not None or f.default_factory is not MISSING))
    if nulls:
        raise ValueError(f"{source}: {', '.join(nulls)} {'is' if len(nulls) == 1 else 'are'} null; give "
                         f"{'a value' if len(nulls) == 1 else 'values'} or leave {'it' if len(nulls) == 1 else 'them'} "
                         "out for the default")


class MethodConfig:
    """Mixin for frozen dataclass configs; a subclass sets METHOD (the file's "method") and LABEL (its name in
    errors)."""

    METHOD = ""
    LABEL = ""

    def to_dict(self) -> dict:
        """What `save_adapter` writes as adapter_config.json (tuples as JSON lists)."""
        own = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        return {"method": self.METHOD, **own}

    @classmethod
    def from_dict(cls, config: dict, source: str = "adapter config"):
        """Read what `to_dict` wrote; an unknown key or a bad value is an error naming `source`."""
        if not isinstance(config, dict):
            raise ValueError(f"{source}: expected a JSON object, got {type(config).__name__}")
        if config.get("method") != cls.METHOD:
            raise ValueError(f"{source}: method is {config.get('method')!r}, expected {cls.METHOD!r}")
        refuse_nulls(cls, config, source)
        kwargs = {k: v for k, v in config.items() if k != "method"}
        unknown = sorted(set(kwargs) - {f.name for f in fields(cls)})
        if unknown:
            raise ValueError(f"{source}: unknown {cls.LABEL} settings {unknown}")
        try:
            return cls(**kwargs)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{source}: {e}") from e

    def replace(self, **changes):
        """A copy with `changes`, validated again."""
        return replace(self, **changes)
