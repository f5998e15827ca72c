"""Point-cloud encoder: farthest-point grouping + a mini PointNet per group (Point-MAE)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from common.config import ConfigError
from models.config import OmniConfig
from models.encoders import register_encoder
from models.encoders.base import ModalityEncoder, Tokenized
from models.generation import GenSpace, register_space


@torch.no_grad()
def farthest_point_sample(
    xyz: torch.Tensor, n: int, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Farthest-point sampling, vectorized over the batch (loop over the ``n`` centres).

    Args:
        xyz: ``(B, N, 3)`` coordinates.
        n: Number of centres.
        valid: ``(B, N)`` bool, padded points are never chosen (optional).

    Returns:
        ``(B, n)`` int64 indices; deterministic (starts from the first valid point).
    """
    b, num, _ = xyz.shape
    dist = torch.full((b, num), float("inf"), device=xyz.device)
    if valid is not None:
        dist = dist.masked_fill(~valid, -1.0)
        far = valid.to(torch.int8).argmax(1)
    else:
        far = torch.zeros(b, dtype=torch.long, device=xyz.device)
    idx = torch.empty(b, n, dtype=torch.long, device=xyz.device)
    rows = torch.arange(b, device=xyz.device)
    for i in range(n):
        idx[:, i] = far
        centre = xyz[rows, far]  # (B, 3)
        d = ((xyz - centre[:, None]) ** 2).sum(-1)  # (B, N)
        dist = torch.where(dist < 0, dist, torch.minimum(dist, d))
        far = dist.argmax(1)
    return idx


def group_points(
    points: torch.Tensor, n_groups: int, group_size: int, valid: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """FPS centres + k nearest neighbours.

    Args:
        points: ``(B, N, C)`` with xyz in the first 3 channels.
        n_groups: ``G`` centres.
        group_size: ``K`` neighbours per centre.
        valid: ``(B, N)`` bool mask of real points.

    Returns:
        ``groups (B, G, K, C)`` with xyz relative to the centre, and ``centres (B, G, 3)``.
    """
    xyz = points[..., :3]
    b = points.shape[0]
    with torch.no_grad():
        c_idx = farthest_point_sample(xyz, n_groups, valid)  # (B, G)
        rows = torch.arange(b, device=points.device)[:, None]
        centres = xyz[rows, c_idx]  # (B, G, 3)
        d = torch.cdist(centres, xyz)  # (B, G, N)
        if valid is not None:
            d = d.masked_fill(~valid[:, None, :], float("inf"))
        nn_idx = d.topk(group_size, dim=-1, largest=False).indices  # (B, G, K)
    groups = points[rows[..., None], nn_idx]  # (B, G, K, C)
    rel = groups[..., :3] - centres[:, :, None, :]
    return torch.cat([rel, groups[..., 3:]], -1), centres


@register_encoder("pointcloud")
class PointCloudEncoder(ModalityEncoder):
    """Tokens are FPS groups; positions are an MLP of the centre coordinates.

    Neighbour offsets are divided by the cloud's mean group radius, so the mini-PointNet
    sees local shape at unit scale whatever the density (raw offsets of a unit-scaled cloud
    are ~0.05: nearly invisible to a freshly initialized MLP).
    """

    @dataclass
    class Config:
        """Section ``encoders.pointcloud``.

        Attributes:
            points: Most points N per cloud.
            channels: Channels C (xyz first; 3, or 6 with normals or colours).
            groups: FPS centres G (tokens).
            group_size: Neighbours K per group.
        """

        points: int = 256
        channels: int = 3
        groups: int = 16
        group_size: int = 16

        def __post_init__(self) -> None:
            if self.channels < 3:
                raise ConfigError("channels must be >= 3 (xyz first)")
            if self.groups < 1 or self.group_size < 1:
                raise ConfigError("groups and group_size must be >= 1")

    presets = {"base": {"groups": 32, "group_size": 16}}
    legacy_keys = {
        "pointcloud_points": "points",
        "pointcloud_channels": "channels",
        "pointcloud_groups": "groups",
        "pointcloud_group_size": "group_size",
    }
    target_kind = "points"
    stem_names = ("point_mlp1", "point_mlp2", "pos_mlp")

    @classmethod
    def sizes_for(cls, max_shape: Sequence[int]) -> dict:
        return {"points": int(max_shape[0]), "channels": int(max_shape[1])}

    @classmethod
    def input_shape(cls, cfg: OmniConfig, section: Config) -> tuple[int, ...]:
        return (section.points, section.channels)

    @classmethod
    def random_item(cls, cfg: OmniConfig, section: Config, rng) -> np.ndarray:
        """Random points with xyz scaled into the unit cube (as the featurizer's are)."""
        p = rng.standard_normal(cls.input_shape(cfg, section))
        p[:, :3] /= np.abs(p[:, :3]).max()
        return p.astype(np.float16)

    def __init__(self, cfg: OmniConfig, section: Config | None = None) -> None:
        super().__init__(cfg, section)
        sec = self.section
        d = cfg.d_model
        self.channels = sec.channels
        self.n_groups = sec.groups
        self.group_size = sec.group_size
        self.target_dim = sec.group_size * 3
        # Two-stage PointNet (per-point MLP, max-pool, concat global, MLP, max-pool).
        self.point_mlp1 = nn.Sequential(nn.Linear(self.channels, d), nn.GELU(), nn.Linear(d, d))
        self.point_mlp2 = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, d))
        self.pos_mlp = nn.Sequential(nn.Linear(3, d), nn.GELU(), nn.Linear(d, d))

    def tokenize(self, batch: dict[str, torch.Tensor]) -> Tokenized:
        pts = self.input(batch)
        if pts.dim() != 3 or pts.shape[2] < self.channels:
            raise ValueError(
                f"pointcloud must be (B, N, C>={self.channels}), got {tuple(pts.shape)}"
            )
        if pts.shape[1] < self.group_size:
            raise ValueError(
                f"pointcloud has {pts.shape[1]} points, fewer than group size {self.group_size}"
            )
        pts = pts[..., : self.channels].to(torch.float32)
        valid = batch.get(f"{self.modality}_mask")
        groups, centres = group_points(
            pts, self.n_groups, self.group_size, None if valid is None else valid.bool()
        )
        rel = groups[..., :3]
        radius = rel.norm(dim=-1).amax(-1).mean(1).clamp_min(1e-6)  # (B,) mean group radius
        groups = torch.cat([rel / radius[:, None, None, None], groups[..., 3:]], -1)
        f = self.point_mlp1(self.as_params(groups))  # (B, G, K, d)
        g = f.max(2, keepdim=True).values.expand_as(f)
        f = self.point_mlp2(torch.cat([f, g], -1)).max(2).values  # (B, G, d)
        mask = torch.ones(f.shape[:2], dtype=torch.bool, device=pts.device)
        targets = groups[..., :3].reshape(*groups.shape[:2], -1)  # (B, G, K*3)
        return Tokenized(x=f, pos=self.pos_mlp(self.as_params(centres)), mask=mask, targets=targets)


