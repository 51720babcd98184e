"""Issue 16 items 5 and 6: map_heads with a bounded window of in-flight work, and retrieval scoring that scales
(features sharded over ranks, chunked top-k, tokens only for the re-ranked candidates) with the same results as
the dense path."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from data_fixtures import write_shards

from alpro.data.samples import captions_of, read_meta
from alpro.data.shards import SampleError, resolve
from alpro.data.sources import item_table, iter_heads, map_heads

# --------------------------------------------------------------------------------------------- map_heads


@pytest.fixture(scope="module")
def head_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    blob = root / "x.jpg"
    blob.write_bytes(b"\xff\xd8 not decoded by head reads")
    samples = [{"key": f"s{i:04d}", "path": blob, "media": "image", "captions": [f"caption {i}"] * (1 + i % 3)}
               for i in range(300)]
    samples[77]["raw_json"] = b"{not json"  # a malformed KEY.json: its SampleError comes back in its place
    return write_shards(root / "set", samples, per_shard=23)


def _caption_of(members):
    return captions_of(read_meta(members), members)[0]


def test_map_heads_order_and_results_with_a_bounded_window(head_shards):
    shardset = resolve(str(head_shards), "heads")
    ids = np.array([5, 299, 0, 77, 5, 150, *range(100, 300, 7)], dtype=np.int64)  # out of order, repeated
    lock, started, seen = threading.Lock(), [0], []

    def fn(members):
        with lock:
            started[0] += 1
        return _caption_of(members)

    window = 8
    out = []
    for found in iter_heads(shardset, fn, ids, window=window):
        with lock:
            seen.append(started[0] - len(out))  # submitted and begun, not yet handed to the caller
        out.append(found)
    assert max(seen) <= window, seen
    assert len(out) == len(ids)
    for gid, found in zip(ids.tolist(), out):
        if gid == 77:
            assert isinstance(found, SampleError) and found.reason == "bad_metadata"
        else:
            assert found == f"caption {gid}"
    # the default window, a window of one and a window larger than the set give the same list
    for w in (1, 3, 64, 10_000):
        assert [str(f) for f in map_heads(shardset, _caption_of, ids, window=w)] == [str(f) for f in out]
    everything = map_heads(shardset, _caption_of)
    assert len(everything) == 300 and everything[299] == "caption 299"
    spread = map_heads(shardset, _caption_of, limit=4)  # limit spread evenly, as before
    assert spread == ["caption 0", "caption 99", "caption 199", "caption 299"]


def test_iter_heads_can_stop_early_and_keeps_the_window(head_shards):
    shardset = resolve(str(head_shards), "heads")
    calls = [0]

    def fn(members):
        calls[0] += 1
        return _caption_of(members)

    it = iter_heads(shardset, fn, window=16)
    first = [next(it) for _ in range(3)]
    it.close()  # a consumer that stops: queued chunks are dropped, nothing hangs
    assert first == ["caption 0", "caption 1", "caption 2"]
    assert calls[0] <= 3 + 16
    with pytest.raises(ValueError):
        next(iter_heads(shardset, fn, window=0))


def test_item_table_counts_subitems_through_the_window(head_shards):
    from alpro.data.config import DataConfig

    shardset = resolve(str(head_shards), "heads")
    cfg = DataConfig()
    table, left_out = item_table(shardset, "image", "retrieval", True, cfg)  # per caption
    per = [1 + i % 3 for i in range(300) if i != 77]
    assert len(table.sample) == sum(per) and left_out == {"bad_metadata": 1}
    assert table.sample[:6].tolist() == [0, 1, 1, 2, 2, 2] and table.sub[:6].tolist() == [0, 0, 1, 0, 1, 2]
    evaluation, left_out = item_table(shardset, "image", "retrieval", False, cfg)
    assert len(evaluation.sample) == 300 and (evaluation.sub == -1).all() and not left_out


# ------------------------------------------------------------------------------------ retrieval at scale

import torch  # noqa: E402
import torch.distributed as tdist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

from alpro import dist  # noqa: E402
from alpro.models import ModelConfig, build_model  # noqa: E402
from alpro.models.evaluation import (  # noqa: E402
    RetrievalEmbeddings,
    embed_texts,
    embed_videos,
    lavis_ranks,
    metrics_from_ranks,
    original_protocol_metrics,
    positives_csr,
    retrieval_metrics,
    scores_lavis,
    scores_original,
    vtc_topk_ranks,
)
from alpro.train.evaluate import ShardedEmbeddings, score_retrieval, sharded_embeddings  # noqa: E402


def _unit(n: int, e: int, g: torch.Generator) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(n, e, generator=g), dim=1)


def _dense_ranks(t2v: torch.Tensor, gt: torch.Tensor, v2t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-query ranks as retrieval_metrics computes them on dense matrices (0 for a clip without texts)."""
    t = (t2v > t2v.gather(1, gt[:, None])).sum(1) + 1
    v = torch.zeros(v2t.shape[0], dtype=torch.long)
    for clip in range(v2t.shape[0]):
        mine = (gt == clip).nonzero().squeeze(1)
        if len(mine):
            v[clip] = ((v2t[clip][None] > v2t[clip, mine][:, None]).sum(1) + 1).min()
    return t, v


