"""The demo's one page: ``reports/index.html``.

Sections (each an ``<section id=...>``): ``steps`` (each step and its wall time), ``targets``
(the headline metrics against their targets, the per-modality accuracy against the
logistic-regression baselines of :mod:`benchmarks.baselines`), ``examples`` (the serve
step's example queries with their inputs shown: image thumbnails, an audio player, a
point-cloud render, the signal trace, video frames; and their answers, search hits as
thumbnails), ``plots`` (every PNG of the run) and ``files`` (logs, export).

Plots are linked as relative files (they sit next to ``index.html``); the example media are
embedded as data URIs or written under ``reports/examples/``, so the folder can be copied
or opened from anywhere.
"""

from __future__ import annotations

import base64
import html
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

#: Targets of the headline figures: (key, label, comparison, value); :func:`target_label`
#: words the label for a run (how many pairs, which emergent pairs).
TARGETS = (
    ("mean_r1", "mean R@1 over the ordered pairs of the modalities present", ">=", 0.90),
    ("emergent", "emergent pair(s) R@1", ">=", 0.85),
    ("fusion_gain", "fusion gain (fused vs best single modality)", ">", 0.0),
)

_AUDIO_MIME = {
    ".wav": "audio/wav",
    ".flac": "audio/flac",
    ".mp3": "audio/mpeg",
    ".ogg": "audio/ogg",
}
_IMAGE_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg"}

