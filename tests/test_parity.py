"""Numerical parity with the public LAVIS ALPRO (salesforce/LAVIS 506965b) on its own small seeded models.

The reference files (tests/data/parity/, described in its README) hold LAVIS state dicts, inputs, every
intermediate and the outputs, computed in fp32 on CPU. We load each state dict through the key map into our
model built from the config in the file's ``parity_info`` metadata and match everything to 1e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from alpro.data.batch import Batch
from alpro.kernels import get_attention_backend, set_attention_backend
from alpro.models import ModelConfig, TextConfig, VisionConfig, build_model, load_checkpoint
from alpro.models.evaluation import RetrievalEmbeddings, scores_lavis, scores_original, vtm_pair_logits

DATA = Path(__file__).parent / "data" / "parity"
ATOL = RTOL = 1e-5  # the README's suggested fp32 tolerance


def config_from_parity(path: Path) -> ModelConfig:
    with safe_open(str(path), "pt") as f:
        info = json.loads(f.metadata()["parity_info"])
    vis, shrink, bert = info["vis_cfg"], info["vis_override"], info["bert_cfg"]
    return ModelConfig(
        vision=VisionConfig(image_size=vis["image_size"], patch_size=vis["patch_size"], num_frames=vis["n_frms"],
                            width=shrink["embed_dim"], depth=shrink["depth"], num_heads=shrink["num_heads"],
                            drop_path_rate=vis["drop_path_rate"]),
        text=TextConfig(vocab_size=bert["vocab_size"], hidden_size=bert["hidden_size"],
                        num_layers=bert["num_hidden_layers"], fusion_layer=bert["fusion_layer"],
                        num_heads=bert["num_attention_heads"], intermediate_size=bert["intermediate_size"],
                        max_position_embeddings=bert["max_position_embeddings"],
                        type_vocab_size=bert["type_vocab_size"], layer_norm_eps=bert["layer_norm_eps"],
                        hidden_act=bert["hidden_act"], attention_dropout=bert["attention_probs_dropout_prob"],
                        hidden_dropout=bert["hidden_dropout_prob"]),
        embed_dim=info["embed_dim"],
        temp_init=info["temp_init"],
    )


def load(name: str, task: str, **kwargs):
    cfg = config_from_parity(DATA / f"{name}.safetensors")
    model = build_model(cfg, task, **kwargs)
    report = load_checkpoint(model, DATA / f"{name}.safetensors", strict=True)
    return model.eval(), report, load_file(str(DATA / f"{name}_io.safetensors"))


class Recorder:
    """Forward hooks that keep each watched module's output (or input, for ``blocks_in``)."""

    def __init__(self, model):
        self.out: dict[str, torch.Tensor] = {}
        ve, te = model.video_encoder, model.text_encoder
        self.handles = [ve.patch_embed.register_forward_hook(self._keep("vis.patch_embed_out")),
                        ve.blocks[0].register_forward_pre_hook(self._keep_input("vis.blocks_in")),
                        ve.norm.register_forward_hook(self._keep("vis.video_embeds_unpooled")),
                        te.bert.embeddings.register_forward_hook(self._keep("txt.embeddings_out"))]
        self.handles += [b.register_forward_hook(self._keep(f"vis.block{i}_out")) for i, b in enumerate(ve.blocks)]
        self.handles += [layer.register_forward_hook(self._keep(f"layer{i}_out")) for i, layer in enumerate(te.layers)]

    def _keep_input(self, name):
        return lambda module, args: self.out.__setitem__(name, args[0])

    def _keep(self, name):
        return lambda module, args, output: self.out.__setitem__(name, output)


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual.float(), expected.float(), atol=ATOL, rtol=RTOL, msg=lambda m: f"{what}: {m}")


@pytest.fixture(scope="module")
def retrieval():
    model, report, io = load("alpro_retrieval_small", "retrieval")
    rec = Recorder(model)
    with torch.no_grad():
        video_embeds = model.encode_video(io["input.video"])
        vis = {k: v for k, v in rec.out.items() if k.startswith("vis.")}
        text_embeds = model.encode_text(io["input.input_ids"], io["input.attention_mask"])
        txt = {k: rec.out[k] for k in ("txt.embeddings_out", "layer0_out", "layer1_out")}
        fused = model.fuse(text_embeds, io["input.attention_mask"], video_embeds)
        fusion = {k: rec.out[k] for k in ("layer2_out", "layer3_out")}
    return dict(model=model, report=report, io=io, video_embeds=video_embeds, text_embeds=text_embeds, vis=vis,
                txt=txt, fused=fused, fusion=fusion)


def test_retrieval_checkpoint_maps_every_key(retrieval):
    report = retrieval["report"]
    assert report.source == "lavis" and report.ok
    assert report.ignored == ["text_encoder.bert.embeddings.position_ids"]  # the arange buffer
    assert report.loaded == 123


def test_retrieval_video_encoder(retrieval):
    io, vis = retrieval["io"], retrieval["vis"]
    for name in ("vis.patch_embed_out", "vis.blocks_in", "vis.block0_out", "vis.block1_out",
                 "vis.video_embeds_unpooled"):
        close(vis[name], io[name], name)
    close(retrieval["video_embeds"], io["video_embeds"], "video_embeds")


