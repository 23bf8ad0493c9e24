"""`fastpeft train --method trainable_tokens`: domain adaptation of a classifier in one run. Frequent words of the
domain (`--corpus`, else the training texts) that the tokenizer splits into pieces become new tokens
(extend_vocabulary); their embedding rows train as trainable tokens beside `--encoder-method` (LoRA by default, with
the classifier head); the adapters are saved with the extended tokenizer (save_adapters), reloaded into a fresh model
and checked to predict the same."""
import transformers

from fastpeft import methods, training
from fastpeft.api import inject, trainable_parameters
from fastpeft.datasets import load_splits
from fastpeft.demo import SetupError, check_agreement
from fastpeft.domain.adapters import load_adapters, save_adapters
from fastpeft.domain.vocabulary import extend_vocabulary
from fastpeft.methods.config import SEQ_CLS_HEADS
from fastpeft.methods.trainable_tokens import TrainableTokensConfig

ENCODER_ADAPTER, TOKENS_ADAPTER = "default", "tokens"


def run(args, log=print) -> list[str]:
    """Train and check as the module docstring says; returns the failed checks. Bad input raises SetupError before
    any training."""
    transformers.set_seed(args.seed)
    options = args.options
    try:
        if options["encoder_method"] == "none":
            raise ValueError("--method trainable_tokens trains the new tokens' rows beside an --encoder-method, which "
                             "also trains the classifier head; none leaves the new head untrained")
        train, test = load_splits(args.data, args.test_data, args.text_column, args.label_column,
                                  args.test_fraction, args.seed)
        model, tokenizer = training.load_classifier(args.model, train.label_names, args.device)
        new = extend_vocabulary(tokenizer, model, options["corpus"] or train.texts, options["min_freq"],
                                options["max_new"])
        encoder = methods.named(options["encoder_method"])
        inject(model, encoder.cli_config(args.encoder_options, list(SEQ_CLS_HEADS), demo=False), ENCODER_ADAPTER)
        inject(model, TrainableTokensConfig(token_indices=new.ids), TOKENS_ADAPTER)
    except (OSError, ValueError, TypeError) as e:  # data, corpus, model directory, an encoder method that does not
        raise SetupError(str(e)) from None  # fit: all before any training
    log(f"model {args.model}; {len(new.words)} new tokens: {', '.join(new.words[:12])}"
        f"{', ...' if len(new.words) > 12 else ''}")
    trainable, total = trainable_parameters(model)
    log(f"{encoder.label} and trainable tokens; trainable parameters: {trainable:,} of {total:,} "
        f"({100 * trainable / total:.3f}%)")
    train_enc = training.EncodedText(tokenizer, train, args.max_length)
    test_enc = training.EncodedText(tokenizer, test, args.max_length)
    before, _ = training.evaluate(model, test_enc, device=args.device)
    training.train(model, train_enc, args.epochs, args.lr, args.batch_size, seed=args.seed, device=args.device)
    after, logits = training.evaluate(model, test_enc, device=args.device)
    log(f"test accuracy: {before:.1%} -> {after:.1%}")
    save_adapters(model, tokenizer, args.output_dir)
    log(f"adapters ({ENCODER_ADAPTER}, {TOKENS_ADAPTER}) and the extended tokenizer saved to {args.output_dir}/")
    fresh, _ = training.load_classifier(args.model, train.label_names, args.device)
    load_adapters(fresh, args.output_dir)
    return check_agreement(logits, {"reloaded": training.evaluate(fresh, test_enc, device=args.device)[1]}, log)
