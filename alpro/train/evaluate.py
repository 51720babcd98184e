"""Evaluation: text-video retrieval (zero-shot or fine-tuned) and video QA, in training and as ``alpro eval``.

    alpro eval runs/pretrain --task retrieval --split test            # zero-shot retrieval of a pre-trained run
    alpro eval runs/qa --split test --out results.json                  # QA accuracy overall and per type
    torchrun --nproc_per_node 2 -m alpro.train.evaluate runs/msrvtt_ret --protocol both

Every rank embeds its share of the clips (the eval loader gives each clip to exactly one rank), embeddings are
gathered, and the fusion passes of the scoring are split by rows across ranks. The maths (both retrieval
protocols, metrics, QA accuracy) lives in :mod:`alpro.models.evaluation`.

Reported next to each metric is its chance level: R@k of a random ranking is k / #clips, and QA accuracy is
compared with always answering the most frequent training answer.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from alpro.config import parse_command_overrides
from alpro.dist import all_gather_objects, all_reduce_
from alpro.errors import AlproError
from alpro.fileio import atomic_write, read_json

LOG = logging.getLogger("alpro")


def _eval_split(cfg) -> str | None:
    for split in ("val", "test"):
        if cfg.data.split(split).video is not None:
            return split
    return None


def _maybe_tqdm(items, enabled: bool, desc: str):
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="batch")


@torch.no_grad()
def retrieval_embeddings(model, loader, tokenizer, max_len: int, device, paragraph: bool = False,
                         progress: bool = False):
    """Embed every clip of ``loader`` and all of their captions. Returns (RetrievalEmbeddings, text_to_video,
    keys), identical on every rank."""
    from alpro.data.text import encode
    from alpro.models.evaluation import RetrievalEmbeddings, embed_texts, embed_videos, paragraph_queries

    local: list[dict[str, Any]] = []
    for batch in _maybe_tqdm(loader, progress, "embedding clips"):
        keep = batch.valid if batch.valid is not None else torch.ones(len(batch), dtype=torch.bool)
        if not keep.any():
            continue
        idx = keep.nonzero().squeeze(1)
        video_embeds, video_feat = embed_videos(model, batch.video[idx].to(device))
        clip_texts = [batch.all_texts[i] for i in idx.tolist()]
        queries = paragraph_queries(clip_texts) if paragraph else [t for ts in clip_texts for t in ts]
        owners = list(range(len(clip_texts))) if paragraph else [i for i, ts in enumerate(clip_texts) for _ in ts]
        ids, mask = encode(tokenizer, queries, max_len)
        text_embeds, text_feat = embed_texts(model, ids.to(device), mask.to(device))
        local.append({
            "keys": [batch.keys[i] for i in idx.tolist()],
            "video_embeds": video_embeds.cpu(), "video_feat": video_feat.float().cpu(),
            "text_embeds": text_embeds.cpu(), "text_mask": mask, "text_feat": text_feat.float().cpu(),
            "owners": owners,
        })
    parts = [p for rank_parts in all_gather_objects(local) for p in rank_parts]
    if not parts:
        raise AlproError("retrieval evaluation: the evaluation split has no clips")
    keys, text_to_video, offset = [], [], 0
    for p in parts:
        keys += p["keys"]
        text_to_video += [offset + o for o in p["owners"]]
        offset += len(p["keys"])
    cat = lambda name: torch.cat([p[name] for p in parts])
    emb = RetrievalEmbeddings(cat("video_embeds"), cat("video_feat"), cat("text_embeds"), cat("text_mask"),
                              cat("text_feat"))
    return emb, text_to_video, keys


@torch.no_grad()
def evaluate_retrieval(model, cfg, tokenizer, rank: int, world: int, device, split: str,
                       protocol: str | None = None, progress: bool = False) -> dict[str, float]:
    from alpro.data import build_eval_loader
    from alpro.models.evaluation import (
        original_protocol_metrics,
        retrieval_metrics,
        scores_lavis,
        scores_original,
    )

    protocol = protocol or cfg.eval.protocol
    loader = build_eval_loader(cfg.data, "retrieval", tokenizer, rank, world, split=split, seed=cfg.seed)
    emb, gt, keys = retrieval_embeddings(model, loader, tokenizer, cfg.data.max_text_len, device,
                                         paragraph=cfg.data.paragraph, progress=progress)
    n_videos, n_texts = emb.video_feat.shape[0], emb.text_feat.shape[0]
    out: dict[str, float] = {"n_videos": float(n_videos), "n_texts": float(n_texts),
                             "chance_r1": 100.0 / n_videos, "chance_r5": min(100.0, 500.0 / n_videos),
                             "chance_r10": min(100.0, 1000.0 / n_videos)}
    vtc = emb.text_feat @ emb.video_feat.t()  # (Nt, Nv) cosine
    out.update({f"vtc_{k}": v for k, v in retrieval_metrics(vtc, gt).items()})
    has_vtm = getattr(model, "vtm_head", None) is not None
    shard = (rank, world)
    if has_vtm and protocol in ("original", "both"):
        scores = all_reduce_(scores_original(model, emb, cfg.eval.batch_size, progress, shard=shard).contiguous())
        metrics = original_protocol_metrics(scores, gt, rounding=cfg.eval.original_rounding)
        out.update({f"original_{k}": v for k, v in metrics.items()})
    if has_vtm and protocol in ("lavis", "both"):
        v2t, t2v = scores_lavis(model, emb, cfg.eval.k_test, cfg.eval.batch_size, progress, shard=shard)
        v2t, t2v = all_reduce_(v2t.contiguous()), all_reduce_(t2v.contiguous())
        out.update({f"lavis_{k}": v for k, v in retrieval_metrics(t2v, gt, v2t).items()})
    return out


@torch.no_grad()
def evaluate_qa(model, cfg, tokenizer, answer_vocab: dict[str, int], rank: int, world: int, device,
                split: str, progress: bool = False) -> dict[str, float]:
    from alpro.data import build_eval_loader
    from alpro.models.evaluation import predict_answers, qa_accuracy

    loader = build_eval_loader(cfg.data, "qa", tokenizer, rank, world, split=split, answer_vocab=answer_vocab,
                               seed=cfg.seed)
    preds, targets, types = [], [], []
    for batch in _maybe_tqdm(loader, progress, "answering"):
        keep = batch.valid if batch.valid is not None else torch.ones(len(batch), dtype=torch.bool)
        idx = keep.nonzero().squeeze(1)
        if len(idx) == 0:
            continue
        p = predict_answers(model, batch.video[idx].to(device), batch.input_ids[idx].to(device),
                            batch.attention_mask[idx].to(device))
        preds.append(p.cpu())
        targets.append(batch.answer_ids[idx].cpu())
        types += [batch.answer_types[i] for i in idx.tolist()] if batch.answer_types else []
    gathered = all_gather_objects((preds, targets, types))
    preds = torch.cat([p for g in gathered for p in g[0]])
    targets = torch.cat([t for g in gathered for t in g[1]])
    types = [t for g in gathered for t in g[2]] or None
    out = qa_accuracy(preds, targets, types)
    # Majority baseline: the vocabulary is sorted by training frequency, so label 0 is the most common answer.
    out["majority_acc"] = 100.0 * float((targets == 0).float().mean())
    return out


def evaluate_during_training(model, cfg, tokenizer, answer_vocab, rank: int, world: int, device) -> dict[str, Any]:
    """The stage's own evaluation on val (or test when there is no val split); {} when neither is set."""
    split = _eval_split(cfg)
    if split is None:
        return {}
    was_training = model.training
    model.eval()
    try:
        if cfg.stage == "qa":
            return evaluate_qa(model, cfg, tokenizer, answer_vocab, rank, world, device, split)
        return evaluate_retrieval(model, cfg, tokenizer, rank, world, device, split)
    finally:
        model.train(was_training)


