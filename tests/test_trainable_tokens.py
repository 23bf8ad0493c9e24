"""What is particular to trainable tokens (the contract test covers the rest): only the chosen rows get a gradient and
change; a tied output layer follows them; bad configs are clear errors; PEFT's TRAINABLE_TOKENS files interoperate
both ways (peft loads ours, we load peft's) with the same outputs (to rounding: peft multiplies by the whole
weight with the rows copied in, we multiply the rows apart)."""
import peft
import pytest
import torch
from transformers import BertConfig, BertForMaskedLM, BertModel

import fastpeft
from fastpeft.methods.record import record
from fastpeft.methods.trainable_tokens import TrainableTokensConfig
from tests.model_cases import one_thread  # noqa: F401  (autouse fixture)

TOKENS = [5, 17, 97]
INPUT = torch.tensor([[1, 5, 8, 17, 97, 2], [3, 97, 97, 4, 5, 0]])
CONFIG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100,
              max_position_embeddings=32)


def tiny_mlm(seed: int = 0) -> BertForMaskedLM:
    torch.manual_seed(seed)
    return BertForMaskedLM(BertConfig(**CONFIG)).eval()


def move_rows(model, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=INPUT).logits


def test_only_the_chosen_rows_train_and_the_rest_stays_bit_identical():
    torch.manual_seed(0)
    model = BertModel(BertConfig(**CONFIG), add_pooling_layer=False)
    weight = model.embeddings.word_embeddings.weight.detach().clone()
    fastpeft.inject(model, TrainableTokensConfig(token_indices=TOKENS))
    (rows,) = [p for p in model.parameters() if p.requires_grad]
    assert rows.shape == (3, 32)
    optimizer = torch.optim.AdamW([rows], lr=0.1)  # optimizer state: O(rows), not O(vocabulary)
    model(input_ids=INPUT).last_hidden_state.pow(2).mean().backward()
    assert rows.grad.abs().sum(1).gt(0).all()
    optimizer.step()
    assert torch.equal(model.embeddings.word_embeddings.base_layer.weight, weight)
    assert not torch.equal(rows.detach(), weight[TOKENS])
    out = model.embeddings.word_embeddings(torch.arange(100))
    changed = (out != weight).any(1).nonzero().flatten().tolist()
    assert changed == TOKENS


def test_a_tied_output_layer_follows_the_rows():
    model = tiny_mlm()
    assert model.cls.predictions.decoder.weight is model.bert.embeddings.word_embeddings.weight
    fastpeft.inject(model, TrainableTokensConfig(token_indices=TOKENS))
    move_rows(model)
    rows = model.bert.embeddings.word_embeddings.trainable_tokens_delta["default"].detach()
    reference = tiny_mlm()  # the same model with the rows written into its (tied) weight
    with torch.no_grad():
        reference.bert.embeddings.word_embeddings.weight[TOKENS] = rows
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-5, atol=1e-5)
    fastpeft.merge(model)
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs, message", [
    (dict(token_indices=[]), r"token_indices must be a non-empty list of token ids \(ints >= 0\), got \[\]"),
    (dict(token_indices=[3, -1]), r"token_indices must be .*got \[3, -1\]"),
    (dict(token_indices=[3, 3]), r"token_indices must not repeat a token id, got \[3\]"),
    (dict(token_indices=[3], init_weights="yes"), r"init_weights must be True or False, got 'yes'"),
])
def test_bad_configs_are_clear_errors(kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        TrainableTokensConfig(**kwargs)


@pytest.mark.parametrize("config, message", [
    (TrainableTokensConfig(token_indices=[5, 100, 120]), r"token_indices \[100, 120\] are beyond the 100 rows of "
                                                         r"bert.embeddings.word_embeddings: resize the embeddings"),
    (TrainableTokensConfig(token_indices=[5], target_modules=["query"]), r"selects .*query \(Linear\); trainable "
                                                                         r"tokens train rows of nn.Embedding"),
])
def test_configs_that_do_not_fit_the_model_are_clear_errors(config, message):
    model = tiny_mlm()
    with pytest.raises(ValueError, match=message):
        fastpeft.inject(model, config)
    assert not fastpeft.adapter_names(model)


def test_peft_loads_ours_with_the_same_outputs(tmp_path):
    model = fastpeft.inject(tiny_mlm(), TrainableTokensConfig(token_indices=TOKENS))
    move_rows(model)
    fastpeft.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(tiny_mlm(), tmp_path).eval()
    torch.testing.assert_close(logits(theirs), logits(model))  # peft's GEMM over the whole weight: other rounding


def test_we_load_peft_files_with_the_same_outputs(tmp_path):
    theirs = peft.get_peft_model(tiny_mlm(), peft.TrainableTokensConfig(token_indices=TOKENS)).eval()
    move_rows(theirs)
    theirs.save_pretrained(tmp_path)
    ours = fastpeft.load_adapter(tiny_mlm(), tmp_path)
    assert record(ours).adapters["default"].method == "trainable_tokens"
    torch.testing.assert_close(logits(ours), logits(theirs))
