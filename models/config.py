"""``OmniConfig``: the typed description of one model; named sizes are data.

A size is an entry of :data:`MODEL_SIZES` (the one source: there are no YAML mirrors) plus
each encoder's ``presets[name]`` delta; ``OmniConfig.from_name("tiny", vocab_size=1024,
num_classes=10)`` returns it with overrides applied. Per-modality sizes live in
``OmniConfig.encoders[m]``, the section declared by the encoder's ``Config`` dataclass
(``models/encoders/<m>.py``). Every export carries its ``model_config.yaml`` so that
``OmniModel.from_pretrained(dir)`` rebuilds exactly the same model; exports written before
the sections existed (flat ``image_size: 32`` keys) still load: each encoder's
``legacy_keys`` maps them into its section.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.config import ConfigError, deep_merge, from_dict, read_yaml, save_yaml, to_dict
from common.modalities import MODALITIES, modality_names


def _encoders() -> dict[str, Any]:
    # Lazy: models.encoders imports this module (encoders take an OmniConfig).
    from models.encoders import ENCODERS

    return ENCODERS


@dataclass
class OmniConfig:
    """Hyper-parameters of an :class:`~models.model.OmniModel`.

    Attributes:
        name: Size name this config was derived from (informational).
        modalities: Modalities with an encoder branch; also the order of fusion gates.
        d_model: Width ``d`` of encoders, trunk, adapters and fusion.
        n_heads: Attention heads everywhere.
        mlp_ratio: Hidden width of dense MLPs (encoders, decoder) as a multiple of ``d``.
        encoder_layers: Transformer layers inside each modality encoder.
        trunk_layers: Layers of the shared sparse-MoE trunk.
        num_experts: Experts per MoE layer.
        top_k: Experts each token is routed to.
        expert_hidden: Hidden width of one expert MLP (0 = ``mlp_ratio * d_model``).
        capacity_factor: Expert capacity = ``ceil(cf * tokens * k / experts)`` when dropping.
        dropless: If True no token is ever dropped (capacity ignored).
        moe_impl: ``native`` (grouped index_select/index_add), ``deepspeed``
            (``deepspeed.moe.layer.MoE``, expert parallel) or ``dense`` (plain MLP with
            ``top_k * expert_hidden`` hidden units: same active parameters, for comparisons).
        ep_size: Expert-parallel group size for ``moe_impl=deepspeed``.
        aux_loss_weight: Weight of the load-balancing loss (used by ``objectives.MoEAuxLoss``).
        z_loss_weight: Weight of the router z-loss.
        adapter_ratio: Bottleneck width of the per-modality adapters relative to ``d``.
        fusion_heads: Heads of the cross-modal attention in fusion.
        embed_dim: Size ``E`` of the shared (contrastive) embedding space.
        init_temperature: Initial InfoNCE temperature (``logit_scale = log(1/T)``).
        max_logit_scale: Clamp of ``logit_scale.exp()``.
        decoder_layers: Layers of the any-modality -> text decoder (0 disables it).
        num_classes: Classes of the classification head (0 disables it).
        dropout: Dropout everywhere (0 for the CPU demo).
        vocab_size, pad_id, bos_id, eos_id, mask_id: Text vocabulary (INTERFACES §1).
        max_text_len: Longest text sequence (positions).
        encoders: Modality -> its encoder's section (the fields of ``ENCODERS[m].Config``:
            input sizes, patch sizes, stems). Filled with the section's defaults for every
            modality in ``modalities`` and validated by the section's ``__post_init__``;
            read it back typed with :meth:`encoder_section`.
        generation: The generation heads' section (fields of
            :class:`models.generation.GenerationConfig`: ``targets``, widths, sampling
            defaults); empty = no generation heads.
    """

    name: str = "custom"
    modalities: list[str] = field(default_factory=lambda: list(modality_names()))
    d_model: int = 64
    n_heads: int = 4
    mlp_ratio: float = 2.0
    encoder_layers: int = 1
    trunk_layers: int = 2
    num_experts: int = 4
    top_k: int = 2
    expert_hidden: int = 0
    capacity_factor: float = 1.25
    dropless: bool = True
    moe_impl: str = "native"
    ep_size: int = 1
    aux_loss_weight: float = 0.01
    z_loss_weight: float = 0.001
    adapter_ratio: float = 0.5
    fusion_heads: int = 4
    embed_dim: int = 64
    init_temperature: float = 0.07
    max_logit_scale: float = 100.0
    decoder_layers: int = 1
    num_classes: int = 0
    dropout: float = 0.0
    # text
    vocab_size: int = 1024
    pad_id: int = 0
    bos_id: int = 1
    eos_id: int = 2
    mask_id: int = 4
    max_text_len: int = 32
    encoders: dict[str, dict[str, Any]] = field(default_factory=dict)
    generation: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.modalities = list(self.modalities)
        unknown = [m for m in self.modalities if m not in MODALITIES]
        if unknown:
            raise ConfigError(f"unknown modalities {unknown}; known: {list(MODALITIES)}")
        if self.d_model % self.n_heads or self.d_model % self.fusion_heads:
            raise ConfigError(
                f"d_model={self.d_model} must be divisible by n_heads={self.n_heads} "
                f"and fusion_heads={self.fusion_heads}"
            )
        if not 1 <= self.top_k <= self.num_experts:
            raise ConfigError(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.moe_impl not in ("native", "deepspeed", "dense"):
            raise ConfigError(f"moe_impl must be native|deepspeed|dense, got {self.moe_impl!r}")
        if self.num_experts % max(self.ep_size, 1):
            raise ConfigError(f"num_experts={self.num_experts} not divisible by ep_size")
        if self.capacity_factor <= 0:
            raise ConfigError("capacity_factor must be > 0")
        bad = [m for m in self.encoders if m not in MODALITIES]
        if bad:
            raise ConfigError(f"encoders: unknown modalities {bad}; known: {list(MODALITIES)}")
        registry = _encoders()
        sections = {}
        for m in MODALITIES:  # table order; every modality of the model gets its section
            if m in self.encoders or m in self.modalities:
                data = self.encoders.get(m)
                # Resolved (every field) and validated by the section itself.
                known = m in registry or (isinstance(data, dict) and data.get("kind"))
                sections[m] = to_dict(self.encoder_section(m, data)) if known else (data or {})
        self.encoders = sections
        if self.generation:
            from models.generation import GenerationConfig

            gen = GenerationConfig.from_model(self)  # validated (unknown keys raise)
            missing = [t for t in gen.targets if t not in self.modalities]
            if missing:
                raise ConfigError(f"generation.targets {missing} not in modalities")
            towers = [t for t in gen.targets if self.encoders.get(t, {}).get("kind") == "hf"]
            if towers:
                raise ConfigError(
                    f"generation.targets {towers}: generation writes into a modality's own "
                    "featurized space; a pretrained tower's input space has no generator"
                )
            self.generation = to_dict(gen)

    @property
    def ffn_hidden(self) -> int:
        """Hidden width of one expert MLP."""
        return self.expert_hidden or int(self.mlp_ratio * self.d_model)

    def encoder_section(self, modality: str, data: dict[str, Any] | None = None) -> Any:
        """The validated ``ENCODERS[modality].Config`` of this model (defaults when the
        section is absent).

        Raises:
            ConfigError: No encoder is registered for ``modality``, or the section has an
                unknown key or a bad value (the message names the key).
        """
        from models.encoders import encoder_class

        data = self.encoders.get(modality, {}) if data is None else data
        try:
            cls = encoder_class(modality, data or {})
        except KeyError as e:
            raise ConfigError(str(e).strip("'\"")) from None
        data = dict(data or {})
        if "kind" not in {f.name for f in dataclasses.fields(cls.Config)}:
            data.pop("kind", None)  # ``kind: native`` on a native section
        return from_dict(cls.Config, data, where=f"OmniConfig.encoders.{modality}")

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> OmniConfig:
        """Named size (:data:`MODEL_SIZES` + every encoder's ``presets[name]``) plus keyword
        overrides: top-level fields, ``encoders={m: {...}}`` (deep-merged onto the presets)
        or legacy flat keys such as ``image_patch=4`` (unknown keys raise ``ConfigError``)."""
        if name not in MODEL_SIZES:
            raise ConfigError(f"unknown model size {name!r}; known: {sorted(MODEL_SIZES)}")
        presets = {m: dict(e.presets.get(name, {})) for m, e in _encoders().items()}
        data = deep_merge({**MODEL_SIZES[name], "encoders": presets}, upgrade_legacy(overrides))
        data.setdefault("name", name)
        mods = data.get("modalities") or modality_names()
        # Presets only for the modalities this model has (others stay out of its YAML).
        extra = set(upgrade_legacy(overrides).get("encoders") or {})
        data["encoders"] = {m: s for m, s in data["encoders"].items() if m in mods or m in extra}
        return from_dict(cls, data, where=f"OmniConfig[{name}]")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> OmniConfig:
        """Builds the config from a mapping (legacy flat per-modality keys are mapped)."""
        return from_dict(cls, upgrade_legacy(data), where="OmniConfig")

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: Any) -> OmniConfig:
        """Reads ``model_config.yaml`` (of this or an older version of OmniRay)."""
        data = deep_merge(upgrade_legacy(read_yaml(path)), upgrade_legacy(overrides))
        return from_dict(cls, data, where=str(path))

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    def save_yaml(self, path: str | Path) -> None:
        save_yaml(self, path)

    def replace(self, **changes: Any) -> OmniConfig:
        return dataclasses.replace(self, **changes)


def upgrade_legacy(data: dict[str, Any]) -> dict[str, Any]:
    """Maps the flat per-modality keys of old ``model_config.yaml`` exports
    (``image_size``, ``audio_patch``, ...) into ``encoders[m]`` sections through each
    encoder's ``legacy_keys``; every other key is left as is (unknown ones then fail).
    Derived keys an old export may carry that no section keeps are dropped."""
    fields = {f.name for f in dataclasses.fields(OmniConfig)}
    out: dict[str, Any] = {}
    moved: dict[str, dict[str, Any]] = {}
    legacy = {
        old: (m, new) for m, enc in _encoders().items() for old, new in enc.legacy_keys.items()
    }
    for k, v in data.items():
        if k in fields or k not in legacy:
            out[k] = v
            continue
        m, new = legacy[k]
        if new is not None:
            moved.setdefault(m, {})[new] = v
    if moved:
        # Explicit sections win over legacy keys of the same field.
        out["encoders"] = deep_merge(moved, dict(out.get("encoders") or {}))
    return out


#: Named sizes: the one source (litgpt style). Per-modality deltas of a size (e.g. ``base``'s
#: smaller patches) live in each encoder's ``presets``; ``python -m models.sizes`` prints them.
MODEL_SIZES: dict[str, dict[str, Any]] = {
    # Tests: < 2M parameters, forward+backward of a batch of 8 well under a second on CPU.
    "tiny": dict(
        d_model=64,
        n_heads=4,
        mlp_ratio=2.0,
        encoder_layers=1,
        trunk_layers=2,
        num_experts=4,
        top_k=2,
        expert_hidden=128,
        embed_dim=64,
        decoder_layers=1,
        fusion_heads=4,
    ),
    # The CPU demo: three short stages in ~12 min on 2 cores.
    "small": dict(
        d_model=128,
        n_heads=4,
        mlp_ratio=2.0,
        encoder_layers=1,
        trunk_layers=3,
        num_experts=8,
        top_k=2,
        expert_hidden=256,
        embed_dim=128,
        decoder_layers=1,
        fusion_heads=4,
    ),
    # GPU: d=768, 12 MoE trunk layers with 8 experts.
    "base": dict(
        d_model=768,
        n_heads=12,
        mlp_ratio=4.0,
        encoder_layers=2,
        trunk_layers=12,
        num_experts=8,
        top_k=2,
        expert_hidden=3072,
        embed_dim=512,
        decoder_layers=2,
        fusion_heads=12,
    ),
}
