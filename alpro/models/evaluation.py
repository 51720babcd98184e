"""Evaluation maths for retrieval and video QA (ALPRO.md §5). The trainer's loop gathers embeddings with
:func:`embed_videos` / :func:`embed_texts`; the functions here score them and compute the metrics.

Retrieval, two protocols:

- ``original`` (salesforce/ALPRO ``inference_retrieval``): every text-video pair goes through the fusion
  encoder and is scored by the VTM match probability ``softmax(vtm_head(e_cls))[:, 1]``; one matrix serves
  both directions.
- ``lavis`` (LAVIS ``compute_sim_matrix``): for each query rank by the VTC cosine, re-score its top ``k_test``
  with ``vtm logit[:, 1] + cosine`` and leave -100 elsewhere; one matrix per direction.

Metrics are R@1/5/10 (percent), median and mean rank (1-indexed), text->video and video->text. A rank is
1 + the number of candidates scored strictly higher than the ground truth (``ties="optimistic"``); for
video->text it is the best rank over that clip's captions. DiDeMo's paragraph-to-video mode joins each clip's
captions into one query.

The released code ranks differently (``eval.original_rounding``): it writes each VTM probability as
``round(p, 4)`` into its result file, rebuilds a float32 matrix from it and takes each ground truth's position
in ``torch.sort(descending=True)``, so a candidate tied with the ground truth after rounding counts against it
when that sort puts it first (``ties="sort_order"``, after :func:`round_like_original`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from alpro.models.alpro import ALPRO


@dataclass
class RetrievalEmbeddings:
    """Everything scoring needs, for Nv clips and Nt texts (may live on the CPU; moved per batch)."""

    video_embeds: torch.Tensor  # (Nv, 1+P, D) encoder output
    video_feat: torch.Tensor  # (Nv, E) normalised VTC features
    text_embeds: torch.Tensor  # (Nt, L, D) text-encoder output
    text_mask: torch.Tensor  # (Nt, L)
    text_feat: torch.Tensor  # (Nt, E)


@torch.no_grad()
def embed_videos(model: ALPRO, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, C, T, H, W) -> video_embeds (B, 1+P, D), video_feat (B, E)."""
    embeds = model.encode_video(video)
    return embeds, model.video_feat(embeds)


@torch.no_grad()
def embed_texts(model: ALPRO, input_ids: torch.Tensor, attention_mask: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) -> text_embeds (B, L, D), text_feat (B, E)."""
    embeds = model.encode_text(input_ids, attention_mask)
    return embeds, model.text_feat(embeds)


def _progress(items: Iterable, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc)


@torch.no_grad()
def vtm_pair_logits(model: ALPRO, emb: RetrievalEmbeddings, text_idx: torch.Tensor, video_idx: torch.Tensor,
                    batch_size: int = 64) -> torch.Tensor:
    """VTM logits (N, 2) of the pairs (text_idx[i], video_idx[i]), ``batch_size`` fusion rows at a time."""
    device = next(model.parameters()).device
    out = []
    for t, v in zip(text_idx.split(batch_size), video_idx.split(batch_size)):
        t, v = t.to(emb.text_embeds.device), v.to(emb.video_embeds.device)  # index where the embeddings live
        out.append(model.vtm_logits(emb.text_embeds[t].to(device), emb.text_mask[t].to(device),
                                    emb.video_embeds[v].to(device)).float())
    return torch.cat(out) if out else torch.zeros(0, 2, device=device)


def _owned(n: int, shard: tuple[int, int]) -> range:
    rank, world = shard
    return range(rank, n, world)


@torch.no_grad()
def scores_original(model: ALPRO, emb: RetrievalEmbeddings, batch_size: int = 64, progress: bool = False,
                    shard: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """(Nt, Nv) VTM match probability of every pair -- the original's exhaustive protocol.

    ``shard = (rank, world)``: this call scores only texts ``rank, rank + world, ...`` and leaves other rows 0,
    so summing the matrices of all ranks (all_reduce) gives the full one.
    """
    Nt, Nv = emb.text_feat.shape[0], emb.video_feat.shape[0]
    scores = torch.zeros(Nt, Nv)
    rows = list(_owned(Nt, shard))
    per_chunk = max(1, batch_size // max(Nv, 1))  # texts per round; each round scores them against every clip
    for start in _progress(range(0, len(rows), per_chunk), progress, "VTM scoring"):
        texts = torch.tensor(rows[start:start + per_chunk])
        t_idx = texts.repeat_interleave(Nv)  # every video for each text
        v_idx = torch.arange(Nv).repeat(len(texts))
        probs = vtm_pair_logits(model, emb, t_idx, v_idx, batch_size).softmax(dim=1)[:, 1]
        scores[texts] = probs.view(len(texts), Nv).cpu()
    return scores


@torch.no_grad()
def scores_lavis(model: ALPRO, emb: RetrievalEmbeddings, k_test: int = 128, batch_size: int = 64,
                 progress: bool = False, shard: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
    """(score_v2t (Nv, Nt), score_t2v (Nt, Nv)): VTC top-``k_test`` re-ranked by VTM logit + cosine, -100
    elsewhere -- LAVIS's protocol. ``shard`` as in :func:`scores_original` (rows of each matrix)."""
    sims = (emb.video_feat.float() @ emb.text_feat.float().t()).cpu()  # (Nv, Nt) cosine, no temperature
    v2t = _rerank(model, emb, sims, k_test, batch_size, progress, shard, video_rows=True)
    t2v = _rerank(model, emb, sims.t(), k_test, batch_size, progress, shard, video_rows=False)
    return v2t, t2v


