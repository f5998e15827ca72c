"""Generation heads: any modality (or the fused sample) -> image, audio, signal, point cloud.

Each target modality gets a :class:`FlowGenerator`: a small velocity network trained with
**conditional flow matching** (rectified-flow / OT paths, Lipman et al. 2023) in that
modality's *featurized* space, conditioned on an L2-normalized vector of the shared space:
the embedding of any other modality of the sample, or the gated fusion's output.

Why flow matching, not a regression head: a decoder trained with MSE to map "seven" to an
image learns the conditional mean, i.e. one blurred average 7 for every prompt and every seed.
Flow matching learns the whole conditional distribution with the same plain MSE objective
(no adversary, no perceptual network to ship), samples are distinct per seed, and the
straight OT paths need only a handful of Euler/Heun steps, which keeps CPU sampling in the
milliseconds for the demo's sizes. Classifier-free guidance (the condition is dropped with
probability ``cond_dropout`` during training, sampling mixes conditional and unconditional
velocities) sharpens the class identity.

Because the condition lives in the shared space, one head per *target* serves every input
modality: text -> image and spoken audio -> image use the same image head.

A target's featurized form maps to the flow's data space through a :class:`GenSpace`,
registered per modality with :func:`register_space` in that modality's encoder module
(``models/encoders/<modality>.py``): its data-space shape, ``vector`` (one MLP velocity net
over the flat item) or ``set`` (a per-point velocity net: rows are i.i.d. draws, so their
order never matters), the conversions to and from the featurized form, and what the
generation evaluation reads of it (classifier features, a grid cell, default sources).
This module names no modality; a new modality brings its own space.

Sampling is seeded (``torch.Generator``): the same condition, seed and steps give the same
samples on any batch composition.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from common.config import ConfigError, from_dict


@dataclass
class GenerationConfig:
    """The generation section of :class:`~models.config.OmniConfig` (``generation:``).

    Attributes:
        targets: Modalities with a generation head (each needs a registered
            :class:`GenSpace` and an encoder branch). Empty: no heads (old exports).
        hidden: Width of the vector velocity networks.
        blocks: Residual FiLM blocks of every velocity network.
        point_hidden: Width of the per-point velocity network.
        cond_dropout: Probability that a training condition is replaced by the learned null
            condition (classifier-free guidance).
        guidance: Default guidance scale at sampling (1 = no guidance).
        steps: Default number of ODE steps at sampling.
        solver: ``heun`` (2 evaluations per step) or ``euler``.
        detach_condition: The translation loss does not back-propagate into the encoders
            (the heads read the shared space as the contrastive terms shape it).
        repeats: Noise/time draws per (row, condition) per step.
        signal_channels: Channels of a generated signal.
        train_points: Points per cloud scored in one training draw of a ``set`` target
            (a random subset: the points are i.i.d. given the condition, so the subset is an
            unbiased estimate of the full loss at a fraction of the per-point net's cost).
        scale_condition: The velocity nets read the condition times ``sqrt(E)`` (entries of
            unit RMS, like the time embedding's) instead of the unit-norm vector, whose
            entries (~1/sqrt(E)) are swamped by the time embedding's. False in exports made
            before it (they were trained without it).
    """

    targets: list[str] = field(default_factory=list)
    hidden: int = 512
    blocks: int = 3
    point_hidden: int = 64
    cond_dropout: float = 0.1
    guidance: float = 2.0
    steps: int = 8
    solver: str = "heun"
    detach_condition: bool = True
    repeats: int = 2
    signal_channels: int = 3
    train_points: int = 64
    scale_condition: bool = False

    def __post_init__(self) -> None:
        self.targets = list(dict.fromkeys(self.targets))
        unknown = [t for t in self.targets if t not in SPACES]
        if unknown:
            raise ConfigError(
                f"generation.targets {unknown} have no generation space; known: {sorted(SPACES)}"
            )
        if self.solver not in ("heun", "euler"):
            raise ConfigError(f"generation.solver must be heun|euler, got {self.solver!r}")
        if not 0.0 <= self.cond_dropout < 1.0:
            raise ConfigError("generation.cond_dropout must be in [0, 1)")
        for name in (
            "hidden",
            "blocks",
            "point_hidden",
            "steps",
            "repeats",
            "signal_channels",
            "train_points",
        ):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"generation.{name} must be >= 1")

    @classmethod
    def from_model(cls, cfg: Any) -> GenerationConfig:
        """The typed section of an ``OmniConfig`` (defaults when it has none)."""
        return from_dict(cls, dict(getattr(cfg, "generation", None) or {}), where="generation")


# ---------------------------------------------------------------------------- spaces
class GenSpace:
    """Featurized form of one modality <-> the flow's float data space.

    Attributes:
        shape: Data-space shape of one item.
        kind: ``vector`` (one MLP over the flat item) or ``set`` (rows are i.i.d. points).
        modality: The modality it is registered for (set by :func:`register_space`).
        eval_sources: Source modalities whose translation into this one the generation
            evaluation scores by default (``jobs.evaluation.generation``).
        plot_projection: matplotlib projection of a grid cell (``None``: 2-D axes).
    """

    kind: str = "vector"
    modality: str = ""
    eval_sources: tuple[str, ...] = ()
    plot_projection: str | None = None

    def __init__(self, shape: Sequence[int]) -> None:
        self.shape = tuple(int(s) for s in shape)

    @classmethod
    def for_model(cls, cfg: Any, gen: GenerationConfig, modality: str) -> GenSpace:
        from models.encoders import ENCODERS

        enc = ENCODERS[modality]
        return cls(enc.input_shape(cfg, cfg.encoder_section(modality)))

    def from_batch(
        self, x: torch.Tensor, mask: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Collated ``batch[m]`` (and ``batch[m_mask]``) -> ``(z, w)``, both ``(B, *shape)``
        float32: data-space items and per-element loss weights."""
        raise NotImplementedError

    def to_item(self, z: torch.Tensor) -> np.ndarray:
        """One data-space sample ``shape`` -> the featurized form (the record's dtype)."""
        raise NotImplementedError

    def probe_features(self, items: Sequence[np.ndarray]) -> np.ndarray:
        """Float32 features of featurized items from which the generation evaluation's
        independent classifiers read the concept (``jobs.evaluation.generation``):

        * ``(N, D)``: read by a standardized logistic regression;
        * ``(N, C, L)``: a sequence (C channels at L positions) where the concept may sit
          anywhere along L, read by a small shift-invariant 1-D CNN (global max pooling).

        Default: the data-space form (:meth:`from_batch` of the collated items), flattened.
        """
        from models.data import collate

        m = self.modality
        feats = []
        for i in range(0, len(items), 256):
            b = collate([{m: x} for x in items[i : i + 256]], modalities=(m,))
            z, _ = self.from_batch(b[m], b.get(f"{m}_mask"))
            feats.append(z.flatten(1).numpy())
        return np.concatenate(feats).astype(np.float32)

    def plot(self, ax: Any, item: np.ndarray) -> None:
        """Draws one featurized item into a matplotlib axes (a cell of a sample grid)."""
        raise NotImplementedError(f"{type(self).__name__}.plot")


#: modality -> its :class:`GenSpace` class. Filled when ``models.encoders`` is imported
#: (each encoder module registers its modality's space), which importing ``models`` does.
SPACES: dict[str, type[GenSpace]] = {}


def register_space(name: str) -> Callable[[type[GenSpace]], type[GenSpace]]:
    """Class decorator: the :class:`GenSpace` of modality ``name`` (a declared modality)."""

    def deco(cls: type[GenSpace]) -> type[GenSpace]:
        from common.modalities import check_registered

        check_registered("register_space", name)
        cls.modality = name
        SPACES[name] = cls
        return cls

    return deco


def generation_targets() -> list[str]:
    """Every modality with a generation space, in the modality table's order."""
    from common.modalities import modality_names

    return [m for m in modality_names() if m in SPACES]


def default_directions(targets: Sequence[str]) -> list[tuple[str, str]]:
    """``(source, target)`` pairs the evaluation scores by default: each target's
    :attr:`GenSpace.eval_sources`, targets in the given order."""
    return [(s, t) for t in targets if t in SPACES for s in SPACES[t].eval_sources]


# ---------------------------------------------------------------------------- networks
def time_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of ``t`` in [0, 1]: ``(B,)`` -> ``(B, dim)``."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=t.device) / half)
    ang = 1000.0 * t.float()[:, None] * freqs[None]  # (B, half)
    return torch.cat([ang.sin(), ang.cos()], -1)


class FiLMBlock(nn.Module):
    """Pre-norm residual MLP block modulated by the (time, condition) vector."""

    def __init__(self, width: int, ctx: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.film = nn.Linear(ctx, 2 * width)
        self.mlp = nn.Sequential(
            nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, width)
        )
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(c).chunk(2, -1)
        if h.dim() == 3:  # (B, N, W) points share their row's modulation
            scale, shift = scale[:, None], shift[:, None]
        return h + self.mlp(self.norm(h) * (1 + scale) + shift)


class VelocityNet(nn.Module):
    """``v(x_t, t, cond)``: ``(B, D)`` or ``(B, N, D)`` data, ``(B,)`` time, ``(B, E)``
    condition -> velocity of the same shape as the data."""

    def __init__(
        self, data_dim: int, embed_dim: int, width: int, blocks: int, cond_gain: float = 1.0
    ) -> None:
        super().__init__()
        ctx = width
        self.cond_gain = float(cond_gain)
        self.t_dim = 64
        self.t_mlp = nn.Sequential(nn.Linear(self.t_dim, ctx), nn.SiLU(), nn.Linear(ctx, ctx))
        self.c_mlp = nn.Sequential(nn.Linear(embed_dim, ctx), nn.SiLU(), nn.Linear(ctx, ctx))
        self.inp = nn.Linear(data_dim, width)
        self.cond_in = nn.Linear(ctx, width)
        self.blocks = nn.ModuleList(FiLMBlock(width, ctx) for _ in range(blocks))
        self.out_norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, data_dim)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        temb = time_embedding(t, self.t_dim).to(cond.dtype)
        c = F.silu(self.t_mlp(temb) + self.c_mlp(cond * self.cond_gain))  # (B, ctx)
        h = self.inp(x)
        bias = self.cond_in(c)
        h = h + (bias[:, None] if h.dim() == 3 else bias)
        for blk in self.blocks:
            h = blk(h, c)
        return self.out(self.out_norm(h))


@dataclass
class FlowOutput:
    """Flow-matching predictions of one target (scored by
    :func:`models.objectives.flow_matching_loss`).

    Attributes:
        pred: ``(R, *shape)`` predicted velocities.
        target: ``(R, *shape)`` ``x1 - x0``.
        weight: ``(R, *shape)`` per-element loss weights.
        valid: ``(R,)`` bool rows to score (target and condition both present).
    """

    pred: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor
    valid: torch.Tensor


class FlowGenerator(nn.Module):
    """Conditional flow-matching head of one target modality.

    Args:
        space: The target's :class:`GenSpace`.
        embed_dim: Size ``E`` of the conditioning (shared-space) vectors.
        gen: The generation config.
    """

    def __init__(self, space: GenSpace, embed_dim: int, gen: GenerationConfig) -> None:
        super().__init__()
        self.space = space
        self.gen = gen
        gain = math.sqrt(embed_dim) if gen.scale_condition else 1.0
        if space.kind == "set":
            self.net = VelocityNet(space.shape[-1], embed_dim, gen.point_hidden, gen.blocks, gain)
        else:
            d = int(np.prod(space.shape))
            self.net = VelocityNet(d, embed_dim, gen.hidden, gen.blocks, gain)
        # Learned "no condition" vector for classifier-free guidance.
        self.null_cond = nn.Parameter(torch.zeros(embed_dim))

    def _flat(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.space.kind == "set" else x.flatten(1)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """``(B, *shape)`` -> ``(B, *shape)`` velocity (in ``x``'s dtype; the net runs in
        its parameters' dtype, e.g. bf16 under DeepSpeed's bf16 mode)."""
        dt = self.null_cond.dtype
        v = self.net(self._flat(x).to(dt), t, cond.to(dt))
        return v.reshape(x.shape).to(x.dtype)

    def flow_output(
        self, x1: torch.Tensor, weight: torch.Tensor, cond: torch.Tensor, valid: torch.Tensor
    ) -> FlowOutput:
        """One training draw: noise, time, interpolation, predicted vs target velocity.

        Args:
            x1: ``(R, *shape)`` data. weight: ``(R, *shape)``. cond: ``(R, E)``.
            valid: ``(R,)`` bool rows to score.
        """
        if self.space.kind == "set" and x1.shape[1] > self.gen.train_points:
            keep = torch.randperm(x1.shape[1], device=x1.device)[: self.gen.train_points]
            x1, weight = x1[:, keep], weight[:, keep]
        r = x1.shape[0]
        x0 = torch.randn_like(x1)
        t = torch.rand(r, device=x1.device)
        tb = t.view(r, *([1] * (x1.dim() - 1)))
        xt = (1 - tb) * x0 + tb * x1
        if self.training and self.gen.cond_dropout > 0:
            drop = torch.rand(r, device=x1.device) < self.gen.cond_dropout
            null = self.null_cond.to(cond.dtype).expand_as(cond)
            cond = torch.where(drop[:, None], null, cond)
        pred = self.velocity(xt, t, cond)
        return FlowOutput(pred=pred, target=x1 - x0, weight=weight, valid=valid)

    @torch.no_grad()
    def sample(
        self,
        cond: torch.Tensor,
        seeds: Sequence[int],
        *,
        steps: int | None = None,
        guidance: float | None = None,
        solver: str | None = None,
    ) -> torch.Tensor:
        """Integrates the flow from seeded noise (t=0) to data (t=1).

        Args:
            cond: ``(B, E)`` conditions, one per sample.
            seeds: ``B`` seeds: sample ``i``'s noise is drawn from ``seeds[i]`` alone, so it
                does not depend on what it is batched with.
            steps: ODE steps (default ``gen.steps``). guidance: CFG scale (default
                ``gen.guidance``). solver: ``heun`` or ``euler`` (default ``gen.solver``).

        Returns:
            ``(B, *shape)`` data-space samples.
        """
        steps = int(steps or self.gen.steps)
        g = float(self.gen.guidance if guidance is None else guidance)
        solver = solver or self.gen.solver
        if len(seeds) != cond.shape[0]:
            raise ValueError(f"{len(seeds)} seeds for {cond.shape[0]} conditions")
        dev = cond.device
        x = torch.stack(
            [
                torch.randn(self.space.shape, generator=torch.Generator().manual_seed(int(s)))
                for s in seeds
            ]
        ).to(dev)
        cond = cond.float()
        null = self.null_cond.float().expand_as(cond)

        def v(xx: torch.Tensor, tt: float) -> torch.Tensor:
            t = torch.full((xx.shape[0],), tt, device=dev)
            if g == 1.0:
                return self.velocity(xx, t, cond)
            both = self.velocity(torch.cat([xx, xx]), torch.cat([t, t]), torch.cat([cond, null]))
            vc, vu = both.chunk(2)
            return vu + g * (vc - vu)

        ts = torch.linspace(0.0, 1.0, steps + 1).tolist()
        for a, b in zip(ts[:-1], ts[1:], strict=True):
            h = b - a
            k1 = v(x, a)
            if solver == "euler":
                x = x + h * k1
            else:
                x_e = x + h * k1
                x = x + 0.5 * h * (k1 + v(x_e, b))
        return x

    def to_items(self, samples: torch.Tensor) -> list[np.ndarray]:
        """``(B, *shape)`` samples -> featurized items."""
        return [self.space.to_item(s) for s in samples]


def build_generators(cfg: Any, modalities: Sequence[str]) -> dict[str, FlowGenerator]:
    """One :class:`FlowGenerator` per ``generation.targets`` entry among ``modalities``."""
    gen = GenerationConfig.from_model(cfg)
    out = {}
    for m in gen.targets:
        if m in modalities:
            space = SPACES[m].for_model(cfg, gen, m)
            out[m] = FlowGenerator(space, cfg.embed_dim, gen)
    return out


def flow_terms(
    generators: dict[str, FlowGenerator],
    batch: dict[str, Any],
    conditions: dict[str, tuple[torch.Tensor, torch.Tensor]],
    *,
    detach: bool,
    repeats: int,
) -> dict[str, FlowOutput]:
    """The translation draws of one training batch.

    Every target ``m`` in ``batch`` is generated from every condition source ``s != m``
    (another modality's embedding, or ``"fused"``), ``repeats`` noise draws each; rows
    where the target or the source is absent are carried with ``valid=False`` so that every
    worker runs the same modules.

    Args:
        generators: ``{target: FlowGenerator}``.
        batch: Collated batch.
        conditions: ``{source: (cond (B, E), present (B,))}``.

    Returns:
        ``{target: FlowOutput}``.
    """
    outs: dict[str, FlowOutput] = {}
    for m, head in generators.items():
        if m not in batch or batch[m] is None:
            continue
        srcs = [s for s in conditions if s != m]
        if not srcs:
            continue
        x, w = head.space.from_batch(batch[m], batch.get(f"{m}_mask"))
        present = batch.get(f"{m}_present")
        present = (
            torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
            if present is None
            else present.bool().to(x.device)
        )
        xs, ws, cs, vs = [], [], [], []
        for s in srcs:
            c, p = conditions[s]
            c = c.detach() if detach else c
            for _ in range(repeats):
                xs.append(x)
                ws.append(w)
                cs.append(c)
                vs.append(present & p.bool().to(x.device))
        outs[m] = head.flow_output(torch.cat(xs), torch.cat(ws), torch.cat(cs), torch.cat(vs))
    return outs
