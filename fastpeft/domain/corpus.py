"""Domain corpora: one sentence per line. The packaged one (fastpeft/data/domain_corpus.txt) is ~300 sentences on GPU
kernel programming, written for the project, with domain words that BERT's WordPiece splits (coalesced, occupancy,
matmul, ...)."""
from importlib import resources
from pathlib import Path


def read_corpus(path) -> list[str]:
    """The non-empty lines of a UTF-8 text file."""
    lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines()]
    sentences = [line for line in lines if line]
    if not sentences:
        raise ValueError(f"corpus file {str(path)!r} has no sentences (expected one per line)")
    return sentences


def domain_corpus() -> list[str]:
    """The packaged GPU-kernel-programming corpus."""
    return read_corpus(resources.files("fastpeft") / "data" / "domain_corpus.txt")


def sentences(corpus, argument: str = "corpus") -> list[str]:
    """A corpus given as a list of strings (or a path to a text file), checked."""
    if isinstance(corpus, (str, Path)):
        return read_corpus(corpus)
    corpus = list(corpus) if not isinstance(corpus, (bytes, dict)) and hasattr(corpus, "__iter__") else None
    if not corpus or not all(isinstance(s, str) for s in corpus):
        raise TypeError(f"{argument} must be a non-empty list of sentences (str) or a path to a text file, got "
                        f"{corpus!r:.80}")
    return corpus
