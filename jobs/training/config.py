"""Typed training config (YAML mirror: ``configs/train/*.yaml``).

Launch: ``python -m jobs.train --config configs/train/tiny.yaml [key=value ...] [--stages all]``.
Every field below can be overridden on the command line with a dotted key, e.g.
``pretrain.steps=20 scaling.num_workers=1 deepspeed.zero_stage=3``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from common.config import ConfigError, load_config

STAGES: tuple[str, ...] = ("pretrain", "align", "finetune")
FREEZE_CHOICES: tuple[str, ...] = ("none", "encoders", "top_k", "connectors")
CLASS_WEIGHTING: tuple[str, ...] = ("none", "balanced")
SAMPLING: tuple[str, ...] = ("uniform", "balanced")


@dataclass
class ScalingSection:
    """Ray Train ``ScalingConfig`` fields.

    Attributes:
        num_workers: Data-parallel training workers (one DeepSpeed rank each).
        use_gpu: One GPU per worker, NCCL + bf16 (else gloo + fp32 on CPU).
        cpus_per_worker: CPUs reserved per worker. Leave at least one CPU of the cluster
            unreserved for Ray Data's read tasks (e.g. 0.5 with 2 workers on 2 cores), or the
            shard reading waits forever for a CPU.
        gpus_per_worker: GPUs per worker when ``use_gpu``.
        placement_strategy: Ray placement group strategy (``PACK``, ``SPREAD``, ...).
    """

    num_workers: int = 2
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0
    placement_strategy: str = "PACK"

    def __post_init__(self) -> None:
        if self.num_workers < 1:
            raise ValueError(f"scaling.num_workers must be >= 1, got {self.num_workers}")


@dataclass
class DataSection:
    """Where the shards are and how batches are formed.

    Attributes:
        shards_dir: Output dir of ``jobs.prepare`` (Contract 2), relative to CWD or absolute/URI.
        batch_size: Micro-batch size per worker (DeepSpeed ``train_micro_batch_size_per_gpu``).
        cache: Keep this rank's rows in worker memory after the first streamed epoch (small
            corpora: avoids re-launching a Ray Data execution every epoch).
        shuffle: Shuffle rows every epoch (seeded: ``seed + epoch``).
        modalities: Modalities to train on; ``None`` = every modality the shards hold.
    """

    shards_dir: str = "data/omnidigits/shards"
    batch_size: int = 8
    cache: bool = True
    shuffle: bool = True
    modalities: list[str] | None = None

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")


@dataclass
class DeepSpeedSection:
    """DeepSpeed settings; the base JSON-like config is a YAML in ``configs/deepspeed/``.

    Attributes:
        config: Path of the base DeepSpeed YAML (``{zero_stage}`` is substituted).
        zero_stage: ZeRO stage 0, 1, 2 or 3 (overrides the YAML's
            ``zero_optimization.stage``). 0 = plain data parallelism (every rank holds the
            whole optimizer state): nothing to partition with one worker, and it skips
            ZeRO's flat-buffer copies, so it is the fastest choice for single-worker runs.
        moe_impl: ``"native"`` (the model's own MoE) or ``"deepspeed"`` (DeepSpeed MoE layers
            with expert parallelism; ZeRO-1/2 only).
        ep_size: Expert-parallel group size for ``moe_impl=deepspeed``.
    """

    config: str = "configs/deepspeed/zero{zero_stage}.yaml"
    zero_stage: int = 2
    moe_impl: str = "native"
    ep_size: int = 1

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.moe_impl not in ("native", "deepspeed"):
            raise ValueError(f"deepspeed.moe_impl must be native|deepspeed, got {self.moe_impl!r}")
        if self.moe_impl == "deepspeed" and self.zero_stage == 3:
            # DeepSpeed's MoE asserts under ZeRO-3; fail before any worker starts.
            raise ValueError(
                "deepspeed.moe_impl=deepspeed needs zero_stage 0, 1 or 2 (ZeRO-3 asserts)"
            )


@dataclass
class StageSection:
    """One training stage (``pretrain``, ``align`` or ``finetune``).

    Attributes:
        enabled: Run this stage under ``--stages all``.
        steps: Optimizer steps (each = ``grad_accum`` micro-batches per worker).
        lr: Peak learning rate (after linear warm-up, then cosine decay to ``lr * min_lr_ratio``).
        warmup_steps: Linear warm-up steps.
        min_lr_ratio: Final LR as a fraction of ``lr``.
        weight_decay: AdamW weight decay.
        grad_accum: Gradient accumulation steps.
        grad_clip: Global gradient-norm clip (0 disables).
        mask_ratio: Token/patch mask ratio (pretrain masked modelling, align reconstruction).
        pairs: align: modality pairs aligned with InfoNCE; ``None`` = every pair of the
            trained modalities that at least one train row holds together (the pairs the
            prepared data has). A pair naming a modality the data lacks is an error.
        held_out_pairs: align: pairs kept out of alignment on purpose (left out of the
            default ``pairs``; listing one in ``pairs`` too is an error). The export records
            them as ``emergent_pairs`` and evaluation reports their R@1, each direction, as
            the emergent-alignment figure (other pairs never trained together are reported
            apart from it).
        label_positives: align: every same-label key is a positive in InfoNCE (multi-positive,
            for corpora whose pairs are category-level like OmniDigits); False = the same row.
        norm_pix_targets: pretrain/align: masked patches are regressed normalized per patch
            (MAE's ``norm_pix_loss``); False (default) = raw featurized values, as the demo
            has always trained (``models.objectives.recon_loss``).
        loss_weights: Weight per loss term name (missing names weigh 1.0).
        modality_dropout: finetune: probability of dropping a modality from a row.
        freeze: finetune: ``none`` (train all), ``encoders`` (freeze modality encoders), or
            ``top_k`` (train only the top ``train_top_k`` trunk layers + adapters/fusion/heads).
            ``connectors``: the connector-only alignment recipe: every encoder (pretrained
            towers and from-scratch encoders), the trunk, adapters, fusion and heads are
            frozen except the towers' connectors and the parts named in ``also_train``;
            the trainable fraction is reported in the stage's start event.
        train_top_k: Trunk layers trained when ``freeze=top_k``.
        also_train: ``freeze=connectors``: model parts trained besides the connectors
            (``trunk``, ``adapters``, ``projections``, ``fusion``, ``recon_heads``,
            ``decoder``, ``classifier``, ``logit_scale``).
        towers: Pretrained towers (encoder kind ``hf``) per modality: ``frozen``,
            ``last_k`` or ``lora`` for this stage (default: the section's ``train``).
        tasks: finetune tasks among ``classification``, ``retrieval``, ``description``.
        class_weighting: finetune classification loss: ``none`` (every row weighs 1) or
            ``balanced`` (class ``c`` weighs ``N / (C * n_c)`` with ``n_c`` its train rows, as
            scikit-learn's ``class_weight="balanced"``): imbalanced labels stop drowning
            the rare classes.
        sampling: finetune rows per epoch: ``uniform`` (each row once, shuffled) or
            ``balanced`` (as many rows, drawn with replacement with probability
            ``1 / n_c`` of the row's class on that rank, so every class is drawn about
            equally often; unlabelled rows weigh as the mean class). Needs
            ``data.cache: true``. An alternative to ``class_weighting`` (the two at once
            over-correct).
        label_smoothing: finetune classification loss: PyTorch's ``label_smoothing``
            (0 = plain cross-entropy).
        checkpoint_every: Report a DeepSpeed checkpoint every N steps (and at the end).
    """

    enabled: bool = True
    steps: int = 100
    lr: float = 1e-3
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    grad_accum: int = 1
    grad_clip: float = 1.0
    mask_ratio: float = 0.3
    pairs: list[list[str]] | None = None
    held_out_pairs: list[list[str]] = field(default_factory=list)
    label_positives: bool = False
    norm_pix_targets: bool = False
    loss_weights: dict[str, float] = field(default_factory=dict)
    modality_dropout: float = 0.3
    freeze: str = "none"
    train_top_k: int = 1
    also_train: list[str] = field(default_factory=list)
    towers: dict[str, str] = field(default_factory=dict)
    tasks: list[str] = field(default_factory=lambda: ["classification", "retrieval", "description"])
    class_weighting: str = "none"
    sampling: str = "uniform"
    label_smoothing: float = 0.0
    checkpoint_every: int = 50

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")
        if self.grad_accum < 1:
            raise ValueError(f"grad_accum must be >= 1, got {self.grad_accum}")
        if self.freeze not in FREEZE_CHOICES:
            raise ValueError(f"freeze must be one of {FREEZE_CHOICES}, got {self.freeze!r}")
        bad_modes = {m: v for m, v in self.towers.items() if v not in ("frozen", "last_k", "lora")}
        if bad_modes:
            raise ValueError(f"towers: modes must be frozen|last_k|lora, got {bad_modes}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.class_weighting not in CLASS_WEIGHTING:
            raise ValueError(
                f"class_weighting must be one of {CLASS_WEIGHTING}, got {self.class_weighting!r}"
            )
        if self.sampling not in SAMPLING:
            raise ValueError(f"sampling must be one of {SAMPLING}, got {self.sampling!r}")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        unknown = set(self.tasks) - {"classification", "retrieval", "description"}
        if unknown:
            raise ValueError(f"unknown finetune task(s) {sorted(unknown)}")
        for p in [*(self.pairs or []), *self.held_out_pairs]:
            if len(p) != 2 or p[0] == p[1]:
                raise ValueError(f"align pair {p!r} must name two different modalities")
        both = {frozenset(p) for p in self.pairs or []} & {
            frozenset(p) for p in self.held_out_pairs
        }
        if both:
            raise ValueError(
                f"held_out_pairs {sorted(sorted(p) for p in both)} are also in pairs: a pair "
                "is either aligned or held out"
            )


@dataclass
class GenerationFitSection:
    """``generation_fit:``: after the last stage, the generation heads are fitted on the
    final, frozen encoders (:func:`jobs.training.generation.fit_generation_heads`, in place
    on the export): every train row embedded once, the heads trained on the cached
    shared-space conditions. The stages' own ``gen_<target>`` terms see each target a few
    thousand times, on conditions that move while the encoders train; this phase gives the
    heads the steps they need on the conditions they will be served (docs/GENERATION.md).

    Attributes:
        steps: Optimizer steps (0: no fit; the heads stay as the stages left them).
        batch: (condition, target) pairs per target per step.
        lr: Peak AdamW learning rate (50 warm-up steps, cosine decay).
        max_rows: Train rows embedded (None: all).
    """

    steps: int = 0
    batch: int = 256
    lr: float = 1e-3
    max_rows: int | None = None

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch < 1 or self.lr <= 0:
            raise ValueError(
                f"generation_fit needs steps >= 0, batch >= 1, lr > 0; got steps={self.steps}, "
                f"batch={self.batch}, lr={self.lr}"
            )
        if self.max_rows is not None and self.max_rows < 1:
            raise ValueError(f"generation_fit.max_rows must be >= 1, got {self.max_rows}")


@dataclass
class FaultInjection:
    """Tests only: make one worker raise once, mid-run.

    Attributes:
        at_step: Raise on reaching this optimizer step (``None`` = never).
        rank: Which rank raises.
        stage: Which stage it fires in.
        marker: File created before raising so that it fires once (relative to the run dir).
    """

    at_step: int | None = None
    rank: int = 1
    stage: str = "pretrain"
    marker: str = "fault_injected.marker"


@dataclass
class TrainConfig:
    """The whole training job.

    Attributes:
        name: Run name; the run dir is ``{runs_dir}/{name}``.
        runs_dir: Parent of run dirs (local metrics/plots; shared storage on a cluster).
        storage_path: Ray Train storage (checkpoints); ``None`` = ``{run_dir}/ray``.
            On a multi-node cluster it must be shared storage or a URI (``s3://...``).
        model: Model size name (``tiny``, ``small``, ``base``).
        model_overrides: Extra ``OmniConfig`` fields, deep-merged last (e.g.
            ``{num_experts: 4, encoders: {image: {patch: 4}}}``; old flat keys such as
            ``image_patch`` are mapped into the encoder sections).
        export_dir: Where the final export goes; ``None`` = ``{run_dir}/export``.
        seed: Global seed (per-rank RNG = ``seed + rank``).
        max_failures: Ray Train ``FailureConfig.max_failures`` (worker-group restarts).
        log_every: Report metrics every N steps.
        export_at_end: Export after the last stage.
        compile: ``torch.compile`` the model's repeated blocks on each worker
            (``OmniModel.compile_blocks``): fewer, fused kernels on a GPU, at a compile cost
            of a few minutes per stage at start-up. Off by default (CPU runs gain little).
        activation_checkpointing: Recompute each trunk layer in the backward pass instead of
            keeping its activations (``MoETrunk.activation_checkpointing``): about a third
            more trunk compute for room to raise ``data.batch_size`` on a GPU.
        varlen_attention: The trunk's attention over its packed tokens uses PyTorch's
            variable-length flash kernel where it runs (CUDA, compute capability 8.0+, bf16):
            one call for every sequence of every modality, no padding. False keeps the
            portable padded path (masked SDPA per modality) everywhere.
        keep_checkpoints: DeepSpeed checkpoints kept per stage (Ray Train
            ``CheckpointConfig(num_to_keep=...)``; the newest reported one is always among
            them). 2 leaves an older complete one to resume from if the newest did not fully
            arrive (ray#41700); 1 halves the disk a run uses but has no such fallback.
        zero_shot_templates: Zero-shot prompt templates written into the export
            (``zero_shot.yaml``, read by evaluation and serving); each contains ``{label}``.
            ``None``: the neutral defaults of :data:`models.zeroshot.DEFAULT_TEMPLATES`.
        zero_shot_label_text: Text written into ``{label}`` per class name (e.g.
            ``{"7": "seven"}`` where captions spell labels out), carried in the export too.
        generation_fit: Fit of the generation heads on the frozen final encoders after the
            export (:class:`GenerationFitSection`; off by default).
    """

    name: str = "run"
    runs_dir: str = "runs"
    storage_path: str | None = None
    model: str = "tiny"
    model_overrides: dict[str, object] = field(default_factory=dict)
    export_dir: str | None = None
    seed: int = 0
    max_failures: int = 2
    log_every: int = 1
    export_at_end: bool = True
    compile: bool = False
    activation_checkpointing: bool = False
    varlen_attention: bool = True
    keep_checkpoints: int = 2
    zero_shot_templates: list[str] | None = None
    zero_shot_label_text: dict[str, str] = field(default_factory=dict)
    scaling: ScalingSection = field(default_factory=ScalingSection)
    data: DataSection = field(default_factory=DataSection)
    deepspeed: DeepSpeedSection = field(default_factory=DeepSpeedSection)
    pretrain: StageSection = field(default_factory=StageSection)
    align: StageSection = field(default_factory=StageSection)
    finetune: StageSection = field(default_factory=StageSection)
    generation_fit: GenerationFitSection = field(default_factory=GenerationFitSection)
    fault_injection: FaultInjection = field(default_factory=FaultInjection)

    def __post_init__(self) -> None:
        if self.keep_checkpoints < 1:
            raise ValueError(
                f"keep_checkpoints must be >= 1 (a running stage resumes from its newest "
                f"checkpoint), got {self.keep_checkpoints}"
            )
        t = self.zero_shot_templates
        if t is not None and (not t or any("{label}" not in x for x in t)):
            raise ValueError(
                f"zero_shot_templates must be a non-empty list of strings containing "
                f"'{{label}}', got {t!r}"
            )

        for name in STAGES:
            st = getattr(self, name)
            if st.sampling == "balanced" and not self.data.cache:
                raise ValueError(
                    f"{name}.sampling=balanced draws from the rows a worker caches: "
                    "set data.cache=true (or sampling=uniform)"
                )

    def stage(self, name: str) -> StageSection:
        if name not in STAGES:
            raise ConfigError(f"unknown stage {name!r}; choose from {STAGES}")
        return getattr(self, name)


def load_train_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """Loads and validates a training YAML plus dotted overrides."""
    return load_config(TrainConfig, path, overrides)


def parse_stages(spec: str, cfg: TrainConfig) -> list[str]:
    """``"all"`` -> enabled stages in order; ``"align,finetune"`` -> those, in pipeline order."""
    if spec == "all":
        return [s for s in STAGES if cfg.stage(s).enabled]
    names = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = [s for s in names if s not in STAGES]
    if unknown or not names:
        raise ConfigError(f"--stages {spec!r}: choose 'all' or a comma list of {STAGES}")
    return [s for s in STAGES if s in names]
