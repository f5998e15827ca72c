"""The loss library (pure math over tensors, no training loop, no ``torch.distributed``).

Every loss training uses lives here; ``jobs.training.stage`` only chooses which of them a
stage combines, with which weights. Each returns a scalar and, when it has nothing to score,
a zero still attached to its inputs (so every worker's graph covers the same parameters).

* :func:`info_nce`: symmetric InfoNCE, local queries vs keys gathered by an injected
  ``gather`` (cross-worker negatives), optional label positives.
* :func:`recon_loss`: masked reconstruction (CE tokens, MSE patches with optional
  ``norm_pix_targets``, Chamfer points).
* :func:`caption_loss`: teacher-forced modality -> text cross-entropy ignoring padding.
* :func:`masked_cross_entropy`: classification over selected rows.
* :func:`moe_aux_terms`: weighted MoE balance and z losses.
* :func:`flow_matching_loss`: conditional flow matching of the generation heads.
"""

from __future__ import annotations

from models.objectives.captioning import caption_loss
from models.objectives.classification import masked_cross_entropy
from models.objectives.contrastive import IGNORE_INDEX, GatherFn, info_nce
from models.objectives.generation import flow_matching_loss
from models.objectives.moe_aux import moe_aux_terms
from models.objectives.reconstruction import chamfer_distance, normalize_patches, recon_loss

__all__ = [
    "IGNORE_INDEX",
    "GatherFn",
    "caption_loss",
    "chamfer_distance",
    "flow_matching_loss",
    "info_nce",
    "masked_cross_entropy",
    "moe_aux_terms",
    "normalize_patches",
    "recon_loss",
]
