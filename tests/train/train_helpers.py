"""Tiny generated corpora for trainer tests (never the shared data); import the fixture from here."""

import random

import pytest

SUBJECTS = ["the cat", "a dog", "the bird", "my friend", "the teacher", "a child"]
VERBS = ["sees", "likes", "chases", "finds", "hears", "follows"]
OBJECTS = ["the ball", "a tree", "the river", "some food", "the house", "a small box"]


def make_corpus(path, n_docs=60, seed=0):
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sents = [
            f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} ." for _ in range(rng.randint(3, 8))
        ]
        docs.append(" ".join(sents))
    path.write_text("\n\n".join(docs) + "\n")
    return path


@pytest.fixture
def tiny_corpus(tmp_path):
    return make_corpus(tmp_path / "corpus.txt")


def tiny_config(out, corpus, **kw):
    from fastformer.train.pretrain import PretrainConfig

    base = dict(
        out_dir=str(out),
        data=[str(corpus)],
        model="bert-tiny",
        steps=8,
        batch_size=4,
        seq_len=32,
        vocab_size=120,
        lr=1e-3,
        log_every=1,
        eval_every=4,
        eval_batches=2,
        progress=False,
        seed=3,
    )
    base.update(kw)
    return PretrainConfig(**base)


POSITIVE, NEGATIVE = ["good", "great", "lovely", "happy"], ["bad", "awful", "sad", "poor"]
FILLER = ["the", "film", "was", "really", "a", "story", "and", "very", "plot", "actor"]


def make_tsv(path, n, seed=0, header="sentence\tlabel"):
    """n rows of `words<TAB>pos|neg`: one sentiment word decides the label."""
    rng = random.Random(seed)
    rows = [header] if header else []
    for _ in range(n):
        label = rng.choice(["pos", "neg"])
        words = rng.sample(FILLER, 4) + [rng.choice(POSITIVE if label == "pos" else NEGATIVE)]
        rng.shuffle(words)
        rows.append(f"{' '.join(words)}\t{label}")
    path.write_text("\n".join(rows) + "\n")
    return path


def finetune_config(out, train, eval_, **kw):
    from fastformer.train.finetune import FinetuneConfig

    base = dict(
        out_dir=str(out),
        train=str(train),
        eval=str(eval_),
        model="bert-tiny",
        steps=6,
        batch_size=8,
        max_len=32,
        vocab_size=120,
        lr=2e-3,
        log_every=1,
        progress=False,
        seed=1,
    )
    base.update(kw)
    return FinetuneConfig(**base)
