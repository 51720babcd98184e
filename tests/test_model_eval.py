"""Retrieval scoring (both protocols) and metrics on hand-built matrices; QA accuracy per answer type."""

from __future__ import annotations

import pytest
import torch

from alpro.models import ModelConfig, build_model
from alpro.models.evaluation import (
    RetrievalEmbeddings,
    embed_texts,
    embed_videos,
    paragraph_queries,
    qa_accuracy,
    retrieval_metrics,
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
