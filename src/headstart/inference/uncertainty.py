"""Saying "I don't know": split-conformal prediction sets and out-of-distribution rejection.

Sets (Angelopoulos & Bates, "A gentle introduction to conformal prediction", 2021): a threshold q
fitted on held-out probabilities so that the set of labels whose score is <= q holds the true label
with probability >= coverage. LAC scores 1 - p(label) (smallest sets); APS scores the probability
mass of the labels ranked above it (APS without randomisation, u = 0: sets grow with the model's
uncertainty and always hold the top label; they over-cover only where top-1 accuracy alone exceeds
the target).

Rejection (Lee et al., "A simple unified framework for detecting out-of-distribution samples", 2018):
the squared Mahalanobis distance of an image's pooled backbone features to the nearest training
class mean, under one shared Ledoit-Wolf covariance; the threshold accepts a chosen share of
held-out in-distribution images. The distance is an `nn.Module`, so the ONNX export computes it
inside the graph and every engine reports the same score.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

SET_METHODS = ("lac", "aps")
OOD_FILE = "ood.safetensors"
UNKNOWN = "unknown"


def conformal_quantile(scores: np.ndarray, level: float) -> float:
    """The finite-sample-valid threshold: the ceil((n+1) level)-th smallest score, moved halfway to
    the next one (inf if n is too small).

    Any value in between decides every calibration score alike and keeps the guarantee. At the
    k-th score itself, the image that scored it sits on the threshold, and rounding decides it:
    PyTorch accepted one such image and ONNX Runtime, 1e-6 away, rejected it."""
    scores = np.sort(np.asarray(scores, dtype=np.float64))
    k = math.ceil((len(scores) + 1) * level - 1e-9)
    if k > len(scores) or k < 1:
        return math.inf
    return float(scores[k - 1] if k == len(scores) else (scores[k - 1] + scores[k]) / 2)


def _ranked(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    order = np.argsort(-probs, axis=1, kind="stable")
    ranked = np.take_along_axis(probs, order, axis=1)
    return order, ranked, np.cumsum(ranked, axis=1)


def nonconformity(probs: np.ndarray, y: np.ndarray, method: str) -> np.ndarray:
    """Score of each true label: 1 - p (LAC) or the mass ranked above it (APS)."""
    rows = np.arange(len(y))
    if method == "lac":
        return 1.0 - probs[rows, y]
    order, ranked, cum = _ranked(probs)
    rank = np.argsort(order, axis=1, kind="stable")[rows, y]
    return (cum - ranked)[rows, rank]


def set_mask(probs: np.ndarray, threshold: float, method: str) -> np.ndarray:
    """[N, C] booleans: which labels are in each image's prediction set."""
    if method == "lac":
        return probs >= 1.0 - threshold
    order, ranked, cum = _ranked(probs)
    keep = (cum - ranked) <= threshold  # the mass ranked above each label; 0 for the top one
    mask = np.zeros_like(keep)
    np.put_along_axis(mask, order, keep, axis=1)
    return mask


@dataclass(frozen=True)
class ConformalSets:
    """A fitted set predictor: method, target coverage and the threshold on the score."""

    method: str
    coverage: float
    threshold: float
    calibration_images: int

    @classmethod
    def fit(cls, probs: np.ndarray, y: np.ndarray, *, coverage: float, method: str = "lac") -> ConformalSets:
        """Fit the threshold on held-out probabilities [N, C] and labels."""
        q = conformal_quantile(nonconformity(probs, y, method), coverage)
        return cls(method, float(coverage), q, int(len(y)))

    def mask(self, probs: np.ndarray) -> np.ndarray:
        """[N, C] set membership for probabilities [N, C]."""
        return set_mask(np.asarray(probs, dtype=np.float64), self.threshold, self.method)

    def to_dict(self) -> dict:
        """model.json form (an infinite threshold, from too few images, is stored as 1e9)."""
        return asdict(self) | {"threshold": min(self.threshold, 1e9)}

    @classmethod
    def from_dict(cls, d: dict) -> ConformalSets:
        """Inverse of `to_dict`."""
        return cls(
            str(d["method"]), float(d["coverage"]), float(d["threshold"]), int(d["calibration_images"])
        )