@pytest.mark.parametrize("chunk,block", [(7, 5), (16384, 1024), (1, 3), (40, 64)])
def test_chunked_topk_and_vtc_ranks_equal_the_dense_matrix(chunk, block):
    g = torch.Generator().manual_seed(chunk)
    nv, nt, e, k = 37, 90, 16, 6
    video, text = _unit(nv, e, g), _unit(nt, e, g)
    gt = torch.randint(0, nv - 3, (nt,), generator=g)  # clips nv-3.. have no caption
    vtc = text @ video.t()
    t_dense, v_dense = _dense_ranks(vtc, gt, vtc.t())
    t_rank, t_sim, t_idx = vtc_topk_ranks(text, video, torch.arange(nt + 1), gt, k, chunk=chunk, block=block,
                                          topk_key_major=True)
    ptr, texts = positives_csr(gt, nv)
    v_rank, v_sim, v_idx = vtc_topk_ranks(video, text, ptr, texts, k, chunk=chunk, block=block,
                                          rank_key_major=True)
    assert torch.equal(t_rank, t_dense) and torch.equal(v_rank, v_dense)  # exact (no tolerance)
    assert (v_rank[nv - 3:] == 0).all()
    # Top-k cosines as scores_lavis has them. A BLAS may round a dot product differently in another shape: to the
    # bit when one chunk holds every key (the dense matrix's own shape), within 1e-6 always (chunks of 40 of the
    # 90 texts differed in the last bit on an AVX-512 CPU, 2026-12-08, while the ranks stayed exact).
    for got_sim, got_idx, dense, n_keys in ((t_sim, t_idx, (video @ text.t()).t(), nv),
                                            (v_sim, v_idx, video @ text.t(), nt)):
        top = dense.topk(k, dim=1)
        assert torch.equal(got_idx, top.indices)
        if chunk >= n_keys:
            assert torch.equal(got_sim, top.values)
        torch.testing.assert_close(got_sim, top.values, rtol=0, atol=1e-6)
    assert metrics_from_ranks(t_rank, v_rank) == retrieval_metrics(vtc, gt)
    # a slice of query rows (what one rank owns) gives that slice of the ranks
    lo, hi = 11, 29
    part, _, _ = vtc_topk_ranks(video[lo:hi], text, ptr[lo:hi + 1], texts, k, chunk=chunk, block=block,
                                rank_key_major=True)
    assert torch.equal(part, v_rank[lo:hi])


