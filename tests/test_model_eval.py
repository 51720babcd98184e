"""Retrieval scoring (both protocols) and metrics on hand-built matrices; QA accuracy per answer type."""

from __future__ import annotations

import pytest
import torch

from alpro.models import ModelConfig, build_model
from alpro.models.evaluation import (
    RetrievalEmbeddings,
    embed_texts,
    embed_videos,
    original_protocol_metrics,
    paragraph_queries,
    qa_accuracy,
    retrieval_metrics,
    round_like_original,
    scores_lavis,
    scores_original,
    vtm_pair_logits,
)


def test_metrics_on_a_hand_built_matrix():
    # 4 texts, 3 clips; texts 0, 1 describe clip 0, text 2 clip 1, text 3 clip 2.
    t2v = torch.tensor([[0.9, 0.1, 0.0],   # gt clip 0 at rank 1
                        [0.2, 0.5, 0.1],   # gt clip 0 at rank 2
                        [0.3, 0.2, 0.1],   # gt clip 1 at rank 2
                        [0.4, 0.6, 0.5]])  # gt clip 2 at rank 2
    m = retrieval_metrics(t2v, [0, 0, 1, 2])
    assert m["t2v_r1"] == 25.0 and m["t2v_r5"] == 100.0 and m["t2v_medr"] == 2.0 and m["t2v_meanr"] == 1.75
    # v2t on the transpose: clip 0 -> best of texts {0, 1} = rank 1; clip 1 -> text 2 at rank 3 (0.6, 0.5
    # above 0.2); clip 2 -> text 3 at rank 1.
    assert m["v2t_r1"] == pytest.approx(200 / 3) and m["v2t_r10"] == 100.0
    assert m["v2t_medr"] == 1.0 and m["v2t_meanr"] == pytest.approx(5 / 3)


def test_metrics_with_separate_lavis_matrices_and_ties():
    t2v = torch.tensor([[-100.0, 1.0], [2.0, -100.0]])  # text 0 -> clip 0 outside the top-k
    v2t = torch.tensor([[3.0, 1.0], [0.5, -100.0]])
    m = retrieval_metrics(t2v, [0, 1], score_v2t=v2t)
    assert m["t2v_r1"] == 0.0 and m["t2v_meanr"] == 2.0
    assert m["v2t_r1"] == 50.0 and m["v2t_medr"] == 1.5
    tied = retrieval_metrics(torch.zeros(2, 2), [0, 1])  # ties rank optimistically: 1 + strictly better
    assert tied["t2v_r1"] == 100.0


def test_paragraph_queries_join_each_clips_captions():
    assert paragraph_queries([["a dog runs.", " it jumps. "], ["one"]]) == ["a dog runs. it jumps.", "one"]


def test_qa_accuracy_overall_and_per_type():
    pred = torch.tensor([1, 2, 3, 4, 0])
    target = torch.tensor([1, 0, 3, -100, 0])
    acc = qa_accuracy(pred, target, ["what", "what", "who", "who", "how"])
    assert acc["acc"] == 60.0 and acc["n"] == 5
    assert acc["acc_what"] == 50.0 and acc["acc_who"] == 50.0 and acc["acc_how"] == 100.0  # -100 counts as wrong


