"""What the demo learned, per question type and per caption attribute: ``OUT/report.json`` and ``OUT/learned.png``.

    python -m alpro.apps.demo_report demo_out/runs/pretrain --corpus demo_out/corpus --qa demo_out/results/qa.json \\
        --out demo_out

Retrieval by attribute: for every test caption the top-1 clip of the text->video ranking (VTC cosine, and the LAVIS
re-ranking when the run has a VTM head) is compared with the caption's own clip attribute by attribute: the set of
object colours, the set of shapes, the object count, the set of motions and the background. A model that matches
only the background texture scores high on ``background`` and at chance on the rest, which R@1 alone cannot show.
Chance for an attribute is the share of test clips that agree with the query's clip on it (averaged over queries):
what a top-1 pick at random would get.

QA by type: accuracy beside the uniform chance (1 / number of answers of the type in the corpus) and the majority
baseline (the type's most common training answer, always given), both computed from the corpus manifest.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from alpro.config import option, parse_command_overrides
from alpro.errors import AlproError

ATTRIBUTES = ("color", "shape", "count", "motion", "background")
QA_TYPES = ("background", "color", "count", "direction", "shape")


def read_manifest(corpus: Path) -> dict[str, dict[str, Any]]:
    """``corpus/manifest.jsonl`` -> {item id: item}; a missing or unreadable manifest is one AlproError line."""
    path = corpus / "manifest.jsonl"
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise AlproError(f"{path}: cannot read the corpus manifest ({e.strerror or e})") from None
    items = {}
    for n, line in enumerate(lines, 1):
        try:
            item = json.loads(line)
            items[item["id"]] = item
        except (ValueError, KeyError, TypeError):
            raise AlproError(f"{path}:{n}: not a corpus item (JSON object with an 'id')") from None
    return items


def attributes(item: dict[str, Any]) -> dict[str, Any]:
    """The five caption attributes of a clip, as comparable values (sets where a caption names several)."""
    objects = item.get("objects") or []
    return {"color": frozenset(o["color"] for o in objects), "shape": frozenset(o["shape"] for o in objects),
            "count": len(objects), "motion": frozenset(o.get("motion", "") for o in objects),
            "background": item.get("background")}


def per_attribute_retrieval(t2v: torch.Tensor, text_to_video: Sequence[int], keys: Sequence[str],
                            meta: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Top-1 attribute agreement of a (texts, videos) score matrix, with its chance level, in percent."""
    if t2v.shape != (len(text_to_video), len(keys)):
        raise ValueError(f"score matrix {tuple(t2v.shape)} does not match {len(text_to_video)} texts x "
                         f"{len(keys)} videos")
    missing = [k for k in keys if k not in meta]
    if missing:
        raise AlproError(f"clip {missing[0]!r} (and {len(missing) - 1} more) not in the corpus manifest")
    attrs = [attributes(meta[k]) for k in keys]
    top = t2v.argmax(dim=1).tolist()
    out: dict[str, dict[str, float]] = {}
    for a in ATTRIBUTES:
        hit = sum(attrs[j][a] == attrs[g][a] for j, g in zip(top, text_to_video))
        chance = sum(sum(v[a] == attrs[g][a] for v in attrs) / len(attrs) for g in text_to_video)
        out[a] = {"acc": 100.0 * hit / len(top), "chance": 100.0 * chance / len(top)}
    exact = sum(j == g for j, g in zip(top, text_to_video))
    out["clip (R@1)"] = {"acc": 100.0 * exact / len(top), "chance": 100.0 / len(keys)}
    return out


def qa_baselines(meta: dict[str, dict[str, Any]], corpus: Path, split: str = "test") -> dict[str, dict[str, float]]:
    """Per answer type: uniform chance over the type's answers, and the majority baseline (the most common
    training answer of the type, scored on ``split``)."""
    vocab_path = corpus / "corpus.json"
    try:
        answers = json.loads(vocab_path.read_text())["answers"]
    except (OSError, ValueError, KeyError) as e:
        raise AlproError(f"{vocab_path}: no answer vocabulary ({e})") from None
    train: dict[str, Counter] = {}
    test: dict[str, list[str]] = {}
    for item in meta.values():
        for q in item.get("qa") or []:
            if item.get("split") == "train":
                train.setdefault(q["answer_type"], Counter())[q["answer"]] += 1
            elif item.get("split") == split:
                test.setdefault(q["answer_type"], []).append(q["answer"])
    out = {}
    for t, given in sorted(test.items()):
        majority = train[t].most_common(1)[0][0] if t in train else None
        out[t] = {"chance": 100.0 / len(answers[t]), "majority": 100.0 * sum(a == majority for a in given) / len(given),
                  "majority_answer": majority, "n": float(len(given))}
    return out


