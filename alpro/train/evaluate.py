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
from alpro.dist import all_gather_objects, get_rank, get_world_size
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
def _embed_local(model, loader, tokenizer, max_len: int, device, paragraph: bool = False,
                 progress: bool = False) -> list[dict[str, Any]]:
    """This rank's clips of ``loader`` and their captions, embedded: one dict per batch (on the CPU)."""
    from alpro.data.text import encode
    from alpro.models.evaluation import embed_texts, embed_videos, paragraph_queries

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
    return local


@torch.no_grad()
def retrieval_embeddings(model, loader, tokenizer, max_len: int, device, paragraph: bool = False,
                         progress: bool = False):
    """Embed every clip of ``loader`` and all of their captions. Returns (RetrievalEmbeddings, text_to_video,
    keys), identical on every rank: every clip's tokens on every rank (the dense path; :func:`evaluate_retrieval`
    uses :func:`sharded_embeddings` instead)."""
    from alpro.models.evaluation import RetrievalEmbeddings

    local = _embed_local(model, loader, tokenizer, max_len, device, paragraph, progress)
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


@dataclass
class ShardedEmbeddings:
    """What a rank holds for scaled retrieval scoring: every clip's and text's pooled VTC feature (E floats
    each) and every text's clip, but only its own clips' and texts' tokens (global ids ``video_lo + i`` and
    ``text_lo + j``, numbered rank by rank as the dense path's gathered order)."""

    video_feat: torch.Tensor  # (Nv, E) all clips
    text_feat: torch.Tensor  # (Nt, E) all texts
    text_to_video: torch.Tensor  # (Nt,) all texts
    video_lo: int
    text_lo: int
    video_embeds: torch.Tensor  # (nv, 1+P, D) this rank's clips
    text_embeds: torch.Tensor  # (nt, L, D) this rank's texts
    text_mask: torch.Tensor  # (nt, L)


def sharded_embeddings(local: list[dict[str, Any]]) -> ShardedEmbeddings:
    """Gather the features (not the tokens) of every rank's :func:`_embed_local` parts."""
    cat = lambda name: torch.cat([p[name] for p in local]) if local else None  # noqa: E731
    mine = {name: cat(name) for name in ("video_embeds", "video_feat", "text_embeds", "text_mask", "text_feat")}
    owners, n = [], 0
    for p in local:
        owners += [n + o for o in p["owners"]]
        n += len(p["keys"])
    shapes = {k: (tuple(v.shape[1:]), v.dtype) for k, v in mine.items() if v is not None}
    gathered = all_gather_objects((mine["video_feat"], mine["text_feat"], torch.tensor(owners, dtype=torch.long),
                                   shapes))
    if all(g[0] is None for g in gathered):
        raise AlproError("retrieval evaluation: the evaluation split has no clips")
    shapes = next(g[3] for g in gathered if g[3])
    for name, value in mine.items():  # a rank without clips holds empty tensors of the right shape
        if value is None:
            mine[name] = torch.empty((0, *shapes[name][0]), dtype=shapes[name][1])
    videos, texts, gt = [], [], []
    video_lo = text_lo = offset = 0
    for r, (vf, tf, own, _) in enumerate(gathered):
        if r == get_rank():
            video_lo, text_lo = offset, sum(len(t) for t in texts)
        if vf is None:
            continue
        videos.append(vf)
        texts.append(tf)
        gt.append(own + offset)
        offset += len(vf)
    return ShardedEmbeddings(torch.cat(videos), torch.cat(texts), torch.cat(gt), video_lo, text_lo,
                             mine["video_embeds"], mine["text_embeds"], mine["text_mask"])


FETCH_BYTES = 64 << 20
"""Query tokens all ranks together send per re-ranking round (each rank ``FETCH_BYTES / world``, >= one row)."""


