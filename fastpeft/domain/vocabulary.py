"""`extend_vocabulary`: frequent domain words that the tokenizer splits into several pieces become whole new tokens.
Their embedding rows start at the mean of their pieces' rows (a good start: the model already reads the word as
those pieces), old token ids and rows stay bit-identical, and a tied output layer follows (an untied one gets the
same mean of its own rows)."""
from collections import Counter
from dataclasses import dataclass

import torch
from tokenizers import AddedToken

from fastpeft.domain.corpus import sentences

WORD_MARKS = "▁Ġ"  # word-start marks of SentencePiece / byte-level pre-tokenizers, not part of the word


@dataclass(frozen=True)
class NewTokens:
    """The added words, their new token ids, the piece ids each was split into before, and each word's count."""

    words: list[str]
    ids: list[int]
    pieces: list[list[int]]
    counts: list[int]


def extend_vocabulary(tokenizer, model, corpus, min_freq: int = 5, max_new: int = 100) -> NewTokens:
    """Add to `tokenizer` (in place) the at most `max_new` most frequent words of `corpus` (list of sentences or a
    text file) seen at least `min_freq` times that it splits into several pieces, and resize `model`'s embeddings."""
    for name, value in (("min_freq", min_freq), ("max_new", max_new)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    counts = _word_counts(tokenizer, sentences(corpus))
    split = {w: tokenizer(w, add_special_tokens=False)["input_ids"] for w, n in counts.items() if n >= min_freq}
    chosen = sorted((w for w, ids in split.items() if len(ids) > 1 and w not in tokenizer.get_vocab()),
                    key=lambda w: (-counts[w], w))[:max_new]
    if not chosen:
        raise ValueError(f"corpus has no new word: no word seen at least min_freq={min_freq} times is split into "
                         "several pieces by the tokenizer (lower min_freq, or give a larger domain corpus)")
    old_rows = model.get_input_embeddings().weight.shape[0]
    tokenizer.add_tokens([AddedToken(w, single_word=True, normalized=True) for w in chosen])
    ids = tokenizer.convert_tokens_to_ids(chosen)
    model.resize_token_embeddings(max(len(tokenizer), old_rows), mean_resizing=False)
    pieces = [split[w] for w in chosen]
    _mean_rows(model.get_input_embeddings(), ids, pieces)
    output = model.get_output_embeddings() if callable(getattr(model, "get_output_embeddings", None)) else None
    if output is not None and output.weight is not model.get_input_embeddings().weight:
        _mean_rows(output, ids, pieces)  # untied: its own pieces' mean; a tied one shares the rows set above
    return NewTokens(chosen, ids, pieces, [counts[w] for w in chosen])


def _word_counts(tokenizer, corpus: list[str]) -> Counter:
    """Words as the tokenizer itself sees them (its normalizer, e.g. lower-casing, and its pre-tokenizer), letters
    only (numbers and punctuation are not domain words)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TypeError(f"tokenizer must be a fast (Rust-backed) Hugging Face tokenizer, got "
                        f"{type(tokenizer).__name__}")
    counts = Counter()
    for text in corpus:
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        words = backend.pre_tokenizer.pre_tokenize_str(text) if backend.pre_tokenizer else [(text, None)]
        counts.update(w.lstrip(WORD_MARKS) for w, _ in words if w.lstrip(WORD_MARKS).isalpha())
    return counts


@torch.no_grad()
def _mean_rows(layer, ids: list[int], pieces: list[list[int]]) -> None:
    weight = layer.weight
    for new, parts in zip(ids, pieces):
        weight[new] = weight[parts].float().mean(0).to(weight.dtype)
    bias = getattr(layer, "bias", None)
    if bias is not None and bias.shape[0] == weight.shape[0]:  # an output layer's per-token bias
        for new, parts in zip(ids, pieces):
            bias[new] = bias[parts].float().mean().to(bias.dtype)
