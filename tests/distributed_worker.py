"""The two-process runs of tests/test_distributed.py, launched as
`python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.distributed_worker OUT` (gloo, CPU), and
what they share with the single-process references the test computes: the model, the data, the training steps.
Each rank writes what it ends with under OUT; the test compares."""
import sys

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn

import fastpeft
from tests.model_cases import minilm_classifier

WORLD = 2  # ranks
ROWS, LENGTH, STEPS, LR = 4, 12, 3, 0.5  # global batch rows, tokens per row, SGD steps per stage
CONFIGS = {
    "lora": lambda: fastpeft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                        modules_to_save=["classifier"]),
    "bottleneck": lambda: fastpeft.BottleneckConfig(placement="pfeiffer", bottleneck=16,
                                                    modules_to_save=["classifier"]),
    "diff_pruning": lambda: fastpeft.DiffPruningConfig(target_modules=["query", "value"], density=0.01,
                                                       modules_to_save=["classifier"]),
}


def base() -> nn.Module:
    """MiniLM with the same new head everywhere and its own dropout off, so that a rank's half batch computes what
    those rows compute in the whole batch."""
    model = minilm_classifier(2)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model.train()


def classifier(method: str) -> nn.Module:
    """`base()` with a fresh adapter, the same on every rank after one manual_seed."""
    model = base()
    torch.manual_seed(0)
    return fastpeft.inject(model, CONFIGS[method]())


def batches(rows: slice = slice(None)) -> list[dict]:
    """STEPS global batches of ROWS random sentences (no padding), or the rows `rows` of each."""
    g = torch.Generator().manual_seed(1)
    full = [{"input_ids": torch.randint(1000, 20000, (ROWS, LENGTH), generator=g),
             "labels": torch.randint(0, 2, (ROWS,), generator=g)} for _ in range(STEPS)]
    return [{key: value[rows] for key, value in batch.items()} for batch in full]


def rows_of(rank: int) -> slice:
    """The rows of each global batch that `rank` trains on."""
    return slice(rank * ROWS // WORLD, (rank + 1) * ROWS // WORLD)


def train(model: nn.Module, data: list[dict], wrap=lambda m: m, penalty=None) -> None:
    """One SGD step per batch on `wrap(model)` (e.g. DDP), minimising the loss plus `penalty(model)` if given."""
    runner = wrap(model)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=LR)
    for batch in data:
        loss = runner(**batch).loss
        (loss if penalty is None else loss + penalty(model)).backward()
        optimizer.step()
        optimizer.zero_grad()