def random_halves(n: int, rounds: int, seed: int = 0):
    """`rounds` random splits of range(n) into a fitting half and a measuring half."""
    rng = np.random.default_rng(seed)
    for _ in range(rounds):
        perm = rng.permutation(n)
        yield perm[: n // 2], perm[n // 2 :]


def held_out_coverage(
    probs: np.ndarray, y: np.ndarray, *, coverage: float, method: str, rounds: int = 200, seed: int = 0
) -> dict:
    """Coverage and set size measured honestly: fit on a random half, measure on the other half."""
    covered, sizes = [], []
    for fit, test in random_halves(len(y), rounds, seed):
        sets = ConformalSets.fit(probs[fit], y[fit], coverage=coverage, method=method)
        m = sets.mask(probs[test])
        covered.append(float(m[np.arange(len(test)), y[test]].mean()))
        sizes.append(float(m.sum(1).mean()))
    return {
        "rounds": rounds,
        "coverage_mean": float(np.mean(covered)),
        "coverage_std": float(np.std(covered)),
        "set_size_mean": float(np.mean(sizes)),
    }


class FeatureDistance(nn.Module):
    """Squared Mahalanobis distance of pooled features [B, D] to the nearest class mean -> [B]."""

    def __init__(self, centers: torch.Tensor, whiten: torch.Tensor):
        super().__init__()
        self.register_buffer("centers", centers.float())  # class means, whitened: [C, D]
        self.register_buffer("whiten", whiten.float())  # L with L L^T = precision: [D, D]

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """min over classes of ||(f - mu_c) L||^2, expanded so memory stays [B, C]."""
        g = features.float().flatten(1) @ self.whiten
        d = (g * g).sum(1, keepdim=True) - 2 * g @ self.centers.T + (self.centers**2).sum(1)[None, :]
        return d.clamp_min(0).amin(dim=1)

    @classmethod
    def fit(cls, features: np.ndarray, y: np.ndarray) -> FeatureDistance:
        """Class means and one shared Ledoit-Wolf covariance of training features [N, D]."""
        from sklearn.covariance import LedoitWolf

        features = np.asarray(features, dtype=np.float64)
        present = np.unique(y)
        means = np.stack([features[y == c].mean(0) for c in present])
        centred = features - means[np.searchsorted(present, y)]
        precision = LedoitWolf(assume_centered=True).fit(centred).precision_
        whiten = np.linalg.cholesky((precision + precision.T) / 2)
        return cls(torch.from_numpy(means @ whiten), torch.from_numpy(whiten))

    def score(self, features: np.ndarray | torch.Tensor, batch_size: int = 4096) -> np.ndarray:
        """Distances for many features, in batches, as float64 NumPy."""
        f = torch.as_tensor(np.asarray(features, dtype=np.float32))
        with torch.inference_mode():
            out = [self(f[i : i + batch_size]) for i in range(0, len(f), batch_size)]
        return torch.cat(out).double().numpy() if out else np.zeros(0)


@dataclass(frozen=True)
class Rejection:
    """Images whose distance exceeds `threshold` are `unknown`; `accept` of in-distribution ones pass."""

    threshold: float
    accept: float
    calibration_images: int
    train_images: int
    feature_dim: int
    score: str = "mahalanobis"
    file: str = OOD_FILE

    def unknown(self, scores):
        """True where an OOD score (a float or an array of them) says `unknown`."""
        return scores > self.threshold

    def to_dict(self) -> dict:
        """model.json form."""
        return asdict(self) | {"threshold": min(self.threshold, 1e30)}

    @classmethod
    def from_dict(cls, d: dict) -> Rejection:
        """Inverse of `to_dict`."""
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


def held_out_acceptance(scores: np.ndarray, *, accept: float, rounds: int = 200, seed: int = 0) -> dict:
    """Share of in-distribution images accepted by a threshold fitted on the other random half."""
    rates = [
        float((scores[test] <= conformal_quantile(scores[fit], accept)).mean())
        for fit, test in random_halves(len(scores), rounds, seed)
    ]
    return {
        "rounds": rounds,
        "acceptance_mean": float(np.mean(rates)),
        "acceptance_std": float(np.std(rates)),
    }
