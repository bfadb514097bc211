"""L1: concepts as directions in a layer's activation space (paper 001): CAV fitting, pooling
and alignment (``cav``), latent gradients and the TCAV score (``gradients``).
"""

from __future__ import annotations

from hansgate.concepts.cav import (
    CAV_KINDS,
    POOLINGS,
    REGULARIZATION_GRID,
    ConceptActivationVector,
    activation_change,
    default_concept_layer,
    layer_activations,
    lift_cav,
    mean_alignment,
    pool_channels,
    pool_gradient,
    pooled_activations,
    sample_alignment,
    signal_cav,
)
from hansgate.concepts.gradients import (
    directional_derivatives,
    latent_gradients,
    tcav_score,
)

__all__ = [
    "CAV_KINDS",
    "POOLINGS",
    "REGULARIZATION_GRID",
    "pool_channels",
    "lift_cav",
    "pool_gradient",
    "default_concept_layer",
    "layer_activations",
    "pooled_activations",
    "activation_change",
    "signal_cav",
    "sample_alignment",
    "mean_alignment",
    "ConceptActivationVector",
    "latent_gradients",
    "directional_derivatives",
    "tcav_score",
]