@torch.no_grad()
def _rerank(model, se: ShardedEmbeddings, top_sim: torch.Tensor, top_idx: torch.Tensor, video_rows: bool,
            batch_size: int, progress: bool, fetch_bytes: int = FETCH_BYTES) -> torch.Tensor:
    """VTM logit + cosine of this rank's rows' top-k pairs (LAVIS's re-ranking). Round by round every rank
    sends its rows' tokens with their candidates; the owner of a candidate scores the pairs it holds (a row's
    pairs in one :func:`vtm_pair_logits` call, in top-k order, as the dense path) and the logits come back. So
    only query tokens travel (one row, not k candidates, per query) and no rank holds another's keys."""
    from alpro.models.evaluation import RetrievalEmbeddings, _progress, vtm_pair_logits

    n, k = top_idx.shape
    world = get_world_size()
    query = (se.video_embeds,) if video_rows else (se.text_embeds, se.text_mask)
    key_lo, key_n = (se.text_lo, len(se.text_embeds)) if video_rows else (se.video_lo, len(se.video_embeds))
    row_bytes = sum(t[0].numel() * t.element_size() for t in query) if n else 1
    per_round = max(1, fetch_bytes // max(1, row_bytes * world))
    rounds = max(all_gather_objects(-(-n // per_round)))
    scores = torch.empty(n, k)
    for r in _progress(range(rounds), progress, "v2t re-rank" if video_rows else "t2v re-rank"):
        lo, hi = min(n, r * per_round), min(n, (r + 1) * per_round)
        sent = all_gather_objects((tuple(t[lo:hi] for t in query), top_idx[lo:hi]))
        replies = []
        for q_tok, cands in sent:  # score the pairs whose candidate this rank holds
            logits = torch.full(cands.shape, float("nan"))
            for i in range(len(cands)):
                mine = (cands[i] >= key_lo) & (cands[i] < key_lo + key_n)
                if not mine.any():
                    continue
                keys, own = cands[i][mine] - key_lo, torch.full((int(mine.sum()),), i)
                if video_rows:
                    emb = RetrievalEmbeddings(q_tok[0], se.video_feat, se.text_embeds, se.text_mask, se.text_feat)
                    t_idx, v_idx = keys, own
                else:
                    emb = RetrievalEmbeddings(se.video_embeds, se.video_feat, q_tok[0], q_tok[1], se.text_feat)
                    t_idx, v_idx = own, keys
                logits[i, mine] = vtm_pair_logits(model, emb, t_idx, v_idx, batch_size)[:, 1].cpu()
            replies.append(logits)
        match = torch.full((hi - lo, k), float("nan"))
        for owner_replies in all_gather_objects(replies):
            got = owner_replies[get_rank()]
            match = torch.where(torch.isnan(got), match, got)
        scores[lo:hi] = match + top_sim[lo:hi]
    return scores


def _gather_cat(x: torch.Tensor) -> torch.Tensor:
    return torch.cat(all_gather_objects(x))


@torch.no_grad()
def score_retrieval(model, se: ShardedEmbeddings, protocol: str, k_test: int, batch_size: int,
                    rounding: bool = False, progress: bool = False, fetch_bytes: int = FETCH_BYTES
                    ) -> dict[str, float]:
    """VTC metrics and those of each protocol from sharded embeddings: every rank ranks its own texts against
    all clips and its own clips against all texts, by pooled features in chunks (running top-k); LAVIS's
    re-ranking fetches only the top-k candidates' tokens; ranks are gathered (an int per query). Equal to the
    dense path (:func:`retrieval_embeddings`, :func:`scores_lavis`, :func:`scores_original`)."""
    from alpro.models.evaluation import (
        RetrievalEmbeddings,
        lavis_ranks,
        metrics_from_ranks,
        original_protocol_metrics,
        positives_csr,
        scores_original,
        vtc_topk_ranks,
    )

    n_videos, n_texts = len(se.video_feat), len(se.text_feat)
    nv, nt = len(se.video_embeds), len(se.text_embeds)
    has_vtm = getattr(model, "vtm_head", None) is not None
    lavis = has_vtm and protocol in ("lavis", "both")
    k = k_test if lavis else 0
    vptr, vpos = positives_csr(se.text_to_video, n_videos)  # the texts of each clip
    tptr, tpos = torch.arange(n_texts + 1), se.text_to_video  # the clip of each text
    # The dense path's orientations: VTC ranks from text_feat @ video_feat.T, LAVIS's top-k from its transpose.
    t_rank, t_sim, t_idx = vtc_topk_ranks(se.text_feat[se.text_lo:se.text_lo + nt], se.video_feat,
                                          tptr[se.text_lo:se.text_lo + nt + 1], tpos, k, topk_key_major=True)
    v_rank, v_sim, v_idx = vtc_topk_ranks(se.video_feat[se.video_lo:se.video_lo + nv], se.text_feat,
                                          vptr[se.video_lo:se.video_lo + nv + 1], vpos, k, rank_key_major=True)
    out = {f"vtc_{key}": v for key, v in metrics_from_ranks(_gather_cat(t_rank), _gather_cat(v_rank)).items()}
    if has_vtm and protocol in ("original", "both"):  # every pair by VTM: O(Nt x Nv) by definition
        videos = torch.cat(all_gather_objects(se.video_embeds))
        mine = RetrievalEmbeddings(videos, se.video_feat, se.text_embeds, se.text_mask,
                                   se.text_feat[se.text_lo:se.text_lo + nt])
        scores = _gather_cat(scores_original(model, mine, batch_size, progress))
        metrics = original_protocol_metrics(scores, se.text_to_video, rounding=rounding)
        out.update({f"original_{key}": v for key, v in metrics.items()})
    if lavis:
        t_scores = _rerank(model, se, t_sim, t_idx, False, batch_size, progress, fetch_bytes)
        v_scores = _rerank(model, se, v_sim, v_idx, True, batch_size, progress, fetch_bytes)
        t_all = _gather_cat(lavis_ranks(t_scores, t_idx, tptr[se.text_lo:se.text_lo + nt + 1], tpos, n_videos))
        v_all = _gather_cat(lavis_ranks(v_scores, v_idx, vptr[se.video_lo:se.video_lo + nv + 1], vpos, n_texts))
        out.update({f"lavis_{key}": v for key, v in metrics_from_ranks(t_all, v_all).items()})
    return out


@torch.no_grad()
def evaluate_retrieval(model, cfg, tokenizer, rank: int, world: int, device, split: str,
                       protocol: str | None = None, progress: bool = False) -> dict[str, float]:
    from alpro.data import build_eval_loader

    protocol = protocol or cfg.eval.protocol
    loader = build_eval_loader(cfg.data, "retrieval", tokenizer, rank, world, split=split, seed=cfg.seed)
    local = _embed_local(model, loader, tokenizer, cfg.data.max_text_len, device, paragraph=cfg.data.paragraph,
                         progress=progress)
    se = sharded_embeddings(local)
    n_videos, n_texts = se.video_feat.shape[0], se.text_feat.shape[0]
    out: dict[str, float] = {"n_videos": float(n_videos), "n_texts": float(n_texts),
                             "chance_r1": 100.0 / n_videos, "chance_r5": min(100.0, 500.0 / n_videos),
                             "chance_r10": min(100.0, 1000.0 / n_videos)}
    out.update(score_retrieval(model, se, protocol, cfg.eval.k_test, cfg.eval.batch_size,
                               cfg.eval.original_rounding, progress))
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