@pytest.fixture(scope="module")
def scored():
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("debug"), "retrieval", vocab_size=1000).eval()
    g = torch.Generator().manual_seed(1)
    video = torch.randn(4, 3, 4, 32, 32, generator=g)
    ids = torch.randint(5, 1000, (5, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0
    v_emb, v_feat = embed_videos(model, video)
    t_emb, t_feat = embed_texts(model, ids, mask)
    return model, RetrievalEmbeddings(v_emb, v_feat, t_emb, mask, t_feat)


def test_original_protocol_scores_every_pair_by_vtm_probability(scored):
    model, emb = scored
    scores = scores_original(model, emb, batch_size=3)
    texts, videos = torch.meshgrid(torch.arange(5), torch.arange(4), indexing="ij")
    expected = vtm_pair_logits(model, emb, texts.flatten(), videos.flatten()).softmax(1)[:, 1].view(5, 4)
    torch.testing.assert_close(scores, expected)
    half = [scores_original(model, emb, batch_size=3, shard=(r, 2)) for r in range(2)]
    torch.testing.assert_close(half[0] + half[1], scores)  # sharded rows sum to the full matrix


def test_lavis_protocol_reranks_the_vtc_top_k(scored):
    model, emb = scored
    v2t, t2v = scores_lavis(model, emb, k_test=2, batch_size=3)
    cos = emb.video_feat @ emb.text_feat.t()  # (4 clips, 5 texts)
    texts, videos = torch.meshgrid(torch.arange(5), torch.arange(4), indexing="ij")
    match = vtm_pair_logits(model, emb, texts.flatten(), videos.flatten())[:, 1].view(5, 4)  # (text, clip)
    for v in range(4):
        top = cos[v].topk(2).indices
        assert (v2t[v] == -100).sum() == 3
        torch.testing.assert_close(v2t[v, top], match[top, v] + cos[v, top])
    for t in range(5):
        top = cos[:, t].topk(2).indices
        assert (t2v[t] == -100).sum() == 2
        torch.testing.assert_close(t2v[t, top], match[t, top] + cos[top, t])
    full_v2t, _ = scores_lavis(model, emb, k_test=100, batch_size=3)  # k beyond Nt: every pair re-scored
    torch.testing.assert_close(full_v2t, match.t() + cos)


def original_ranking_metrics(scores: torch.Tensor, gt: list[int]) -> dict[str, float]:
    """The released code's ranking, written out as it does it (run_video_retrieval.get_retrieval_scores):
    torch.sort(descending=True) per row, the ground truth's position in it, R@k and numpy-style median / mean."""
    _, order = torch.sort(scores, dim=1, descending=True)
    ranks = (order == torch.tensor(gt)[:, None]).float().argmax(1) + 1
    return {"r1": 100 * float((ranks <= 1).float().mean()), "r5": 100 * float((ranks <= 5).float().mean()),
            "medr": float(ranks.double().quantile(0.5)), "meanr": float(ranks.double().mean())}


def test_round_like_original_is_pythons_round_in_float32():
    probs = torch.tensor([[0.50001, 0.50004, 0.123449997, 0.99995], [0.00005, 0.33335, 0.66665, 1.0]])
    rounded = round_like_original(probs)
    assert rounded.dtype == torch.float32 and rounded.shape == probs.shape
    expected = [[round(float(v), 4) for v in row] for row in probs]
    assert rounded.tolist() == torch.tensor(expected, dtype=torch.float32).tolist()
    assert rounded[0, 0] == rounded[0, 1] == torch.tensor(0.5)  # distinct probabilities, tied after rounding


def test_original_rounding_ranks_ties_in_torch_sort_order():
    """Issue 10 item 21: VTM probabilities rounded to 4 decimals, ties broken by torch.sort's (column) order."""
    # 3 texts, 3 clips, text i <-> clip i. Unrounded, every ground truth is strictly best except text 2's.
    probs = torch.tensor([[0.90004, 0.90001, 0.1],    # gt 0 ties clip 1 after rounding; clip 1 is later: rank 1
                          [0.70001, 0.70004, 0.2],    # gt 1 ties clip 0 after rounding; clip 0 is earlier: rank 2
                          [0.30001, 0.30002, 0.30004]])  # gt 2 ties clips 0 and 1, both earlier: rank 3
    gt = [0, 1, 2]
    plain = retrieval_metrics(probs, gt)
    assert plain["t2v_r1"] == 100.0 and plain["t2v_meanr"] == 1.0
    rounded = round_like_original(probs)
    released = retrieval_metrics(rounded, gt, ties="sort_order")
    assert released["t2v_r1"] == pytest.approx(100 / 3) and released["t2v_meanr"] == 2.0
    assert released["t2v_medr"] == 2.0
    optimistic = retrieval_metrics(rounded, gt)  # the same rounded matrix, ties in the ground truth's favour
    assert optimistic["t2v_r1"] == 100.0
    assert original_protocol_metrics(probs, gt, rounding=True) == released  # what eval.original_rounding runs
    assert original_protocol_metrics(probs, gt) == plain
    # the closed form equals the original's own procedure, in both directions (one caption per clip)
    for direction, matrix in (("t2v", rounded), ("v2t", rounded.t())):
        ref = original_ranking_metrics(matrix, gt)
        for k, v in ref.items():
            assert released[f"{direction}_{k}"] == pytest.approx(v), (direction, k)


def test_sort_order_ties_match_torch_sort_on_a_random_tied_matrix():
    g = torch.Generator().manual_seed(0)
    probs = torch.randint(0, 4, (40, 30), generator=g).float() / 4  # many ties
    gt = torch.randint(0, 30, (40,), generator=g).tolist()
    ours = retrieval_metrics(probs, gt, ties="sort_order")
    for k, v in original_ranking_metrics(probs, gt).items():
        assert ours[f"t2v_{k}"] == pytest.approx(v), k
    assert retrieval_metrics(probs, gt)["t2v_meanr"] < ours["t2v_meanr"]  # optimistic ties rank higher
    with pytest.raises(ValueError, match="unknown tie rule"):
        retrieval_metrics(probs, gt, ties="pessimistic")
