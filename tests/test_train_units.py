"""Unit tests of the training library (no Ray cluster): config, schedule, data, checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pytest
import torch

from common.config import ConfigError, read_yaml
from jobs.training.checkpoint import (
    TrainState,
    find_resumable,
    is_complete,
    list_checkpoints,
    read_rank_state,
    write_rank_state,
)
from jobs.training.config import load_train_config, parse_stages
from jobs.training.data import RankBatches, table_to_samples
from jobs.training.engine import deepspeed_config
from jobs.training.schedule import build_scheduler, lr_factor
from pipelines.schema import pack_tensors

ROOT = Path(__file__).resolve().parents[1]
TRAIN_CONFIGS = sorted((ROOT / "configs/train").glob("*.yaml"))
DS_CONFIGS = sorted((ROOT / "configs/deepspeed").glob("*.yaml"))


@pytest.mark.parametrize("path", TRAIN_CONFIGS, ids=lambda p: p.name)
def test_every_train_yaml_loads_and_builds_a_deepspeed_config(path):
    cfg = load_train_config(str(path))
    assert parse_stages("all", cfg) == ["pretrain", "align", "finetune"]
    for stage in ("pretrain", "align", "finetune"):
        st = cfg.stage(stage)
        ds = deepspeed_config(cfg, st, use_gpu=cfg.scaling.use_gpu)
        assert ds["zero_optimization"]["stage"] == cfg.deepspeed.zero_stage
        assert ds["train_micro_batch_size_per_gpu"] == cfg.data.batch_size
        assert ds["optimizer"]["params"]["lr"] == pytest.approx(st.lr)
        assert ("bf16" in ds) == cfg.scaling.use_gpu
        if cfg.scaling.use_gpu:  # no per-tensor overflow syncs: bf16 needs no loss scaling
            assert ds["bf16"] == {"enabled": True, "check_grad_overflow": False}
        if not cfg.scaling.use_gpu:
            assert ds["optimizer"]["params"]["torch_adam"] is True


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_deepspeed_yamls_name_their_stage(path):
    data = read_yaml(path)
    assert data["zero_optimization"]["stage"] == int(path.stem[-1])
    assert data["optimizer"]["params"]["torch_adam"] is True


def test_demo_config_leaves_an_emergent_pair_out():
    cfg = load_train_config(str(ROOT / "configs/train/demo_small.yaml"))
    pairs = {frozenset(p) for p in cfg.align.pairs}
    assert frozenset({"audio", "pointcloud"}) not in pairs
    assert cfg.align.held_out_pairs == [["audio", "pointcloud"]]
    assert len(pairs) == 17  # 14 of the 15 pairs of the six media modalities + 3 tabular
    # The corpus' own prompts travel into the export; other configs keep the neutral ones.
    assert "the digit {label}" in cfg.zero_shot_templates
    assert cfg.zero_shot_label_text["7"] == "seven"
    assert load_train_config(str(ROOT / "configs/train/tiny.yaml")).zero_shot_templates is None


def test_bad_config_values_are_rejected_clearly():
    tiny = str(ROOT / "configs/train/tiny.yaml")
    with pytest.raises(ConfigError, match="zero_stage"):
        load_train_config(tiny, ["deepspeed.zero_stage=4"])
    with pytest.raises(ConfigError, match="ZeRO-3"):
        load_train_config(tiny, ["deepspeed.zero_stage=3", "deepspeed.moe_impl=deepspeed"])
    with pytest.raises(ConfigError, match="unknown key"):
        load_train_config(tiny, ["pretrain.stepz=3"])
    with pytest.raises(ConfigError, match="freeze"):
        load_train_config(tiny, ["finetune.freeze=some"])
    with pytest.raises(ConfigError, match="pair"):
        load_train_config(tiny, ["align.pairs=[[text,text]]"])
    with pytest.raises(ConfigError, match=r"compile: expected bool, got 'maybe'"):
        load_train_config(tiny, ["compile=maybe"])
    with pytest.raises(ConfigError, match=r"activation_checkpointing: expected bool"):
        load_train_config(tiny, ["activation_checkpointing=3"])
    with pytest.raises(ConfigError, match=r"varlen_attention: expected bool"):
        load_train_config(tiny, ["varlen_attention=fast"])
    with pytest.raises(ConfigError, match=r"finetune: class_weighting must be one of"):
        load_train_config(tiny, ["finetune.class_weighting=inverse"])
    with pytest.raises(ConfigError, match=r"keep_checkpoints must be >= 1"):
        load_train_config(tiny, ["keep_checkpoints=0"])
    with pytest.raises(ConfigError, match=r"zero_shot_templates .*\{label\}"):
        load_train_config(tiny, ["zero_shot_templates=[a photo]"])
    assert load_train_config(tiny, ["varlen_attention=false"]).varlen_attention is False
    cfg = load_train_config(tiny)
    with pytest.raises(ConfigError, match="--stages"):
        parse_stages("pretrain,decode", cfg)
    assert parse_stages("finetune,pretrain", cfg) == ["pretrain", "finetune"]


def test_lr_schedule_warms_up_then_decays_to_the_floor():
    f = [lr_factor(s, warmup_steps=4, total_steps=20, min_lr_ratio=0.1) for s in range(25)]
    assert f[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in zip(f[4:], f[5:], strict=False))  # monotone decay
    assert f[20] == pytest.approx(0.1) and f[24] == pytest.approx(0.1)
    assert f[12] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    # The LambdaLR's state is its step count: a restored scheduler continues the curve.
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(opt, warmup_steps=4, total_steps=20, min_lr_ratio=0.1)
    for _ in range(7):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = build_scheduler(opt2, warmup_steps=4, total_steps=20, min_lr_ratio=0.1)
    sched2.load_state_dict(state)
    assert sched2.get_last_lr()[0] == pytest.approx(f[7])


def _table(n: int) -> pa.Table:
    rng = np.random.default_rng(0)
    texts = [rng.integers(5, 50, size=rng.integers(3, 9)).astype(np.int32) for _ in range(n)]
    images = [
        None if i % 3 == 0 else rng.integers(0, 255, (4, 4, 3), dtype=np.uint8) for i in range(n)
    ]
    t, ts = pack_tensors("text", texts)
    im, ims = pack_tensors("image", images)
    return pa.table(
        {
            "id": [f"r{i}" for i in range(n)],
            "label": [str(i % 3) for i in range(n)],
            "group": ["g"] * n,
            "modalities": [
                ["text"] + (["image"] if images[i] is not None else []) for i in range(n)
            ],
            "text": t,
            "text_shape": ts,
            "image": im,
            "image_shape": ims,
        }
    )


class _FakeShard:
    """Stands in for a Ray DataIterator: ``iter_batches`` over an Arrow table."""

    def __init__(self, table: pa.Table) -> None:
        self.table = table
        self.passes = 0

    def iter_batches(self, *, batch_size, batch_format, drop_last, **_):
        assert batch_format == "pyarrow"
        self.passes += 1
        for i in range(0, self.table.num_rows, batch_size):
            chunk = self.table.slice(i, batch_size)
            if drop_last and chunk.num_rows < batch_size:
                return
            yield chunk


def test_table_to_samples_keeps_absent_modalities_as_none():
    table = _table(6)
    samples = table_to_samples(table, ["text", "image", "audio"])
    assert [s["image"] is None for s in samples] == [True, False, False, True, False, False]
    assert all(s["audio"] is None for s in samples)
    assert samples[1]["image"].shape == (4, 4, 3) and samples[1]["label"] == "1"


def test_rank_batches_cache_reproduces_the_data_position():
    shard = _FakeShard(_table(23))
    rb = RankBatches(
        shard, modalities=["text", "image"], batch_size=4, cache=True, shuffle=True, seed=3, rank=1
    )
    e0 = [[s["id"] for s in b] for b in rb.epoch(0)]
    e1 = [[s["id"] for s in b] for b in rb.epoch(1)]
    assert len(e0) == len(e1) == 5  # 23 // 4, the tail is dropped: equal on every rank
    assert e0 != e1  # reshuffled per epoch
    assert shard.passes == 1  # streamed once, then cached
    # A restarted worker (fresh object) skipping 2 batches sees exactly the rest of epoch 1.
    rb2 = RankBatches(
        _FakeShard(_table(23)),
        modalities=["text", "image"],
        batch_size=4,
        cache=True,
        shuffle=True,
        seed=3,
        rank=1,
    )
    assert [[s["id"] for s in b] for b in rb2.epoch(1, skip=2)] == e1[2:]


def test_rank_batches_balanced_sampling_draws_classes_equally():
    """finetune.sampling=balanced: a 9:1 imbalanced rank draws both classes about equally,
    reproducibly per (epoch, rank); without the cache it is refused."""
    from jobs.training.data import balanced_order

    t = _table(200)
    labels = ["rare" if i % 10 == 0 else "common" for i in range(200)]
    t = t.set_column(t.column_names.index("label"), "label", pa.array(labels))
    rb = RankBatches(
        _FakeShard(t), modalities=["text"], batch_size=20, cache=True, shuffle=True, seed=0,
        rank=0, sampling="balanced",
    )  # fmt: skip
    drawn = [s["label"] for e in range(5) for b in rb.epoch(e) for s in b]
    assert len(drawn) == 5 * 200
    assert 0.4 < drawn.count("rare") / len(drawn) < 0.6  # 0.1 with uniform sampling
    again = RankBatches(
        _FakeShard(t), modalities=["text"], batch_size=20, cache=True, shuffle=True, seed=0,
        rank=0, sampling="balanced",
    )  # fmt: skip
    assert [s["id"] for b in again.epoch(3) for s in b] == [s["id"] for b in rb.epoch(3) for s in b]
    # Unlabelled rows weigh as the mean labelled row; no labels at all: uniform.
    order = balanced_order(["a", "a", "a", "b", None], np.random.default_rng(0))
    assert len(order) == 5 and set(order) <= set(range(5))
    assert len(balanced_order([None, None], np.random.default_rng(0))) == 2
    with pytest.raises(ValueError, match="needs cache"):
        RankBatches(
            _FakeShard(t), modalities=["text"], batch_size=4, cache=False, shuffle=True, seed=0,
            rank=0, sampling="balanced",
        )  # fmt: skip


def test_sampling_and_label_smoothing_config_errors():
    tiny = str(ROOT / "configs/train/tiny.yaml")
    with pytest.raises(ConfigError, match=r"finetune: sampling must be one of"):
        load_train_config(tiny, ["finetune.sampling=oversample"])
    with pytest.raises(ConfigError, match=r"sampling=balanced .*data.cache=true"):
        load_train_config(tiny, ["finetune.sampling=balanced", "data.cache=false"])
    with pytest.raises(ConfigError, match=r"label_smoothing must be in \[0, 1\)"):
        load_train_config(tiny, ["finetune.label_smoothing=1.5"])
    tc = load_train_config(tiny, ["finetune.sampling=balanced", "finetune.label_smoothing=0.1"])
    assert tc.finetune.sampling == "balanced" and tc.finetune.label_smoothing == 0.1


def test_rank_batches_streaming_mode_skips_consumed_batches():
    shard = _FakeShard(_table(20))
    rb = RankBatches(
        shard, modalities=["text"], batch_size=4, cache=False, shuffle=False, seed=0, rank=0
    )
    ids = [[s["id"] for s in b] for b in rb.epoch(0, skip=3)]
    assert ids == [["r12", "r13", "r14", "r15"], ["r16", "r17", "r18", "r19"]]


def _write_ckpt(root: Path, step: int, ranks: list[int], world: int) -> Path:
    d = root / f"checkpoint_{step:08d}"
    (d / "ds").mkdir(parents=True)
    for r in ranks:
        write_rank_state(
            str(d), r, TrainState(step=step, epoch=1, batch=2, world_size=world, stage="pretrain")
        )
    return d


def test_incomplete_checkpoint_falls_back_to_the_previous_one(tmp_path):
    fs = pafs.LocalFileSystem()
    good = _write_ckpt(tmp_path, 10, [0, 1], 2)
    bad = _write_ckpt(tmp_path, 20, [0], 2)  # rank 1's files never arrived (Ray #41700)
    assert is_complete(fs, str(good)) and not is_complete(fs, str(bad))
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [20, 10]
    path, _ = find_resumable(str(tmp_path), preferred=str(bad))
    assert path == str(good)
    assert find_resumable(str(tmp_path / "nothing")) is None


def test_rank_state_round_trip_restores_rng(tmp_path):
    torch.manual_seed(5)
    np.random.seed(5)
    d = tmp_path / "c"
    d.mkdir()
    write_rank_state(str(d), 0, TrainState(step=7, epoch=2, batch=3, world_size=1, stage="align"))
    expect_t, expect_n = torch.rand(3), np.random.rand(3)
    torch.manual_seed(99)
    np.random.seed(99)
    st = read_rank_state(str(d), 0)
    assert (st.step, st.epoch, st.batch, st.stage) == (7, 2, 3, "align")
    assert torch.equal(torch.rand(3), expect_t)
    assert np.array_equal(np.random.rand(3), expect_n)


@pytest.mark.parametrize("stage", ["pretrain", "align", "finetune"])
def test_stage_objective_trains_a_bf16_model(tmp_path, stage):
    """DeepSpeed's bf16 mode (the GPU setting) holds the whole model in bf16 while the
    featurized inputs arrive as uint8/fp32: every stage's forward and backward accept that."""
    import pyarrow.parquet as pq

    from jobs.training.data import inspect_shards
    from jobs.training.engine import build_stage_model
    from jobs.training.runner import model_config_from_data
    from jobs.training.stage import StageObjective
    from jobs.training.synthetic import write_synthetic_shards

    shards = write_synthetic_shards(str(tmp_path / "shards"), n=24, seed=0)
    info = inspect_shards(shards)
    tc = load_train_config(
        str(Path(__file__).resolve().parents[1] / "configs/train/tiny.yaml"),
        [f"data.shards_dir={shards}"],
    )
    model_cfg = model_config_from_data(tc, shards, info, info.modalities).to_dict()
    torch.manual_seed(0)
    model = build_stage_model(model_cfg).to(torch.bfloat16)
    obj = StageObjective(
        stage, tc.stage(stage), modalities=info.modalities, label_names=info.label_names
    )
    obj.freeze_unused(model)
    samples = table_to_samples(pq.read_table(str(Path(shards) / "train")), info.modalities)[:8]
    terms, out = obj(model, obj.collate(samples, info.label_names), step=0)
    assert torch.isfinite(terms["loss"])
    terms["loss"].backward()
    stems = {  # the input layers, which take the fp32 featurized tensors (not token ids)
        m: enc.stem_parameters() for m, enc in model.encoders.items() if enc.target_kind != "tokens"
    }
    for m, params in stems.items():  # every modality's input layer got a finite gradient
        assert params and all(p.grad is not None for p in params), m
        assert all(torch.isfinite(p.grad).all() for p in params), m
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert set(obj.token_counts(out)) == set(out.features)