def _rerank(model: ALPRO, emb: RetrievalEmbeddings, sims: torch.Tensor, k_test: int, batch_size: int,
            progress: bool, shard: tuple[int, int], video_rows: bool) -> torch.Tensor:
    n_rows, n_cols = sims.shape
    k = min(k_test, n_cols)
    scores = torch.zeros(n_rows, n_cols)
    for row in _progress(_owned(n_rows, shard), progress, "v2t re-rank" if video_rows else "t2v re-rank"):
        top_sim, top_idx = sims[row].topk(k)
        row_idx = torch.full((k,), row)
        t_idx, v_idx = (top_idx, row_idx) if video_rows else (row_idx, top_idx)
        match = vtm_pair_logits(model, emb, t_idx, v_idx, batch_size)[:, 1].cpu()
        scores[row] = -100.0
        scores[row, top_idx] = match + top_sim
    return scores


Ties = Literal["optimistic", "sort_order"]


def round_like_original(scores: torch.Tensor, decimals: int = 4) -> torch.Tensor:
    """Each score as the original stores it: Python's ``round(float(p), 4)`` (correctly rounded, half to even on
    the exact binary value; ``torch.round(x, decimals=4)`` differs on rare values), back in float32."""
    return torch.tensor([[round(v, decimals) for v in row] for row in scores.float().tolist()],
                        dtype=torch.float32).view(scores.shape)


def _ranks(scores: torch.Tensor, gt: torch.Tensor, ties: Ties) -> torch.Tensor:
    """(rows, cols) scores, (rows,) ground-truth columns -> (rows,) 1-indexed ranks.

    ``optimistic``: 1 + #candidates scored strictly higher. ``sort_order``: the ground truth's position in
    ``torch.sort(descending=True)`` of its row on the CPU, exactly the released code's call: among equal scores
    the order is whatever that (not stable) sort returns -- column order for short rows, implementation-defined
    for long ones -- so it is computed by sorting, not by a formula."""
    if ties == "optimistic":
        return (scores > scores.gather(1, gt[:, None])).sum(1) + 1
    if ties != "sort_order":
        raise ValueError(f"unknown tie rule {ties!r}; choose optimistic or sort_order")
    _, order = torch.sort(scores.cpu(), dim=1, descending=True)
    return (order == gt[:, None]).int().argmax(1) + 1