@pytest.mark.parametrize("k", [1, 4, 12])
def test_lavis_ranks_from_the_top_k_equal_the_dense_matrices(k):
    g = torch.Generator().manual_seed(k)
    nv, nt = 12, 30
    gt = torch.randint(0, nv - 1, (nt,), generator=g)
    cos = _unit(nv, 8, g) @ _unit(nt, 8, g).t()  # (Nv, Nt)
    match = torch.randn(nt, nv, generator=g) * 3
    match[::4] -= 200.0  # re-ranked scores below -100: the untouched -100 pairs then rank above the ground truth
    match[5, :] = 1.0  # ties among re-ranked scores count as not above
    dense = {}
    for name, sims, vtm in (("v2t", cos, match.t()), ("t2v", cos.t(), match)):
        out = torch.full(sims.shape, -100.0)
        top_sim, top_idx = sims.topk(min(k, sims.shape[1]), dim=1)
        out.scatter_(1, top_idx, vtm.gather(1, top_idx) + top_sim)
        dense[name] = (out, vtm.gather(1, top_idx) + top_sim, top_idx)
    expected = retrieval_metrics(dense["t2v"][0], gt, dense["v2t"][0])
    t_rank = lavis_ranks(dense["t2v"][1], dense["t2v"][2], torch.arange(nt + 1), gt, nv)
    ptr, texts = positives_csr(gt, nv)
    v_rank = lavis_ranks(dense["v2t"][1], dense["v2t"][2], ptr, texts, nt)
    t_dense, v_dense = _dense_ranks(dense["t2v"][0], gt, dense["v2t"][0])
    assert torch.equal(t_rank, t_dense) and torch.equal(v_rank, v_dense)
    assert metrics_from_ranks(t_rank, v_rank) == expected


def _fixture_embeddings():
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("debug"), "retrieval", vocab_size=1000).eval()
    g = torch.Generator().manual_seed(1)
    nv, nt = 10, 21
    video = torch.randn(nv, 3, 4, 32, 32, generator=g)
    gt = torch.sort(torch.randint(0, nv - 1, (nt,), generator=g)).values  # the last clip has no caption
    ids = torch.randint(5, 1000, (nt, 7), generator=g)
    ids[10], gt[10] = ids[11], gt[11]  # a caption twice for one clip
    ids[3] = ids[17]  # the same caption for two clips: exactly tied cosines and VTM logits
    mask = torch.ones_like(ids)
    mask[2, 4:] = 0
    with torch.no_grad():
        v_emb, v_feat = embed_videos(model, video)
        t_emb, t_feat = embed_texts(model, ids, mask)
    return model, RetrievalEmbeddings(v_emb, v_feat, t_emb, mask, t_feat), gt


def _dense_metrics(model, emb, gt, k: int, batch_size: int, original: bool = True) -> dict[str, float]:
    """What evaluate_retrieval computed before issue 16 (every matrix dense, every token on every rank)."""
    out = {f"vtc_{a}": b for a, b in retrieval_metrics(emb.text_feat @ emb.video_feat.t(), gt).items()}
    if original:
        probs = scores_original(model, emb, batch_size)
        out.update({f"original_{a}": b for a, b in original_protocol_metrics(probs, gt, rounding=True).items()})
    v2t, t2v = scores_lavis(model, emb, k, batch_size)
    out.update({f"lavis_{a}": b for a, b in retrieval_metrics(t2v, gt, v2t).items()})
    return out


@pytest.fixture(scope="module")
def real_model():
    return _fixture_embeddings()


@pytest.mark.parametrize("k,protocol,fetch_bytes", [(3, "both", 1), (12, "lavis", 1 << 30)])
def test_scaled_scoring_gives_the_dense_numbers(real_model, k, protocol, fetch_bytes):
    """k = 12 > 10 clips re-ranks every text->video pair; fetch_bytes 1: one row per re-ranking round, 1 GiB: all
    in one."""
    model, emb, gt = real_model
    expected = _dense_metrics(model, emb, gt, k, batch_size=32, original=protocol == "both")
    se = ShardedEmbeddings(emb.video_feat, emb.text_feat, gt, 0, 0, emb.video_embeds, emb.text_embeds,
                           emb.text_mask)
    assert score_retrieval(model, se, protocol, k, 32, rounding=True, fetch_bytes=fetch_bytes) == expected


