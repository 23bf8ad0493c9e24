"""What is particular to prefix tuning (the contract test covers the rest): PEFT's files both ways with PEFT's outputs
on a tiny GPT-2 and Llama (CAUSAL_LM); MiniLM (BERT), where peft 0.21 refuses prefix tuning under transformers 5.25
and PEFT otherwise numbers the tokens after the prefix, which we do not on BERT, so there PEFT's outputs are checked
with its positions given, and otherwise our own save / load round trip, bit for bit, and the padding mask against
the sentences run alone; generation; the MLP reparameterisation; and clear errors for bad options."""
import copy
import inspect
import json

import peft
import pytest
import torch
from packaging.version import Version
from safetensors.torch import load_file
from torch import nn
from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM)

import fastpeft
from fastpeft.methods.prefix_tuning import PrefixTuningConfig
from tests.model_cases import assert_unchanged, minilm_batch, minilm_classifier, snapshot
from tests.model_cases import one_thread  # noqa: F401  (autouse fixture)
from tests.peft_layout import comparable
from tests.test_method_contract import tiny_bert

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
N = 5  # virtual tokens


def tiny_gpt2_lm() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0,
                                      eos_token_id=0)).eval()


def tiny_llama_lm() -> LlamaForCausalLM:  # grouped-query attention: 4 heads, 2 key / value heads
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=64, vocab_size=100,
                                        max_position_embeddings=64)).eval()


def lm_batch() -> dict:
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    return {"input_ids": ids, "attention_mask": mask, "labels": ids}


@torch.no_grad()
def moved(model, seed: int = 1):
    """The trainable parameters moved off their init, so that a wrong load would show."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


def outputs(model, batch):
    with torch.no_grad():
        return model.eval()(**batch)


# --- PEFT's files and outputs on decoders ---------------------------------------------------------------------------
@pytest.mark.parametrize("make", [tiny_gpt2_lm, tiny_llama_lm])
def test_peft_loads_our_files_with_our_outputs(tmp_path, make):
    ours = moved(fastpeft.inject(make(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)))
    fastpeft.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path)
    expected, got = outputs(ours, lm_batch()), outputs(theirs, lm_batch())
    assert not torch.allclose(expected.logits, outputs(make(), lm_batch()).logits, atol=1e-3)
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("projection", [False, True])
def test_peft_trained_files_load_with_peft_outputs(tmp_path, projection):
    """PEFT trains (through its MLP with prefix_projection) and saves the final prefixes; they load as plain ones."""
    theirs = peft.get_peft_model(tiny_gpt2_lm(), peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=projection, encoder_hidden_size=16))
    optimizer = torch.optim.Adam([p for p in theirs.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        optimizer.zero_grad()
        theirs.train()(**lm_batch()).loss.backward()
        optimizer.step()
    theirs.save_pretrained(tmp_path)
    ours = fastpeft.load_adapter(tiny_gpt2_lm(), tmp_path)
    expected, got = outputs(theirs, lm_batch()), outputs(ours, lm_batch())
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-6)
    config = fastpeft.adapter_config(ours, "default")
    assert (config.prefix_projection, config.encoder_hidden_size) == (projection, 16)
    trainable = [n for n, p in ours.named_parameters() if p.requires_grad]
    assert trainable == ["prefix_tuning.encoders.default.embedding.weight"]  # plain prefixes, as PEFT loads them


def test_config_dict_is_what_peft_writes(tmp_path):
    kwargs = dict(task_type="CAUSAL_LM", num_virtual_tokens=N, prefix_projection=True, encoder_hidden_size=16)
    peft.get_peft_model(tiny_llama_lm(), peft.PrefixTuningConfig(**kwargs)).save_pretrained(tmp_path)
    theirs = json.loads((tmp_path / "adapter_config.json").read_text())
    ours = fastpeft.adapter_config(fastpeft.inject(tiny_llama_lm(), PrefixTuningConfig(**kwargs)), "default")
    written, expected = comparable(ours.to_peft_dict(), theirs)
    assert written == expected  # sizes filled from the model as PEFT fills them (key / value heads: 2)
    assert (ours.token_dim, ours.num_attention_heads) == (16, 2)
    assert PrefixTuningConfig.from_peft_dict(theirs) == ours


def test_generate_keeps_the_prefix():
    """generate, with its own key/value cache, gives the tokens of greedy decoding by full forwards of the whole
    (left-padded) sequence, positions counted from the attention mask as generate counts them (such forwards agree
    with PEFT's, above)."""
    model = moved(fastpeft.inject(tiny_gpt2_lm(), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)))
    batch = lm_batch()
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **settings)
    sequence, mask, logits = batch["input_ids"], batch["attention_mask"], []
    with torch.no_grad():
        for _ in range(6):
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            logits.append(model(input_ids=sequence, attention_mask=mask, position_ids=positions,
                                use_cache=False).logits[:, -1])
            sequence = torch.cat([sequence, logits[-1].argmax(-1, keepdim=True)], dim=1)
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
    assert torch.equal(out.sequences, sequence)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(logits), rtol=1e-5, atol=1e-5)
    with fastpeft.disable_adapters(model):
        plain = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **settings)
    assert not torch.allclose(plain.logits[0], out.logits[0], atol=1e-2)


