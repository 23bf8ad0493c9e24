"""Multi-task heads as a method: a `MultiTaskHeads` module added at `model.multitask_heads` (one per model), beside
the encoder, which it does not change: the encoder's output is the same with or without it, and any weight method
(LoRA, bottleneck adapters, prefix tuning, ...) can adapt the encoder at the same time, training with the heads.
Its file: adapter_config.json holding {"method": "multitask", <MultiTaskConfig fields>} and adapter_model.safetensors
with keys `base_model.model.multitask_heads.heads.<task>.linear.{weight,bias}` and
`base_model.model.multitask_heads.log_variances.<task>` (a scalar)."""
import torch
from torch import nn

from fastpeft.arguments import positive_float
from fastpeft.methods.base import Method
from fastpeft.methods.config import ENCODER_METHOD_OPTION
from fastpeft.methods.files import PREFIX, Entry, check_tensors
from fastpeft.methods.multitask.config import KINDS, POOLINGS, MultiTaskConfig
from fastpeft.methods.multitask.find import PATH
from fastpeft.methods.multitask.heads import MultiTaskHeads
from fastpeft.methods.multitask.sampling import STRATEGIES
from fastpeft.methods.multitask.task_option import task_spec

HALF = (torch.float16, torch.bfloat16)


class MultiTaskMethod(Method):
    name = "multitask"
    label = "multi-task heads"
    config_type = MultiTaskConfig
    one_per_model = True
    cannot_merge = ("multi-task heads cannot be merged into the base weights: they are new output modules, one per "
                    "task, and learned loss weights, not a change of any encoder weight. Keep them with save_adapter "
                    "/ load_adapter; merge_and_unload leaves them in the model as a plain module")

    cli_options = {
        "--task": dict(type=task_spec, action="append", default=None, metavar="NAME[:KIND]=PATH",
                       help=f"one task and its .csv / .jsonl data, repeated per task; KIND one of {KINDS} "
                            "(token_classification: .jsonl rows of word and tag lists)"),
        "--encoder-method": ENCODER_METHOD_OPTION,
        "--sampling": dict(choices=STRATEGIES, default="proportional", help="how each step's task is drawn"),
        "--temperature": dict(type=positive_float, default=2.0, help="the temperature of --sampling temperature"),
        "--pooling": dict(choices=POOLINGS, default="mean", help="how the sequence-level heads pool the tokens"),
        "--head-dropout": dict(type=float, default=0.1, help="dropout before each task head"),
    }
    cli_run = "fastpeft.multitask_run:run"

    def cli_config(self, options: dict, modules_to_save: list[str], demo: bool):
        raise ValueError("--method multitask trains on several tasks' data: `fastpeft train --method multitask "
                         "--task NAME[:KIND]=PATH ...` (the demo's one labelled data set has one task)")

    def describe(self, config: MultiTaskConfig) -> str:
        tasks = ", ".join(f"{task} ({spec['kind']}, {spec['num_labels']})" for task, spec in config.tasks.items())
        return f"multi-task heads: {tasks}; {config.pooling} pooling, dropout={config.dropout:g}"

    def planned_paths(self, model: nn.Module, config: MultiTaskConfig) -> set[str]:
        if hasattr(model, PATH):
            raise ValueError(f"{type(model).__name__} already has an attribute {PATH!r}, where multi-task heads go "
                             "(heads left by merge_and_unload? delete that attribute first)")
        _hidden_size(model)
        return {PATH}

    def wrapped_paths(self, model: nn.Module, name: str) -> set[str]:
        return {PATH} if isinstance(getattr(model, PATH, None), MultiTaskHeads) else set()

    def inject(self, model: nn.Module, config: MultiTaskConfig, name: str, autocast_adapter_dtype: bool):
        _attach(model, _build(model, config, autocast_adapter_dtype))
        return config

    def activate(self, model: nn.Module, name: str | None, config) -> None:
        """One per model: the heads are there while the adapter is."""

    def trainable(self, model: nn.Module, name: str, config) -> list[nn.Parameter]:
        return list(getattr(model, PATH).parameters())

    def disable(self, model: nn.Module):
        """Nothing to switch off: the heads never change the encoder's output (the base model is what runs), and they
        are the tasks' outputs, so they stay usable on the base encoder inside disable_adapters."""
        return lambda: None

    def delete(self, model: nn.Module, name: str) -> None:
        delattr(model, PATH)

    def check_merge(self, model: nn.Module, name: str, merged_ok: bool = False) -> None:
        """merge is refused with the reason; merge_and_unload (`merged_ok`) keeps the heads as they are."""
        if not merged_ok:
            raise ValueError(self.cannot_merge)

    def unload(self, model: nn.Module, name: str) -> None:
        """The heads stay in the model (a plain module, still found by multitask_forward); the record forgets them."""

    def file_config(self, saved) -> MultiTaskConfig:
        return MultiTaskConfig.from_dict(saved.config, source=saved.config_path)

    def state(self, model: nn.Module, name: str, config: MultiTaskConfig):
        tensors = {f"{PREFIX}{PATH}.{key}": value for key, value in getattr(model, PATH).state_dict().items()}
        settings = {**config.to_dict(), "base_model_name_or_path":
                    config.base_model_name_or_path or getattr(model, "name_or_path", None) or None}
        return settings, tensors, {}

    def load(self, model, saved, name, autocast_adapter_dtype, existing_config=None):
        """Build and fill the heads aside, checking every key, shape and dtype, then put them in."""
        config = self.file_config(saved)
        heads = _build(model, config, autocast_adapter_dtype)
        state = {f"{PREFIX}{PATH}.{key}": value for key, value in heads.state_dict().items()}
        check_tensors({key: Entry(key, tuple(value.shape), value.dtype) for key, value in state.items()},
                      saved.tensors, f"{saved.weights_path} does not fit the multi-task heads of "
                                     f"{type(model).__name__}")
        with torch.no_grad():
            for key, value in state.items():
                value.copy_(saved.tensors[key])
        _attach(model, heads)
        return config, lambda: self.delete(model, name)


def _hidden_size(model: nn.Module) -> int:
    size = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"multi-task heads read the encoder's hidden size from model.config.hidden_size; "
                         f"{type(model).__name__} has {size!r}")
    return size


def _build(model: nn.Module, config: MultiTaskConfig, autocast_adapter_dtype: bool) -> MultiTaskHeads:
    """Fresh heads on the device of the model's weights, in their dtype (float32 for float16 / bfloat16 weights with
    `autocast_adapter_dtype`, as PEFT does for adapter weights)."""
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    device, dtype = (None, None) if weight is None else (weight.device, weight.dtype)
    if autocast_adapter_dtype and dtype in HALF:
        dtype = torch.float32
    return MultiTaskHeads(config, _hidden_size(model), device=device, dtype=dtype)


def _attach(model: nn.Module, heads: MultiTaskHeads) -> None:
    heads.train(model.training)  # a fresh module trains; in an eval-mode model its dropout must not run
    model.add_module(PATH, heads)
