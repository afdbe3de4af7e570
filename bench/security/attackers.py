"""Model-extraction attackers and benign query streams for the ``digits`` model.

Each attacker sees the victim only through ``oracle(rows) -> probabilities`` (one query per row,
as the gateway's answers come back: full scores, or whatever the output policy leaves) and
chooses its next queries from what it learned. The copy is a scikit-learn MLP trained on the
answers' top labels; its quality is its argmax agreement with the victim on held-out digits.

* ``jbda``: Papernot et al. (2017), Jacobian-based dataset augmentation: natural seeds, then each
  round every known query x adds x + λ·sign(∇x of the copy's logit for x's label), on the
  model's 0..16 scale (λ on [0, 1], ×16), the set doubling each round;
* ``random``: uniform noise over the domain;
* ``knockoff``: natural digits from elsewhere (rows the victim did not train on, shifted by up
  to a pixel and noised), as Orekondy et al.'s knockoff nets use natural data of the domain.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier

Oracle = Callable[[np.ndarray], np.ndarray]
HI = 16.0


def digits_split() -> dict[str, np.ndarray]:
    """The split ``models/build.py`` trained ``digits`` with: train, calibration, hold-out."""
    x, y = load_digits(return_X_y=True)
    x_train, x_rest, y_train, y_rest = train_test_split(x, y, test_size=0.4, random_state=0, stratify=y)
    x_cal, x_test, _, y_test = train_test_split(x_rest, y_rest, test_size=0.5, random_state=1, stratify=y_rest)
    return {"train": x_train.astype(np.float32), "calibration": x_cal.astype(np.float32),
            "holdout": x_test.astype(np.float32), "holdout_y": y_test, "all": x.astype(np.float32)}


def train_copy(queries: np.ndarray, answers: np.ndarray, seed: int = 0) -> MLPClassifier:
    """An MLP fitted to the answers as returned: soft labels (each query once per class it was
    given at least 1% of, weighted by it) where the answers are scores, plain labels where they
    are one-hot, so that what an output policy withholds is what the copy misses."""
    import warnings

    p = np.clip(answers.astype(np.float64), 0.0, None)
    p = p / np.where(p.sum(axis=1, keepdims=True) > 0, p.sum(axis=1, keepdims=True), 1.0)
    rows, classes = np.nonzero(p >= 0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        copy = MLPClassifier(hidden_layer_sizes=(64,), max_iter=300, random_state=seed)
        copy.fit(queries[rows] / HI, classes, sample_weight=p[rows, classes])
    return copy


def agreement(copy: MLPClassifier | None, x: np.ndarray, victim_labels: np.ndarray) -> float:
    if copy is None:
        return 0.0
    return float((copy.predict(x / HI) == victim_labels).mean())


def _logit_gradient_sign(copy: MLPClassifier, x: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """sign(∂ logit_label / ∂ x) of the copy (one ReLU layer), per row."""
    w1, w2 = copy.coefs_
    b1 = copy.intercepts_[0]
    h = x / HI @ w1 + b1
    classes = list(copy.classes_)
    cols = np.array([classes.index(c) if c in classes else 0 for c in labels])
    if w2.shape[1] == 1:  # two classes seen so far: one logit
        upstream = np.where(cols[:, None] == 1, 1.0, -1.0) * w2[:, 0][None, :]
    else:
        upstream = w2[:, cols].T
    return np.sign((upstream * (h > 0)) @ w1.T)


def jbda(oracle: Oracle, seeds: np.ndarray, lam: float, budget: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yields (queries, answers) as each batch is asked."""
    known = seeds.copy()
    answers = oracle(known)
    asked = len(known)
    yield known, answers
    while asked < budget:
        copy = train_copy(known, answers)
        new = np.clip(known + lam * HI * _logit_gradient_sign(copy, known, answers.argmax(axis=1)), 0.0, HI)
        new = new[: budget - asked].astype(np.float32)
        got = oracle(new)
        asked += len(new)
        known, answers = np.concatenate([known, new]), np.concatenate([answers, got])
        yield new, got


def random_queries(oracle: Oracle, budget: int, rng: np.random.Generator, step: int = 100) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for start in range(0, budget, step):
        q = rng.uniform(0.0, HI, (min(step, budget - start), 64)).astype(np.float32)
        yield q, oracle(q)


def augmented(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each digit shifted by up to a pixel each way and noised (σ 1 on 0..16), clipped."""
    images = x.reshape(-1, 8, 8)
    out = np.zeros_like(images)
    for i, image in enumerate(images):
        dy, dx = rng.integers(-1, 2, 2)
        out[i] = np.roll(np.roll(image, dy, axis=0), dx, axis=1)
        if dy:
            out[i, 0 if dy > 0 else -1, :] = 0
        if dx:
            out[i, :, 0 if dx > 0 else -1] = 0
    noised = out.reshape(len(x), 64) + rng.normal(0.0, 1.0, (len(x), 64))
    return np.clip(noised, 0.0, HI).astype(np.float32)


def knockoff(oracle: Oracle, pool: np.ndarray, budget: int, rng: np.random.Generator,
             step: int = 100) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    for start in range(0, budget, step):
        picks = pool[rng.integers(0, len(pool), min(step, budget - start))]
        q = augmented(picks, rng)
        yield q, oracle(q)


def benign_streams(natural: np.ndarray, count: int, rng: np.random.Generator,
                   lengths: tuple[int, int] = (540, 1797)) -> list[np.ndarray]:
    """``count`` streams of natural digits, each a random order of a random subset (no repeats)."""
    out = []
    for _ in range(count):
        n = int(rng.integers(lengths[0], min(lengths[1], len(natural)) + 1))
        out.append(natural[rng.permutation(len(natural))[:n]])
    return out