def _rank_metrics(ranks: torch.Tensor) -> dict[str, float]:
    """Recalls in percent; MdR as numpy's median (the mean of the middle two for an even count), as the original."""
    if len(ranks) == 0:
        return {"r1": 0.0, "r5": 0.0, "r10": 0.0, "medr": 0.0, "meanr": 0.0}
    ranks = ranks.double()
    recall = {f"r{k}": 100.0 * int((ranks <= k).sum()) / len(ranks) for k in (1, 5, 10)}
    return {**recall, "medr": float(ranks.quantile(0.5)), "meanr": float(ranks.mean())}


def retrieval_metrics(score_t2v: torch.Tensor, text_to_video: Sequence[int] | torch.Tensor,
                      score_v2t: torch.Tensor | None = None, ties: Ties = "optimistic") -> dict[str, float]:
    """R@1/5/10, MdR, MnR for both directions as ``t2v_r1``, ..., ``v2t_meanr``.

    ``score_t2v`` (Nt, Nv); ``text_to_video[i]`` = the clip of text i; ``score_v2t`` (Nv, Nt) defaults to
    ``score_t2v.T`` (the original protocol's single matrix). ``ties``: how a candidate scored equal to the
    ground truth counts (see :func:`_ranks`).
    """
    score_t2v = score_t2v.float().cpu()
    gt = torch.as_tensor(text_to_video, dtype=torch.long)
    score_v2t = score_t2v.t() if score_v2t is None else score_v2t.float().cpu()
    t2v_ranks = _ranks(score_t2v, gt, ties)
    texts_of: dict[int, list[int]] = defaultdict(list)
    for t, v in enumerate(gt.tolist()):
        texts_of[v].append(t)
    v2t_ranks = []
    for v in range(score_v2t.shape[0]):
        if texts_of[v]:  # a clip without captions has nothing to retrieve
            row = score_v2t[v:v + 1].expand(len(texts_of[v]), -1)
            v2t_ranks.append(int(_ranks(row, torch.tensor(texts_of[v]), ties).min()))
    out = {f"t2v_{k}": val for k, val in _rank_metrics(t2v_ranks).items()}
    out.update({f"v2t_{k}": val for k, val in _rank_metrics(torch.tensor(v2t_ranks)).items()})
    return out


def original_protocol_metrics(scores: torch.Tensor, text_to_video: Sequence[int] | torch.Tensor,
                              rounding: bool = False) -> dict[str, float]:
    """Metrics of the original protocol's (Nt, Nv) VTM probabilities. ``rounding`` (``eval.original_rounding``)
    ranks as the released code: probabilities rounded to 4 decimals, ties in ``torch.sort`` order."""
    if rounding:
        return retrieval_metrics(round_like_original(scores), text_to_video, ties="sort_order")
    return retrieval_metrics(scores, text_to_video)


def paragraph_queries(all_texts: Sequence[Sequence[str]]) -> list[str]:
    """DiDeMo paragraph-to-video: each clip's captions joined into one query (text i <-> clip i)."""
    return [" ".join(c.strip() for c in captions) for captions in all_texts]


# ----------------------------------------------------------------------------------------------------------- QA