@torch.no_grad()
def retrieval_scores(run: Path, split: str, overrides: list[str], k_test: int | None = None):
    """Embed the run's ``split`` clips in this process and score them: {"vtc": t2v, "lavis": t2v}, gt, keys."""
    from alpro.data import build_eval_loader, build_tokenizer
    from alpro.models import build_model, load_checkpoint
    from alpro.models.evaluation import scores_lavis
    from alpro.train.evaluate import _load_run, retrieval_embeddings

    cfg, weights, final = _load_run(run, overrides)
    tokenizer = build_tokenizer(tokenizer_dir=final / "tokenizer")
    task = "retrieval" if cfg.stage != "qa" else "qa"
    model = build_model(cfg.model, task, vocab_size=len(tokenizer))
    load_checkpoint(model, weights)
    model.eval()
    loader = build_eval_loader(cfg.data, "retrieval", tokenizer, 0, 1, split=split, seed=cfg.seed)
    emb, gt, keys = retrieval_embeddings(model, loader, tokenizer, cfg.data.max_text_len, torch.device("cpu"))
    scores = {"vtc": emb.text_feat @ emb.video_feat.t()}
    if cfg.stage != "prompter" and getattr(model, "vtm_head", None) is not None:  # a prompter's VTM head is untrained
        _, scores["lavis"] = scores_lavis(model, emb, k_test or cfg.eval.k_test, cfg.eval.batch_size)
    return scores, gt, keys


def plot(report: dict[str, Any], out_png: Path) -> Path:
    """Two panels: QA accuracy per type (chance and majority marked), retrieval top-1 agreement per attribute."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    qa = report.get("qa") or {}
    ax = axes[0]
    if qa:
        types = sorted(qa)
        xs = range(len(types))
        ax.bar(xs, [qa[t]["acc"] for t in types], color="tab:blue", label="ALPRO (demo)")
        ax.scatter(xs, [qa[t]["chance"] for t in types], marker="_", s=900, color="black", label="uniform chance")
        ax.scatter(xs, [qa[t]["majority"] for t in types], marker="_", s=900, color="tab:red",
                   label="majority answer")
        ax.set_xticks(list(xs), types)
        ax.legend(fontsize=8)
    ax.set_ylim(0, 100)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("Video QA: accuracy per question type (test)")
    ax = axes[1]
    retrieval = report.get("retrieval") or {}
    names = [a for a in (*ATTRIBUTES, "clip (R@1)") if a in next(iter(retrieval.values()), {})]
    width = 0.8 / max(1, len(retrieval) + 1)
    for i, (proto, rows) in enumerate(retrieval.items()):
        ax.bar([x + i * width for x in range(len(names))], [rows[a]["acc"] for a in names], width, label=proto)
    if retrieval:
        first = next(iter(retrieval.values()))
        ax.bar([x + len(retrieval) * width for x in range(len(names))], [first[a]["chance"] for a in names], width,
               color="lightgray", label="chance")
    ax.set_xticks([x + width * len(retrieval) / 2 for x in range(len(names))], names)
    ax.set_ylim(0, 100)
    ax.set_ylabel("top-1 clip agrees with the caption (%)")
    ax.set_title("Zero-shot text->video retrieval: what the top-1 clip gets right")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=110)
    plt.close(fig)
    return out_png


def build_report(run: Path | None, corpus: Path, qa_json: Path | None, split: str = "test",
                 overrides: Sequence[str] = (), k_test: int | None = None) -> dict[str, Any]:
    meta = read_manifest(corpus)
    report: dict[str, Any] = {}
    if run is not None:
        scores, gt, keys = retrieval_scores(run, split, list(overrides), k_test)
        report["retrieval"] = {name: per_attribute_retrieval(s, gt, keys, meta) for name, s in scores.items()}
    if qa_json is not None:
        try:
            qa = json.loads(qa_json.read_text())
        except (OSError, ValueError) as e:
            raise AlproError(f"{qa_json}: cannot read QA results ({e})") from None
        base = qa_baselines(meta, corpus, split)
        report["qa"] = {t: {"acc": qa[f"acc_{t}"], **base[t]} for t in base if f"acc_{t}" in qa}
    return report


@dataclass
class ReportOptions:
    """The options of ``python -m alpro.apps.demo_report`` (parsed by :func:`alpro.config.parse_command_overrides`;
    help from these docstrings). Other ``--section.key VALUE`` pairs override the run's config."""

    corpus: Path = option(positional=False)
    """the synth corpus directory (manifest.jsonl)"""
    out: Path = option(positional=False)
    """directory for report.json and learned.png"""
    run: Path | None = option(None, positional=True)
    """a finished pre-training (or prompter) run"""
    qa: Path | None = None
    """QA results JSON from alpro eval"""
    split: Literal["train", "val", "test"] = "test"
    """the corpus split to report on"""
    k_test: int | None = None
    """VTM re-ranking candidates per query (default: the run's eval.k_test)"""


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_command_overrides(ReportOptions, argv, prog="python -m alpro.apps.demo_report",
                                              description=__doc__.splitlines()[0])
    torch.set_num_threads(max(1, torch.get_num_threads()))
    report = build_report(args.run, args.corpus, args.qa, args.split, overrides, args.k_test)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    png = plot(report, args.out / "learned.png")
    for proto, rows in (report.get("retrieval") or {}).items():
        print(f"retrieval ({proto}) top-1 agreement: " +
              ", ".join(f"{a} {r['acc']:.1f} (chance {r['chance']:.1f})" for a, r in rows.items()))
    for t, r in (report.get("qa") or {}).items():
        print(f"qa {t}: {r['acc']:.1f} (chance {r['chance']:.1f}, majority {r['majority']:.1f})")
    print(f"wrote {args.out / 'report.json'} and {png}")
    return 0


if __name__ == "__main__":
    from alpro.cli import guarded

    raise SystemExit(guarded("demo_report", main))
