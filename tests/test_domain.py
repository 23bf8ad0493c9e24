"""Domain adaptation on MiniLM with the packaged GPU-kernel corpus: vocabulary extension, BERT's 80/10/10 masking on a
large sample, continued masked-LM pretraining, LoRA beside trainable tokens (saved and loaded together); and the
cross-lingual plumbing on a tiny random XLM-RoBERTa whose two "languages" are disjoint token ranges."""
import copy
import functools
import math
import random

import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoTokenizer,
    BertForMaskedLM,
    BertForSequenceClassification,
    PreTrainedTokenizerFast,
    XLMRobertaConfig,
    XLMRobertaForSequenceClassification,
)

import fastpeft
from fastpeft.datasets import LabelledText
from fastpeft.domain import (
    continue_pretraining,
    cross_lingual_transfer,
    domain_corpus,
    extend_vocabulary,
    load_adapters,
    mlm_collator,
    mlm_loss,
    save_adapters,
)
from fastpeft.methods.trainable_tokens import TrainableTokensConfig
from tests.model_cases import MINILM_DIR, one_thread  # noqa: F401  (autouse fixture)

transformers.logging.set_verbosity_error()  # MiniLM has no MLM head: its load report is expected


@functools.cache
def _mlm():
    return BertForMaskedLM.from_pretrained(MINILM_DIR).eval()


def mlm_model():
    return copy.deepcopy(_mlm())


def tokenizer():
    return AutoTokenizer.from_pretrained(MINILM_DIR)


# --- vocabulary ---------------------------------------------------------------------------------------------------
def test_frequent_split_words_become_tokens_and_old_rows_stay():
    tok, model = tokenizer(), mlm_model()
    old_size, old = len(tok), model.get_input_embeddings().weight.detach().clone()
    new = extend_vocabulary(tok, model, domain_corpus(), min_freq=4, max_new=30)
    assert 0 < len(new.words) <= 30 and all(n >= 4 for n in new.counts)
    assert new.counts == sorted(new.counts, reverse=True)
    assert {"coalesced", "occupancy", "matmul", "triton"} <= set(new.words)
    assert new.ids == list(range(old_size, old_size + len(new.words))) and len(tok) == old_size + len(new.words)
    text = " ".join(domain_corpus()).lower()
    for word, ids, pieces in zip(new.words, new.ids, new.pieces):
        assert len(pieces) > 1 and f" {word} " in f" {text} "
        assert tok(f"the {word} is", add_special_tokens=False)["input_ids"] == [1996, ids, 2003]  # whole, one token
    weight = model.get_input_embeddings().weight
    assert torch.equal(weight[:old_size], old)  # old ids and rows bit-identical
    for ids, pieces in zip(new.ids, new.pieces):
        torch.testing.assert_close(weight[ids], old[pieces].mean(0))
    assert model.cls.predictions.decoder.weight is weight  # the tied output layer follows
    assert model.cls.predictions.decoder.weight.shape[0] == len(tok)
    fewer = extend_vocabulary(tokenizer(), mlm_model(), domain_corpus(), min_freq=10, max_new=100)
    assert all(n >= 10 for n in fewer.counts) and len(fewer.words) < len(new.words) + 100


@pytest.mark.parametrize("corpus, kwargs, error, message", [
    (["the cat sat on the mat"] * 10, {}, ValueError, r"corpus has no new word: no word seen at least min_freq=5"),
    (None, dict(min_freq=0), ValueError, r"min_freq must be an int >= 1, got 0"),
    (None, dict(max_new=0), ValueError, r"max_new must be an int >= 1, got 0"),
    ([], {}, TypeError, r"corpus must be a non-empty list of sentences"),
])
def test_bad_options_are_clear_errors(corpus, kwargs, error, message):
    tok, model = tokenizer(), mlm_model()
    with pytest.raises(error, match=message):
        extend_vocabulary(tok, model, domain_corpus() if corpus is None else corpus, **kwargs)
    assert len(tok) == 30522 and model.get_input_embeddings().weight.shape[0] == 30522


# --- masking --------------------------------------------------------------------------------------------------------
def test_masking_follows_the_80_10_10_rule_on_a_large_sample():
    tok = tokenizer()
    rng = random.Random(0)
    specials = set(tok.all_special_ids)
    words = [i for i in range(1000, 30000) if i not in specials]
    lengths = [rng.randint(300, 510) for _ in range(500)]
    features = [{"input_ids": [tok.cls_token_id] + [rng.choice(words) for _ in range(n)] + [tok.sep_token_id],
                 "special_tokens_mask": [1] + [0] * n + [1]} for n in lengths]
    batch = mlm_collator(tok, seed=0)(features)  # padded to the longest: pads are special tokens too
    original = tok.pad(features, return_tensors="pt")["input_ids"]
    special = torch.tensor([[t in specials for t in row] for row in original.tolist()])
    selected = batch["labels"] != -100
    n = int((~special).sum())
    assert n > 200_000

    def near(count: int, total: int, p: float) -> bool:  # within 5 binomial standard deviations
        return abs(count - total * p) <= 5 * math.sqrt(total * p * (1 - p))
    picked = int(selected.sum())
    assert near(picked, n, 0.15)
    inputs = batch["input_ids"][selected]
    masked = int((inputs == tok.mask_token_id).sum())
    unchanged = int((inputs == original[selected]).sum())
    assert near(masked, picked, 0.8) and near(unchanged, picked, 0.1)
    assert near(picked - masked - unchanged, picked, 0.1)  # random replacements
    assert torch.equal(batch["labels"][selected], original[selected])  # labels: the original tokens, -100 elsewhere
    assert not (selected & special).any() and torch.equal(batch["input_ids"][special], original[special])


