"""OmniRay models: one encoder per declared modality, a shared sparse-MoE trunk, gated fusion, heads.

Pure PyTorch (never imports ``ray`` or ``pipelines``)::

    from models import OmniConfig, build_model
    cfg = OmniConfig.from_name("tiny", vocab_size=1024, num_classes=10)
    model = build_model(cfg)
    out = model(collate(samples))
"""

from models.config import MODEL_SIZES, OmniConfig
from models.encoders import ENCODERS, build_encoder, register_encoder
from models.model import (
    PARTS,
    ModalityFeatures,
    OmniModel,
    OmniOutput,
    ReconOutput,
    build_model,
)

__all__ = [
    "ENCODERS",
    "MODEL_SIZES",
    "PARTS",
    "ModalityFeatures",
    "OmniConfig",
    "OmniModel",
    "OmniOutput",
    "ReconOutput",
    "build_encoder",
    "build_model",
    "register_encoder",
]
