"""Zero-shot classification from text prompts: the one classifier evaluation and serving run.

As OpenCLIP's ``build_zero_shot_classifier``: every label is written into every prompt
template, the prompts are embedded by the text branch, and a label's class embedding is the
mean of its L2-normalized prompt embeddings, renormalized. A query is scored by cosine
similarity with every class embedding; with the model's temperature, the softmax of the
scaled similarities gives class probabilities.

The templates are data: the export carries its list (``zero_shot.yaml``), configs set the
demo's; :data:`DEFAULT_TEMPLATES` is the neutral fallback. Callers that embed
asynchronously (the service) use :func:`template_prompts` + :func:`class_embeddings`, the
two halves of :func:`zero_shot_classifier`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_TEMPLATES: tuple[str, ...] = ("{label}", "a {label}")
"""Neutral prompt templates; ``{label}`` is replaced by the label text."""

ArrayLike = torch.Tensor | np.ndarray


def template_prompts(labels: Sequence[str], templates: Sequence[str]) -> list[str]:
    """Every label in every template, label-major: ``[t.format(label=l) for l in labels for t
    in templates]`` (``L*T`` prompts).

    Raises:
        ValueError: No label, no template, or a template without ``{label}`` (it would give
            every class the same prompt).
    """
    if not labels:
        raise ValueError("zero-shot classification needs at least one label")
    if not templates:
        raise ValueError("zero-shot classification needs at least one prompt template")
    for t in templates:
        if "{label}" not in t:
            raise ValueError(f"prompt template {t!r} has no '{{label}}' placeholder")
    return [t.format(label=lab) for lab in labels for t in templates]


def class_embeddings(prompt_embeds: ArrayLike, num_labels: int) -> torch.Tensor:
    """Class embeddings from label-major prompt embeddings.

    Args:
        prompt_embeds: ``(L*T, E)`` (or ``(L, T, E)``) embeddings of
            :func:`template_prompts`' prompts; normalized here, so any scale is fine.
        num_labels: ``L``.

    Returns:
        ``(L, E)`` unit-norm mean of each label's normalized prompt embeddings (dtype kept).
    """
    e = torch.as_tensor(prompt_embeds)
    e = e.reshape(num_labels, -1, e.shape[-1])  # (L, T, E)
    return F.normalize(F.normalize(e, dim=-1).mean(1), dim=-1)


def zero_shot_classifier(
    embed_texts: Callable[[list[str]], ArrayLike],
    labels: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
) -> torch.Tensor:
    """Builds the zero-shot classifier of ``labels``.

    Args:
        embed_texts: Embeds a list of ``n`` prompts into ``(n, E)`` text embeddings (the
            model's text branch; called once with all ``L*T`` prompts).
        labels: ``L`` label texts (the names the classes are written as in prompts).
        templates: ``T`` prompt templates containing ``{label}``.

    Returns:
        ``(L, E)`` unit-norm class embeddings, row ``i`` for ``labels[i]``.
    """
    prompts = template_prompts(labels, templates)
    emb = embed_texts(prompts)
    if len(emb) != len(prompts):
        raise ValueError(f"embed_texts returned {len(emb)} embeddings for {len(prompts)} prompts")
    return class_embeddings(emb, len(labels))


def zero_shot_scores(
    query_emb: ArrayLike, classifier: ArrayLike, logit_scale: float | None = None
) -> torch.Tensor:
    """Scores queries against a zero-shot classifier.

    Args:
        query_emb: ``(N, E)`` (or ``(E,)``) query embeddings of any modality; normalized here.
        classifier: ``(L, E)`` class embeddings from :func:`zero_shot_classifier`.
        logit_scale: The model's inverse temperature ``exp(model.logit_scale)`` (not its
            log). None: return the cosine similarities.

    Returns:
        ``(N, L)`` (or ``(L,)``): cosine similarities in ``[-1, 1]`` when ``logit_scale`` is
        None, else class probabilities ``softmax(logit_scale * cos)`` (rows sum to 1). Both
        rank the classes identically; accuracy is measured on either.
    """
    q = torch.as_tensor(query_emb)
    c = torch.as_tensor(classifier).to(q.dtype)
    sims = F.normalize(q, dim=-1) @ F.normalize(c, dim=-1).t()
    if logit_scale is None:
        return sims
    return (float(logit_scale) * sims).softmax(-1)