#: After load, ``<body data-images-loaded="k/n">``: how many images the browser decoded
#: (a broken path or data URI shows as k < n; the browser test reads it).
_LOAD_CHECK = (
    "window.addEventListener('load',function(){var a=Array.from(document.images);"
    "document.body.dataset.imagesLoaded=a.filter(function(i){return i.complete&&"
    "i.naturalWidth>0}).length+'/'+a.length;});"
)

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1200px;color:#222}
h1{margin-bottom:.2em} h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ddd;padding:3px 8px;
font-size:14px;text-align:left} th{background:#f3f3f3}
.ok{color:#107010;font-weight:600} .miss{color:#b00020;font-weight:600}
.thumb{width:64px;height:64px;image-rendering:pixelated;border:1px solid #ccc;margin:1px}
.render{height:140px;border:1px solid #ccc} .plot{max-width:100%;border:1px solid #eee;margin:.4em 0}
.example{border:1px solid #ddd;border-radius:6px;padding:.6em;margin:.6em 0}
.hits{display:flex;gap:6px;flex-wrap:wrap} .hit{text-align:center;font-size:12px}
figure{margin:.6em 0} figcaption{font-size:13px;color:#555} code{background:#f5f5f5}
"""


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png_of(fig) -> bytes:
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    _plt().close(fig)
    return buf.getvalue()


def render_pointcloud(points: np.ndarray) -> bytes:
    """PNG of an ``(N, 3)`` cloud seen from the front and from above."""
    plt = _plt()
    p = np.asarray(points, dtype=np.float32)[:, :3]
    fig = plt.figure(figsize=(4, 2))
    for i, (elev, azim) in enumerate(((10, -80), (75, -90))):
        ax = fig.add_subplot(1, 2, i + 1, projection="3d")
        ax.scatter(p[:, 0], p[:, 1], p[:, 2], s=3, c=p[:, 2], cmap="viridis")
        ax.view_init(elev=elev, azim=azim)
        ax.set_axis_off()
    return _png_of(fig)


def render_signal(signal: np.ndarray) -> bytes:
    """PNG of a ``(C, L)`` signal, one trace per channel."""
    plt = _plt()
    x = np.asarray(signal, dtype=np.float32)
    x = x[None] if x.ndim == 1 else x
    fig, ax = plt.subplots(figsize=(4, 1.8))
    for c in range(x.shape[0]):
        ax.plot(x[c], lw=1, label=f"ch{c}")
    ax.legend(fontsize=6, loc="upper right")
    ax.tick_params(labelsize=6)
    return _png_of(fig)


def render_frames(frames: np.ndarray) -> bytes:
    """PNG strip of a video's ``(F, H, W, 3)`` frames."""
    from PIL import Image

    f = np.asarray(frames, dtype=np.uint8)
    strip = np.concatenate(list(f), axis=1)
    img = Image.fromarray(strip).resize((strip.shape[1] * 2, strip.shape[0] * 2), Image.NEAREST)
    import io

    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


class _Media:
    """Renders a corpus input of any modality as HTML (data URIs)."""

    def __init__(self, corpus_dir: Path) -> None:
        self.root = corpus_dir
        self.cache: dict[tuple[str, str], str] = {}

    def _decode(self, modality: str, path: Path) -> np.ndarray:
        from pipelines.featurize import get_featurizer

        return get_featurizer(modality).decode(path.read_bytes(), path.suffix)

    def html(self, modality: str, value: Any, css: str = "thumb") -> str:
        key = (modality, json.dumps(value, sort_keys=True, default=str))
        if key in self.cache:
            return self.cache[key]
        out = self._html(modality, value, css)
        self.cache[key] = out
        return out

    def _html(self, modality: str, value: Any, css: str) -> str:
        if not isinstance(value, str) or modality in ("text",):
            text = value if isinstance(value, str) else json.dumps(value)
            return f"<code>{_esc(text)}</code>"
        path = self.root / value
        if not path.is_file():
            return f"<code>{_esc(value)}</code> (missing)"
        suffix = path.suffix.lower()
        try:
            if modality == "image" and suffix in _IMAGE_MIME:
                uri = _data_uri(path.read_bytes(), _IMAGE_MIME[suffix])
                return f'<img class="{css}" src="{uri}" alt="image {_esc(value)}">'
            if modality == "audio":
                mime = _AUDIO_MIME.get(suffix, "audio/wav")
                uri = _data_uri(path.read_bytes(), mime)
                return f'<audio controls src="{uri}" title="{_esc(value)}"></audio>'
            if modality == "pointcloud":
                png = render_pointcloud(self._decode(modality, path))
            elif modality == "signal":
                png = render_signal(self._decode(modality, path))
            elif modality == "video":
                png = render_frames(self._decode(modality, path))
            else:
                return f"<code>{_esc(value)}</code>"
        except Exception as e:  # noqa: BLE001 - an unreadable input is shown as such
            return f"<code>{_esc(value)}</code> (not rendered: {_esc(type(e).__name__)})"
        alt = f"{modality} {value}"
        return f'<img class="render" src="{_data_uri(png, "image/png")}" alt="{_esc(alt)}">'


def headline(metrics: dict[str, Any]) -> dict[str, float | None]:
    """The figures :data:`TARGETS` names, from the evaluation's ``metrics.json``: the mean
    R@1 over every measured ordered pair of the modalities the split and the export have,
    the mean R@1 of the emergent pair(s) (both directions), the fusion gain."""
    fu = metrics.get("fusion") or {}
    em = metrics.get("emergent") or metrics.get("emergent_alignment") or {}
    return {
        "mean_r1": metrics.get("mean_R@1"),
        "emergent": em.get("mean_R@1"),
        "fusion_gain": fu.get("fusion_gain"),
    }


def target_label(key: str, metrics: dict[str, Any], *, short: bool = False) -> str:
    """The label of target ``key`` for this run: ``mean R@1 over the 42 ordered pairs of
    the 7 modalities present``, ``emergent pair R@1 (held out in training): audio->pointcloud
    0.715, pointcloud->audio 0.891; mean``."""
    label = next(lab for k, lab, _, _ in TARGETS if k == key)
    if key == "mean_r1":
        n_pairs = len((metrics.get("retrieval_summary") or {}).get("R@1") or {})
        n_mod = len(metrics.get("modalities") or [])
        if n_pairs:
            what = "mean R@1" if short else "mean R@1 over the"
            label = f"{what} {n_pairs} ordered pairs" + (f" of {n_mod} modalities" if n_mod else "")
            label += "" if short else " present"
    elif key == "emergent":
        em = metrics.get("emergent") or metrics.get("emergent_alignment") or {}
        r1 = em.get("R@1") or {}
        if r1:
            which = "" if short else f", {em.get('selected_by') or 'never trained together'}"
            cells = ", ".join(f"{k} {v:.3f}" for k, v in r1.items())
            label = f"emergent R@1{which}: {cells}" + ("; mean" if len(r1) > 1 else "")
    elif short:
        label = label.split(" (")[0]
    return label


def meets(value: float | None, op: str, target: float) -> bool | None:
    if value is None:
        return None
    return value >= target if op == ">=" else value > target


def _fmt(v: Any, nd: int = 3) -> str:
    return "n/a" if v is None else (f"{v:.{nd}f}" if isinstance(v, float) else _esc(v))


def _verdict(ok: bool | None) -> str:
    if ok is None:
        return "<td>not measured</td>"
    return '<td class="ok">met</td>' if ok else '<td class="miss">missed</td>'


def _steps_section(report: dict[str, Any]) -> str:
    rows = "".join(
        f"<tr><td>{_esc(k)}</td><td>{'cached' if v.get('skipped') else _fmt(v.get('seconds'), 1) + ' s'}</td></tr>"
        for k, v in (report.get("steps") or {}).items()
    )
    c = report.get("corpus") or {}
    tr = (report.get("training") or {}).get("stages") or {}
    stage_rows = "".join(
        f"<tr><td>{_esc(s)}</td><td>{_fmt(v.get('steps'))}</td><td>{_fmt(v.get('first_loss'))}"
        f" &rarr; {_fmt(v.get('final_loss'))}</td><td>{_fmt(v.get('samples_per_s'), 1)}</td>"
        f"<td>{_fmt(v.get('wall_s'), 0)} s</td></tr>"
        for s, v in tr.items()
    )
    return (
        '<section id="steps"><h2>Steps and times</h2>'
        f"<p>Total {_fmt(report.get('total_seconds'), 0)} s. Corpus: read {_fmt(c.get('rows_read'))}"
        f" rows, wrote {_fmt(c.get('rows_written'))} {_esc(c.get('splits'))}, quarantined "
        f"{_fmt(c.get('quarantine_records'))} inputs {_esc(report.get('quarantine_by_reason'))}.</p>"
        f"<table><tr><th>step</th><th>wall time</th></tr>{rows}</table>"
        + (
            "<table><tr><th>training stage</th><th>steps</th><th>loss</th><th>samples/s</th>"
            f"<th>wall</th></tr>{stage_rows}</table>"
            if stage_rows
            else ""
        )
        + "</section>"
    )


def _targets_section(metrics: dict[str, Any], baselines: dict[str, Any], examples: dict) -> str:
    h = headline(metrics)
    rows = "".join(
        f"<tr><td>{_esc(target_label(key, metrics))}</td><td>{_fmt(h.get(key))}</td>"
        f"<td>{op} {target}</td>{_verdict(meets(h.get(key), op, target))}</tr>"
        for key, _, op, target in TARGETS
    )
    em = metrics.get("emergent_alignment") or {}
    other = em.get("other_never_trained") or {}
    if other.get("R@1"):
        cells = ", ".join(f"{k} {v:.3f}" for k, v in other["R@1"].items())
        rows += (
            f"<tr><td>other pairs never trained together (not held out on purpose): "
            f"{_esc(cells)}</td><td>{_fmt(other['mean_R@1'])}</td><td>&ndash;</td><td></td></tr>"
        )
    n_right = sum(1 for e in examples.values() if e.get("top1_right"))
    if examples:
        rows += (
            f"<tr><td>example searches right at top-1</td><td>{n_right}/{len(examples)}</td>"
            f"<td>all</td>{_verdict(n_right == len(examples))}</tr>"
        )
    out = (
        '<section id="targets"><h2>Metrics against targets</h2>'
        f"<table><tr><th>figure</th><th>value</th><th>target</th><th></th></tr>{rows}</table>"
    )
    out += _per_modality_table(metrics, baselines)
    return out + "</section>"


def _acc(rep: dict[str, Any] | None) -> str:
    if not rep or rep.get("accuracy") is None:
        return "n/a"
    bal = rep.get("balanced_accuracy")
    return f"{rep['accuracy']:.3f}" + ("" if bal is None else f" / {bal:.3f}")


def _per_modality_table(metrics: dict[str, Any], baselines: dict[str, Any]) -> str:
    zs = (metrics.get("zero_shot") or {}).get("per_modality") or {}
    cl = metrics.get("classification") or {}
    head = cl.get("per_modality") or {}
    base = (baselines.get("per_modality") or {}) if baselines else {}
    mods = list(dict.fromkeys([*head, *zs, *base]))
    if not mods:
        return ""
    rows = []
    for m in mods:
        b = (base.get(m) or {}).get("accuracy")
        z = (zs.get(m) or {}).get("accuracy")
        c = (head.get(m) or {}).get("accuracy")
        best = max([v for v in (z, c) if v is not None], default=None)
        verdict = _verdict(None if b is None or best is None else best >= b)
        rows.append(
            f"<tr><td>{_esc(m)}</td><td>{_fmt(b)}</td><td>{_acc(zs.get(m))}</td>"
            f"<td>{_acc(head.get(m))}</td>{verdict}</tr>"
        )
    note = (
        f"<p>Baseline: {_esc(baselines.get('method', 'logistic regression'))} on the featurized "
        f"train split, scored on {_esc(baselines.get('split', 'test'))}.</p>"
        if baselines
        else "<p>No baseline run found (run <code>python -m benchmarks.baselines</code>).</p>"
    )
    skipped = "".join(
        f"<p>{what}: skipped ({_esc(sec['skipped'])}).</p>"
        for what, sec in (("Zero-shot", metrics.get("zero_shot") or {}), ("Classifier head", cl))
        if "skipped" in sec
    )
    return (
        "<h3>Per-sample accuracy / balanced accuracy per modality (test split)</h3>"
        "<table><tr><th>modality</th><th>baseline accuracy</th><th>OmniRay zero-shot</th>"
        "<th>OmniRay classifier head</th><th>OmniRay &ge; baseline</th></tr>"
        + "".join(rows)
        + f"</table><p>Classifier head on each row's modalities fused: {_acc(cl.get('fused'))}."
        "</p>" + skipped + note + _recall_table(metrics)
    )


def _recall_table(metrics: dict[str, Any]) -> str:
    """Recall of each class, one row per head panel (fused, each modality) and zero-shot
    modality (``eval/per_class_recall.csv`` holds the same)."""
    from jobs.evaluation.report import classification_panels

    rows = [
        (src, name, rep)
        for src, key in (("head", "classification"), ("zero-shot", "zero_shot"))
        for name, rep in classification_panels(metrics.get(key) or {}).items()
    ]
    if not rows:
        return ""
    classes = list(rows[0][2].get("per_class_recall") or {})
    head = "".join(f"<th>{_esc(c)}</th>" for c in classes)
    body = "".join(
        f"<tr><td>{_esc(src)}</td><td>{_esc(name)}</td>"
        + "".join(f"<td>{_fmt(rep['per_class_recall'].get(c), 2)}</td>" for c in classes)
        + "</tr>"
        for src, name, rep in rows
    )
    return (
        '<h3 id="recall">Recall per class (test split)</h3>'
        f"<table><tr><th>scorer</th><th>modality</th>{head}</tr>{body}</table>"
        "<p>Confusion matrices: the <code>confusion_classification</code> and "
        "<code>confusion_zero_shot</code> plots below.</p>"
    )


def _examples_section(serving: dict[str, Any], media: _Media, manifest: dict[str, dict]) -> str:
    reqs = serving.get("requests") or {}
    blocks = []
    for name, r in reqs.items():
        inputs = r.get("inputs")
        if not inputs:
            continue
        shown = " ".join(
            f"<div><b>{_esc(m)}</b><br>{media.html(m, v)}</div>"
            for m, v in inputs.items()
            if m != "id"
        )
        answer = _answer_html(r, media, manifest)
        blocks.append(
            f'<div class="example" data-request="{_esc(name)}"><b>{_esc(name)}</b> '
            f"(HTTP {_esc(r.get('status'))}, {_fmt(r.get('latency_ms'), 0)} ms, query row "
            f"<code>{_esc(inputs.get('id'))}</code>)"
            f'<div class="hits">{shown}</div><div>{answer}</div></div>'
        )
    if not blocks:
        body = "<p>The serve step did not run (or sent no example queries).</p>"
    else:
        body = "".join(blocks)
    return f'<section id="examples"><h2>Example queries to the service</h2>{body}</section>'


def _answer_html(r: dict[str, Any], media: _Media, manifest: dict[str, dict]) -> str:
    ans = r.get("answer")
    if ans is None:
        return f"answer: {_esc(r.get('summary', ''))}"
    true = ans.get("true")
    if "results" in ans:
        hits = []
        for x in ans["results"]:
            row = manifest.get(x.get("id"), {})
            img = media.html("image", row["image"]) if "image" in row else ""
            mark = "ok" if true is not None and x.get("label") == true else "miss"
            hits.append(
                f'<div class="hit">{img}<br><span class="{mark}">{_esc(x.get("label"))}</span>'
                f" {x.get('score', 0):.2f}</div>"
            )
        return f"answer (true label {_esc(true)}): top-{len(hits)} images" + (
            f'<div class="hits">{"".join(hits)}</div>'
        )
    if "label" in ans:
        mark = "ok" if ans["label"] == true else "miss"
        return f'answer: <span class="{mark}">{_esc(ans["label"])}</span> (true {_esc(true)})'
    if "text" in ans:
        return f"answer: <q>{_esc(ans['text'])}</q> (true label {_esc(true)})"
    if "gates" in ans:
        cells = ", ".join(f"{_esc(k)} {v:.2f}" for k, v in ans["gates"].items())
        return f"answer: fused embedding; gate weights {cells}"
    return f"answer: <code>{_esc(json.dumps(ans)[:300])}</code>"


#: Captions of the known plots (others get their file name).
CAPTIONS = {
    "loss_pretrain": "Pretraining losses by family (raw thin, smoothed thick).",
    "loss_align": "Alignment losses: one panel per contrastive pair, reconstruction, caption, MoE.",
    "loss_finetune": "Finetuning losses: classification, retrieval, description, MoE.",
    "expert_load": "Expert load: share of each modality's tokens per expert and trunk layer.",
    "gate_weights": "Fusion gate weight per modality during finetuning.",
    "retrieval_r1": "Cross-modal retrieval R@1 (query row, gallery column); hatched * = never "
    "trained together.",
    "embeddings_2d": "Test embeddings projected to 2-D, coloured by label, marker by modality.",
    "zero_shot": "Zero-shot accuracy per modality.",
    "fusion": "Fusion: fused vs single-modality accuracy.",
    "confusion_classification": "Classifier head confusion matrices.",
    "confusion_zero_shot": "Zero-shot confusion matrices.",
    "baselines": "Per-modality accuracy: logistic-regression baseline vs OmniRay.",
}


def _plots_section(reports: Path) -> str:
    pngs = sorted(
        (p for p in reports.rglob("*.png") if "examples" not in p.relative_to(reports).parts),
        key=lambda p: (list(CAPTIONS).index(p.stem) if p.stem in CAPTIONS else 99, str(p)),
    )
    figs = "".join(
        f'<figure><img class="plot" src="{_esc(p.relative_to(reports).as_posix())}" '
        f'alt="{_esc(p.stem)}"><figcaption>{_esc(CAPTIONS.get(p.stem, p.stem))}</figcaption></figure>'
        for p in pngs
    )
    return f'<section id="plots"><h2>Plots</h2>{figs or "<p>No plots.</p>"}</section>'


def _read_manifest(corpus_dir: Path) -> dict[str, dict]:
    path = corpus_dir / "manifest.jsonl"
    if not path.is_file():
        return {}
    out = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                row = json.loads(line)
                out.setdefault(row.get("id"), row)
    return out


def write_html_report(
    report: dict[str, Any],
    reports_dir: Path,
    *,
    metrics: dict[str, Any] | None = None,
    baselines: dict[str, Any] | None = None,
    corpus_dir: Path | None = None,
    log_dir: Path | None = None,
    title: str = "OmniRay demo report",
) -> Path:
    """Writes ``reports_dir/index.html`` and returns its path.

    Args:
        report: :func:`jobs.demo.run.build_report`'s dict (steps, corpus, training, serving).
        metrics: The evaluation's ``metrics.json``.
        baselines: :mod:`benchmarks.baselines`' JSON (None: the table says it is missing).
        corpus_dir: The corpus (raw files of the example queries and search hits).
        log_dir: Where the steps' logs are (listed).
    """
    reports_dir.mkdir(parents=True, exist_ok=True)
    serving = report.get("serving") or {}
    corpus = Path(corpus_dir or serving.get("corpus_dir") or ".")
    media = _Media(corpus)
    manifest = _read_manifest(corpus)
    metrics = metrics or {}
    files = [("export", (report.get("paths") or {}).get("export"))]
    if log_dir is not None:
        files += [(p.name, str(p)) for p in sorted(Path(log_dir).glob("*.log"))]
    if serving.get("log"):
        files.append(("serve.log", serving["log"]))
    file_rows = "".join(
        f"<tr><td>{_esc(k)}</td><td><code>{_esc(v)}</code></td></tr>" for k, v in files if v
    )
    body = (
        f"<h1>{_esc(title)}</h1><p>Generated {time.strftime('%Y-%m-%d %H:%M:%S')}.</p>"
        + _steps_section(report)
        + _targets_section(metrics, baselines or {}, serving.get("examples") or {})
        + _examples_section(serving, media, manifest)
        + _plots_section(reports_dir)
        + f'<section id="files"><h2>Files</h2><table>{file_rows}</table></section>'
    )
    page = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>{_esc(title)}</title><style>{_CSS}</style></head><body>{body}"
        f"<script>{_LOAD_CHECK}</script></body></html>"
    )
    path = reports_dir / "index.html"
    path.write_text(page)
    return path
