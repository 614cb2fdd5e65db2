"""The Frechet distance between Gaussians fitted to two feature sets (FID's formula, any features)."""
from __future__ import annotations

import numpy as np
import torch


def frechet_distance(a: torch.Tensor, b: torch.Tensor, ridge: float = 1e-6) -> float:
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)) for features a [N, D] and b [M, D].

    A set of one sample has zero covariance; when the matrix square root is not finite (singular
    covariances, fewer samples than dimensions) both covariances get `ridge` on the diagonal."""
    from scipy import linalg

    a, b = a.detach().double().cpu().numpy(), b.detach().double().cpu().numpy()

    def cov(x: np.ndarray) -> np.ndarray:
        return np.cov(x, rowvar=False) if x.shape[0] > 1 else np.zeros((x.shape[1],) * 2)

    s1, s2 = cov(a), cov(b)
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        off = np.eye(s1.shape[0]) * ridge
        s1, s2 = s1 + off, s2 + off
        covmean = linalg.sqrtm(s1 @ s2)
    fd = ((a.mean(0) - b.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean.real)
    return max(float(fd), 0.0)  # rounding makes identical sets give -1e-13
