"""Full fine-tuning as a method: every parameter trains in place (fastpeft.methods.bitfit.in_place, which BitFit and
this baseline share), with a CPU copy of the initial model kept to disable and delete it. Its file:
adapter_config.json holding {"method": "full_finetuning", <FullFinetuningConfig fields>} and
adapter_model.safetensors with `base_model.model.<parameter name>` for every parameter: a whole model, the price of
the baseline."""
from torch import nn

from fastpeft.methods.in_place import InPlaceMethod
from fastpeft.methods.full_finetuning.config import FullFinetuningConfig


class FullFinetuningMethod(InPlaceMethod):
    name = "full_finetuning"
    label = "full fine-tuning"
    config_type = FullFinetuningConfig
    initial_on_cpu = True  # a second copy of the model: in host memory, not on the accelerator
    cannot_merge = ("full fine-tuning cannot be merged: it trains every parameter in place, so the model holds the "
                    "result already. merge_and_unload keeps the trained model and drops the adapter; delete_adapter "
                    "restores the initial parameters")

    cli_options = {}
    demo_options = {}
    # Every weight moves: the adapters' demo rate (3e-3) wrecks the pretrained encoder (test accuracy 50% after 2
    # epochs); 5e-5, as usual for fine-tuning BERT-size models, reaches 85% (seed 0).
    demo_lr = 5e-5

    def cli_config(self, options: dict, modules_to_save: list[str], demo: bool) -> FullFinetuningConfig:
        return FullFinetuningConfig(modules_to_save=modules_to_save)

    def describe(self, config: FullFinetuningConfig) -> str:
        return "full fine-tuning (every parameter)"

    def select(self, model: nn.Module, config, skip: tuple[str, ...]) -> tuple[list[str], list[str]]:
        chosen = [key for key, _ in model.named_parameters() if not key.startswith(skip)]
        if not chosen:
            raise ValueError(f"{type(model).__name__} has no parameters outside modules_to_save="
                             f"{list(config.modules_to_save or ())} for full fine-tuning to train")
        return chosen, []