def _parts(emb: RetrievalEmbeddings, gt: torch.Tensor, clips: range) -> list[dict]:
    """The batches _embed_local would produce on a rank that owns ``clips``: two batches."""
    texts = torch.isin(gt, torch.tensor(list(clips), dtype=torch.long)).nonzero().squeeze(1)
    out = []
    for half in (clips[: len(clips) // 2], clips[len(clips) // 2:]):
        if not len(half):
            continue
        t = texts[torch.isin(gt[texts], torch.tensor(list(half)))]
        out.append({"keys": [f"clip{i}" for i in half], "video_embeds": emb.video_embeds[half.start:half.stop],
                    "video_feat": emb.video_feat[half.start:half.stop], "text_embeds": emb.text_embeds[t],
                    "text_mask": emb.text_mask[t], "text_feat": emb.text_feat[t],
                    "owners": (gt[t] - half.start).tolist()})
    return out


SPLITS = {"uneven": (range(0, 4), range(4, 10)), "rank 1 empty": (range(0, 10), range(10, 10))}


def _rank(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=2)
    try:
        model, emb, gt = _fixture_embeddings()
        results = {}
        for name, split in SPLITS.items():
            se = sharded_embeddings(_parts(emb, gt, split[rank]))
            results[name] = score_retrieval(model, se, "both", 5, 32, rounding=True, fetch_bytes=1 << 14)
        torch.save(results, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy()


@pytest.mark.dist
@pytest.mark.slow
def test_two_gloo_ranks_give_the_single_process_numbers(real_model, tmp_path):
    model, emb, gt = real_model
    expected = _dense_metrics(model, emb, gt, 5, batch_size=32)
    mp.spawn(_rank, args=(str(tmp_path),), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        for name in SPLITS:
            assert got[name] == expected, (rank, name)


# ---------------------------------------------------------------------------------------- index and search


def test_index_arrays_are_written_in_blocks_and_read_memory_mapped(tmp_path):
    import json
    from contextlib import ExitStack

    from alpro.apps.search import FEAT_FILE, TOKENS_FILE, IndexArrays, _NpyRows, _read_index, _top_cosines

    g = torch.Generator().manual_seed(0)
    feat, tokens = _unit(300, 8, g), torch.randn(300, 5, 4, generator=g)
    with ExitStack() as stack:
        writers = _NpyRows(stack, tmp_path / FEAT_FILE, np.float32), _NpyRows(stack, tmp_path / TOKENS_FILE,
                                                                               np.float16)
        for lo in range(0, 300, 64):  # what build_index does batch by batch
            writers[0].append(feat[lo:lo + 64])
            writers[1].append(tokens[lo:lo + 64].half())
        for w in writers:
            w.close()
    assert np.array_equal(np.load(tmp_path / FEAT_FILE), feat.numpy())  # a plain .npy for numpy too
    (tmp_path / "keys.json").write_text(json.dumps({"keys": [f"k{i}" for i in range(300)], "captions": []}))
    (tmp_path / "meta.json").write_text(json.dumps({"run": "r", "shards": "s"}))
    arrays, keys, _ = _read_index(tmp_path)
    assert isinstance(arrays._feat, np.memmap) and len(arrays) == 300 and arrays.has_tokens
    assert torch.equal(arrays.feat(10, 20), feat[10:20])
    ids = torch.tensor([299, 3, 150])
    assert torch.equal(arrays.tokens(ids), tokens[ids].half().float())
    query = _unit(1, 8, g)[0]
    dense = (feat @ query).topk(7)
    for chunk in (1, 13, 64, 10_000):  # search's chunked top-k equals the dense one
        best, where = _top_cosines(arrays, query, 7, chunk=chunk)
        torch.testing.assert_close(best, dense.values, rtol=0, atol=1e-6)
        assert torch.equal(where, dense.indices)
    # an index written before issue 16 (one safetensors file) reads the same, lazily
    from safetensors.torch import save_file

    legacy = tmp_path / "legacy"
    legacy.mkdir()
    save_file({"video_feat": feat, "video_tokens": tokens.half()}, str(legacy / "index.safetensors"))
    old = IndexArrays(legacy)
    assert len(old) == 300 and torch.equal(old.feat(10, 20), feat[10:20])
    assert torch.equal(old.tokens(ids), tokens[ids].half().float())
