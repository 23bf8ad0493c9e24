"""What is particular to prompt tuning (the contract test covers the rest): PEFT's files both ways with PEFT's outputs
on MiniLM (SEQ_CLS) and a tiny GPT-2 (CAUSAL_LM), PEFT's TEXT init, generation with the prompt kept in front, no loss
at virtual positions, training on MiniLM, the hook's life cycle, and clear errors for bad options."""
import copy
import json
import pickle
from dataclasses import asdict

import peft
import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

import fastpeft
from fastpeft import methods
from fastpeft.methods.prompt_tuning import PromptTuningConfig
from tests.model_cases import MINILM_DIR, assert_unchanged, minilm_batch, minilm_classifier, snapshot
from tests.model_cases import one_thread  # noqa: F401  (autouse fixture)
from tests.peft_layout import comparable
from tests.test_method_contract import INPUT, tiny_bert

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning")
N = 5  # virtual tokens


def tiny_gpt2_lm() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0,
                                      eos_token_id=0)).eval()


def tiny_llama_lm() -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                         intermediate_size=64, vocab_size=100, max_position_embeddings=64)
    return LlamaForCausalLM(config).eval()


def lm_batch() -> dict:
    ids = torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


MODELS = {"minilm": (lambda: minilm_classifier(3), lambda: {**minilm_batch(), "labels": torch.tensor([0, 2])},
                     "SEQ_CLS"),
          "gpt2": (tiny_gpt2_lm, lm_batch, "CAUSAL_LM")}


@torch.no_grad()
def moved(model, seed: int = 1):
    """The trainable parameters (prompt, head) moved off their init, so that a wrong load would show."""
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return model


# --- PEFT's files and outputs ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", MODELS)
def test_peft_files_load_with_peft_outputs(tmp_path, kind):
    make, batch, task = MODELS[kind]
    theirs = moved(peft.get_peft_model(make(), peft.PromptTuningConfig(task_type=task, num_virtual_tokens=N)))
    theirs.save_pretrained(tmp_path)
    ours = fastpeft.load_adapter(make(), tmp_path)
    with torch.no_grad():
        expected, got = theirs.eval()(**batch()), ours(**batch())
    assert got.logits.shape == expected.logits.shape
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", MODELS)
def test_peft_loads_our_files_with_our_outputs(tmp_path, kind):
    make, batch, task = MODELS[kind]
    ours = moved(fastpeft.inject(make(), PromptTuningConfig(task_type=task, num_virtual_tokens=N)))
    fastpeft.save_adapter(ours, tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (saved["peft_type"], saved["num_virtual_tokens"], saved["task_type"]) == ("PROMPT_TUNING", N, task)
    theirs = peft.PeftModel.from_pretrained(make(), tmp_path).eval()
    with torch.no_grad():
        expected, got = ours(**batch()), theirs(**batch())
    torch.testing.assert_close(got.logits, expected.logits, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got.loss, expected.loss, rtol=1e-5, atol=1e-6)


def test_config_dict_is_what_peft_writes():
    kwargs = dict(task_type="SEQ_CLS", num_virtual_tokens=N, prompt_tuning_init="TEXT",
                  prompt_tuning_init_text="classify this", tokenizer_name_or_path=MINILM_DIR)
    theirs = peft.get_peft_model(minilm_classifier(3), peft.PromptTuningConfig(**kwargs)).peft_config["default"]
    heads = sorted(set(theirs.modules_to_save))  # PEFT lists each head twice
    theirs = {**theirs.to_dict(), "inference_mode": True, "modules_to_save": heads}
    ours = fastpeft.adapter_config(fastpeft.inject(minilm_classifier(3), PromptTuningConfig(**kwargs)), "default")
    written, expected = comparable(ours.to_peft_dict(), theirs)
    assert written == expected  # with the sizes and base model filled from the model, as PEFT fills them
    read, expected = comparable(asdict(PromptTuningConfig.from_peft_dict(theirs)), asdict(ours))
    assert read == expected


def test_text_init_is_peft_s():
    kwargs = dict(task_type="SEQ_CLS", num_virtual_tokens=9, prompt_tuning_init="TEXT",  # 9 > the text's 5 tokens
                  prompt_tuning_init_text="classify this", tokenizer_name_or_path=MINILM_DIR)
    theirs = peft.get_peft_model(minilm_classifier(3), peft.PromptTuningConfig(**kwargs))
    ours = fastpeft.inject(minilm_classifier(3), PromptTuningConfig(**kwargs))
    assert torch.equal(ours.bert.embeddings.word_embeddings.prompts["default"],
                       theirs.prompt_encoder["default"].embedding.weight)


# --- causal LMs -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make", [tiny_gpt2_lm, tiny_llama_lm])
def test_generate_keeps_the_prompt_in_front(make):
    """generate with its key/value cache gives the tokens of greedy decoding by full forwards of the whole sequence
    (whose outputs agree with PEFT's, above); peft 0.21's own generate cannot serve as the reference: with
    transformers 5.x's `cache` argument it puts the prompt in front at every step."""
    model = moved(fastpeft.inject(make(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)))
    ids = lm_batch()["input_ids"]
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True)
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **settings)
    sequence, logits = ids, []
    with torch.no_grad():
        for _ in range(6):
            logits.append(model(input_ids=sequence, use_cache=False).logits[:, -1])
            sequence = torch.cat([sequence, logits[-1].argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.sequences, sequence)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(logits), rtol=1e-5, atol=1e-5)
    with fastpeft.disable_adapters(model):
        plain = model.generate(input_ids=ids, **settings)
    assert not torch.allclose(plain.logits[0], out.logits[0], atol=1e-2)


