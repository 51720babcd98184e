"""ALPRO model behaviour on the ``debug`` preset: shapes, gradients, each loss's rules, checkpointing, presets."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from alpro.config import ConfigError, from_dict
from alpro.data.batch import Batch
from alpro.errors import AlproError
from alpro.models import (
    IMAGE_TEMPLATES,
    VIDEO_TEMPLATES,
    LossConfig,
    ModelConfig,
    build_model,
    sample_hard_negatives,
)
from alpro.models.video_encoder import resize_time_embed

VOCAB = 1000


def debug_cfg(**loss) -> ModelConfig:
    return dataclasses.replace(ModelConfig.preset("debug"), loss=LossConfig(**loss))


def make_batch(cfg: ModelConfig, B: int = 4, T: int = 4, L: int = 8, seed: int = 0, media: str = "video") -> Batch:
    """A hand-built pre-training batch: random clips and ids, 2 masked tokens per caption, a 1x2-patch box."""
    g = torch.Generator().manual_seed(seed)
    S = cfg.vision.image_size
    ids = torch.randint(5, VOCAB, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, L - 3:] = 0  # one padded caption
    mlm_labels = torch.full((B, L), -100)
    mlm_labels[:, 2:4] = ids[:, 2:4]
    mlm_ids = ids.clone()
    mlm_ids[:, 2:4] = 4  # [MASK]
    pem_mask = torch.zeros(B, cfg.vision.num_patches)
    pem_mask[:, :2] = 1
    video = torch.randn(B, 3, T, S, S, generator=g)
    return Batch(type=media, keys=[f"k{i}" for i in range(B)], video=video, input_ids=ids, attention_mask=mask,
                 mlm_input_ids=mlm_ids, mlm_labels=mlm_labels, crop_video=video * (pem_mask.sum() > 0),
                 pem_mask=pem_mask, answer_ids=torch.tensor([1, 0, 2, -100])[:B], answer_types=["what", "who"] * 2)


class FakeTokenizer:
    """Deterministic stand-in for a HF tokenizer: ids derived from the prompt text."""

    def __call__(self, texts, padding, truncation, max_length, return_tensors):
        ids = torch.tensor([[5 + (hash(w) % (VOCAB - 5)) for w in (t.split() + ["."] * max_length)[:max_length]]
                            for t in texts])
        mask = torch.ones_like(ids)
        mask[:, 8:] = 0
        return {"input_ids": ids, "attention_mask": mask}


def pretrain_model(cfg: ModelConfig | None = None, seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(cfg or debug_cfg(), "pretrain", vocab_size=VOCAB)
    if model.prompter is not None:
        model.build_prompts(FakeTokenizer(), [f"thing{i}" for i in range(model.cfg.num_entities)])
    return model


# ----------------------------------------------------------------------------------------------------- presets


def test_alpro_base_has_the_papers_size():
    """~232M trainable in pre-training (KERNELS.md §0.6): TimeSformer-B 121.26M + BERT-base with MLM head."""
    with torch.device("meta"):
        model = build_model(ModelConfig.preset("alpro-base"), "pretrain")
    C, P, T, depth = 768, 196, 4, 12
    # per block: 3 LayerNorms, 2 x (qkv + proj), temporal_fc, MLP
    block = 3 * 2 * C + (3 * C * C + 3 * C + C * C + C) * 2 + (C * C + C) + (8 * C * C + 5 * C)
    timesformer = depth * block + (3 * 16 * 16 * C + C) + C + (1 + P) * C + T * C + 2 * C
    assert sum(p.numel() for p in model.video_encoder.parameters()) == timesformer == 121_255_680
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert 228e6 < trainable < 236e6
    assert not any(p.requires_grad for p in model.prompter.parameters())


def test_presets_are_validated_configs():
    for name in ("alpro-base", "tiny", "debug"):
        cfg = ModelConfig.preset(name)
        assert from_dict(ModelConfig, dataclasses.asdict(cfg)) == cfg
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelConfig.preset("huge")
    with pytest.raises(ConfigError, match="fusion_layer"):
        from_dict(ModelConfig, {"text": {"num_layers": 4, "fusion_layer": 4}})
    with pytest.raises(ConfigError, match="unknown key 'vision.widht'"):
        from_dict(ModelConfig, {"vision": {"widht": 3}})


# ------------------------------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize("frames", [1, 4, 8, 16])
def test_video_embeddings_for_any_frame_count(frames):
    torch.manual_seed(0)
    cfg = ModelConfig.preset("debug")
    model = build_model(cfg, "retrieval", vocab_size=VOCAB).eval()
    video = torch.randn(2, 3, frames, 32, 32)
    with torch.no_grad():
        tokens = model.video_encoder.forward_tokens(video)
        pooled = model.encode_video(video)
    assert tokens.shape == (2, 1 + 4 * frames, 64)
    assert pooled.shape == (2, 1 + cfg.vision.num_patches, 64)
    torch.testing.assert_close(pooled[:, 1:], tokens[:, 1:].view(2, 4, frames, 64).mean(2))


def test_time_embedding_is_nearest_interpolated_at_run_time():
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("debug"), "retrieval", vocab_size=VOCAB).eval()
    enc = model.video_encoder
    with torch.no_grad():
        enc.time_embed.copy_(torch.arange(4.0).view(1, 4, 1).expand(1, 4, 64))
    assert resize_time_embed(enc.time_embed, 8)[0, :, 0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert resize_time_embed(enc.time_embed, 2)[0, :, 0].tolist() == [0, 2]
    video = torch.randn(1, 3, 8, 32, 32)
    with torch.no_grad():
        tokens = enc.embed(video)[:, 1:].view(1, 4, 8, 64)  # (B, N, T, C)
        zero_time = enc.time_embed.clone()
        enc.time_embed.zero_()
        base = enc.embed(video)[:, 1:].view(1, 4, 8, 64)
        enc.time_embed.copy_(zero_time)
    expected = torch.tensor([0.0, 0, 1, 1, 2, 2, 3, 3]).expand(4, 8)
    torch.testing.assert_close((tokens - base)[0, :, :, 0], expected, atol=1e-5, rtol=0)


def test_text_and_fusion_shapes():
    model = build_model(ModelConfig.preset("debug"), "retrieval", vocab_size=VOCAB).eval()
    batch = make_batch(model.cfg)
    with torch.no_grad():
        text = model.encode_text(batch.input_ids, batch.attention_mask)
        fused = model.fuse(text, batch.attention_mask, model.encode_video(batch.video))
    assert text.shape == (4, 8, 64) and fused.shape == (4, 8 + 1 + 4, 64)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model.encode_text(torch.zeros(1, 65, dtype=torch.long), torch.ones(1, 65, dtype=torch.long))


def original_block_forward(blk, x: torch.Tensor, T: int, p: float) -> torch.Tensor:
    """TimeSformer's ``Block.forward`` (divided space-time), translated literally: per-group tensors, the CLS
    copied into every frame, and timm's DropPath drawing its mask over dim 0 of what it is given."""
    def drop_path(t):
        mask = t.new_empty((t.shape[0],) + (1,) * (t.ndim - 1)).bernoulli_(1 - p).div_(1 - p)
        return t * mask

    def attention(mod, t):
        G, N, C = t.shape
        q, k, v = mod.qkv(t).reshape(G, N, 3, blk.num_heads, C // blk.num_heads).permute(2, 0, 3, 1, 4)
        a = ((q @ k.transpose(-2, -1)) * (C // blk.num_heads) ** -0.5).softmax(-1)
        return mod.proj((a @ v).transpose(1, 2).reshape(G, N, C))

    B, L, C = x.shape
    N = (L - 1) // T
    xt = x[:, 1:].reshape(B * N, T, C)  # 'b (h w t) m -> (b h w) t m'
    res = blk.temporal_fc(drop_path(attention(blk.temporal_attn, blk.temporal_norm1(xt))).reshape(B, N * T, C))
    xt = x[:, 1:] + res
    cls = x[:, :1]
    xs = xt.reshape(B, N, T, C).transpose(1, 2).reshape(B * T, N, C)  # 'b (h w t) m -> (b t) (h w) m'
    xs = torch.cat([cls.repeat(1, T, 1).reshape(B * T, 1, C), xs], 1)
    res = drop_path(attention(blk.attn, blk.norm1(xs)))  # (B*T, 1+N, C)
    cls_res = res[:, 0].reshape(B, T, C).mean(1, keepdim=True)
    patch_res = res[:, 1:].reshape(B, T, N, C).transpose(1, 2).reshape(B, N * T, C)
    x = torch.cat([cls, xt], 1) + torch.cat([cls_res, patch_res], 1)
    return x + drop_path(blk.mlp(blk.norm2(x)))


@pytest.mark.parametrize("training", [False, True])
def test_block_matches_timesformer_including_drop_path_masks(training):
    """Same seed -> same Bernoulli draws: equality in train mode shows the masks are drawn per (b, location) in
    the temporal branch, per (b, frame) in the spatial branch and per clip after the MLP."""
    torch.manual_seed(0)
    model = build_model(ModelConfig.preset("debug"), "retrieval", vocab_size=VOCAB)
    blk = model.video_encoder.blocks[1]
    torch.nn.init.normal_(blk.temporal_fc.weight, std=0.1)
    blk.drop_path = 0.4
    blk.train(training)
    x = torch.randn(3, 1 + 4 * 5, 64)  # B=3, N=4 locations, T=5 frames
    torch.manual_seed(1)
    ours = blk(x, 5)
    torch.manual_seed(1)
    reference = original_block_forward(blk, x, 5, 0.4 if training else 0.0)
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("task", ["prompter", "pretrain", "retrieval", "qa"])
def test_every_trainable_parameter_gets_a_gradient(task):
    cfg = debug_cfg(pem_discard="none")  # random prompts: the paper's rule would drop every label
    model = pretrain_model(cfg) if task == "pretrain" else build_model(cfg, task, vocab_size=VOCAB, num_answers=3)
    model.train()
    for block in model.video_encoder.blocks:  # zero at init, which would starve the temporal path of gradient
        torch.nn.init.normal_(block.temporal_fc.weight, std=0.02)
    batch = make_batch(model.cfg)
    out = model(batch)
    expected = {"prompter": {"loss_vtc"}, "pretrain": {"loss_vtc", "loss_vtm", "loss_mlm", "loss_pem"},
                "retrieval": {"loss_vtc", "loss_vtm"}, "qa": {"loss_qa"}}[task]
    assert expected <= set(out) and torch.isfinite(out["loss"])
    out["loss"].backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert missing == []
    if task == "pretrain":
        assert all(p.grad is None and not p.requires_grad for p in model.prompter.parameters())
        assert not model.prompter.training  # stays in eval mode under model.train()


def test_loss_is_the_weighted_sum_and_zero_weight_switches_a_loss_off():
    model = pretrain_model(debug_cfg(vtc=2.0, mlm=0.5))
    model.eval()
    out = model(make_batch(model.cfg), negatives=(torch.tensor([1, 2, 3, 0]), torch.tensor([3, 0, 1, 2])))
    total = 2.0 * out["loss_vtc"] + out["loss_vtm"] + 0.5 * out["loss_mlm"] + out["loss_pem"]
    torch.testing.assert_close(out["loss"], total)
    off = build_model(debug_cfg(mlm=0.0, pem=0.0), "pretrain", vocab_size=VOCAB)
    assert off.prompter is None and off.text_encoder.cls is None
    assert set(off(make_batch(off.cfg))) == {"loss", "loss_vtc", "loss_vtm", "acc_vtm", "temp"}


def test_temperature_is_clamped_in_place():
    model = build_model(debug_cfg(), "prompter", vocab_size=VOCAB)
    with torch.no_grad():
        model.temp.fill_(5.0)
    out = model(make_batch(model.cfg))
    assert model.temp.item() == pytest.approx(0.5) and out["temp"].item() == pytest.approx(0.5)
    assert "temp" in model.no_weight_decay() and "video_encoder.pos_embed" in model.no_weight_decay()
    assert "video_encoder.blocks.0.attn.qkv.weight" not in model.no_weight_decay()


def test_grad_checkpointing_trains_with_identical_gradients():
    """The original's checkpoint dropped the parameters' gradients; ours must equal the plain backward."""
    grads, calls = [], []
    for enable in (False, True):
        model = pretrain_model(seed=1)
        model.train()
        model.set_grad_checkpointing(enable)
        calls.append(0)
        for module in (model.video_encoder.blocks[0], model.text_encoder.layers[0]):
            module.register_forward_pre_hook(lambda *_: calls.__setitem__(-1, calls[-1] + 1))
        torch.manual_seed(123)  # same dropout / drop-path / VTM draws in both runs
        model(make_batch(model.cfg))["loss"].backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert calls[1] == 2 * calls[0]  # every checkpointed call ran again in backward
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.parametrize("task", ["qa", "retrieval"])
def test_original_ckpt_freeze_leaves_timesformer_attn_and_mlp_without_gradient(task):
    """Issue 10 item 20: with ``original_ckpt_freeze`` (the published QA fine-tuning) every block's attn,
    temporal_attn and mlp weights get no gradient and leave the optimizer; without it they train. Gradients of
    everything else are unchanged (they flow through the frozen weights, as through the original's checkpoint)."""
    from alpro.train.runtime import param_groups

    frozen_parts = (".attn.", ".temporal_attn.", ".mlp.")
    grads, frozen = [], []
    for knob in (False, True):
        cfg = dataclasses.replace(debug_cfg(), grad_checkpointing=True, original_ckpt_freeze=knob)
        torch.manual_seed(0)
        model = build_model(cfg, task, vocab_size=VOCAB, num_answers=3).train()
        for block in model.video_encoder.blocks:  # zero at init, which would starve the temporal path of gradient
            torch.nn.init.normal_(block.temporal_fc.weight, std=0.02)
        torch.manual_seed(1)
        model(make_batch(cfg), negatives=(torch.tensor([1, 2, 3, 0]), torch.tensor([3, 0, 1, 2])))["loss"].backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        frozen.append({n for n, p in model.named_parameters() if n.startswith("video_encoder.blocks.")
                       and any(part in n for part in frozen_parts)})
        in_optimizer = {id(p) for g in param_groups(model, 0.01, model.no_weight_decay()) for p in g["params"]}
        names_in_optimizer = {n for n, p in model.named_parameters() if id(p) in in_optimizer}
        assert (names_in_optimizer & frozen[-1]) == (set() if knob else frozen[-1])
    without, with_knob = grads
    assert len(frozen[1]) == 2 * 12  # 2 blocks x (attn qkv/proj + temporal_attn qkv/proj + mlp fc1/fc2) x (w, b)
    assert all(without[n] is not None and without[n].any() for n in frozen[0])  # the fix: they train
    assert all(with_knob[n] is None for n in frozen[1])  # the published behaviour: no gradient
    for name, g in without.items():
        if name not in frozen[1]:
            assert with_knob[name] is not None, name
            torch.testing.assert_close(with_knob[name], g, atol=1e-6, rtol=1e-5, msg=name)
    assert any(n.endswith("temporal_norm1.weight") for n in without) and not any("norm" in n for n in frozen[1])


def test_freeze_video_encoder_trains_everything_else_exactly_as_before():
    """Issue 14: ``freeze_video_encoder`` (the demo's QA stage) leaves every video-encoder weight without gradient
    and out of the optimizer, keeps the encoder in eval mode through ``train()`` and builds no graph through it;
    the text, fusion and QA-head gradients equal those of the unfrozen model with its encoder in eval mode."""
    from alpro.train.runtime import param_groups

    grads = []
    for knob in (False, True):
        cfg = dataclasses.replace(debug_cfg(), freeze_video_encoder=knob)
        torch.manual_seed(0)
        model = build_model(cfg, "qa", vocab_size=VOCAB, num_answers=3).train()
        if not knob:
            model.video_encoder.eval()  # the reference: same forward (no stochastic depth), encoder still trains
        batch = make_batch(cfg)
        batch.answer_ids = torch.tensor([0, 2, 1, 2])
        video = model.encode_video(batch.video)
        assert video.requires_grad is not knob
        model(batch)["loss"].backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
        encoder = {n for n, _ in model.named_parameters() if n.startswith("video_encoder.")}
        in_optimizer = {id(p) for g in param_groups(model, 0.01, model.no_weight_decay()) for p in g["params"]}
        names_in_optimizer = {n for n, p in model.named_parameters() if id(p) in in_optimizer}
        assert bool(encoder & names_in_optimizer) is not knob
        if knob:
            assert not model.video_encoder.training and model.text_encoder.training
            assert all(grads[-1][n] is None for n in encoder)
    without, frozen = grads
    for name, g in without.items():
        if not name.startswith("video_encoder."):
            torch.testing.assert_close(frozen[name], g, atol=1e-6, rtol=1e-5, msg=name)


# ---------------------------------------------------------------------------------------------------- losses


def test_vtm_never_samples_itself():
    torch.manual_seed(0)
    sim = torch.eye(6) * 50 + torch.randn(6, 6)  # the diagonal would win every draw if it were allowed
    for _ in range(200):
        neg_video, neg_text = sample_hard_negatives(sim)
        assert not (neg_video == torch.arange(6)).any() and not (neg_text == torch.arange(6)).any()
    with pytest.raises(AlproError, match="at least 2"):
        sample_hard_negatives(torch.zeros(1, 1))


def test_vtm_uses_given_negatives_and_hard_ones_follow_similarity():
    sim = torch.full((3, 3), -30.0)
    sim[0, 2] = sim[1, 0] = sim[2, 1] = 30.0  # video i is most similar to text (i+2)%3
    neg_video, neg_text = sample_hard_negatives(sim)
    assert neg_text.tolist() == [2, 0, 1] and neg_video.tolist() == [1, 2, 0]


def test_mlm_loss_is_cross_entropy_on_masked_positions_only():
    model = pretrain_model(debug_cfg(vtm=0.0, pem=0.0))
    model.eval()
    batch = make_batch(model.cfg)
    with torch.no_grad():
        out = model(batch)
        video = model.encode_video(batch.video)
        text = model.encode_text(batch.mlm_input_ids, batch.attention_mask)
        logits = model.text_encoder.mlm_logits(model.fuse(text, batch.attention_mask, video)[:, :8])
    expected = F.cross_entropy(logits.reshape(-1, VOCAB), batch.mlm_labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(out["loss_mlm"], expected)
    assert (model.text_encoder.cls.predictions.decoder.weight
            is model.text_encoder.bert.embeddings.word_embeddings.weight)  # tied head


def test_pem_loss_pools_the_box_and_matches_the_prompter():
    model = pretrain_model(debug_cfg(pem_discard="none"))
    model.eval()
    batch = make_batch(model.cfg, media="image")
    with torch.no_grad():
        out = model(batch, negatives=(torch.tensor([1, 0, 3, 2]), torch.tensor([1, 0, 3, 2])))
        video = model.encode_video(batch.video)
        text = model.encode_text(batch.input_ids, batch.attention_mask)
        patches = model.fuse(text, batch.attention_mask, video)[:, 8 + 1:]  # (B, P, D)
        logits = model.pem_head(patches[:, :2].mean(1))  # the box is patches 0 and 1
        p = model.prompter
        sim = p.video_feat(p.encode_video(batch.crop_video)) @ p.image_prompt_feat.t() / p.temp
        expected = -(sim.softmax(1) * logits.log_softmax(1)).sum(1).mean()
    torch.testing.assert_close(out["loss_pem"], expected)
    assert out["pem_kept"].item() == 1.0


def test_pem_discard_rules():
    torch.manual_seed(0)
    prompter = build_model(debug_cfg(), "prompter", vocab_size=VOCAB).eval()
    prompter.build_prompts(FakeTokenizer(), [f"e{i}" for i in range(16)])
    clips = torch.randn(6, 3, 4, 32, 32)
    with torch.no_grad():
        sim = prompter.video_feat(prompter.encode_video(clips)) @ prompter.video_prompt_feat.t() / prompter.temp
    probs = sim.softmax(1)
    threshold = float(probs.max(1).values.median())  # keeps about half under the paper's rule

    def keep(rule):
        prompter.cfg = dataclasses.replace(prompter.cfg, loss=LossConfig(pem_discard=rule, pem_threshold=threshold))
        soft, kept = prompter.pseudo_labels(clips, "video")
        torch.testing.assert_close(soft, probs)
        return kept

    assert keep("max_prob").tolist() == (probs.max(1).values >= threshold).tolist()
    assert keep("argmax_index").tolist() == (sim.argmax(1) != 0).tolist()  # the original: only index 0 dropped
    assert keep("none").all()


def test_prompts_average_the_twelve_templates_without_renormalising():
    assert len(VIDEO_TEMPLATES) == len(IMAGE_TEMPLATES) == 12
    assert VIDEO_TEMPLATES[0] == "A footage of a {}." and IMAGE_TEMPLATES[6] == "A good photo of the {}."
    torch.manual_seed(0)
    prompter = build_model(debug_cfg(), "prompter", vocab_size=VOCAB).eval()
    entities = [f"e{i}" for i in range(16)]
    prompter.build_prompts(FakeTokenizer(), entities)
    tok = FakeTokenizer()(["A photo of one e3."], None, None, 15, None)
    with torch.no_grad():
        one = prompter.text_feat(prompter.encode_text(tok["input_ids"], tok["attention_mask"]))
        enc = FakeTokenizer()([t.format("e3") for t in IMAGE_TEMPLATES], None, None, 15, None)
        mean = prompter.text_feat(prompter.encode_text(enc["input_ids"], enc["attention_mask"])).mean(0)
    torch.testing.assert_close(prompter.image_prompt_feat[3], mean)
    assert prompter.image_prompt_feat[3].norm() < 1.0 and one.norm() == pytest.approx(1.0)
    with pytest.raises(AlproError, match="num_entities=16"):
        prompter.build_prompts(FakeTokenizer(), entities[:3])


def test_pem_needs_built_prompts():
    model = build_model(debug_cfg(), "pretrain", vocab_size=VOCAB)
    with pytest.raises(AlproError, match="build_prompts"):
        model(make_batch(model.cfg))


def test_missing_batch_fields_are_clear_errors():
    model = pretrain_model()
    batch = dataclasses.replace(make_batch(model.cfg), mlm_input_ids=None)
    with pytest.raises(AlproError, match="mlm_input_ids"):
        model(batch)


def test_invalid_clips_are_dropped():
    model = build_model(debug_cfg(), "retrieval", vocab_size=VOCAB).eval()
    batch = make_batch(model.cfg, B=4)
    flagged = dataclasses.replace(batch, valid=torch.tensor([True, False, True, True]))
    kept = Batch(type="video", keys=["k0", "k2", "k3"], video=batch.video[[0, 2, 3]],
                 input_ids=batch.input_ids[[0, 2, 3]], attention_mask=batch.attention_mask[[0, 2, 3]])
    negatives = (torch.tensor([1, 2, 0]), torch.tensor([2, 0, 1]))
    with torch.no_grad():
        torch.testing.assert_close(model(flagged, negatives)["loss"], model(kept, negatives)["loss"])


def test_qa_ignores_answers_outside_the_vocabulary():
    torch.manual_seed(0)
    model = build_model(debug_cfg(), "qa", vocab_size=VOCAB, num_answers=3).eval()
    batch = make_batch(model.cfg)  # answer_ids [1, 0, 2, -100]
    with torch.no_grad():
        out = model(batch)
        text = model.encode_text(batch.input_ids, batch.attention_mask)
        logits = model.qa_logits(text, batch.attention_mask, model.encode_video(batch.video))
    torch.testing.assert_close(out["loss_qa"], F.cross_entropy(logits[:3], batch.answer_ids[:3]))
    with pytest.raises(ValueError, match="num_answers"):
        build_model(debug_cfg(), "qa", vocab_size=VOCAB)


def test_bf16_weights_take_fp32_batches():
    """A bf16 engine casts the weights, not the batch: the model casts the clips itself."""
    model = pretrain_model(debug_cfg(pem_discard="none")).to(torch.bfloat16)
    out = model(make_batch(model.cfg))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and model.vtm_head.weight.grad.dtype == torch.bfloat16
