"""Tiny random ``transformers`` towers saved locally (no network): a 2-layer BERT with its
WordPiece tokenizer, a 2-layer ViT with its image processor, a 2-layer wav2vec2 with its
feature extractor. Used by ``tests/test_towers.py`` and the tower benchmarks' smoke runs."""

from __future__ import annotations

from pathlib import Path

_WORDS = (
    "the a an of digit digits number zero one two three four five six seven eight nine "
    "ten picture photo image sound recording clip video of handwritten spoken shape circle "
    "square line bar triangle star polygon moving dot"
).split()


def make_bert(path: str | Path, hidden: int = 32, max_pos: int = 64) -> Path:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *"abcdefghijklmnopqrstuvwxyz0123456789"]
    vocab += [w for w in _WORDS if w not in vocab] + [
        f"##{c}" for c in "abcdefghijklmnopqrstuvwxyz"
    ]
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, do_lower_case=True)
    tok.save_pretrained(path)
    cfg = BertConfig(
        vocab_size=len(vocab),
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        max_position_embeddings=max_pos,
    )
    import torch

    torch.manual_seed(0)
    BertModel(cfg).save_pretrained(path)
    return path


def make_vit(path: str | Path, hidden: int = 32, size: int = 32, patch: int = 8) -> Path:
    from transformers import ViTConfig, ViTImageProcessor, ViTModel

    path = Path(path)
    cfg = ViTConfig(
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        image_size=size,
        patch_size=patch,
    )
    import torch

    torch.manual_seed(0)
    ViTModel(cfg).save_pretrained(path)
    ViTImageProcessor(size={"height": size, "width": size}).save_pretrained(path)
    return path


def make_wav2vec2(path: str | Path, hidden: int = 32) -> Path:
    from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

    path = Path(path)
    cfg = Wav2Vec2Config(
        hidden_size=hidden,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden,
        conv_dim=(16, 16),
        conv_stride=(5, 4),
        conv_kernel=(10, 8),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
    )
    import torch

    torch.manual_seed(0)
    Wav2Vec2Model(cfg).save_pretrained(path)
    Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, do_normalize=True, return_attention_mask=True
    ).save_pretrained(path)
    return path
