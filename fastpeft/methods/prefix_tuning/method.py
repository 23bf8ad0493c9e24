"""Prefix tuning as a method: the model's PrefixEncoders hold each adapter's prefixes (one active), forward pre-hooks
put them in front of every attention layer's keys and values (fastpeft.methods.prefix_tuning.hooks); never merged;
PEFT's file format (fastpeft.methods.prefix_tuning.files)."""
from torch import nn

from fastpeft.arguments import positive_int
from fastpeft.methods import saved_modules
from fastpeft.methods.base import Method
from fastpeft.methods.config import NUM_VIRTUAL_TOKENS_OPTION
from fastpeft.methods.prefix_tuning import files
from fastpeft.methods.prefix_tuning.build import apply, encoders_of, plan, remove
from fastpeft.methods.prefix_tuning.config import PEFT_TYPE, PrefixTuningConfig
from fastpeft.methods.prefix_tuning.encoder import ATTRIBUTE


class PrefixTuningMethod(Method):
    name = "prefix_tuning"
    label = "prefix tuning"
    config_type = PrefixTuningConfig
    peft_type = PEFT_TYPE
    changes_output_at_init = True  # the prefixes start random: every layer attends to them from the start
    cannot_merge = ("prefix tuning cannot be merged into the base weights: it adds learned key / value rows that every "
                    "attention layer attends to, not a change of any weight. Keep the prefixes (save_adapter / "
                    "load_adapter) instead")

    cli_options = {
        "--num-virtual-tokens": dict(type=positive_int, **NUM_VIRTUAL_TOKENS_OPTION),  # one flag for both methods
    }
    demo_options = {"--num-virtual-tokens": 10}

    def cli_config(self, options: dict, modules_to_save: list[str], demo: bool) -> PrefixTuningConfig:
        # The runs train a sequence classifier. The MLP reparameterisation steadies training, as Li and Liang found.
        return PrefixTuningConfig(num_virtual_tokens=options["num_virtual_tokens"], prefix_projection=True,
                                  task_type="SEQ_CLS", modules_to_save=modules_to_save)

    def describe(self, config: PrefixTuningConfig) -> str:
        width = f" of width {config.encoder_hidden_size}" if config.encoder_hidden_size else ""  # None: token_dim
        through = f", trained through an MLP{width}" if config.prefix_projection else ""
        return f"prefix tuning: {config.num_virtual_tokens} virtual tokens in every attention layer{through}"

    def peft_config(self, config: PrefixTuningConfig):
        # peft 0.21 refuses prefix tuning on the demo's MiniLM (BERT) under transformers 5.25 ("does not support past
        # key values"), and PEFT otherwise numbers the tokens after the prefix, which we do not on BERT: no comparison.
        return None

    def planned_paths(self, model: nn.Module, config: PrefixTuningConfig) -> set[str]:
        # The attention modules only get hooks and keep their own children: other methods may still adapt those.
        return {ATTRIBUTE} | {path for path, _ in plan(model, config, "").saved}

    def wrapped_paths(self, model: nn.Module, name: str) -> set[str]:
        encoders = encoders_of(model)
        mine = {ATTRIBUTE} if encoders is not None and name in encoders.encoders else set()
        return mine | {path for path, _ in saved_modules.wrappers(model, name)}

    def inject(self, model: nn.Module, config: PrefixTuningConfig, name: str, autocast_adapter_dtype: bool):
        planned = plan(model, config, name, autocast_adapter_dtype)
        apply(model, planned, name, projection=planned.config.prefix_projection)
        return planned.config

    def activate(self, model: nn.Module, name: str | None, config) -> None:
        encoders = encoders_of(model)
        if encoders is not None:
            encoders.active_adapter = name if name in encoders.encoders else None

    def trainable(self, model: nn.Module, name: str, config) -> list[nn.Parameter]:
        return list(encoders_of(model).encoders[name].parameters())

    def disable(self, model: nn.Module):
        encoders = encoders_of(model)
        if encoders is None:
            return lambda: None
        before, encoders.disabled = encoders.disabled, True

        def undo():
            encoders.disabled = before
        return undo

    def delete(self, model: nn.Module, name: str) -> None:
        remove(model, name)

    def reads(self, file_config: dict) -> bool:
        return "method" not in file_config and file_config.get("peft_type") == PEFT_TYPE

    def file_config(self, saved) -> PrefixTuningConfig:
        return PrefixTuningConfig.from_peft_dict(saved.config, source=saved.config_path)

    def state(self, model: nn.Module, name: str, config: PrefixTuningConfig):
        return files.state(model, name, config)

    def load(self, model, saved, name, autocast_adapter_dtype, existing_config=None):
        if existing_config is not None:
            raise ValueError(f"the model already has a prefix tuning adapter named {name!r}; delete_adapter it or "
                             "load this one under another name")
        return files.load(model, saved, self.file_config(saved), name, autocast_adapter_dtype)