def test_no_loss_at_virtual_positions():
    model = moved(fastpeft.inject(tiny_gpt2_lm(), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=N)))
    batch = lm_batch()
    out = model(**batch)
    assert out.logits.shape[1] == N + batch["labels"].shape[1]
    # the last virtual token predicts the first real one; nothing predicts a virtual token
    expected = nn.functional.cross_entropy(out.logits[:, N - 1:-1].flatten(0, 1), batch["labels"].flatten())
    torch.testing.assert_close(out.loss, expected)


# --- training and the model's life cycle ----------------------------------------------------------------------------
def test_training_on_minilm_lowers_the_loss_and_touches_only_prompt_and_head():
    model = fastpeft.inject(minilm_classifier(3), PromptTuningConfig(task_type="SEQ_CLS", num_virtual_tokens=N,
                                                                    prompt_tuning_init="SAMPLE_VOCAB"))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "prompts" not in k and "modules_to_save" not in k}
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == ["bert.embeddings.word_embeddings.prompts.default",
                                 "classifier.modules_to_save.default.bias", "classifier.modules_to_save.default.weight"]
    batch = {**minilm_batch(), "labels": torch.tensor([0, 2])}
    prompt = model.bert.embeddings.word_embeddings.prompts["default"]
    start = prompt.detach().clone()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    losses = []
    for _ in range(6):
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0] and not torch.equal(prompt, start)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())


def test_positions_inputs_and_copies_are_handled():
    model = moved(fastpeft.inject(tiny_bert(), PromptTuningConfig(num_virtual_tokens=N)))
    with torch.no_grad():
        out = model(input_ids=INPUT).last_hidden_state
        assert out.shape[1] == N + INPUT.shape[1]
        assert torch.equal(model(INPUT).last_hidden_state, out)  # input_ids given by position
        positions = torch.arange(INPUT.shape[1]).expand_as(INPUT)  # the default positions, shifted behind the prompt
        assert torch.equal(model(input_ids=INPUT, position_ids=positions).last_hidden_state, out)
        mask = torch.ones_like(INPUT)
        assert torch.equal(model(input_ids=INPUT, attention_mask=mask, token_type_ids=0 * mask).last_hidden_state,
                           out)
        embeds = model.embeddings.word_embeddings(INPUT)
        assert torch.equal(model(inputs_embeds=embeds).last_hidden_state, out)
        for other in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):  # each with its own prompt
            assert torch.equal(other(input_ids=INPUT).last_hidden_state, out)
            other.embeddings.word_embeddings.prompts["default"].zero_()
            assert not torch.equal(other(input_ids=INPUT).last_hidden_state, out)
        assert torch.equal(model(input_ids=INPUT).last_hidden_state, out)


def test_adapters_switch_and_delete_takes_out_the_hook():
    plain = tiny_bert()
    with torch.no_grad():
        base = plain(input_ids=INPUT).last_hidden_state
    before = snapshot(plain.requires_grad_(False))  # the API leaves a model without adapters frozen
    model = fastpeft.inject(plain, PromptTuningConfig(num_virtual_tokens=3), adapter_name="short")
    fastpeft.inject(model, PromptTuningConfig(num_virtual_tokens=6), adapter_name="long")
    assert model(input_ids=INPUT).last_hidden_state.shape[1] == 6 + INPUT.shape[1]
    fastpeft.set_adapter(model, "short")
    assert model(input_ids=INPUT).last_hidden_state.shape[1] == 3 + INPUT.shape[1]
    fastpeft.delete_adapter(model, "short")
    assert fastpeft.active_adapter(model) == "long"
    fastpeft.delete_adapter(model, "long")
    assert not model._forward_pre_hooks and isinstance(model.embeddings.word_embeddings, nn.Embedding)
    assert_unchanged(model, before)
    with torch.no_grad():
        assert torch.equal(model(input_ids=INPUT).last_hidden_state, base)


def test_methods_share_a_model_on_other_modules_only():
    model = fastpeft.inject(tiny_bert(), PromptTuningConfig(num_virtual_tokens=N), adapter_name="prompt")
    fastpeft.inject(model, fastpeft.LoraConfig(r=2, target_modules=["query"]), adapter_name="lora")
    assert fastpeft.active_adapters(model) == ["prompt", "lora"]
    with pytest.raises(ValueError, match="word_embeddings"):
        fastpeft.inject(model, fastpeft.LoraConfig(r=2, target_modules=["key"], modules_to_save=["word_embeddings"]),
                        adapter_name="clash")
    with pytest.raises(ValueError, match="prompt tuning cannot be merged"):
        fastpeft.merge(model)