def test_positions_are_peft_s():
    """Real tokens are numbered after the prefix, as PEFT numbers them: given position_ids are shifted by
    num_virtual_tokens, and none given is the same as 0, 1, ... given."""
    config = PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)
    ours = moved(fastpeft.inject(tiny_gpt2_lm(), config))
    theirs = peft.get_peft_model(tiny_gpt2_lm(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N))
    with torch.no_grad():
        theirs.prompt_encoder["default"].embedding.weight.copy_(ours.prefix_tuning.encoders["default"]())
    batch = lm_batch()
    positions = (batch["attention_mask"].cumsum(-1) - 1).clamp(min=0)
    got = outputs(ours, {**batch, "position_ids": positions}).logits
    torch.testing.assert_close(got, outputs(theirs, {**batch, "position_ids": positions}).logits, rtol=1e-5, atol=1e-6)
    plain = {**batch, "attention_mask": torch.ones_like(batch["attention_mask"])}
    counted = outputs(ours, {**plain, "position_ids": torch.arange(7)[None]}).logits
    torch.testing.assert_close(outputs(ours, plain).logits, counted)


# --- BERT / MiniLM, which PEFT refuses under newer transformers ----------------------------------------------------
def test_peft_on_minilm_refuses_or_agrees_with_ours():
    """PEFT hands BERT its prefixes through BertModel's cache argument. transformers 5.25 renamed that argument
    `cache` (BertModel.forward has no `past_key_values`), and peft 0.21 refuses; peft 0.22, and peft 0.21 under
    transformers 5.17, pass the prefixes, and PEFT's outputs there are ours, once the tokens are numbered as PEFT's
    run numbers them: after its cache, from num_virtual_tokens on (BertEmbeddings counts from the cache's length). We
    leave BERT's positions alone (the prefix only joins the attention); the MiniLM tests below check ours on their
    own."""
    ours = moved(fastpeft.inject(minilm_classifier(3), PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=N)))
    base = minilm_classifier(3)
    theirs = peft.get_peft_model(base, peft.PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=N))
    batch = minilm_batch()
    renamed = "past_key_values" not in inspect.signature(base.bert.forward).parameters  # transformers 5.25
    if renamed and Version(peft.__version__) < Version("0.22"):
        with pytest.raises(ValueError, match="does not support past key values"):
            theirs(**batch)
        return
    with torch.no_grad():  # the same prefixes and classifier on both sides
        theirs.prompt_encoder["default"].embedding.weight.copy_(ours.prefix_tuning.encoders["default"]())
        theirs.base_model.classifier.modules_to_save["default"].load_state_dict(
            ours.classifier.modules_to_save["default"].state_dict())
    for attention in ("eager", "sdpa"):
        ours.set_attn_implementation(attention)
        base.set_attn_implementation(attention)
        expected = outputs(theirs, batch).logits
        positions = torch.arange(batch["input_ids"].shape[1])[None] + N  # PEFT's numbering, after its cache
        torch.testing.assert_close(outputs(ours, {**batch, "position_ids": positions}).logits, expected, rtol=1e-5,
                                   atol=1e-6)
        assert not torch.allclose(outputs(ours, batch).logits, expected, atol=1e-3)  # ours, positions from 0


