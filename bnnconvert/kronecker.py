"""A Kronecker-factored Gaussian posterior for a fully Bayesian Linear layer (or 1x1
convolution).

The diagonal posterior of :mod:`bnnconvert.layers` gives each entry its own sigma and no
correlation. For a Linear layer whose every weight and bias is Bayesian (the last layer of
a classifier, ``bnnconvert convert --last-layer``) a Kronecker-factored Laplace posterior
keeps the correlations the data induce, at the cost of two small eigenbases. A 1x1
convolution (a segmentation network's head) is the same map applied at every position:
each position is one input row (one "example" of A, its GGN summed into B):

    W~ = [W, b]  (C x P, P = in_features + 1 with a bias),
    precision of vec(W~) = B kron A + lambda I,
    A = (1 / N) sum_n phi~_n phi~_n^T  (P x P, phi~ = [input, 1]),
    B = sum_n J_n^T Lambda_n J_n        (C x C, the GGN of the NLL in the layer's output),

the K-FAC approximation of the layer's GGN (Martens & Grosse 2015; Ritter et al. 2018; the
layout of laplace-torch's ``hessian_structure="kron"`` with the bias as one more input
column). With A = Q_A diag(a) Q_A^T and B = Q_B diag(b) Q_B^T,

    W~ - mu = Q_B M Q_A^T,   M_ij ~ N(0, t^2 V_ij) independent,   V_ij = 1 / (b_i a_j + lambda),

so a posterior draw costs two small matrix products, and the output f = W~ phi~ of an
input has the closed-form variance (what the probit predictive needs)

    var f_k = t^2 sum_i Q_B[k, i]^2 sum_j V_ij (Q_A^T phi~)_j^2.

t is the layer's scale (``bayes_scale``), as for the diagonal posterior. The layer keeps
Q_A, Q_B and V as the buffers ``kron_qa`` (P, P), ``kron_qb`` (C, C) and ``kron_var``
(C, P); they are saved and loaded with the model. Its ``rho`` holds the marginal sigma of
each entry (the diagonal of the covariance), so sigma summaries read as for a diagonal
posterior; the forward uses the factors.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "KRONECKER_BUFFERS",
    "augment",
    "draw",
    "eigenbases",
    "marginal_variance",
    "output_variance",
]

KRONECKER_BUFFERS = ("kron_qa", "kron_qb", "kron_var")
"""The buffers of a layer with a Kronecker-factored posterior: Q_A, Q_B, V."""


def augment(x: Tensor, bias: bool) -> Tensor:
    """phi~: the inputs (..., in) flattened to (M, in), with a column of ones appended
    if the layer has a bias: (M, in + 1)."""
    flat = x.reshape(-1, x.shape[-1])
    if not bias:
        return flat
    return torch.cat([flat, flat.new_ones(flat.shape[0], 1)], dim=1)


def output_variance(phi: Tensor, qa: Tensor, qb: Tensor, var: Tensor, scale: Tensor) -> Tensor:
    """The variance of each output of W~ phi~ under the posterior, (M, P) -> (M, C)."""
    u = phi @ qa.to(phi.dtype)  # (M, P): the inputs in A's eigenbasis
    v = (var * scale.square()).to(phi.dtype)  # (C, P)
    return (u.square() @ v.t()) @ qb.to(phi.dtype).square().t()


def draw(qa: Tensor, qb: Tensor, var: Tensor, scale: Tensor) -> Tensor:
    """One draw of W~ - mu, (C, P): Q_B (t sqrt(V) * eps) Q_A^T (global RNG)."""
    m = (scale * var.sqrt()) * torch.randn_like(var)
    return qb @ m @ qa.t()


def marginal_variance(qa: Tensor, qb: Tensor, var: Tensor) -> Tensor:
    """The diagonal of the covariance at t = 1, (C, P): Q_B^2 V (Q_A^2)^T."""
    return qb.square() @ var @ qa.square().t()


def eigenbases(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(Q_A (P, P), Q_B (C, C), eigenvalues b_i a_j (C, P)) of the factors A and B,
    computed in float64; negative round-off eigenvalues are clamped to 0."""
    eig_a, qa = torch.linalg.eigh(a.double())
    eig_b, qb = torch.linalg.eigh(b.double())
    products = eig_b.clamp_min(0)[:, None] * eig_a.clamp_min(0)[None, :]
    return qa, qb, products
