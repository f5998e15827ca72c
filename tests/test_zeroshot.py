"""The one zero-shot classifier (``models.zeroshot``): prompts, class embeddings, scores."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.zeroshot import (
    DEFAULT_TEMPLATES,
    class_embeddings,
    template_prompts,
    zero_shot_classifier,
    zero_shot_scores,
)

LABELS = ["zero", "one", "two"]
TEMPLATES = ["{label}", "the digit {label}"]


def fake_text_encoder(dim: int = 6, seed: int = 0):
    """Embeds a prompt as a fixed random vector of arbitrary norm; records its calls."""
    rng = np.random.default_rng(seed)
    table: dict[str, np.ndarray] = {}
    calls: list[list[str]] = []

    def embed(prompts: list[str]) -> torch.Tensor:
        calls.append(list(prompts))
        for p in prompts:
            table.setdefault(p, rng.normal(size=dim) * rng.uniform(0.5, 3.0))
        return torch.tensor(np.stack([table[p] for p in prompts]))

    return embed, table, calls


def test_template_prompts_are_label_major_and_validated() -> None:
    assert template_prompts(["a", "b"], ["{label}", "x {label}"]) == ["a", "x a", "b", "x b"]
    assert all("{label}" in t for t in DEFAULT_TEMPLATES)
    with pytest.raises(ValueError, match="placeholder"):
        template_prompts(["a"], ["a photo"])
    with pytest.raises(ValueError, match="label"):
        template_prompts([], TEMPLATES)
    with pytest.raises(ValueError, match="template"):
        template_prompts(["a"], [])


def test_classifier_is_the_renormalized_mean_of_normalized_prompt_embeddings() -> None:
    embed, table, calls = fake_text_encoder()
    cls = zero_shot_classifier(embed, LABELS, TEMPLATES)
    assert calls == [template_prompts(LABELS, TEMPLATES)]  # one call, all L*T prompts
    assert cls.shape == (3, 6)
    for i, lab in enumerate(LABELS):
        vs = [table[t.format(label=lab)] for t in TEMPLATES]
        mean = np.mean([v / np.linalg.norm(v) for v in vs], axis=0)
        np.testing.assert_allclose(cls[i].numpy(), mean / np.linalg.norm(mean), rtol=1e-12)
    torch.testing.assert_close(cls.norm(dim=-1), torch.ones(3, dtype=cls.dtype))
    # Prompt-embedding norms do not matter (each prompt is normalized first).
    scaled = class_embeddings(torch.stack([embed([p])[0] * 7.0 for p in calls[0]]), 3)
    torch.testing.assert_close(scaled, cls)
    # (L, T, E) input is the same as label-major (L*T, E).
    torch.testing.assert_close(class_embeddings(embed(calls[0]).reshape(3, 2, 6), 3), cls)
    # One template: the class embedding is that prompt's unit embedding.
    single = zero_shot_classifier(embed, ["one"], ["{label}"])
    v = table["one"]
    np.testing.assert_allclose(single[0].numpy(), v / np.linalg.norm(v), rtol=1e-12)


def test_classifier_rejects_a_wrong_number_of_embeddings() -> None:
    with pytest.raises(ValueError, match="4 prompts"):
        zero_shot_classifier(lambda ps: torch.zeros(len(ps) - 1, 3), ["a", "b"], TEMPLATES)


def test_scores_are_cosines_or_probabilities() -> None:
    embed, _, _ = fake_text_encoder(seed=1)
    cls = zero_shot_classifier(embed, LABELS, TEMPLATES)
    g = torch.Generator().manual_seed(0)
    q = torch.randn(5, 6, generator=g, dtype=torch.float64) * 4  # any norm
    sims = zero_shot_scores(q, cls)
    qn = q / q.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(sims, qn @ cls.t())
    assert sims.shape == (5, 3) and float(sims.abs().max()) <= 1 + 1e-12
    probs = zero_shot_scores(q, cls, logit_scale=math.exp(math.log(20.0)))
    torch.testing.assert_close(probs, (20.0 * sims).softmax(-1))
    torch.testing.assert_close(probs.sum(-1), torch.ones(5, dtype=probs.dtype))
    assert torch.equal(probs.argmax(-1), sims.argmax(-1))
    # A query equal to a class embedding picks that class; a higher scale sharpens it.
    hit = zero_shot_scores(cls[1], cls, logit_scale=100.0)
    assert hit.shape == (3,) and int(hit.argmax()) == 1 and float(hit[1]) > 0.99
    soft = zero_shot_scores(cls[1], cls, logit_scale=1.0)
    assert float(soft[1]) < float(hit[1])


def test_numpy_inputs_match_the_per_label_service_formula() -> None:
    """The service embeds each label's prompts, averages and renormalizes per label, and
    takes ``softmax(scale * sims)`` of one unit query: the same numbers as this module."""
    embed, table, _ = fake_text_encoder(dim=4, seed=2)
    cls = zero_shot_classifier(embed, LABELS, TEMPLATES)
    per_label = []
    for lab in LABELS:
        vs = [table[t.format(label=lab)] for t in TEMPLATES]
        v = np.mean([u / np.linalg.norm(u) for u in vs], axis=0)
        per_label.append(v / np.linalg.norm(v))
    label_emb = np.stack(per_label).astype(np.float32)
    q = np.asarray([0.3, -1.2, 0.5, 2.0], np.float32)
    qn = q / np.linalg.norm(q)
    logits = 10.0 * (label_emb @ qn)
    expect = np.exp(logits - logits.max())
    expect /= expect.sum()
    got = zero_shot_scores(q, label_emb, logit_scale=10.0)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expect, rtol=1e-5)
    np.testing.assert_allclose(label_emb, cls.numpy(), rtol=1e-6)