@pytest.mark.parametrize("backend", ["reference", "sdpa"])
def test_video_encoder_every_attention_backend(retrieval, backend):
    previous = get_attention_backend()
    set_attention_backend(backend)
    try:
        with torch.no_grad():
            out = retrieval["model"].encode_video(retrieval["io"]["input.video"])
    finally:
        set_attention_backend(previous)
    close(out, retrieval["io"]["video_embeds"], f"video_embeds ({backend})")


def test_retrieval_text_encoder(retrieval):
    io, txt = retrieval["io"], retrieval["txt"]
    close(txt["txt.embeddings_out"], io["txt.embeddings_out"], "embeddings")
    close(txt["layer0_out"], io["txt.layer0_out"], "text layer 0")
    close(txt["layer1_out"], io["txt.layer1_out"], "text layer 1")
    close(retrieval["text_embeds"], io["text_embeds"], "text_embeds")


def test_projections_and_similarities(retrieval):
    model, io = retrieval["model"], retrieval["io"]
    with torch.no_grad():
        video_feat, text_feat = model.video_feat(retrieval["video_embeds"]), model.text_feat(retrieval["text_embeds"])
    close(video_feat, io["video_feat"], "video_feat")
    close(text_feat, io["text_feat"], "text_feat")
    close(video_feat @ text_feat.t() / model.temp, io["sim_v2t"], "sim_v2t")
    close(text_feat @ video_feat.t() / model.temp, io["sim_t2v"], "sim_t2v")


def _embeddings(retrieval) -> RetrievalEmbeddings:
    model, io = retrieval["model"], retrieval["io"]
    with torch.no_grad():
        return RetrievalEmbeddings(retrieval["video_embeds"], model.video_feat(retrieval["video_embeds"]),
                                   retrieval["text_embeds"], io["input.attention_mask"],
                                   model.text_feat(retrieval["text_embeds"]))


def test_fusion_and_vtm_logits_of_all_pairs(retrieval):
    io = retrieval["io"]
    close(retrieval["fusion"]["layer2_out"], io["fusion_pos.layer2_out"], "fusion layer 2")
    close(retrieval["fusion"]["layer3_out"], io["fusion_pos.layer3_out"], "fusion layer 3")
    close(retrieval["fused"], io["fusion_pos.last_hidden_state"], "fusion output")
    videos, texts = torch.meshgrid(torch.arange(3), torch.arange(3), indexing="ij")  # [video i, text j]
    logits = vtm_pair_logits(retrieval["model"], _embeddings(retrieval), texts.flatten(), videos.flatten())
    close(logits.view(3, 3, 2), io["vtm_logits_all"], "vtm_logits_all")


def test_eval_scores_both_protocols(retrieval):
    model, io, emb = retrieval["model"], retrieval["io"], _embeddings(retrieval)
    for k in (3, 2):
        v2t, t2v = scores_lavis(model, emb, k_test=k, batch_size=2)
        close(v2t, io[f"score_matrix_v2t_k{k}"], f"LAVIS v2t k={k}")
        close(t2v, io[f"score_matrix_t2v_k{k}"], f"LAVIS t2v k={k}")
    probs = io["vtm_logits_all"].softmax(-1)[..., 1]  # (video, text)
    close(scores_original(model, emb, batch_size=4), probs.t(), "original protocol (t2v)")


def test_training_forward_with_the_stored_negatives(retrieval):
    model, io = retrieval["model"], retrieval["io"]
    batch = Batch(type="video", keys=["0", "1", "2"], video=io["input.video"], input_ids=io["input.input_ids"],
                  attention_mask=io["input.attention_mask"])
    negatives = (io["forward.neg_video_idx_for_text"], io["forward.neg_text_idx_for_video"])
    with torch.no_grad():
        out = model(batch, negatives=negatives)
        emb = _embeddings(retrieval)
        neg_v, neg_t = negatives
        texts = torch.cat([torch.arange(3), torch.arange(3), neg_t])
        videos = torch.cat([torch.arange(3), neg_v, torch.arange(3)])
        logits = vtm_pair_logits(model, emb, texts, videos)
    for name in ("loss", "loss_vtc", "loss_vtm"):
        close(out[name], io[f"forward.{name}"], name)
    close(logits, io["forward.vtm_logits"], "training VTM logits")


def test_qa_forward_and_intermediates():
    model, report, io = load("alpro_qa_small", "qa", num_answers=10)
    assert report.source == "lavis" and report.ok
    rec = Recorder(model)
    batch = Batch(type="video", keys=["0", "1", "2"], video=io["input.video"], input_ids=io["input.input_ids"],
                  attention_mask=io["input.attention_mask"], answer_ids=io["input.answers"])
    with torch.no_grad():
        out = model(batch)
        text_embeds = model.encode_text(io["input.input_ids"], io["input.attention_mask"])
        video_embeds = model.encode_video(io["input.video"])
        logits = model.qa_logits(text_embeds, io["input.attention_mask"], video_embeds)
    for name in ("vis.patch_embed_out", "vis.blocks_in", "vis.block0_out", "vis.block1_out",
                 "vis.video_embeds_unpooled", "txt.embeddings_out"):
        close(rec.out[name], io[name], name)
    close(rec.out["layer2_out"], io["fusion.layer2_out"], "fusion layer 2")
    close(rec.out["layer3_out"], io["fusion.layer3_out"], "fusion layer 3")
    close(text_embeds, io["text_embeds"], "text_embeds")
    close(video_embeds, io["video_embeds"], "video_embeds")
    close(logits, io["logits"], "logits")
    close(out["loss"], io["forward.loss"], "loss")
