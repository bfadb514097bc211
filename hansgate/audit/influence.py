"""Training-point ranking by influence functions on a linear student (paper 003, Sec. 3, App. B).

Paper 003 computes influence (Koh & Liang 2017) not on the deep network but on a linear
student that mimics it: embeddings of every layer, randomly projected to a fixed width,
feed a multinomial logistic regression trained on the network's predictions; the
student's fidelity (correlation of its logits with the network's) is reported.

For a test point ``t`` and a training point ``i`` the influence of up-weighting ``i`` on
the test loss is ``I(t, i) = -grad l(t)^T H^{-1} grad l(i)`` (paper 003, Sec. 3, Koh & Liang
Eq. 2), with ``H`` the Hessian of the student's mean training loss. For the softmax student
with features ``phi`` (plus a bias feature), ``grad l = (p - onehot(y)) (x) phi`` and
``H = 1/n sum_i (diag(p_i) - p_i p_i^T) (x) phi_i phi_i^T + (1/(n C)) I``; both are computed in
closed form here (``softmax_hessian``), and ``H`` is solved with a Cholesky factorisation.
The ranking lists training points by ``-I(t, i)``: the points whose up-weighting lowers the
test loss most ("helpful") come first.

Metrics: the "top-k share of the test sample's class" (paper 003, Sec. 4, k = 20), and
the share of top-k training points that carry the artifact, on clean test points and on
the same test points with the artifact pasted (paper 003, Fig. 6, right).

Deviation, on purpose: the default projection width is 256, not the paper's 1000 --
the exact Hessian of a ``K (D + 1)``-parameter student has ``(K (D + 1))^2`` entries
(10,010^2 for D = 1000 and ten classes, 800 MB), which does not fit the 3-minute, two-core
budget of an audit; ``InfluenceConfig.projection_dim`` raises it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field
from sklearn.linear_model import LogisticRegression
from sklearn.random_projection import SparseRandomProjection
from torch import nn

from hansgate.errors import DataError
from hansgate.nn.hooks import capture, eval_mode
from hansgate.nn.training import gradient_batch_size

__all__ = ["InfluenceConfig", "layer_embeddings", "softmax_hessian", "LinearStudentInfluence", "Fidelity",
           "TopKShares", "InfluenceReport"]


class InfluenceConfig(BaseModel):
    """Student and ranking settings (paper 003, App. B, except ``projection_dim``; see module doc)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    projection_dim: int = Field(256, ge=8, le=2048)
    C: float = Field(1.0, gt=0, description="inverse L2 strength of the student (scikit-learn's C)")
    damping: float = Field(1e-4, ge=0, description="added to the Hessian's diagonal")
    top_k: int = Field(20, ge=1)
    test_samples: int = Field(50, ge=1, description="test points ranked")
    max_train: int = Field(2000, ge=10, description="training points used (seeded subset)")
    seed: int = 0


