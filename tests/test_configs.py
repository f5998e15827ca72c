"""Every YAML under configs/ loads and validates against its typed config."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
ALL_YAML = sorted((ROOT / "configs").rglob("*.yaml"))


def _load(path: Path):
    kind = path.relative_to(ROOT / "configs").parts[0]
    if kind == "data":
        from pipelines.config import load_data_config

        return load_data_config(str(path))
    if kind == "train":
        from jobs.training.config import load_train_config

        return load_train_config(str(path))
    if kind == "eval":
        from common.config import load_config
        from jobs.evaluation.config import EvalConfig

        return load_config(EvalConfig, path)
    if kind == "model":
        from models.config import OmniConfig

        return OmniConfig.from_yaml(str(path))
    if kind == "serve":
        from ray.serve.schema import ServeDeploySchema

        from serve.config import OmniServeArgs

        raw = yaml.safe_load(path.read_text())
        ServeDeploySchema.model_validate(raw) if hasattr(
            ServeDeploySchema, "model_validate"
        ) else ServeDeploySchema.parse_obj(raw)
        return [OmniServeArgs.model_validate(app["args"]) for app in raw["applications"]]
    if kind == "embed":
        from jobs.embedding.config import load_embed_config

        return load_embed_config(str(path))
    if kind == "deepspeed":
        raw = yaml.safe_load(path.read_text())
        assert raw["zero_optimization"]["stage"] in (0, 1, 2, 3)
        return raw
    raise AssertionError(f"no validator for configs/{kind}/ — add one to tests/test_configs.py")


def test_there_are_configs_of_every_kind():
    kinds = {p.relative_to(ROOT / "configs").parts[0] for p in ALL_YAML}
    assert {"data", "train", "deepspeed", "serve"} <= kinds


@pytest.mark.parametrize("path", ALL_YAML, ids=lambda p: str(p.relative_to(ROOT / "configs")))
def test_config_loads(path: Path):
    assert _load(path) is not None


def test_train_configs_point_at_existing_deepspeed_and_model_sizes():
    from jobs.training.config import load_train_config
    from models.config import MODEL_SIZES

    for path in sorted((ROOT / "configs" / "train").glob("*.yaml")):
        cfg = load_train_config(str(path))
        ds = ROOT / cfg.deepspeed.config.format(zero_stage=cfg.deepspeed.zero_stage)
        assert ds.is_file(), (path, ds)
        assert cfg.model in MODEL_SIZES, (path, cfg.model)