def test_masks_are_new_at_every_batch():
    tok = tokenizer()
    features = [tok(s, return_special_tokens_mask=True) for s in domain_corpus()[:32]]
    collate = mlm_collator(tok, seed=0)
    assert not torch.equal(collate(features)["labels"], collate(features)["labels"])


def test_continued_pretraining_lowers_the_mlm_loss():
    tok, model = tokenizer(), mlm_model()
    corpus = domain_corpus()
    extend_vocabulary(tok, model, corpus, min_freq=4, max_new=30)
    before = mlm_loss(model, tok, corpus[:32], max_length=32)
    losses = continue_pretraining(model, tok, corpus, steps=6, lr=3e-4, batch_size=8, max_length=32)
    assert len(losses) == 6
    assert mlm_loss(model, tok, corpus[:32], max_length=32) < before - 0.5


# --- LoRA beside trainable tokens -----------------------------------------------------------------------------------
def test_lora_and_the_new_rows_train_and_are_saved_and_loaded_together(tmp_path):
    torch.manual_seed(0)
    tok, model = tokenizer(), BertForSequenceClassification.from_pretrained(MINILM_DIR, num_labels=2)
    new = extend_vocabulary(tok, model, domain_corpus(), min_freq=4, max_new=20)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    fastpeft.inject(model, fastpeft.LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"],
                                               task_type="SEQ_CLS"), adapter_name="task")
    fastpeft.inject(model, TrainableTokensConfig(token_indices=new.ids), adapter_name="tokens")
    trainable = {k for k, p in model.named_parameters() if p.requires_grad}
    assert trainable == {k for k in trainable if ".lora_" in k or ".modules_to_save.task." in k} | \
        {"bert.embeddings.word_embeddings.trainable_tokens_delta.tokens"}
    assert any(".lora_" in k for k in trainable) and any("classifier" in k for k in trainable)
    batch = tok(domain_corpus()[:16], padding=True, return_tensors="pt")
    labels = torch.tensor([i % 2 for i in range(16)])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(3):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    rows = model.bert.embeddings.word_embeddings.trainable_tokens_delta["tokens"]
    assert not torch.equal(rows.detach(), base["bert.embeddings.word_embeddings.weight"][new.ids])
    state = model.state_dict()
    assert torch.equal(state["bert.embeddings.word_embeddings.base_layer.weight"],
                       base["bert.embeddings.word_embeddings.weight"])  # the frozen rows, old and new, unchanged
    save_adapters(model, tok, tmp_path)
    fresh = BertForSequenceClassification.from_pretrained(MINILM_DIR, num_labels=2).eval()
    loaded_tok = load_adapters(fresh, tmp_path)
    assert len(loaded_tok) == len(tok) and fastpeft.adapter_names(fresh) == ["task", "tokens"]
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, model(**batch).logits)


# --- cross-lingual plumbing -----------------------------------------------------------------------------------------
LANGUAGE_WORDS = 40  # per language; the two label words are shared, like numbers or names across real languages


def toy_language(prefix: str, n: int, seed: int) -> LabelledText:
    """Sentences of one language's words with a shared label word ("yes" / "no") somewhere: label = that word."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        label = rng.randrange(2)
        words = [f"{prefix}{rng.randrange(LANGUAGE_WORDS)}" for _ in range(6)]
        words.insert(rng.randrange(7), ("no", "yes")[label])
        texts.append(" ".join(words))
        labels.append(label)
    return LabelledText(texts, labels, ["no", "yes"])


def tiny_xlmr_dir(path):
    """A random 2-layer XLM-RoBERTa and a word-level tokenizer over two disjoint 'languages', saved as a local model
    directory, as a real multilingual checkpoint would be."""
    specials = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    words = specials + ["no", "yes"] + [f"{p}{i}" for p in "ab" for i in range(LANGUAGE_WORDS)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  unk_token="<unk>", mask_token="<mask>", cls_token="<s>", sep_token="</s>")
    torch.manual_seed(0)
    config = XLMRobertaConfig(vocab_size=len(words), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                              intermediate_size=64, max_position_embeddings=40, pad_token_id=1)
    XLMRobertaForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_cross_lingual_transfer_trains_on_one_language_and_evaluates_on_another(tmp_path):
    model_dir = tiny_xlmr_dir(tmp_path / "xlmr")
    train, test_a, test_b = toy_language("a", 256, 0), toy_language("a", 128, 1), toy_language("b", 128, 2)
    assert not any(w.startswith("b") for t in train.texts for w in t.split())  # language b is never trained on
    result = cross_lingual_transfer(model_dir, train, {"a": test_a, "b": test_b}, epochs=4, lr=1e-2,
                                    adapter_dir=tmp_path / "adapter")
    assert set(result.accuracy) == {"a", "b"} and result.losses[-1] < result.losses[0]
    assert result.accuracy["a"] > 0.9 and result.accuracy["b"] > 0.7  # through the shared label words
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    with pytest.raises(ValueError, match=r"evaluations\['b'\] has labels \['x', 'y'\], expected the training labels"):
        cross_lingual_transfer(model_dir, train, {"b": LabelledText(test_b.texts, test_b.labels, ["x", "y"])})
