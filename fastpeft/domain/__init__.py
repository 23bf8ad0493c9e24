"""Domain adaptation over the methods: extend the vocabulary with a domain's frequent split words, continue masked-LM
pretraining on the domain corpus, then fine-tune with LoRA beside trainable tokens (the new rows); and cross-lingual
transfer (train on one language, evaluate on another) with the same tools on any local model directory."""
from fastpeft.domain.adapters import load_adapters, save_adapters
from fastpeft.domain.corpus import domain_corpus, read_corpus
from fastpeft.domain.mlm import continue_pretraining, mlm_collator, mlm_loss
from fastpeft.domain.transfer import cross_lingual_transfer
from fastpeft.domain.vocabulary import NewTokens, extend_vocabulary

__all__ = ["NewTokens", "extend_vocabulary", "domain_corpus", "read_corpus", "mlm_collator", "mlm_loss",
           "continue_pretraining", "save_adapters", "load_adapters", "cross_lingual_transfer"]
