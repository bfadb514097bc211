"""Streaming moments, the PCA basis and the PCA-EGEM module (paper 000, Sec. 3.2, Eq. 6).

What: PCA-EGEM soft-prunes in the PCA basis of the refinement activations:
``h = U^T (a - mean)``, ``h_k <- c_k h_k`` with ``c_k = E[h_k^2] / (E[h_k^2] + lambda)``,
``a <- U h + mean``; ``E[h_k^2]`` is the k-th eigenvalue of the activations' covariance.
This module accumulates the moments in one streamed pass, decomposes them, and holds
the refinement as a real ``nn.Module`` (``PcaExposure``).

Why and the choices made (tested in tests/refinement/test_egem.py, test_egem_oracle.py):

- Two exact routes to the basis. With at least as many samples as units (``N > D``)
  the ``D x D`` covariance is accumulated (about the first batch's mean, so that no
  large mean cancels) and decomposed. With ``N <= D`` only ``N`` components exist
  (rank ``<= N - 1``): the activations are kept (``N x D``, no more memory than the
  covariance would take) and the ``N x N`` Gram matrix of the centred data is decomposed
  instead (the dual: ``U = X^T V / sqrt(N e)``), cubic in ``N`` rather than ``D``.
  Directions the refinement data never span are then absent from the basis, so the
  module removes them (the Clever-Hans property of Sec. 3.2).
- Precision: ``float64`` (default) forms and decomposes everything in float64 and
  zeroes only eigenvalues below ``max * K * eps64`` (numpy's rank rule), which keeps
  every component a float64 reference keeps. ``float32`` (a named option, faster on the
  primal route) forms the per-batch products and the decomposition in float32 with the
  float32 rank floor: it zeroes the small components whose float32 eigenvalues are
  rounding noise, which float64 keeps.
- Dead units (zero variance) are exact eigenvectors with eigenvalue 0; only the active
  block is decomposed.
- Conv maps refined per channel project the per-image channel sums ``s``. The default
  ``conv_mode="ratio"`` is the authors' ``PCAMultiplierLayer``: each channel map is
  scaled by ``s'_c / s_c`` (0 where ``s_c = 0``), so zeros stay zero and the signs of a
  post-ReLU map are kept. ``conv_mode="linear"`` (the project's earlier default) applies
  the affine map ``P = U diag(c) U^T`` at every pixel with the mean spread over the
  ``H x W`` positions: it reproduces the projected channel sums exactly and is smooth,
  but changes every entry of the map, zeros included.
- Transformer tokens ``[N, T, D]`` (units on the last axis, summed over the tokens) always
  take the ``linear`` rule at every token: their sums are signed and can lie near zero, where
  the ratio ``s'_c / s_c`` amplifies rounding without bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

__all__ = ["LayerMoments", "pca_basis", "dual_basis", "PcaExposure"]

MomentKind = Literal["diag", "full", "data"]


@dataclass
class LayerMoments:
    """Streaming moments of one layer's unit activations ``s`` ``[N, D]``.

    ``kind``: ``"diag"`` keeps ``sum`` and the raw per-unit ``E[s^2]`` (EGEM);
    ``"full"`` the ``[D, D]`` products of ``s - shift`` (PCA, ``N > D``); ``"data"`` the
    activations themselves (PCA, ``N <= D``, for the dual). ``spatial`` is the unit
    shape for per-element layers (``[C, H, W]``), else the map's spatial shape.
    """

    n: int
    dim: int
    spatial: tuple[int, ...]
    kind: MomentKind
    sum: torch.Tensor  # of s ("diag") or of s - shift ("full")
    sum_sq: torch.Tensor  # [D] ("diag"), [D, D] ("full"), the activations [capacity, D] ("data")
    shift: torch.Tensor | None = None

    @classmethod
    def empty(cls, dim: int, spatial: tuple[int, ...], kind: MomentKind, capacity: int = 0) -> "LayerMoments":
        store = {"diag": lambda: torch.zeros(dim, dtype=torch.float64),
                 "full": lambda: torch.zeros(dim, dim, dtype=torch.float64),
                 "data": lambda: torch.zeros(capacity, dim, dtype=torch.float32)}[kind]()
        return cls(0, dim, spatial, kind, torch.zeros(dim, dtype=torch.float64), store)

    def update(self, s: torch.Tensor, dtype: torch.dtype = torch.float64) -> None:
        """Add a batch; ``full`` products are formed in ``dtype`` and accumulated in float64."""
        s = s.detach()
        if self.kind == "data":
            if self.n + len(s) > len(self.sum_sq):
                grown = torch.zeros(max(2 * len(self.sum_sq), self.n + len(s)), self.dim, dtype=torch.float32)
                grown[: self.n] = self.sum_sq[: self.n]
                self.sum_sq = grown
            self.sum_sq[self.n : self.n + len(s)] = s.float()
            self.n += len(s)
            return
        self.n += s.shape[0]
        if self.kind == "diag":  # EGEM needs the raw E[s^2]; D products per sample, kept in float64
            s64 = s.double()
            self.sum += s64.sum(0)
            self.sum_sq += (s64 * s64).sum(0)
            return
        if self.shift is None:
            self.shift = s.double().mean(0)
        d = (s.double() - self.shift).to(dtype)
        self.sum += d.sum(0).double()
        self.sum_sq += (d.T @ d).double()

    def centred(self) -> torch.Tensor:
        """The kept activations minus their mean, ``[N, D]`` float64 (``kind="data"`` only)."""
        x = self.sum_sq[: self.n].double()
        return x - x.mean(0)

    @property
    def mean(self) -> torch.Tensor:
        """``E[s]`` ``[D]``."""
        if self.kind == "data":
            return self.sum_sq[: self.n].double().mean(0)
        return self.sum / self.n if self.shift is None else self.shift + self.sum / self.n

    @property
    def covariance(self) -> torch.Tensor:
        """``Cov[s]`` ``[D, D]`` (PCA kinds), from the shifted sums without cancellation."""
        if self.kind == "data":
            x = self.centred()
            return x.T @ x / self.n
        d = self.sum / self.n
        cov = self.sum_sq / self.n - torch.outer(d, d)
        return (cov + cov.T) / 2

    @property
    def second(self) -> torch.Tensor:
        """``E[s^2]`` per unit ``[D]`` (``diag``) or ``E[s s^T]`` ``[D, D]`` (PCA kinds)."""
        if self.kind == "diag":
            return self.sum_sq / self.n
        return self.covariance + torch.outer(self.mean, self.mean)


def _floored(evals: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # the numerical rank rule (as numpy's matrix_rank): below it an eigenvalue is rounding noise,
    # and a direction the data never span must get c = 0 at any lambda > 0
    floor = evals.abs().max() * len(evals) * torch.finfo(dtype).eps if len(evals) else 0.0
    return torch.where(evals > floor, evals, torch.zeros_like(evals))


def pca_basis(cov: torch.Tensor, dtype: torch.dtype = torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues ``[D]`` (descending, >= 0) and eigenvectors ``[D, D]`` (columns) of a covariance.

    ``cov``: ``[D, D]`` float64, decomposed in ``dtype``; results are float64, eigenvalues
    under the rank floor of ``dtype`` set to 0. Dead units (zero row and column) are exact
    eigenvectors with eigenvalue 0, so only the active block is decomposed.
    """
    active = cov.diagonal() > 0
    if not bool(active.all()):
        sub_vals, sub_vecs = pca_basis(cov[active][:, active], dtype) if bool(active.any()) else (
            torch.zeros(0, dtype=torch.float64), torch.zeros(0, 0, dtype=torch.float64))
        dead = int((~active).sum())
        evecs = torch.zeros_like(cov)
        evecs[active.nonzero().flatten()[:, None], torch.arange(len(sub_vals))] = sub_vecs
        evecs[(~active).nonzero().flatten(), torch.arange(len(sub_vals), len(sub_vals) + dead)] = 1.0
        return torch.cat([sub_vals, torch.zeros(dead, dtype=torch.float64)]), evecs
    evals, evecs = torch.linalg.eigh(cov.to(dtype))
    order = torch.argsort(evals, descending=True)
    return _floored(evals[order].double(), dtype), evecs[:, order].double()


