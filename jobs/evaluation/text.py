"""The export's text featurizer, used to tokenize zero-shot label prompts.

Prompts are tokenized exactly like training text: the tokenizer and ``data_config.yaml``
come from the export (Contract 3), falling back to the shards dir that ``jobs.prepare``
wrote (Contract 2) when an older export lacks them.
"""

from __future__ import annotations

from pathlib import Path

from common.config import ConfigError
from jobs.evaluation.data import EvaluationError


def load_text_featurizer(export_dir: Path, data_dir: Path | None = None):
    """``get_featurizer("text", features, tokenizer_dir=...)`` for the export.

    Raises:
        EvaluationError: no tokenizer, or an unreadable data config.
    """
    try:
        from pipelines.config import FeatureConfig, load_feature_config
        from pipelines.featurize import get_featurizer
    except ImportError as e:  # a featurizer's decoder library missing on this node
        raise EvaluationError(f"cannot import the featurizers: {e}") from e

    roots = [export_dir] + ([data_dir] if data_dir is not None else [])
    tok_dir = next((r / "tokenizer" for r in roots if (r / "tokenizer").is_dir()), None)
    if tok_dir is None:
        raise EvaluationError(f"no tokenizer/ in {', '.join(str(r) for r in roots)}")
    cfg_path = next(
        (r / "data_config.yaml" for r in roots if (r / "data_config.yaml").is_file()), None
    )
    try:
        features = load_feature_config(cfg_path) if cfg_path else FeatureConfig()
    except ConfigError as e:
        raise EvaluationError(f"unreadable data config {cfg_path}: {e}") from e
    try:
        return get_featurizer("text", features, tokenizer_dir=tok_dir)
    except (OSError, ValueError, KeyError) as e:
        raise EvaluationError(f"cannot load the text tokenizer from {tok_dir}: {e}") from e
