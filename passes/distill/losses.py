"""The distillation losses, as plain functions on tensors (``s`` student, ``t`` teacher).

Response-based (on the distilled output, see ``distill(output=...)``):

* ``kd_loss``: with temperature ``T`` and logits ``z`` over the last axis,
  ``L_soft = T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))
  = T² · Σ_c p_t,c (log p_t,c − log p_s,c)``, averaged over all leading positions (every
  sample, every token). The ``T²`` keeps the soft gradients' magnitude independent of ``T``
  (Hinton et al., 2015). With labels ``y``:
  ``L = α · CE(z_s, y) + (1 − α) · L_soft`` (``CE`` ignores labels equal to ``-100``).
* ``cosine_loss``: ``mean(1 − cos(s, t))``, cosine along the last axis, for embeddings.
* ``mse_loss``: ``mean((s − t)²)`` over every element.

Feature-based (intermediate tensors paired by ``features.py``):

* ``feature_loss``: relative squared error ``‖P(s) − t‖² / (‖t‖² + ε)`` per pair (``P`` the
  learned projection where widths differ, else the identity), averaged over pairs, so layers
  of different scale weigh alike.

Relation-based (Park et al., 2019, with cosine similarity):

* ``relation_loss``: per-sample embeddings ``e`` (the output pooled by ``pool_samples``: the
  mean over every axis between the batch axis and the last), ``G = ê·êᵀ`` with rows
  normalised to unit length, ``L = mean((G_s − G_t)²)`` over the ``B × B`` entries.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "kd_loss",
    "soft_kd",
    "hard_loss",
    "cosine_loss",
    "mse_loss",
    "feature_loss",
    "relation_loss",
    "pool_samples",
    "similarity_matrix",
    "per_vector_cosine",
]

logger = logging.getLogger(__name__)

_EPS = 1e-12


def soft_kd(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(softmax(z_t/T) ‖ softmax(z_s/T))`` averaged over the leading positions."""
    classes = student.shape[-1]
    log_p_s = F.log_softmax(student.reshape(-1, classes).float() / temperature, dim=-1)
    log_p_t = F.log_softmax(teacher.reshape(-1, classes).float() / temperature, dim=-1)
    kl = F.kl_div(log_p_s, log_p_t, reduction="batchmean", log_target=True)
    return kl * temperature**2


def kd_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None = None,
            *, temperature: float = 4.0, alpha: float = 0.5) -> torch.Tensor:
    """``α·CE(z_s, y) + (1 − α)·T²·KL(p_t ‖ p_s)`` with labels, the soft term alone without."""
    soft = soft_kd(student, teacher, temperature)
    if labels is None:
        return soft
    return alpha * hard_loss(student, labels) + (1.0 - alpha) * soft


def hard_loss(student: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the student's logits against integer labels (``-100`` ignored)."""
    classes = student.shape[-1]
    return F.cross_entropy(student.reshape(-1, classes).float(), labels.reshape(-1).long(),
                           ignore_index=-100)


def per_vector_cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Cosine similarity along the last axis, one value per leading position (flattened)."""
    width = student.shape[-1]
    return F.cosine_similarity(student.reshape(-1, width).float(),
                               teacher.reshape(-1, width).float(), dim=-1, eps=1e-8)


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``mean(1 − cos(s, t))`` with the cosine along the last axis."""
    return (1.0 - per_vector_cosine(student, teacher)).mean()


def mse_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``mean((s − t)²)`` over every element."""
    return F.mse_loss(student.float(), teacher.float())


def feature_loss(students: Sequence[torch.Tensor],
                 teachers: Sequence[torch.Tensor]) -> torch.Tensor:
    """Mean over pairs of ``‖s − t‖² / (‖t‖² + ε)`` (``s`` already projected to ``t``'s width)."""
    if not students:
        raise ValueError("feature_loss needs at least one pair")
    terms = []
    for s, t in zip(students, teachers):
        t = t.float()
        terms.append((s.float() - t).pow(2).sum() / (t.pow(2).sum() + _EPS))
    return torch.stack(terms).mean()


def pool_samples(x: torch.Tensor) -> torch.Tensor:
    """One vector per sample: ``[B, D]`` as is, ``[B, ..., D]`` averaged over the middle axes."""
    if x.dim() < 2:
        raise ValueError(f"relation loss needs per-sample vectors [B, D], got shape "
                         f"{tuple(x.shape)}")
    return x.float() if x.dim() == 2 else x.float().mean(dim=tuple(range(1, x.dim() - 1)))


def similarity_matrix(embeddings: torch.Tensor) -> torch.Tensor:
    """``G = ê·êᵀ`` for row-normalised ``ê`` (pairwise cosine similarity, ``[B, B]``)."""
    unit = F.normalize(embeddings, dim=-1, eps=1e-8)
    return unit @ unit.T


def relation_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``mean((G_s − G_t)²)`` of the pairwise cosine-similarity matrices of the batch."""
    return F.mse_loss(similarity_matrix(pool_samples(student)),
                      similarity_matrix(pool_samples(teacher)))
