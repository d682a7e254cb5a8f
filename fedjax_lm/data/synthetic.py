"""A generated text-classification task with a known, learnable signal.

Each text is filler words with a few class-specific keywords mixed in; a fraction of the train
labels is flipped to another class. The optimum is known (a keyword lookup is exact on clean
labels), which makes it a cheap end-to-end check that training learns, with no files at all.
Deterministic by `seed`; the test split has clean labels so accuracy measures the signal.
"""

from __future__ import annotations

import numpy as np

from fedjax_lm.data.errors import DataError
from fedjax_lm.data.registry import LoadContext, register_task
from fedjax_lm.data.task_data import Split, TaskData

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def _pseudo_words(rng: np.random.Generator, n: int) -> list[str]:
    """n distinct pronounceable lowercase words (2-3 consonant-vowel syllables)."""
    words: list[str] = []
    seen: set[str] = set()
    while len(words) < n:
        k = int(rng.integers(2, 4))
        word = "".join(
            _CONSONANTS[int(rng.integers(len(_CONSONANTS)))] + _VOWELS[int(rng.integers(5))]
            for _ in range(k)
        )
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def _flip(rng: np.random.Generator, truth: np.ndarray, noise: float,
          num_classes: int) -> tuple[np.ndarray, int]:
    """Labels with a `noise` fraction moved to another class (int32), and how many moved."""
    labels = truth.copy()
    flip = rng.random(len(truth)) < noise
    labels[flip] = (truth[flip] + rng.integers(1, num_classes, flip.sum())) % num_classes
    return labels.astype(np.int32), int(flip.sum())


def _check_params(*, num_classes: int, num_train: int, num_test: int, words_per_text: int,
                  keywords_per_class: int, keyword_rate: float, vocab_size: int,
                  label_noise: float) -> None:
    """The generative model's parameters, checked once for both generators."""
    checks = [
        (num_classes >= 2, f"num_classes must be >= 2, got {num_classes}"),
        (
            num_train >= 1 and num_test >= 1,
            f"num_train/num_test must be >= 1: {num_train}/{num_test}",
        ),
        (words_per_text >= 1, f"words_per_text must be >= 1, got {words_per_text}"),
        (keywords_per_class >= 1, f"keywords_per_class must be >= 1, got {keywords_per_class}"),
        (0.0 < keyword_rate <= 1.0, f"keyword_rate must be in (0, 1], got {keyword_rate}"),
        (vocab_size >= 1, f"vocab_size must be >= 1, got {vocab_size}"),
        (0.0 <= label_noise < 1.0, f"label_noise must be in [0, 1), got {label_noise}"),
    ]
    for ok, message in checks:
        if not ok:
            raise DataError(message)


def make_synthetic(
    *,
    num_classes: int = 4,
    num_train: int = 2000,
    num_test: int = 500,
    words_per_text: int = 24,
    keywords_per_class: int = 8,
    keyword_rate: float = 0.15,
    vocab_size: int = 400,
    label_noise: float = 0.1,
    seed: int = 0,
) -> TaskData:
    """Generate the task. Classes are balanced; every text has at least one keyword of its class."""
    _check_params(num_classes=num_classes, num_train=num_train, num_test=num_test,
                  words_per_text=words_per_text, keywords_per_class=keywords_per_class,
                  keyword_rate=keyword_rate, vocab_size=vocab_size, label_noise=label_noise)
    rng = np.random.default_rng(seed)
    words = _pseudo_words(rng, vocab_size + num_classes * keywords_per_class)
    filler = words[:vocab_size]
    keywords = [
        words[vocab_size + c * keywords_per_class : vocab_size + (c + 1) * keywords_per_class]
        for c in range(num_classes)
    ]

    def generate(n: int, noise: float) -> tuple[Split, int]:
        truth = rng.permutation(np.arange(n) % num_classes)
        texts = []
        for y in truth:
            is_kw = rng.random(words_per_text) < keyword_rate
            is_kw[int(rng.integers(words_per_text))] = True
            texts.append(
                " ".join(
                    keywords[y][int(rng.integers(keywords_per_class))]
                    if kw
                    else filler[int(rng.integers(vocab_size))]
                    for kw in is_kw
                )
            )
        labels, flipped = _flip(rng, truth, noise, num_classes)
        return Split(labels=labels, texts=texts), flipped

    train, flipped = generate(num_train, label_noise)
    test, _ = generate(num_test, 0.0)
    names = tuple(f"class_{c}" for c in range(num_classes))
    info = {"keywords": keywords, "flipped_train_labels": flipped, "seed": seed}
    return TaskData("synthetic", train, test, num_classes, names, source="generated", info=info)


@register_task("synthetic", needs_data=False, seeded=True)
def _load_synthetic(ctx: LoadContext, **params: float | int) -> TaskData:
    return make_synthetic(seed=ctx.seed, **params)  # type: ignore[arg-type]


def synthetic_population(
    num_train: int,
    num_test: int = 10_000,
    *,
    num_classes: int = 4,
    words_per_text: int = 12,
    keywords_per_class: int = 8,
    keyword_rate: float = 0.15,
    vocab_size: int = 400,
    label_noise: float = 0.1,
    seed: int = 0,
) -> TaskData:
    """The synthetic task's generative model at population scale (10^6 examples and more),
    vectorised: the same kind of texts, drawn from another random stream than `make_synthetic`
    (which keeps its own, so existing runs are unchanged)."""
    _check_params(num_classes=num_classes, num_train=num_train, num_test=num_test,
                  words_per_text=words_per_text, keywords_per_class=keywords_per_class,
                  keyword_rate=keyword_rate, vocab_size=vocab_size, label_noise=label_noise)
    rng = np.random.default_rng((seed, 7))
    words = np.asarray(_pseudo_words(rng, vocab_size + num_classes * keywords_per_class),
                       dtype=object)

    def generate(n: int, noise: float) -> Split:
        truth = rng.permutation(np.arange(n) % num_classes)
        ids = rng.integers(0, vocab_size, (n, words_per_text))
        keyword = rng.random((n, words_per_text)) < keyword_rate
        keyword[np.arange(n), rng.integers(0, words_per_text, n)] = True
        kw_ids = vocab_size + truth[:, None] * keywords_per_class + rng.integers(
            0, keywords_per_class, (n, words_per_text))
        table = words[np.where(keyword, kw_ids, ids)]
        texts = [" ".join(row) for row in table.tolist()]
        return Split(labels=_flip(rng, truth, noise, num_classes)[0], texts=texts)

    train, test = generate(num_train, label_noise), generate(num_test, 0.0)
    names = tuple(f"class_{c}" for c in range(num_classes))
    return TaskData("synthetic_population", train, test, num_classes, names,
                    source=f"generated (population, seed {seed})")


POPULATION_EXAMPLES = 1_000_000


@register_task("synthetic_population", needs_data=False, seeded=True)
def _load_synthetic_population(ctx: LoadContext, **params: float | int) -> TaskData:
    """A cross-device population from the command line: 1,000,000 generated training texts
    (10,000 test) for up to a million one-example clients; `--max-train-examples` takes fewer."""
    return synthetic_population(POPULATION_EXAMPLES, seed=ctx.seed, **params)  # type: ignore[arg-type]