def dual_basis(centred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """PCA of ``N <= D`` centred samples ``[N, D]`` through the ``N x N`` Gram matrix (float64).

    Returns eigenvalues ``[N]`` (descending, floored as in ``pca_basis``) and the matching
    unit eigenvectors of the covariance ``[D, N]`` (zero columns for floored components):
    ``X X^T / N = V diag(e) V^T`` gives ``U = X^T V / sqrt(N e)``.
    """
    x = centred.double()
    n = len(x)
    evals, v = torch.linalg.eigh(x @ x.T / n)
    order = torch.argsort(evals, descending=True)
    evals, v = _floored(evals[order], torch.float64), v[:, order]
    scale = torch.where(evals > 0, 1 / torch.sqrt(n * evals.clamp_min(1e-300)), torch.zeros_like(evals))
    return evals, (x.T @ v) * scale


class PcaExposure(nn.Module):
    """Eq. 6 as a module: ``a <- U diag(c) U^T (a - mean) + mean`` (conv maps: see the module doc)."""

    projection: torch.Tensor
    mean: torch.Tensor

    def __init__(self, mean: torch.Tensor, basis: torch.Tensor, factors: torch.Tensor, spatial_size: int,
                 conv_mode: Literal["linear", "ratio"] = "ratio", per_element: bool = False) -> None:
        super().__init__()
        self.per_element = per_element
        proj = (basis * factors.to(basis.dtype)) @ basis.T
        self.register_buffer("projection", proj.to(torch.float32))  # symmetric [D, D]
        self.register_buffer("mean", mean.to(torch.float32))  # mean of the per-image sums
        self.spatial_size = spatial_size
        self.conv_mode = conv_mode

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        if a.ndim == 2 or self.per_element:
            flat = a.flatten(1)
            return ((flat - self.mean) @ self.projection + self.mean).view(a.shape)
        if a.ndim == 3:  # tokens [N, T, D]: units on the last axis, the T tokens as positions
            return self._maps(a.transpose(1, 2), a.shape[1], "linear").transpose(1, 2)
        return self._maps(a, self.spatial_size, self.conv_mode)

    def _maps(self, a: torch.Tensor, spatial_size: int, mode: str) -> torch.Tensor:
        """Channel-first maps ``[N, C, ...]`` over ``spatial_size`` positions (module doc)."""
        if mode == "ratio":
            s = a.flatten(2).sum(2)
            s_new = (s - self.mean) @ self.projection + self.mean
            nonzero = s.abs() > 1e-12
            ratio = torch.where(nonzero, s_new / torch.where(nonzero, s, torch.ones_like(s)), torch.zeros_like(s))
            return a * ratio.view(*ratio.shape, *(1,) * (a.ndim - 2))
        pixel_mean = (self.mean / spatial_size).view(1, -1, *(1,) * (a.ndim - 2))
        centred = (a - pixel_mean).movedim(1, -1) @ self.projection
        return centred.movedim(-1, 1) + pixel_mean