def _leaf_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@torch.no_grad()
def layer_embeddings(model: nn.Module, x: torch.Tensor, projection: SparseRandomProjection | None = None,
                     batch_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Outputs of every conv/linear layer, flattened and concatenated, then randomly projected.

    Returns ``(features [N, D], logits [N, K])``; ``projection`` must already be fitted on the
    concatenated width (``fit`` below does it). The outputs are read live (``hooks.capture`` with
    ``copy=False``): where an in-place activation follows a layer, its embedding is the activated
    value. Runs in eval mode; the caller's modes come back.
    """
    # every layer's output of a batch is held at once, as in a backward pass: the gradient bound
    batch_size = batch_size or gradient_batch_size(int(x[0].numel()) if len(x) else 1, cap=256)
    names = [n for n, _ in _leaf_layers(model)]
    feats, logits = [], []
    with eval_mode(model), capture(model, names, copy=False) as store:
        for start in range(0, len(x), batch_size):
            for calls in store.values():
                calls.clear()
            out = model(x[start : start + batch_size])
            flat = torch.cat([o.flatten(1) for n in names for o in store[n]], 1).numpy()
            feats.append(flat if projection is None else projection.transform(flat))
            logits.append(out.numpy())
    return np.concatenate(feats).astype(np.float64), np.concatenate(logits)


def softmax_hessian(phi: np.ndarray, p: np.ndarray, reg: float) -> np.ndarray:
    """Hessian of the mean softmax cross-entropy in ``W`` ``[K, D]`` (row-major flattening).

    ``phi`` ``[n, D]``, ``p`` ``[n, K]`` probabilities; ``H[(k, d), (l, e)] =
    1/n sum_i (p_ik [k == l] - p_ik p_il) phi_id phi_ie + reg [k == l][d == e]``; returns ``[K D, K D]``.
    """
    n, d = phi.shape
    k = p.shape[1]
    phi_t = torch.from_numpy(phi)
    p_t = torch.from_numpy(p)
    h = torch.zeros(k, d, k, d, dtype=phi_t.dtype)
    for a in range(k):
        for b in range(a, k):
            w = (p_t[:, a] * ((1.0 if a == b else 0.0) - p_t[:, b])) / n
            block = phi_t.T @ (w[:, None] * phi_t)
            h[a, :, b, :] = block
            if a != b:
                h[b, :, a, :] = block.T
    h = h.reshape(k * d, k * d)
    h += reg * torch.eye(k * d, dtype=h.dtype)
    return h.numpy()


class LinearStudentInfluence:
    """Influence ranking of training points through a linear student of ``model``.

    ``fit(model, x_train)`` embeds the training set, trains the student on the model's
    predicted classes and factorises the Hessian. Learned: ``projection_``, ``student_``,
    ``fidelity_`` (``Fidelity`` on the training set),
    ``train_labels_`` (the model's predictions the student mimics), ``train_index_`` (the seeded subset
    of at most ``max_train`` training points used; ``report`` takes full-length label/artifact arrays).
    ``rank(x_test, y_test)`` -> ``[n_test, n_train]`` scores ``-I(t, i)``, highest = most helpful.
    """

    def __init__(self, config: InfluenceConfig | None = None) -> None:
        self.config = config or InfluenceConfig()

    def fit(self, model: nn.Module, x_train: torch.Tensor) -> "LinearStudentInfluence":
        cfg = self.config
        if len(x_train) < 10:
            raise DataError(f"influence ranking needs at least 10 training samples, got {len(x_train)}")
        self.model_ = model
        n_all = len(x_train)
        idx = np.arange(n_all)
        if n_all > cfg.max_train:
            idx = np.sort(np.random.default_rng(cfg.seed).choice(n_all, cfg.max_train, replace=False))
        self.train_index_ = idx
        x_train = x_train[torch.as_tensor(idx)]
        raw, _ = layer_embeddings(model, x_train[:2])
        self.projection_ = SparseRandomProjection(n_components=cfg.projection_dim, random_state=cfg.seed)
        self.projection_.fit(raw)
        feats, logits = layer_embeddings(model, x_train, self.projection_)
        self.mean_ = feats.mean(0)
        self.scale_ = feats.std(0) + 1e-8
        phi = self._features(feats)
        labels = logits.argmax(1)
        self.train_labels_ = labels
        classes = np.unique(labels)
        if len(classes) != logits.shape[1]:
            raise DataError(f"the model predicts only {len(classes)} of {logits.shape[1]} classes on the training "
                            "data; the student cannot mimic the rest")
        self.student_ = LogisticRegression(C=cfg.C, max_iter=500, fit_intercept=False)
        self.student_.fit(phi, labels)
        student_logits = self.student_.decision_function(phi)
        a = student_logits - student_logits.mean(1, keepdims=True)
        b = logits - logits.mean(1, keepdims=True)
        self.fidelity_ = Fidelity(logit_correlation=float(np.corrcoef(a.ravel(), b.ravel())[0, 1]),
                                  agreement=float((student_logits.argmax(1) == labels).mean()))
        n = len(phi)
        p = self.student_.predict_proba(phi)
        # sklearn minimises 1/2 ||W||^2 + C sum_i l_i; per sample mean: reg = 1 / (n C)
        h = softmax_hessian(phi, p, 1.0 / (n * cfg.C) + cfg.damping)
        self.hessian_chol_ = np.linalg.cholesky(h)
        self.train_grads_ = self._grads(phi, p, labels)  # [n, K*D]
        return self

    def _features(self, feats: np.ndarray) -> np.ndarray:
        z = (feats - self.mean_) / self.scale_
        return np.concatenate([z, np.ones((len(z), 1))], 1)  # bias as a feature, regularised alike

    @staticmethod
    def _grads(phi: np.ndarray, p: np.ndarray, y: np.ndarray) -> np.ndarray:
        r = p.copy()
        r[np.arange(len(y)), y] -= 1.0
        return (r[:, :, None] * phi[:, None, :]).reshape(len(y), -1)

    def rank(self, x_test: torch.Tensor, y_test: np.ndarray) -> np.ndarray:
        """Scores ``-I(t, i)`` ``[n_test, n_train]``: ``grad l(t)^T H^{-1} grad l(i)``."""
        feats, _ = layer_embeddings(self.model_, x_test, self.projection_)
        phi = self._features(feats)
        g = self._grads(phi, self.student_.predict_proba(phi), np.asarray(y_test))
        from scipy.linalg import cho_solve

        v = cho_solve((self.hessian_chol_, True), g.T)  # [K*D, n_test]
        return (self.train_grads_ @ v).T

    def report(self, x_test: torch.Tensor, y_test: np.ndarray, y_train: np.ndarray,
               train_has_artifact: np.ndarray | None = None,
               x_test_pasted: torch.Tensor | None = None) -> "InfluenceReport":
        """Top-k class share and top-k artifact share, for the most helpful (``-I`` largest) and the most
        harmful (``I`` largest) training points, on clean test points and on the same points with the
        artifact pasted (``x_test_pasted``)."""
        k = self.config.top_k
        y_test, y_train = np.asarray(y_test), np.asarray(y_train)[self.train_index_]
        art = None if train_has_artifact is None else np.asarray(train_has_artifact, dtype=bool)[self.train_index_]
        rankings: dict[str, TopKShares] = {}
        sets = {"clean": x_test} | ({"pasted": x_test_pasted} if x_test_pasted is not None else {})
        for name, xs in sets.items():
            scores = self.rank(xs, y_test)
            for direction, sc in (("helpful", scores), ("harmful", -scores)):
                top = np.argsort(-sc, axis=1)[:, :k]
                class_share = (y_train[top] == y_test[:, None]).mean(1)
                rankings[f"{name}_{direction}"] = TopKShares(
                    float(class_share.mean()), None if art is None else float(art[top].mean()))
        return InfluenceReport(config=self.config, fidelity=self.fidelity_, n_train=int(len(y_train)),
                               n_test=int(len(y_test)), top_k=k,
                               train_artifact_rate=None if art is None else float(art.mean()), rankings=rankings)


@dataclass(frozen=True)
class Fidelity:
    """How well the student mimics the network on the training set: centred-logit correlation, agreement."""

    logit_correlation: float
    agreement: float


@dataclass(frozen=True)
class TopKShares:
    """Share of the top-k training points with the test point's class, and carrying the artifact."""

    top_k_class_share: float
    top_k_artifact_share: float | None


@dataclass(frozen=True)
class InfluenceReport:
    """``LinearStudentInfluence.report``: the rankings ``{clean,pasted}_{helpful,harmful}``."""

    config: InfluenceConfig
    fidelity: Fidelity
    n_train: int
    n_test: int
    top_k: int
    train_artifact_rate: float | None
    rankings: dict[str, TopKShares]

    @property
    def top_k_class_share(self) -> float:
        return self.rankings["clean_helpful"].top_k_class_share

    def as_dict(self) -> dict[str, object]:
        return {"config": self.config.model_dump(), "fidelity": asdict(self.fidelity), "n_train": self.n_train,
                "n_test": self.n_test, "top_k": self.top_k, "train_artifact_rate": self.train_artifact_rate,
                "rankings": {k: asdict(v) for k, v in self.rankings.items()},
                "top_k_class_share": self.top_k_class_share}