def test_minilm_trains_and_round_trips_bit_exactly(tmp_path):
    model = fastpeft.inject(minilm_classifier(3), PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=N,
                                                                    prefix_projection=True, encoder_hidden_size=32))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "prefix_tuning" not in k
              and "modules_to_save" not in k}
    assert sorted(n for n, p in model.named_parameters() if p.requires_grad) == [
        "classifier.modules_to_save.default.bias", "classifier.modules_to_save.default.weight",
        "prefix_tuning.encoders.default.embedding.weight", "prefix_tuning.encoders.default.transform.0.bias",
        "prefix_tuning.encoders.default.transform.0.weight", "prefix_tuning.encoders.default.transform.2.bias",
        "prefix_tuning.encoders.default.transform.2.weight"]
    mlp = model.prefix_tuning.encoders["default"].transform[0].weight
    start = mlp.detach().clone()
    batch = {**minilm_batch(), "labels": torch.tensor([0, 2])}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0] and not torch.equal(mlp, start)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())

    fastpeft.save_adapter(model, tmp_path)
    with torch.no_grad():  # the file holds the MLP's output, the plain prefixes
        assert torch.equal(load_file(tmp_path / "adapter_model.safetensors")["prompt_embeddings"],
                           model.prefix_tuning.encoders["default"]())
    fresh = fastpeft.load_adapter(minilm_classifier(3), tmp_path)
    assert torch.equal(outputs(fresh, batch).logits, outputs(model, batch).logits)


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
def test_minilm_padding_is_masked_and_prefixes_are_not(attention):
    """Each sentence run alone gives what it gives in a padded batch (the prefix columns attend, padding does not),
    with either attention implementation (additive / boolean masks)."""
    model = moved(fastpeft.inject(minilm_classifier(3), PrefixTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=N)))
    model.set_attn_implementation(attention)
    batch = minilm_batch()
    together = outputs(model, batch).logits
    for i in range(2):
        length = int(batch["attention_mask"][i].sum())
        alone = {k: v[i:i + 1, :length] for k, v in batch.items()}
        torch.testing.assert_close(outputs(model, alone).logits, together[i:i + 1], rtol=1e-5, atol=1e-5)
    with fastpeft.disable_adapters(model):
        assert not torch.allclose(outputs(model, batch).logits, together, atol=1e-3)


# --- the model's life cycle -----------------------------------------------------------------------------------------
def test_adapters_switch_copies_keep_the_hooks_and_delete_takes_them_out():
    model = fastpeft.inject(tiny_gpt2_lm(), PrefixTuningConfig(num_virtual_tokens=N), adapter_name="a")
    fastpeft.inject(model, PrefixTuningConfig(num_virtual_tokens=3), adapter_name="b")
    batch = lm_batch()
    b = outputs(model, batch).logits
    fastpeft.set_adapter(model, "a")
    a = outputs(model, batch).logits
    assert not torch.allclose(a, b, atol=1e-3)
    assert torch.equal(outputs(copy.deepcopy(model), batch).logits, a)
    fastpeft.delete_adapter(model, "a")
    torch.testing.assert_close(outputs(model, batch).logits, b)
    fastpeft.delete_adapter(model, "b")
    assert not hasattr(model, "prefix_tuning") and not model._forward_pre_hooks


# --- errors ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs, message", [
    (dict(num_virtual_tokens=0), "num_virtual_tokens must be an int >= 1, got 0"),
    (dict(encoder_hidden_size=-1), "encoder_hidden_size must be an int >= 1, got -1"),
    (dict(num_transformer_submodules=2), "num_transformer_submodules must be 1 .*got 2"),
    (dict(task_type="SEQ_2_SEQ_LM"), "task_type must be one of .* for prefix tuning, got 'SEQ_2_SEQ_LM'"),
    (dict(token_dim=30, num_attention_heads=4), r"token_dim must be a multiple of num_attention_heads \(4\), got 30"),
    (dict(init_weights="ones"), r"init_weights must be one of \(None, 'zero'\), got 'ones'"),
])
def test_bad_options_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrefixTuningConfig(**kwargs)


@pytest.mark.parametrize("model, config, message", [
    (lambda: nn.Sequential(nn.Linear(2, 2)), PrefixTuningConfig(num_layers=1, token_dim=2, num_attention_heads=1),
     "prefix tuning needs attention layers: Sequential has no BERT-style self-attention modules"),
    (lambda: nn.Sequential(nn.Linear(2, 2)), PrefixTuningConfig(),
     "prefix tuning needs num_layers, token_dim, num_attention_heads: give them in PrefixTuningConfig"),
    (tiny_bert, PrefixTuningConfig(num_layers=3), r"num_layers must be BertModel's 2 \(from its config\), got 3"),
    (tiny_gpt2_lm, PrefixTuningConfig(token_dim=32), r"token_dim must be GPT2LMHeadModel's 64 .*got 32"),
    (tiny_bert, PrefixTuningConfig(modules_to_save=["nothing"]), r"modules_to_save=\['nothing'\] matches no module"),
])
def test_configs_that_do_not_fit_the_model_change_nothing(model, config, message):
    model = model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        fastpeft.inject(model, config)
    assert_unchanged(model, before)
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_merge_is_refused_with_the_reason():
    model = fastpeft.inject(tiny_bert(), PrefixTuningConfig(num_virtual_tokens=N))
    with pytest.raises(ValueError, match="prefix tuning cannot be merged into the base weights"):
        fastpeft.merge(model)