@torch.no_grad()
def predict_answers(model: ALPRO, video: torch.Tensor, input_ids: torch.Tensor,
                    attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) arg-max answer indices (the original's prediction)."""
    text = model.encode_text(input_ids, attention_mask)
    return model.qa_logits(text, attention_mask, model.encode_video(video)).argmax(dim=1)


def qa_accuracy(predictions: torch.Tensor, targets: torch.Tensor,
                answer_types: Sequence[str] | None = None) -> dict[str, float]:
    """Top-1 accuracy (percent) overall and per answer type (``acc_what``, ``acc_who``, ...).

    Targets of -100 (answers outside the vocabulary) count as wrong, as in the original, which compares answer
    strings and so can never match an answer the classifier cannot output.
    """
    correct = (predictions.cpu() == targets.cpu()) & (targets.cpu() != -100)
    out = {"acc": 100.0 * int(correct.sum()) / max(len(correct), 1), "n": float(len(correct))}
    if answer_types is not None:
        by_type: dict[str, list[bool]] = defaultdict(list)
        for kind, ok in zip(answer_types, correct.tolist()):
            by_type[kind].append(ok)
        for kind, oks in sorted(by_type.items()):
            out[f"acc_{kind}"] = 100 * sum(oks) / len(oks)
    return out


# ------------------------------------------------------------------------------------------ retrieval at scale
#
# The same retrieval metrics without (Nt, Nv) matrices: each rank ranks only its own query rows (its texts for
# text->video, its clips for video->text) against every key's pooled VTC feature, ``SCORE_CHUNK`` keys at a
# time, keeping a running top-k and the number of keys above the ground truth. LAVIS's re-ranking then needs
# the VTM logits of the top-k pairs only, and its rank follows from them: every other pair of the dense
# matrix holds exactly -100. See docs/training.md "Evaluation at scale" for the memory model.

SCORE_CHUNK = 16384
"""Keys (clips or texts) scored per block by :func:`vtc_topk_ranks`."""
QUERY_BLOCK = 1024
"""Query rows per block: a block's cosines are QUERY_BLOCK x SCORE_CHUNK float32 (64 MiB)."""


def positives_csr(text_to_video: Sequence[int] | torch.Tensor, n_videos: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ptr (Nv+1,), texts) with the texts of clip v at ``texts[ptr[v]:ptr[v+1]]`` (ascending)."""
    gt = torch.as_tensor(text_to_video, dtype=torch.long)
    order = torch.sort(gt, stable=True).indices
    ptr = torch.zeros(n_videos + 1, dtype=torch.long)
    ptr[1:] = torch.bincount(gt, minlength=n_videos).cumsum(0)
    return ptr, order


def _cosines(q: torch.Tensor, keys: torch.Tensor, key_major: bool) -> torch.Tensor:
    """(n, E) x (m, E) -> (n, m): ``q @ keys.T``, or ``(keys @ q.T).T`` as a dense matrix computed the other
    way round holds them (the same dot products; a BLAS may round them differently)."""
    return (keys.float() @ q.t()).t() if key_major else q @ keys.float().t()


@torch.no_grad()
def vtc_topk_ranks(queries: torch.Tensor, keys: torch.Tensor, pos_ptr: torch.Tensor, pos_idx: torch.Tensor,
                   k: int, chunk: int = SCORE_CHUNK, block: int = QUERY_BLOCK, rank_key_major: bool = False,
                   topk_key_major: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank ``queries`` (n, E) against ``keys`` (N, E) by cosine, ``chunk`` keys at a time.
    ``pos_idx[pos_ptr[i]:pos_ptr[i+1]]`` are the ground-truth keys of query i.

    Returns (ranks (n,), top_sim (n, k), top_idx (n, k)): rank = 1 + #keys scored strictly higher than the best
    ground truth (``ties="optimistic"``, the best over several ground truths as the dense video->text rank), 0
    for a query without ground truth; the ``k`` highest cosines and their key ids, as ``torch.topk`` of the
    dense row (equal up to the order of exactly tied cosines). ``*_key_major``: compute the cosines of the ranks
    / of the top-k as ``keys @ queries.T`` (the orientation of the dense matrix they must equal to the bit).
    Memory: O(block x (chunk + k))."""
    n, N = queries.shape[0], keys.shape[0]
    k = min(k, N)
    ranks = torch.zeros(n, dtype=torch.long)
    top_sim = torch.empty(n, k, dtype=torch.float32)
    top_idx = torch.empty(n, k, dtype=torch.long)
    for b0 in range(0, n, block):
        q = queries[b0:b0 + block].float()
        nb = q.shape[0]
        ptr = pos_ptr[b0:b0 + nb + 1]
        pos = pos_idx[ptr[0]:ptr[-1]]
        pos_row = torch.repeat_interleave(torch.arange(nb), ptr.diff())
        best = torch.full((nb,), float("-inf"))
        if len(pos):  # the ground truths' cosines, from the very blocks the counting below computes
            lo, hi = int(pos.min()) // chunk * chunk, int(pos.max()) + 1
            for c0 in range(lo, hi, chunk):
                c1 = min(c0 + chunk, N)
                inside = (pos >= c0) & (pos < c1)
                if inside.any():
                    sims = _cosines(q, keys[c0:c1], rank_key_major)
                    best.scatter_reduce_(0, pos_row[inside], sims[pos_row[inside], pos[inside] - c0], "amax")
        above = torch.zeros(nb, dtype=torch.long)
        run_sim = torch.empty(nb, 0)
        run_idx = torch.empty(nb, 0, dtype=torch.long)
        for c0 in range(0, N, chunk):
            sims = _cosines(q, keys[c0:c0 + chunk], rank_key_major)
            above += (sims > best[:, None]).sum(1)
            if k:
                if topk_key_major != rank_key_major:
                    sims = _cosines(q, keys[c0:c0 + chunk], topk_key_major)
                cand_sim = torch.cat([run_sim, sims], 1)
                cand_idx = torch.cat([run_idx, torch.arange(c0, c0 + sims.shape[1]).expand(nb, -1)], 1)
                run_sim, at = cand_sim.topk(min(k, cand_sim.shape[1]), dim=1)
                run_idx = cand_idx.gather(1, at)
        ranks[b0:b0 + nb] = torch.where(ptr.diff() > 0, above + 1, 0)
        top_sim[b0:b0 + nb], top_idx[b0:b0 + nb] = run_sim, run_idx
    return ranks, top_sim, top_idx


def lavis_ranks(scores: torch.Tensor, top_idx: torch.Tensor, pos_ptr: torch.Tensor, pos_idx: torch.Tensor,
                n_keys: int) -> torch.Tensor:
    """Ranks under LAVIS's protocol from the re-ranked top-k alone: ``scores`` (n, k) = VTM logit + cosine of
    the pairs ``top_idx`` (n, k); every other key of the dense row holds exactly -100. rank = 1 + #keys scored
    strictly higher than the best ground truth (-100 when none is in the top-k); 0 for a query without ground
    truth. Equal to :func:`retrieval_metrics`'s ranks of the dense matrices of :func:`scores_lavis`."""
    n, k = top_idx.shape
    best = torch.full((n,), float("-inf"))
    counts = pos_ptr.diff()
    rows = torch.repeat_interleave(torch.arange(n), counts)
    pos = pos_idx[pos_ptr[0]:pos_ptr[-1]]
    for p0 in range(0, len(pos), QUERY_BLOCK):  # each ground truth's score: its re-ranked score, else -100
        r, p = rows[p0:p0 + QUERY_BLOCK], pos[p0:p0 + QUERY_BLOCK]
        hit = top_idx[r] == p[:, None]
        found = torch.where(hit, scores[r].float(), float("-inf")).amax(1) if k else torch.full((len(r),),
                                                                                               float("-inf"))
        best.scatter_reduce_(0, r, torch.where(hit.any(1), found, torch.tensor(-100.0)), "amax")
    above = (scores.float() > best[:, None]).sum(1) + torch.where(best < -100.0, n_keys - k, 0)
    return torch.where(counts > 0, above + 1, 0)


def metrics_from_ranks(t2v_ranks: torch.Tensor, v2t_ranks: torch.Tensor) -> dict[str, float]:
    """The keys of :func:`retrieval_metrics` from per-query ranks (0 = a query without ground truth, left out)."""
    out = {f"t2v_{k}": v for k, v in _rank_metrics(t2v_ranks[t2v_ranks > 0]).items()}
    out.update({f"v2t_{k}": v for k, v in _rank_metrics(v2t_ranks[v2t_ranks > 0]).items()})
    return out
