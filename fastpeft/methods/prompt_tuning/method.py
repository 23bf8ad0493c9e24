"""Prompt tuning as a method: a PromptEmbedding in the word embeddings' place holds each adapter's prompt (one active),
a forward pre-hook on the model puts it in front of the input (fastpeft.methods.prompt_tuning.hook); never merged;
PEFT's file format (fastpeft.methods.prompt_tuning.files)."""
from torch import nn

from fastpeft.arguments import positive_int
from fastpeft.methods import saved_modules
from fastpeft.methods.base import Method
from fastpeft.methods.switches import switch_off
from fastpeft.methods.config import NUM_VIRTUAL_TOKENS_OPTION
from fastpeft.methods.prompt_tuning import files
from fastpeft.methods.prompt_tuning.build import apply, plan, prompt_wrappers, remove
from fastpeft.methods.prompt_tuning.config import PEFT_TYPE, PromptTuningConfig
from fastpeft.methods.prompt_tuning.initial import initial_prompt


class PromptTuningMethod(Method):
    name = "prompt_tuning"
    label = "prompt tuning"
    config_type = PromptTuningConfig
    peft_type = PEFT_TYPE
    changes_output_at_init = True  # the prompt starts random (or as text): the model sees new tokens from the start
    cannot_merge = ("prompt tuning cannot be merged into the base weights: it adds learned input tokens in front of "
                    "the sequence, not a change of any weight. Keep the prompt (save_adapter / load_adapter) instead")

    cli_options = {
        "--num-virtual-tokens": dict(type=positive_int, **NUM_VIRTUAL_TOKENS_OPTION),  # one flag for both methods
    }
    demo_options = {"--num-virtual-tokens": 20}
    demo_lr = 3e-2  # Lester et al. and PEFT's examples train prompts at 1e-2 .. 3e-1

    def cli_config(self, options: dict, modules_to_save: list[str], demo: bool) -> PromptTuningConfig:
        # The runs train a sequence classifier. Vocabulary embeddings start the prompt where the model's inputs live
        # (N(0, 1) values are far larger than MiniLM's word embeddings and swamp its attention at first).
        return PromptTuningConfig(num_virtual_tokens=options["num_virtual_tokens"], prompt_tuning_init="SAMPLE_VOCAB",
                                  task_type="SEQ_CLS", modules_to_save=modules_to_save)

    def describe(self, config: PromptTuningConfig) -> str:
        init = config.prompt_tuning_init + (f" {config.prompt_tuning_init_text!r}"
                                            if config.prompt_tuning_init == "TEXT" else "")
        return f"prompt tuning: {config.num_virtual_tokens} virtual tokens, init {init}"

    def peft_config(self, config: PromptTuningConfig):
        import peft  # only the demo's comparison needs it
        keep = ("num_virtual_tokens", "prompt_tuning_init", "prompt_tuning_init_text", "tokenizer_name_or_path",
                "tokenizer_kwargs", "modules_to_save", "task_type")
        settings = {k: v for k, v in config.to_peft_dict().items() if k in keep}
        return peft.PromptTuningConfig(**settings)

    def planned_paths(self, model: nn.Module, config: PromptTuningConfig) -> set[str]:
        planned = plan(model, config, "")
        return {planned.path} | {path for path, _ in planned.saved}

    def wrapped_paths(self, model: nn.Module, name: str) -> set[str]:
        return {path for path, _ in prompt_wrappers(model, name)} | \
            {path for path, _ in saved_modules.wrappers(model, name)}

    def inject(self, model: nn.Module, config: PromptTuningConfig, name: str, autocast_adapter_dtype: bool):
        planned = plan(model, config, name, autocast_adapter_dtype)
        apply(model, planned, name, initial_prompt(planned.config, planned.wrapper.base_layer, planned.dtype))
        return planned.config

    def activate(self, model: nn.Module, name: str | None, config) -> None:
        for _, wrapper in prompt_wrappers(model):
            wrapper.active_adapter = name if name in wrapper.prompts else None

    def trainable(self, model: nn.Module, name: str, config) -> list[nn.Parameter]:
        return [wrapper.prompts[name] for _, wrapper in prompt_wrappers(model, name)]

    def disable(self, model: nn.Module):
        return switch_off(wrapper for _, wrapper in prompt_wrappers(model))

    def delete(self, model: nn.Module, name: str) -> None:
        remove(model, name)

    def reads(self, file_config: dict) -> bool:
        return "method" not in file_config and file_config.get("peft_type") == PEFT_TYPE

    def file_config(self, saved) -> PromptTuningConfig:
        return PromptTuningConfig.from_peft_dict(saved.config, source=saved.config_path)

    def state(self, model: nn.Module, name: str, config: PromptTuningConfig):
        return files.state(model, name, config)

    def load(self, model, saved, name, autocast_adapter_dtype, existing_config=None):
        if existing_config is not None:
            raise ValueError(f"the model already has a prompt tuning adapter named {name!r}; delete_adapter it or "
                             "load this one under another name")
        return files.load(model, saved, self.file_config(saved), name, autocast_adapter_dtype)
