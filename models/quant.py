"""INT8 dynamic quantization for CPU inference.

``quantize_int8(model)`` returns a copy whose ``nn.Linear`` layers (attention
projections, every MoE expert, adapters, heads) hold int8 weights with activations
quantized on the fly. Router weights are plain parameters and stay fp32, so routing is
computed in full precision. Quantized models are for inference only and are not saved
(save the fp32 model; quantize after loading).
"""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn


def quantize_int8(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Dynamic INT8 quantization of every ``nn.Linear`` (CPU).

    Args:
        model: An fp32 model (e.g. :class:`~models.model.OmniModel`).
        inplace: Quantize ``model`` itself instead of a deep copy.

    Returns:
        The quantized model in eval mode.
    """
    target = model if inplace else copy.deepcopy(model)
    target = target.to("cpu").eval()
    if "x86" in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = "x86"
    with warnings.catch_warnings():
        # torch.ao.quantization's eager API is deprecated in favour of torchao, which is
        # not in the pinned stack; it still works on this torch version.
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(target, {nn.Linear}, dtype=torch.qint8, inplace=True)


def count_quantized_linears(model: nn.Module) -> tuple[int, int]:
    """``(quantized, remaining fp32 nn.Linear)`` module counts."""
    from torch.ao.nn.quantized.dynamic import Linear as QLinear

    q = sum(isinstance(m, QLinear) for m in model.modules())
    f = sum(type(m) is nn.Linear for m in model.modules())
    return q, f
