"""`AdapterCheckpoints`, the callback that makes the stock `transformers.Trainer` checkpoint a fastpeft model as an
adapter: every `checkpoint-N` gets the model's adapters in fastpeft's files (`load_adapter` reads them; PEFT reads
LoRA's), and Trainer's own weights file there holds the trainable tensors only, not the frozen base model.

That file is what `resume_from_checkpoint` reads: the resuming script builds the same base model with the same adapters
injected, and Trainer loads the file into it non-strictly (the frozen keys it lacks are the ones the model says it
does not save, so no warning), then the optimizer, scheduler, RNG states and data position."""
import os

from torch import nn
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from fastpeft.api import adapter_names, save_adapter


class AdapterCheckpoints(TrainerCallback):
    """`Trainer(..., callbacks=[AdapterCheckpoints()])`. Adapter "default" is saved in checkpoint-N itself, any other
    in checkpoint-N/<name> (PEFT's layout). Between the Trainer's creation and the end of training the model's
    `_keys_to_ignore_on_save` (the transformers attribute save_pretrained honours) names its frozen tensors; the
    model's own set comes back at the end, so that a later `save_pretrained` (e.g. after merge_and_unload) is whole."""

    _UNSET = object()

    def __init__(self):
        self._own_ignored = self._UNSET  # the model's own _keys_to_ignore_on_save, once seen

    def on_init_end(self, args, state, control, model: nn.Module = None, **kwargs):
        self._ignore_frozen(model)

    def on_train_begin(self, args, state, control, model: nn.Module = None, **kwargs):
        self._ignore_frozen(model)  # what trains may have changed since (e.g. diff pruning's project_to_density)

    def on_save(self, args, state, control, model: nn.Module = None, **kwargs):
        """Called on every process after Trainer wrote checkpoint-N: rank 0 writes, FSDP2's shards are gathered."""
        checkpoint = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        for name in adapter_names(model):
            save_adapter(model, checkpoint if name == "default" else os.path.join(checkpoint, name), name)

    def on_train_end(self, args, state, control, model: nn.Module = None, **kwargs):
        model._keys_to_ignore_on_save = self._own_ignored

    def _ignore_frozen(self, model: nn.Module) -> None:
        if self._own_ignored is self._UNSET:
            self._own_ignored = model._keys_to_ignore_on_save
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        model._keys_to_ignore_on_save = set(model.state_dict(keep_vars=True)) - trainable
