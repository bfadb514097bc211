"""Streaming moments, the PCA basis and the PCA-EGEM module (paper 000, Sec. 3.2, Eq. 6).

What: PCA-EGEM soft-prunes in the PCA basis of the refinement activations:
``h = U^T (a - mean)``, ``h_k <- c_k h_k`` with ``c_k = E[h_k^2] / (E[h_k^2] + lambda)``,
``a <- U h + mean``; ``E[h_k^2]`` is the k-th eigenvalue of the activations' covariance.
This module accumulates the moments in one streamed pass and decomposes them; the
refinement itself, ``PcaExposure``, is defined in ``hansgate.nn.units`` (the audit rebuilds it).

Why and the choices made (tested in tests/refinement/test_egem.py, test_egem_oracle.py):

- Two exact routes to the basis. With at least as many samples as units (``N > D``)
  the ``D x D`` covariance is accumulated (about the first batch's mean, so that no
  large mean cancels) and decomposed. With ``N <= D`` only ``N`` components exist
  (rank ``<= N - 1``): the activations are kept (``N x D``, no more memory than the
  covariance would take) and the ``N x N`` Gram matrix of the centred data is decomposed
  instead (the dual: ``U = X^T V / sqrt(N e)``), cubic in ``N`` rather than ``D``.
  Directions the refinement data never span are then absent from the basis, so the
  module removes them (the Clever-Hans property of Sec. 3.2).
- Only the spectrum is decomposed at fit time (``pca_spectrum``, ``dual_spectrum``: the
  lambda search needs nothing else), and each refinement builds ``P = U diag(c) U^T`` as
  ``I - lambda (Cov + lambda I)^-1`` (``N > D``) or ``X^T (X X^T + N lambda I)^-1 X``
  (``N <= D``) by Cholesky (``resolvent_projection``, ``dual_resolvent_projection``): the
  same matrix without the eigenvectors, whose computation costs more than the spectrum.
  It differs from the eigenbasis route only on components under the rank floor (factor
  ``<= floor / lambda`` instead of 0); where that bound exceeds ``RESOLVENT_TOL`` (a
  ``lambda`` within a few orders of the floor) the eigenbasis is computed after all, once
  per fit. Float64 moments are accumulated with BLAS ``syrk`` (one triangle).
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
- A map that takes negative values (linear bottlenecks, Hardswish, SiLU, GELU: MobileNet,
  EfficientNet, ConvNeXt blocks) gets the ``linear`` rule whatever ``conv_mode`` says
  (``ExposureMinimizer.conv_modes_``, the manifest's ``conv_modes``): its signed channel sums
  can lie near zero, where the ratio amplifies without bound; the authors' networks refine
  post-ReLU maps only.
- Transformer tokens ``[N, T, D]`` (units on the last axis, summed over the tokens) always
  take the ``linear`` rule at every token: their sums are signed and can lie near zero, where
  the ratio ``s'_c / s_c`` amplifies rounding without bound.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from scipy.linalg import blas, eigh, lapack

from hansgate.nn.units import PcaExposure

__all__ = ["LayerMoments", "pca_basis", "pca_spectrum", "resolvent_projection", "exposure_from_projection",
           "dual_basis", "dual_spectrum", "dual_resolvent_projection", "PcaExposure"]

#: Largest bound on ``|c_resolvent - c_basis|`` at which ``resolvent_projection`` is used (see there).
RESOLVENT_TOL = 1e-6

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
        if dtype == torch.float64:
            _add_gram(self.sum_sq, d)
        else:
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
        lower = self.sum_sq.tril()  # float64 batches fill only the lower triangle (``_add_gram``)
        return (lower + lower.tril(-1).T) / self.n - torch.outer(d, d)

    def covariance_lower(self) -> torch.Tensor:
        """``Cov[s]`` in the lower triangle only (``kind="full"``; the upper is not the covariance's).

        Two passes over ``D x D`` instead of ``covariance``'s symmetrisation: for ``pca_spectrum``.
        """
        d = self.sum / self.n
        return (self.sum_sq / self.n).sub_(torch.outer(d, d))

    @property
    def second(self) -> torch.Tensor:
        """``E[s^2]`` per unit ``[D]`` (``diag``) or ``E[s s^T]`` ``[D, D]`` (PCA kinds)."""
        if self.kind == "diag":
            return self.sum_sq / self.n
        return self.covariance + torch.outer(self.mean, self.mean)


def _add_gram(acc: torch.Tensor, d: torch.Tensor) -> None:
    """``acc += d^T d`` in float64, lower triangle of ``acc`` only (BLAS ``syrk``: half a matmul's products)."""
    c = acc.numpy().T  # F-ordered view: its upper triangle is acc's lower one
    out = blas.dsyrk(1.0, d.contiguous().numpy().T, beta=1.0, c=c, lower=0, overwrite_c=1)
    if not np.shares_memory(out, c):  # BLAS wrapper copied after all: write back
        c[...] = out


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


def pca_spectrum(cov: torch.Tensor) -> torch.Tensor:
    """Eigenvalues ``[D]`` of a float64 covariance, as ``pca_basis`` returns them, without eigenvectors.

    The lambda search needs only the spectrum; the reduction to tridiagonal form is the
    whole cost here, the back-transformation of eigenvectors is skipped. Only the lower
    triangle of ``cov`` is read (``LayerMoments.covariance_lower`` suffices).
    """
    active = cov.diagonal() > 0
    idx = active.nonzero().flatten()
    if len(idx) == 0:
        return torch.zeros(len(cov), dtype=torch.float64)
    block = cov[idx[:, None], idx] if len(idx) < len(cov) else cov.clone()  # the one copy LAPACK overwrites
    # block.T is Fortran-ordered: its upper triangle is block's lower one, passed without another copy
    evals = eigh(block.numpy().T, lower=False, eigvals_only=True, overwrite_a=True, check_finite=False, driver="evr")
    dead = torch.zeros(len(cov) - len(idx), dtype=torch.float64)
    return torch.cat([_floored(torch.from_numpy(evals).flip(0).double().contiguous(), torch.float64), dead])


def resolvent_projection(cov: torch.Tensor, lam: float, top: float) -> torch.Tensor | None:
    """Eq. 6's ``P = U diag(e / (e + lambda)) U^T = I - lambda (Cov + lambda I)^-1``, by Cholesky (float64).

    The same matrix as the eigenbasis route (``pca_basis``) up to rounding, except for the
    components under the float64 rank floor (``top * K * eps64``, ``top`` the largest
    eigenvalue, ``K`` the active units): the basis route sets their factor to 0, here it is
    ``e / (e + lambda) <= floor / lambda``. Returns None (use the basis route) when that bound
    exceeds ``RESOLVENT_TOL`` or the factorisation fails. Dead units get exact zero rows.
    """
    active = cov.diagonal() > 0
    idx = active.nonzero().flatten()
    k = len(idx)
    if k == 0 or lam <= 0 or top * k * torch.finfo(torch.float64).eps / lam > RESOLVENT_TOL:
        return None
    a = cov[idx][:, idx].numpy() + lam * np.eye(k)
    chol, info = lapack.dpotrf(a, lower=1, clean=0, overwrite_a=1)
    if info != 0:
        return None
    inv, info = lapack.dpotri(chol, lower=1, overwrite_c=1)
    if info != 0:
        return None
    inv_t = torch.from_numpy(inv).tril()
    block = torch.eye(k, dtype=torch.float64) - lam * (inv_t + inv_t.tril(-1).T)
    if k == len(cov):
        return block
    out = torch.zeros_like(cov)
    out[idx[:, None], idx] = block
    return out


def dual_spectrum(centred: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``dual_basis``'s eigenvalues ``[N]`` without eigenvectors, and the Gram matrix ``X X^T / N`` they come from."""
    x = centred.double().contiguous()
    if len(x) == 0:
        return torch.zeros(0, dtype=torch.float64), torch.zeros(0, 0, dtype=torch.float64)
    # X X^T by BLAS syrk (one triangle: half a matmul's products), then mirrored
    upper = torch.from_numpy(blas.dsyrk(1.0, x.numpy().T, trans=1, lower=0)).triu()
    gram = (upper + upper.triu(1).T) / len(x)
    evals = torch.from_numpy(eigh(gram.numpy(), eigvals_only=True, driver="evr", check_finite=False)).flip(0)
    return _floored(evals.double().contiguous(), torch.float64), gram


def dual_resolvent_projection(centred: torch.Tensor, gram: torch.Tensor, lam: float, top: float
                              ) -> torch.Tensor | None:
    """``resolvent_projection`` for ``N <= D`` samples: ``P = X^T (X X^T + N lambda I)^-1 X`` ``[D, D]``.

    With ``X X^T / N = V diag(e) V^T`` and ``U = X^T V / sqrt(N e)`` this is ``U diag(e / (e + lambda)) U^T``,
    the dual basis's projection; same floor bound and None as there (rank floor ``top * N * eps64``).
    """
    x = centred.double()
    n = len(x)
    if n == 0 or lam <= 0 or top * n * torch.finfo(torch.float64).eps / lam > RESOLVENT_TOL:
        return None
    chol, info = torch.linalg.cholesky_ex(gram + lam * torch.eye(n, dtype=torch.float64))
    if int(info) != 0:
        return None
    z = torch.linalg.solve_triangular(chol, x, upper=False) / n**0.5  # L^-1 X / sqrt(N)
    return z.T @ z


def exposure_from_projection(mean: torch.Tensor, projection: torch.Tensor, spatial_size: int,
                             conv_mode: Literal["linear", "ratio"] = "ratio", per_element: bool = False
                             ) -> "PcaExposure":
    """A ``PcaExposure`` holding a given ``projection`` ``[D, D]`` (e.g. ``resolvent_projection``'s)."""
    empty = torch.zeros(len(projection), 0, dtype=projection.dtype)  # zero components: proj starts at 0
    module = PcaExposure(mean, empty, torch.zeros(0, dtype=projection.dtype), spatial_size, conv_mode, per_element)
    module.projection.copy_(projection)
    return module


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
