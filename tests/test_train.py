"""End-to-end training runs: Ray Train + DeepSpeed (2 workers, CPU, gloo) on tiny shards.

Each run is a real ``jobs.training.runner.run_training`` inside the session's ``ray_local``
(2 CPUs): ZeRO-2 through all three stages with export; ZeRO-3 with an injected worker
failure and resume; DeepSpeed MoE with expert parallelism; re-running a finished command.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from jobs.training.config import load_train_config
from jobs.training.metrics import read_jsonl
from jobs.training.schedule import lr_factor
from jobs.training.synthetic import write_synthetic_shards

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs/train/tiny.yaml")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> str:
    return write_synthetic_shards(str(tmp_path_factory.mktemp("shards")), n=96, seed=0)


def _cfg(tmp: Path, shards: str, *overrides: str):
    return load_train_config(TINY, [f"data.shards_dir={shards}", f"runs_dir={tmp}", *overrides])


def _steps(records: list[dict], stage: str) -> list[dict]:
    return [r for r in records if r.get("stage") == stage and "loss" in r]


def _assert_probe_matches(out, expect) -> None:
    """The export, loaded by ``models`` alone, embeds the probe rows exactly as the trained
    engine did at the end of training (``out, expect`` from the ``probe_outputs`` fixture)."""
    assert {k.split("/", 1)[1] for k in expect if k.startswith("embed/")} == set(out.embeds)
    for m, e in out.embeds.items():
        torch.testing.assert_close(e, expect[f"embed/{m}"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out.fused, expect["fused"], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_zero2_three_stages_export_and_resume_skip(
    ray_local, shards, tmp_path, capsys, probe_outputs
):
    from jobs.training.data import inspect_shards
    from jobs.training.runner import run_training

    cfg = _cfg(
        tmp_path,
        shards,
        "pretrain.steps=10",
        "align.steps=8",
        "finetune.steps=8",
        "pretrain.checkpoint_every=5",
        "align.checkpoint_every=4",
        "finetune.checkpoint_every=4",
        "align.pairs=[[text,image],[image,audio]]",
    )
    res = run_training(cfg, ["pretrain", "align", "finetune"])
    run_dir = Path(res["run_dir"])
    records = read_jsonl(str(run_dir / "metrics.jsonl"))
    for stage, n in (("pretrain", 10), ("align", 8), ("finetune", 8)):
        rows = _steps(records, stage)
        assert [r["step"] for r in rows] == list(range(1, n + 1)), stage
        first, last = (
            np.mean([r["loss"] for r in rows[:3]]),
            np.mean([r["loss"] for r in rows[-3:]]),
        )
        assert last < first, f"{stage}: loss did not fall ({first:.3f} -> {last:.3f})"
        assert all(r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 for r in rows)
        assert (run_dir / f"loss_{stage}.png").stat().st_size > 1000
        assert (run_dir / stage / "DONE.json").is_file()
        ckpts = sorted((run_dir / "ray" / f"tiny-{stage}").glob("checkpoint_0*"))
        assert ckpts and ckpts[-1].name == f"checkpoint_{n:08d}"
        assert {p.name for p in ckpts[-1].iterdir()} >= {
            "ds",
            "complete_rank0.json",
            "complete_rank1.json",
            "rank0.json",
            "rank1.json",
        }
    # Per-modality expert load and gates are logged; align logs only the configured pairs.
    last = _steps(records, "finetune")[-1]
    assert set(last["expert_load"]) == set(inspect_shards(shards).modalities)
    assert all(abs(sum(v) - 1) < 1e-4 for v in last["expert_load"].values())
    assert last["gates"] and all(0 <= g <= 1 for g in last["gates"].values())
    nce = {k for r in _steps(records, "align") for k in r if k.startswith("loss/nce_")}
    assert nce == {"loss/nce_text_image", "loss/nce_image_audio"}
    assert any(k.startswith("loss/caption_") for k in _steps(records, "align")[0])
    assert any(k.startswith("loss/cls_") for k in _steps(records, "finetune")[0])

    export = Path(res["export_dir"])
    assert {
        "model.safetensors",
        "model_config.yaml",
        "metrics.json",
        "training.yaml",
        "data_config.yaml",
    } <= {p.name for p in export.iterdir()}
    info = __import__("yaml").safe_load((export / "training.yaml").read_text())
    assert info["aligned_pairs"] == [["text", "image"], ["image", "audio"]]
    assert info["label_names"] == [str(i) for i in range(10)]
    _assert_probe_matches(*probe_outputs(run_dir, "finetune", export, shards))

    # The same command again: every stage is finished, nothing retrains.
    n_lines = len(records)
    capsys.readouterr()
    run_training(cfg, ["pretrain", "align", "finetune"])
    assert "stage pretrain: already finished, skipped" in capsys.readouterr().out
    assert len(read_jsonl(str(run_dir / "metrics.jsonl"))) == n_lines


@pytest.mark.slow
def test_zero3_worker_failure_resumes_from_latest_checkpoint(
    ray_local, shards, tmp_path, probe_outputs
):
    from jobs.export import main as export_main
    from jobs.training.runner import run_training

    cfg = _cfg(
        tmp_path,
        shards,
        "deepspeed.zero_stage=3",
        "pretrain.steps=12",
        "pretrain.warmup_steps=3",
        "pretrain.checkpoint_every=4",
        "fault_injection.at_step=7",
        "fault_injection.rank=1",
        "export_at_end=false",
    )
    res = run_training(cfg, ["pretrain"])
    run_dir = Path(res["run_dir"])
    assert (run_dir / cfg.fault_injection.marker).is_file()  # the fault did fire
    records = read_jsonl(str(run_dir / "metrics.jsonl"))
    starts = [r for r in records if r.get("event") == "start"]
    assert [s["resumed_from"] for s in starts] == [None, 4]  # restarted from checkpoint 4
    assert all(s["zero_stage"] == 3 for s in starts)
    rows = _steps(records, "pretrain")
    after = rows[[r["step"] for r in rows].index(4, 0) + 1 :]
    # Steps 5..6 ran before the crash (step 7 raised before logging), then 5..12 again.
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6, 5, 6, 7, 8, 9, 10, 11, 12]
    assert after[-1]["step"] == 12
    for r in rows:  # the LR schedule continues where it was (restored scheduler state)
        expect = cfg.pretrain.lr * lr_factor(
            r["step"] - 1, warmup_steps=3, total_steps=12, min_lr_ratio=cfg.pretrain.min_lr_ratio
        )
        assert r["lr"] == pytest.approx(expect, rel=1e-6), r["step"]
    # jobs.export consolidates the ZeRO-3 partitions (zero_to_fp32) into a loadable export.
    out = tmp_path / "export_z3"
    assert (
        export_main(
            [
                "--config",
                TINY,
                f"data.shards_dir={shards}",
                f"runs_dir={tmp_path}",
                "deepspeed.zero_stage=3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    _assert_probe_matches(*probe_outputs(run_dir, "pretrain", out, shards))


@pytest.mark.slow
def test_deepspeed_moe_expert_parallel_over_two_workers(ray_local, shards, tmp_path):
    from jobs.training.runner import run_training

    cfg = _cfg(
        tmp_path,
        shards,
        "deepspeed.moe_impl=deepspeed",
        "deepspeed.ep_size=2",
        "pretrain.steps=3",
        "pretrain.checkpoint_every=3",
        "export_at_end=false",
        "name=moe",
    )
    res = run_training(cfg, ["pretrain"])
    rows = _steps(read_jsonl(os.path.join(res["run_dir"], "metrics.jsonl")), "pretrain")
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in rows)
    ds_files = {
        p.name for p in (Path(res["run_dir"]) / "ray/moe-pretrain/checkpoint_00000003/ds").iterdir()
    }
    assert any("expert" in f for f in ds_files)  # expert-parallel shards were checkpointed
    # Consolidated with every expert in one process (ep_size 1), loadable by models alone.
    from models import OmniModel

    model = OmniModel.from_pretrained(Path(res["run_dir"]) / "pretrain" / "final")
    assert model.config.moe_impl == "deepspeed" and model.config.ep_size == 1


@pytest.mark.slow
def test_zero0_single_worker_freezes_unused_parts_and_exports(
    ray_local, shards, tmp_path, probe_outputs
):
    """ZeRO-0 (the single-worker setting): pretraining trains only what its losses reach,
    leaves fusion/decoder/classifier/projections exactly at their init, and its checkpoint
    (no ZeRO partitions) consolidates into an export that reproduces the trained engine."""
    from jobs.training.data import inspect_shards
    from jobs.training.engine import build_stage_model
    from jobs.training.runner import model_config_from_data, run_training

    cfg = _cfg(
        tmp_path,
        shards,
        "deepspeed.zero_stage=0",
        "scaling.num_workers=1",
        "scaling.cpus_per_worker=1",
        "pretrain.steps=6",
        "pretrain.warmup_steps=2",
        "pretrain.checkpoint_every=3",
        "name=z0",
    )
    res = run_training(cfg, ["pretrain"])
    run_dir = Path(res["run_dir"])
    records = read_jsonl(str(run_dir / "metrics.jsonl"))
    (start,) = [r for r in records if r.get("event") == "start"]
    assert start["zero_stage"] == 0 and start["world_size"] == 1
    assert start["unused_by_stage"] == [
        "fusion",
        "decoder",
        "classifier",
        "generators",
        "projections",
        "logit_scale",
    ]
    rows = _steps(records, "pretrain")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all(np.isfinite(r["loss"]) for r in rows)

    info = inspect_shards(shards)
    torch.manual_seed(cfg.seed)  # rank 0 seeds with cfg.seed before building its model
    init = build_stage_model(
        model_config_from_data(cfg, shards, info, info.modalities).to_dict()
    ).state_dict()
    final = load_file(str(run_dir / "pretrain" / "final" / "model.safetensors"))
    unused = ("fusion.", "decoder.", "classifier.", "projections.", "logit_scale")
    for k, v in final.items():
        if k.startswith(unused):
            torch.testing.assert_close(v, init[k].reshape(v.shape), rtol=0, atol=0, msg=k)
    assert any(
        not torch.equal(v, init[k]) for k, v in final.items() if k.startswith("trunk.")
    )  # the trunk did train
    from jobs.export import main as export_main

    out = tmp_path / "export_z0"
    args = ["--config", TINY, f"data.shards_dir={shards}", f"runs_dir={tmp_path}", "name=z0"]
    assert export_main([*args, "--out", str(out)]) == 0
    _assert_probe_matches(*probe_outputs(run_dir, "pretrain", out, shards))


def test_missing_shards_fail_clearly(tmp_path):
    from common.config import ConfigError
    from jobs.training.runner import run_training

    cfg = _cfg(tmp_path, str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"^data.shards_dir: .*jobs.prepare"):
        run_training(cfg, ["pretrain"])


@pytest.mark.slow
def test_two_modality_corpus_keeps_n_checkpoints_and_reports_disk(ray_local, tmp_path, capsys):
    """Align pairs from the data, balanced class weights, ``keep_checkpoints`` per stage,
    the corpus' zero-shot prompts in the export and the run's disk use on screen."""
    import json

    import yaml

    from jobs.training.runner import run_training

    shards = write_synthetic_shards(
        str(tmp_path / "shards2"), n=48, modalities=["image", "signal"], seed=1
    )
    cfg = _cfg(
        tmp_path,
        shards,
        "name=two",
        "pretrain.steps=6",
        "pretrain.checkpoint_every=2",
        "finetune.steps=4",
        "finetune.checkpoint_every=1",
        "finetune.class_weighting=balanced",
        "keep_checkpoints=2",
        "zero_shot_templates=['a recording of {label}']",
    )
    res = run_training(cfg, ["pretrain", "finetune"])
    run_dir = Path(res["run_dir"])
    for stage, kept in (("pretrain", [4, 6]), ("finetune", [3, 4])):
        ckpts = sorted(p.name for p in (run_dir / "ray" / f"two-{stage}").glob("checkpoint_0*"))
        assert ckpts == [f"checkpoint_{s:08d}" for s in kept], (stage, ckpts)
    export = Path(res["export_dir"])
    info = yaml.safe_load((export / "training.yaml").read_text())
    assert info["aligned_pairs"] == [["image", "signal"]]  # the pair the data has
    assert info["class_weighting"] == "balanced"
    zs = yaml.safe_load((export / "zero_shot.yaml").read_text())
    assert zs["templates"] == ["a recording of {label}"]
    out = capsys.readouterr().out
    assert "[train] disk used by the run: " in out and "checkpoints " in out
    disk = json.loads((run_dir / "summary.json").read_text())["disk"]
    assert disk["total_bytes"] >= disk["checkpoints_bytes"] + disk["export_bytes"] > 0