@register_space("pointcloud")
class PointSpace(GenSpace):
    """Generation space of a point cloud: (N, C) centred, unit-sphere points; xyz generated
    as a *set* by a per-point velocity net (points are i.i.d. draws from the shape's surface
    density given the condition, so point order never matters); extra channels are 0.
    Evaluated from text by default."""

    kind = "set"
    eval_sources = ("text",)
    plot_projection = "3d"

    @classmethod
    def for_model(cls, cfg, gen, modality):
        from models.encoders import ENCODERS

        n, c = ENCODERS[modality].input_shape(cfg, cfg.encoder_section(modality))
        space = cls((n, 3))
        space.channels = int(c)
        return space

    def from_batch(self, x, mask):
        z = x.float()[..., :3]
        w = torch.ones_like(z)
        if mask is not None:
            w = w * mask.float()[..., None]
        n = self.shape[0]
        if z.shape[1] < n:  # padded batches: pad rows carry no weight
            pad = n - z.shape[1]
            z = torch.cat([z, z.new_zeros(z.shape[0], pad, 3)], 1)
            w = torch.cat([w, w.new_zeros(w.shape[0], pad, 3)], 1)
        return z[:, :n], w[:, :n]

    def to_item(self, z):
        z = z.float()
        c = getattr(self, "channels", 3)
        if c > 3:
            z = torch.cat([z, z.new_zeros(z.shape[0], c - 3)], 1)
        return z.cpu().numpy().astype(np.float16)

    def probe_features(self, items):
        """An order-free 6x6x6 occupancy histogram of the xyz points in [-1, 1]^3."""
        out = []
        for x in items:
            p = np.asarray(x, np.float32)[:, :3]
            h, _ = np.histogramdd(p, bins=(6, 6, 6), range=[(-1, 1)] * 3)
            out.append(h.ravel() / max(len(p), 1))
        return np.stack(out).astype(np.float32)

    def plot(self, ax, item):
        x = np.asarray(item, np.float32)
        ax.scatter(x[:, 0], x[:, 1], x[:, 2], s=1)
        ax.view_init(elev=90, azim=-90)
        ax.set_zticks([])