# --- files of other PEFT methods and bad options ----------------------------------------------------------------
def test_peft_files_go_to_the_method_of_their_peft_type():
    assert methods.for_file({"peft_type": "PROMPT_TUNING"}, ".").name == "prompt_tuning"
    assert methods.for_file({"peft_type": "LORA"}, ".").name == "lora"
    with pytest.raises(ValueError, match="peft_type is 'IA3'; fastpeft loads 'LORA' / .*'PROMPT_TUNING'"):
        methods.for_file({"peft_type": "IA3"}, ".")


@pytest.mark.parametrize("kwargs, message", [
    (dict(num_virtual_tokens=0), "num_virtual_tokens must be an int >= 1, got 0"),
    (dict(num_virtual_tokens=2.0), "num_virtual_tokens must be an int >= 1, got 2.0"),
    (dict(prompt_tuning_init="VOCAB"), r"prompt_tuning_init must be one of \('RANDOM', 'TEXT', 'SAMPLE_VOCAB'\), "
                                       "got 'VOCAB'"),
    (dict(prompt_tuning_init="TEXT", tokenizer_name_or_path=MINILM_DIR),
     "prompt_tuning_init='TEXT' needs prompt_tuning_init_text .a non-empty string., got None"),
    (dict(prompt_tuning_init="TEXT", prompt_tuning_init_text="hi"),
     "prompt_tuning_init='TEXT' needs tokenizer_name_or_path .a non-empty string., got None"),
    (dict(tokenizer_kwargs={"use_fast": True}), "tokenizer_kwargs must be a dict, and only with prompt_tuning_init="),
    (dict(num_transformer_submodules=2), "num_transformer_submodules must be 1 .*got 2"),
    (dict(task_type="SEQ_2_SEQ_LM"), "task_type must be one of .* for prompt tuning, got 'SEQ_2_SEQ_LM'"),
    (dict(token_dim=0), "token_dim must be an int >= 1, got 0"),
])
def test_bad_options_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PromptTuningConfig(**kwargs)


@pytest.mark.parametrize("model, config, message", [
    (tiny_bert, PromptTuningConfig(token_dim=64), "token_dim must be the width of BertModel's input embeddings, 32, "
                                                  "got 64"),
    (tiny_bert, PromptTuningConfig(prompt_tuning_init="TEXT", prompt_tuning_init_text="hi",
                                   tokenizer_name_or_path="/no/such/tokenizer"),
     "tokenizer_name_or_path='/no/such/tokenizer': no tokenizer could be loaded"),
    (tiny_bert, PromptTuningConfig(prompt_tuning_init="TEXT", prompt_tuning_init_text="hello world",
                                   tokenizer_name_or_path=MINILM_DIR), "beyond the model's 100 word embeddings"),
    (lambda: nn.Sequential(nn.Linear(2, 2)), PromptTuningConfig(),
     "Sequential.get_input_embeddings.. must give an nn.Embedding"),
])
def test_configs_that_do_not_fit_the_model_change_nothing(model, config, message):
    model = model()
    before = snapshot(model)
    with pytest.raises(ValueError, match=message):
        fastpeft.inject(model, config)
    assert_unchanged(model, before)
    assert not model._forward_pre_hooks


def test_command_line_options():
    from fastpeft.cli import parse_args
    from fastpeft.demo import demo_config
    train = ["train", "--model", "m", "--data", "d.csv", "--output-dir", "unused", "--method", "prompt_tuning"]
    assert parse_args([*train, "--num-virtual-tokens", "12"]).options == {"num_virtual_tokens": 12}
    assert parse_args(["demo", "--method", "prompt_tuning"]).options == {"num_virtual_tokens": 20}
    config = demo_config(method="prompt_tuning", options={"num_virtual_tokens": 7}).config
    assert (config.num_virtual_tokens, config.task_type, config.modules_to_save) == (7, "SEQ_CLS", ("classifier",))
    with pytest.raises(SystemExit):
        parse_args([*train, "--num-virtual-tokens", "0"])


def test_half_precision_models_get_a_float32_prompt_as_in_peft():
    model = fastpeft.inject(tiny_bert().to(torch.bfloat16), PromptTuningConfig(num_virtual_tokens=N))
    assert model.embeddings.word_embeddings.prompts["default"].dtype == torch.float32
    with torch.no_grad():
        assert model(input_ids=INPUT).last_hidden_state.dtype == torch.bfloat16
    kept = fastpeft.inject(tiny_bert().to(torch.bfloat16), PromptTuningConfig(), autocast_adapter_dtype=False)
    assert kept.embeddings.word_embeddings.prompts["default"].dtype == torch.bfloat16