def test_non_finite_loss_fails_the_run_with_a_clear_error():
    from jobs.training.loop import check_finite_loss

    check_finite_loss({"loss": 1.5, "moe_aux": 1.0}, "align", 20, 10)  # fine: no error
    for bad in (math.nan, math.inf):
        with pytest.raises(
            FloatingPointError,
            match=r"align: the loss became non-finite .* "
            r"10 micro-steps before step 20; lower the learning rate",
        ):
            check_finite_loss({"loss": bad}, "align", 20, 10)


def test_compile_blocks_keeps_parameter_names_and_outputs(tmp_path):
    """``train.compile``: the compiled model has the eager model's state_dict keys (so
    checkpoints and exports are unchanged) and computes the same outputs. Dynamo's ``eager``
    backend traces the same graphs as inductor without generating kernels (fast on CPU)."""
    from models import OmniConfig, build_model
    from models.data import collate, synthetic_samples

    torch.manual_seed(0)
    cfg = OmniConfig.from_name("tiny", num_classes=10)
    eager = build_model(cfg).eval()
    compiled = build_model(cfg).eval()
    compiled.load_state_dict(eager.state_dict())
    compiled.compile_blocks(backend="eager")
    assert list(compiled.state_dict()) == list(eager.state_dict())
    batch = collate(synthetic_samples(cfg, 6, seed=1))
    with torch.no_grad():
        a, b = eager(batch), compiled(batch)
    for m in a.embeds:
        torch.testing.assert_close(b.embeds[m], a.embeds[m], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b.fused, a.fused, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("stage", ["pretrain", "align", "finetune"])
def test_activation_checkpointing_gives_the_same_step(tmp_path, stage):
    """``activation_checkpointing=true`` (the job sets ``model.trunk.activation_checkpointing``):
    every stage's loss and gradients equal those of the plain model."""
    import pyarrow.parquet as pq

    from jobs.training.data import inspect_shards
    from jobs.training.engine import build_stage_model
    from jobs.training.runner import model_config_from_data
    from jobs.training.stage import StageObjective
    from jobs.training.synthetic import write_synthetic_shards

    shards = write_synthetic_shards(str(tmp_path / "shards"), n=24, seed=0)
    info = inspect_shards(shards)
    tc = load_train_config(
        str(ROOT / "configs/train/tiny.yaml"),
        [f"data.shards_dir={shards}", "activation_checkpointing=true"],
    )
    assert tc.activation_checkpointing is True
    model_cfg = model_config_from_data(tc, shards, info, info.modalities).to_dict()
    samples = table_to_samples(pq.read_table(str(Path(shards) / "train")), info.modalities)[:8]
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = build_stage_model(model_cfg)
        model.trunk.activation_checkpointing = ckpt
        obj = StageObjective(
            stage, tc.stage(stage), modalities=info.modalities, label_names=info.label_names
        )
        obj.freeze_unused(model)
        torch.manual_seed(1)  # the objective's masking draws
        terms, _ = obj(model, obj.collate(samples, info.label_names), step=0)
        terms["loss"].backward()
        grads.append((terms["loss"].detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, ga), (loss_b, gb) = grads
    torch.testing.assert_close(loss_b, loss_a)
    trunk_grads = [n for n, g in ga.items() if n.startswith("trunk.") and g is not None]
    assert trunk_grads
    for n, g in ga.items():
        if g is None:
            assert gb[n] is None, n
        else:
            torch.testing.assert_close(gb[n], g, msg=n)


# ----------------------------------------------------------------- configs that follow the data


def _write_light_shards(root: Path, rows: list[tuple[str, list[str]]]) -> str:
    """Train shards with only the light columns ``inspect_shards`` reads."""
    import pyarrow.parquet as pq

    (root / "train").mkdir(parents=True)
    table = pa.table(
        {
            "id": [f"r{i}" for i in range(len(rows))],
            "label": [lab for lab, _ in rows],
            "modalities": pa.array([m for _, m in rows], pa.list_(pa.string())),
        }
    )
    pq.write_table(table, root / "train" / "part-0.parquet")
    return str(root)


def test_align_pairs_default_to_the_pairs_the_data_has(tmp_path):
    """text+image and text+signal rows, never image+signal: only the two pairs are aligned;
    an explicit pair naming a modality the data lacks is a one-line error naming the key."""
    from jobs.training.data import inspect_shards
    from jobs.training.runner import aligned_pairs, held_out_pairs

    rows = [("a", ["text", "image"])] * 3 + [("b", ["text", "signal"])] * 2
    rows += [("b", ["image"]), ("c", ["signal"])]
    info = inspect_shards(_write_light_shards(tmp_path, rows))
    assert info.modalities == ["text", "image", "signal"]
    assert info.pair_rows == {("text", "image"): 3, ("text", "signal"): 2}
    assert info.rows_with_pair("image", "text") == 3 and info.rows_with_pair("image", "signal") == 0
    assert info.label_names == ["a", "b", "c"] and info.label_counts == {"a": 3, "b": 3, "c": 1}
    tiny = str(ROOT / "configs/train/tiny.yaml")
    tc = load_train_config(tiny)
    assert aligned_pairs(tc, info.modalities, info) == [["text", "image"], ["text", "signal"]]
    assert aligned_pairs(tc, ["image", "signal"], info) == []  # data.modalities subset
    tc = load_train_config(tiny, ["align.pairs=[[image,signal],[text,audio]]"])
    with pytest.raises(ConfigError, match=r"^align.pairs: pair \['text', 'audio'\] names 'audio'"):
        aligned_pairs(tc, info.modalities, info)
    # A held-out pair leaves the default pairs; it must name trained modalities and may not
    # be aligned as well.
    tc = load_train_config(tiny, ["align.held_out_pairs=[[signal,text]]"])
    assert aligned_pairs(tc, info.modalities, info) == [["text", "image"]]
    # A pair naming a modality the run does not train holds nothing out; a typo is an error.
    tc = load_train_config(tiny, ["align.held_out_pairs=[[text,audio],[text,signal]]"])
    assert held_out_pairs(tc, info.modalities) == [["text", "signal"]]
    tc = load_train_config(tiny, ["align.held_out_pairs=[[text,audi]]"])
    with pytest.raises(ConfigError, match=r"^align.held_out_pairs: pair \['text', 'audi'\]"):
        aligned_pairs(tc, info.modalities, info)
    with pytest.raises(ConfigError, match="also in pairs"):
        load_train_config(
            tiny, ["align.pairs=[[text,image]]", "align.held_out_pairs=[[image,text]]"]
        )


@pytest.fixture(scope="module")
def two_modality_shards(tmp_path_factory) -> str:
    from jobs.training.synthetic import write_synthetic_shards

    return write_synthetic_shards(
        str(tmp_path_factory.mktemp("shards2")), n=24, modalities=["image", "signal"], seed=0
    )


@pytest.mark.parametrize(
    "override, key, names",
    [
        ("align.pairs=[[image,audio]]", "align.pairs", "'audio'"),
        ("data.modalities=[image,video]", "data.modalities", "video"),
        ("data.shards_dir=/nonexistent/shards", "data.shards_dir", "jobs.prepare"),
        ("finetune.class_weighting=inverse", "class_weighting", "balanced"),
        ("keep_checkpoints=0", "keep_checkpoints", ">= 1"),
        ("model=huge", "model size", "'huge'"),
    ],
)
def test_train_misconfiguration_is_one_line_and_exit_2(
    two_modality_shards, tmp_path, capsys, override, key, names
):
    """``python -m jobs.train`` with a key that does not fit: exit 2, one line naming the
    key, no traceback, no Ray started (resolved before any worker)."""
    from jobs.train import main

    rc = main(
        [
            "--config",
            str(ROOT / "configs/train/tiny.yaml"),
            f"data.shards_dir={two_modality_shards}",
            f"runs_dir={tmp_path}",
            override,
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith("jobs.train: error: ") and err.count("\n") == 1, err
    assert key in err and names in err and "Traceback" not in err


def test_resolve_run_on_a_two_modality_corpus(two_modality_shards, tmp_path):
    from jobs.training.runner import resolve_run

    tc = load_train_config(
        str(ROOT / "configs/train/tiny.yaml"),
        [
            f"data.shards_dir={two_modality_shards}",
            f"runs_dir={tmp_path}",
            "finetune.class_weighting=balanced",
        ],
    )
    setup = resolve_run(tc)
    assert setup.modalities == ["image", "signal"] and setup.pairs == [["image", "signal"]]
    w = setup.class_weights["finetune"]
    assert setup.class_weights["pretrain"] is None and len(w) == len(setup.info.label_names)
    # Every class weighs the same in total over the train split: N / C.
    counts = [setup.info.label_counts[c] for c in setup.info.label_names]
    n = sum(counts)
    assert [wi * ci for wi, ci in zip(w, counts, strict=True)] == pytest.approx(
        [n / len(counts)] * len(counts)
    )


# ----------------------------------------------------------------- class weighting


def test_balanced_class_weights_and_weighted_cross_entropy():
    from jobs.training.stage import class_weights
    from models.objectives import masked_cross_entropy

    names = ["a", "b", "c"]
    assert class_weights("none", names, {"a": 6, "b": 3, "c": 1}) is None
    w = class_weights("balanced", names, {"a": 6, "b": 3, "c": 1})
    assert w == pytest.approx([10 / 18, 10 / 9, 10 / 3])  # N / (C * n_c)
    # A class without train rows takes the largest weight of the others.
    assert class_weights("balanced", names, {"a": 6, "b": 2}) == pytest.approx(
        [8 / 18, 8 / 6, 8 / 6]
    )

    torch.manual_seed(0)
    logits = torch.randn(6, 3)
    labels = torch.tensor([0, 0, 0, 1, 2, -100])
    rows = labels != -100
    wt = torch.tensor(w)
    got = masked_cross_entropy(logits, labels, rows, wt)
    ce = -torch.log_softmax(logits, -1)[torch.arange(5), labels[:5]]  # per-row CE
    expect = (wt[labels[:5]] * ce).sum() / wt[labels[:5]].sum()
    torch.testing.assert_close(got, expect)
    torch.testing.assert_close(masked_cross_entropy(logits, labels, rows), ce.mean())
    # Equal weights change nothing; no selected row gives a zero with a graph.
    torch.testing.assert_close(
        masked_cross_entropy(logits, labels, rows, torch.full((3,), 2.5)), ce.mean()
    )
    # Label smoothing as PyTorch's.
    torch.testing.assert_close(
        masked_cross_entropy(logits, labels, rows, label_smoothing=0.1),
        torch.nn.functional.cross_entropy(logits[:5], labels[:5], label_smoothing=0.1),
    )
    x = logits.clone().requires_grad_()
    zero = masked_cross_entropy(x, labels, torch.zeros(6, dtype=torch.bool), wt)
    assert zero.item() == 0.0 and zero.requires_grad


def test_finetune_objective_weighs_the_classification_loss(two_modality_shards):
    """The finetune stage's classification terms use the class weights it was given."""
    import pyarrow.parquet as pq

    from jobs.training.data import inspect_shards
    from jobs.training.engine import build_stage_model
    from jobs.training.runner import model_config_from_data
    from jobs.training.stage import StageObjective
    from models.objectives import IGNORE_INDEX, masked_cross_entropy

    shards = two_modality_shards
    info = inspect_shards(shards)
    tc = load_train_config(
        str(ROOT / "configs/train/tiny.yaml"),
        [
            f"data.shards_dir={shards}",
            "finetune.modality_dropout=0",
            "finetune.tasks=[classification]",
        ],
    )
    torch.manual_seed(0)
    model = build_stage_model(model_config_from_data(tc, shards, info, info.modalities).to_dict())
    model.eval()
    weights = [float(i + 1) for i in range(len(info.label_names))]
    with pytest.raises(ValueError, match="class weights"):
        StageObjective(
            "finetune",
            tc.finetune,
            modalities=info.modalities,
            label_names=info.label_names,
            class_weights=[1.0],
        )
    obj = StageObjective(
        "finetune",
        tc.finetune,
        modalities=info.modalities,
        label_names=info.label_names,
        class_weights=weights,
    )
    samples = table_to_samples(pq.read_table(str(Path(shards) / "train")), info.modalities)[:8]
    batch = obj.collate(samples, info.label_names)
    with torch.no_grad():
        terms, out = obj(model, batch, step=0)
    labels = batch["label"]
    valid = labels != IGNORE_INDEX
    w = torch.tensor(weights)
    torch.testing.assert_close(
        terms["cls_fused"], masked_cross_entropy(out.logits, labels, valid, w)
    )
    m = "signal"
    rows = valid & out.present[m]
    want = masked_cross_entropy(out.modality_logits[m], labels, rows, w) / len(out.modality_logits)
    torch.testing.assert_close(terms[f"cls_{m}"], want)
    assert not torch.allclose(
        terms["cls_fused"], masked_cross_entropy(out.logits, labels, valid)
    )  # the weights did change the loss


# ----------------------------------------------------------------- retention, disk, export


def test_disk_usage_counts_the_run_and_what_lies_outside_it(tmp_path):
    from jobs.training.checkpoint import disk_usage, format_disk

    run = tmp_path / "run"
    (run / "ray" / "tiny-pretrain" / "checkpoint_00000004").mkdir(parents=True)
    (run / "ray" / "tiny-pretrain" / "checkpoint_00000004" / "x.pt").write_bytes(b"0" * 3000)
    (run / "metrics.jsonl").write_bytes(b"1" * 500)
    export = tmp_path / "elsewhere" / "export"
    export.mkdir(parents=True)
    (export / "model.safetensors").write_bytes(b"2" * 1000)
    d = disk_usage(str(run), str(run / "ray"), str(export))
    assert d == {
        "run_dir": str(run),
        "total_bytes": 4500,
        "checkpoints_bytes": 3000,
        "export_bytes": 1000,
    }
    d = disk_usage(str(run), "s3://bucket/ray", str(run / "missing_export"))
    assert d["total_bytes"] == 3500 and d["checkpoints_bytes"] is None
    assert d["export_bytes"] == 0
    line = format_disk(disk_usage(str(run), str(run / "ray"), str(export)))
    assert line.startswith("disk used by the run: 0.0 MB") and "checkpoints 0.0 MB" in line


def test_export_carries_the_configs_zero_shot_prompts(two_modality_shards, tmp_path):
    """``zero_shot_templates`` / ``zero_shot_label_text`` of the train config land in the
    export's zero_shot.yaml, which evaluation and serving read."""
    import os

    from jobs.evaluation.data import read_label_text
    from jobs.exports import read_templates
    from jobs.training.data import inspect_shards
    from jobs.training.runner import RunPaths, export_run

    tc = load_train_config(
        str(ROOT / "configs/train/tiny.yaml"),
        [
            f"data.shards_dir={two_modality_shards}",
            f"runs_dir={tmp_path}",
            "zero_shot_templates=['a reading of {label}', '{label}']",
            "zero_shot_label_text={'0': walking}",
        ],
    )
    paths = RunPaths(tc)
    os.makedirs(paths.final("finetune"))
    Path(paths.final("finetune"), "model.safetensors").write_bytes(b"")
    info = inspect_shards(paths.shards)
    out = Path(export_run(tc, paths, info, [["image", "signal"]], info.modalities))
    assert read_templates(out) == ["a reading of {label}", "{label}"]
    assert read_label_text(out) == {"0": "walking"}
    # The default: neutral templates, no label text.
    tc = load_train_config(
        str(ROOT / "configs/train/tiny.yaml"),
        [f"data.shards_dir={two_modality_shards}", f"runs_dir={tmp_path}"],
    )
    out = Path(export_run(tc, paths, info, [], info.modalities, out_dir=str(tmp_path / "e2")))
    assert read_templates(out) == ["{label}", "a {label}"] and read_label_text(out) == {}