def trained(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable parameters (full tensors; FSDP2's shards gathered, a collective), by name."""
    def whole(p):
        return p.full_tensor() if hasattr(p, "full_tensor") else p
    return {name: whole(p).detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def fixed_mask(out: str) -> nn.Module:
    """Diff pruning's fixed-mask stage from the mask the DDP run projected, with values of about the size of the
    weights' entries: a delta missing from a forward or a backward would change the training far beyond rounding."""
    model = fastpeft.load_adapter(base(), f"{out}/ddp-diff_pruning-projected")
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".values"):
                p.copy_(0.3 * torch.randn(p.shape, generator=g))
    return model


# ------------------------------------------------------------------------------------------------ the runs
def ddp(out: str, method: str, rank: int) -> None:
    """Train on this rank's rows under DDP; diff pruning: the search, then (saved as `-projected`) the fixed mask."""
    from torch.nn.parallel import DistributedDataParallel

    model = classifier(method)
    rows = rows_of(rank)
    if method == "diff_pruning":
        train(model, batches(rows), DistributedDataParallel, fastpeft.l0_penalty)
        save_file(trained(model), f"{out}/ddp-{method}-search-rank{rank}.safetensors")
        fastpeft.project_to_density(model)
        fastpeft.save_adapter(model, f"{out}/ddp-{method}-projected")
    train(model, batches(rows), DistributedDataParallel)
    save_file(trained(model), f"{out}/ddp-{method}-rank{rank}.safetensors")
    if method == "lora":  # nothing is sharded: rank 0 saves alone; called on every rank, rank 0 alone writes
        if rank == 0:
            fastpeft.save_adapter(model, f"{out}/ddp-lora-rank0-alone")
        fastpeft.save_adapter(model, f"{out}/ddp-lora-called-on-rank{rank}")


def accelerated(out: str, rank: int) -> None:
    """LoRA trained the accelerate way: Accelerator.prepare (which wraps the model in DDP) and accelerator.backward."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    model = classifier("lora")
    runner, optimizer = accelerator.prepare(model, torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=LR))
    for batch in batches(rows_of(rank)):
        accelerator.backward(runner(**batch).loss)
        optimizer.step()
        optimizer.zero_grad()
    save_file(trained(accelerator.unwrap_model(runner)), f"{out}/accelerate-lora-rank{rank}.safetensors")


def fsdp(out: str, rank: int) -> None:
    """LoRA under FSDP2 (every layer and the model sharded), saved by save_adapter called on every rank; rank 0
    also writes the sharded model's logits of the first batch, for the test to compare with the loaded adapter."""
    from torch.distributed.fsdp import fully_shard

    model = classifier("lora")
    for layer in model.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    train(model, batches(rows_of(rank)))
    fastpeft.save_adapter(model, f"{out}/fsdp-lora")
    with torch.no_grad():
        logits = model.eval()(input_ids=batches()[0]["input_ids"]).logits
    if rank == 0:
        save_file({"logits": logits}, f"{out}/fsdp-lora-logits.safetensors")


def trainer_ddp(out: str, rank: int) -> None:
    """LoRA under the stock transformers.Trainer, which wraps the model in DDP under torchrun, with fastpeft's
    AdapterCheckpoints callback; every rank writes the trainable tensors it ends with."""
    from transformers import Trainer, TrainingArguments

    from fastpeft.hf_trainer import AdapterCheckpoints

    model = classifier("lora")
    data = [{"input_ids": ids, "labels": label} for batch in batches() for ids, label in
            zip(batch["input_ids"], batch["labels"])]
    args = TrainingArguments(output_dir=f"{out}/trainer", max_steps=STEPS, save_steps=STEPS,
                             per_device_train_batch_size=ROWS // WORLD, learning_rate=1e-2, seed=0, use_cpu=True,
                             ddp_backend="gloo", report_to="none", disable_tqdm=True, logging_strategy="no")
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[AdapterCheckpoints()])
    trainer.train()
    save_file(trained(model), f"{out}/trainer-lora-rank{rank}.safetensors",
              metadata={"world_size": str(args.world_size), "wrapper": type(trainer.model_wrapped).__name__})


def fsdp_diff_pruning(out: str, rank: int) -> None:
    """Diff pruning's fixed mask trained under FSDP2 (every layer and the model sharded), then saved on every rank."""
    from torch.distributed.fsdp import fully_shard

    dist.barrier()  # rank 0 wrote the projected adapter in ddp() without waiting
    model = fixed_mask(out)
    for layer in model.bert.encoder.layer:
        fully_shard(layer)
    fully_shard(model)
    train(model, batches(rows_of(rank)))
    save_file(trained(model), f"{out}/fsdp-diff_pruning-rank{rank}.safetensors")
    fastpeft.save_adapter(model, f"{out}/fsdp-diff_pruning")


def dropout_masks(out: str, rank: int) -> None:
    """One LoRA layer with dropout 0.5 after the same manual_seed on every rank: its initial adapter weights, the mask
    its forward drew and the mask its backward used. A = B = I and scaling 1 make the LoRA branch of the output the
    dropped input itself (2 where kept, 0 where dropped) and the LoRA part of dx the dropped dy."""
    torch.manual_seed(0)
    layer = fastpeft.LoraLinear.from_linear(nn.Linear(16, 16), r=16, lora_alpha=16, lora_dropout=0.5)
    init = layer.lora_A["default"].detach().clone()
    with torch.no_grad():
        layer.lora_A["default"].copy_(torch.eye(16))
        layer.lora_B["default"].copy_(torch.eye(16))
    x = torch.ones(64, 16, requires_grad=True)
    y = layer(x)
    y.sum().backward()
    with torch.no_grad():
        forward_branch = y - layer.base_layer(x)
        backward_branch = x.grad - torch.ones(64, 16) @ layer.base_layer.weight
    save_file({"init_A": init, "forward_kept": forward_branch > 1, "backward_kept": backward_branch > 1},
              f"{out}/dropout-rank{rank}.safetensors")


def main(out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    try:
        dropout_masks(out, rank)
        for method in CONFIGS:
            ddp(out, method, rank)
        accelerated(out, rank)
        fsdp(out, rank)
        fsdp_diff_pruning(out, rank)
        trainer_ddp(out, rank)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