# ------------------------------------------------------------------------------------------------------- CLI


def _load_run(path: Path, overrides: list[str]):
    """A run directory (its final/) or a final/ directory -> (RunConfig, weights path, final dir)."""
    from alpro.config import apply_overrides, from_dict, load_yaml
    from alpro.train.config import RunConfig

    final = path / "final" if (path / "final").is_dir() else path
    if not (final / "config.yaml").is_file() or not (final / "model.safetensors").is_file():
        raise AlproError(f"{path}: not a finished run (expected final/config.yaml and final/model.safetensors)")
    data = apply_overrides(load_yaml(final / "config.yaml"), overrides)
    return from_dict(RunConfig, data), final / "model.safetensors", final


@dataclass
class EvalOptions:
    """The options of ``alpro eval`` (parsed by :func:`alpro.config.parse_command_overrides`; help from these
    docstrings). Other ``--section.key VALUE`` pairs override the run's config."""

    run: Path
    """a run directory (uses RUN/final) or a final/ directory"""
    task: Literal["retrieval", "qa"] | None = None
    """default: qa for QA runs, retrieval otherwise (zero-shot for a pre-trained run)"""
    split: Literal["train", "val", "test"] = "test"
    """the split to evaluate"""
    protocol: Literal["original", "lavis", "both"] | None = None
    """retrieval protocol (default: the run's eval.protocol)"""
    k_test: int | None = None
    """VTM re-ranking candidates per query (default: the run's eval.k_test)"""
    out: Path | None = None
    """write the metrics as JSON here"""
    progress: bool = True
    """tqdm bars on rank 0 (--no-progress: none)"""


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_command_overrides(
        EvalOptions, argv, prog="alpro eval", description="Evaluate retrieval or QA from a finished run.",
        epilog="Extra --section.key VALUE pairs override the run's config "
               "(e.g. --data.test.video shards/test --data.eval_batch_size 64).")
    if args.k_test is not None:
        overrides += ["--eval.k_test", str(args.k_test)]
    cfg, weights, final = _load_run(args.run, overrides)
    task = args.task or ("qa" if cfg.stage == "qa" else "retrieval")
    if cfg.data.split(args.split).video is None:
        raise AlproError(f"the run's config has no data.{args.split}.video: pass --data.{args.split}.video SHARDS")

    from alpro.train import runtime

    rank, world, local = runtime.init_distributed()
    try:
        return _evaluate_run(args, cfg, final, weights, task, rank, world, local)
    finally:
        runtime.shutdown()


