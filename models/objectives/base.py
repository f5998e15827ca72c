"""Objective protocol: an ``nn.Module`` computing named losses from a model output.

Every objective declares

* ``batch_keys``: batch entries it reads (``{m}`` stands for every modality);
* ``model_kwargs``: keyword arguments the model forward needs for it (e.g.
  ``{"mask_ratio": 0.5}`` or ``{"caption": True}``);

and returns a dict with ``"loss"`` (the tensor to optimize, weight applied) plus detached
components for logging. :class:`CompositeObjective` sums several of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from models.model import OmniOutput


def zero_loss(out: OmniOutput) -> torch.Tensor:
    """A 0 that is still attached to the graph (keeps DDP/DeepSpeed happy)."""
    if out.logit_scale is not None:
        return out.logit_scale * 0.0
    return torch.zeros(())


def present_of(out: OmniOutput, batch: Mapping[str, Any], m: str) -> torch.Tensor:
    """``(B,)`` bool rows that have modality ``m``."""
    if m in out.present:
        return out.present[m]
    p = batch.get(f"{m}_present")
    if p is None:
        return torch.ones(batch[m].shape[0], dtype=torch.bool, device=batch[m].device)
    return p.bool()


class Objective(nn.Module):
    """Base class (see module docstring)."""

    name: str = "objective"
    batch_keys: tuple[str, ...] = ()

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = float(weight)
        self.model_kwargs: dict[str, Any] = {}

    def forward(self, out: OmniOutput, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _result(self, out: OmniOutput, parts: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Mean of the component losses, weighted; components detached for logging."""
        if parts:
            total = torch.stack(list(parts.values())).mean()
        else:
            total = zero_loss(out)
        res = {"loss": self.weight * total, self.name: total.detach()}
        res.update({k: v.detach() for k, v in parts.items()})
        return res


class CompositeObjective(Objective):
    """Sum of objectives; ``loss = sum_i loss_i`` (each already weighted)."""

    name = "total"

    def __init__(self, objectives: Sequence[Objective]) -> None:
        super().__init__()
        self.objectives = nn.ModuleList(objectives)
        keys: list[str] = []
        for o in objectives:
            keys += [k for k in o.batch_keys if k not in keys]
            for k, v in o.model_kwargs.items():
                if k in self.model_kwargs and self.model_kwargs[k] != v:
                    raise ValueError(f"objectives disagree on model kwarg {k!r}")
                self.model_kwargs[k] = v
        self.batch_keys = tuple(keys)

    def forward(self, out: OmniOutput, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]:
        res: dict[str, torch.Tensor] = {}
        total = zero_loss(out)
        for o in self.objectives:
            r = o(out, batch)
            total = total + r.pop("loss")
            res.update(r)
        res["loss"] = total
        return res