def _evaluate_run(args, cfg, final, weights, task, rank, world, local) -> int:
    from alpro.data import build_tokenizer
    from alpro.models import build_model, load_checkpoint
    from alpro.train import runtime
    from alpro.train.metrics import setup_logging

    setup_logging(None, rank)
    device = runtime.device_for(local)
    tokenizer = build_tokenizer(tokenizer_dir=final / "tokenizer")
    answer_vocab = None
    if task == "qa":
        vocab_path = final / "answer_vocab.json"
        if not vocab_path.is_file():
            raise AlproError(f"{final}: no answer_vocab.json (is this a QA run?)")
        answer_vocab = read_json(vocab_path)
    model = build_model(cfg.model, task, vocab_size=len(tokenizer),
                        num_answers=len(answer_vocab) if answer_vocab else None)
    report = load_checkpoint(model, weights)
    LOG.info(str(report))
    model.to(device).eval()
    progress = rank == 0 and args.progress
    t0 = time.perf_counter()
    if task == "qa":
        results = evaluate_qa(model, cfg, tokenizer, answer_vocab, rank, world, device, args.split, progress)
    else:
        results = evaluate_retrieval(model, cfg, tokenizer, rank, world, device, args.split, args.protocol,
                                     progress)
    results["seconds"] = time.perf_counter() - t0
    if rank == 0:
        print(json.dumps({"run": str(args.run), "task": task, "split": args.split, **results}, indent=1))
        if args.out is not None:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(args.out, json.dumps({"task": task, "split": args.split, **results}, indent=1))
    return 0


if __name__ == "__main__":
    import sys

    from alpro.cli import main as cli_main

    raise SystemExit(cli_main(["eval", *sys.argv[1:]]))
