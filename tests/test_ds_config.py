"""The DeepSpeed JSON is generated from typed run-config fields; a user's ``train.ds_config`` JSON is merged on top
(its keys win, the trainer-owned ones must agree). In-process, no DeepSpeed engine: fast."""

import json
from pathlib import Path

import pytest

from alpro.config import ConfigError
from alpro.train.config import load_run_config
from alpro.train.runtime import TRAINER_OWNED, build_ds_config

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "launch" / "ds_configs" / "example.json"


def ds_for(cfg, world_size=2, template=None):
    return build_ds_config(template if template is not None else cfg.train.ds_config,
                           micro_batch=cfg.data.batch_size, grad_accum=cfg.train.grad_accum, world_size=world_size,
                           grad_clip=cfg.optim.grad_clip, precision=cfg.train.precision,
                           zero_stage=cfg.train.zero_stage, settings=cfg.train.deepspeed)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_generated_from_typed_fields(stage):
    cfg = load_run_config(None, ["--train.zero_stage", str(stage), "--train.grad_accum", "3", "--data.batch_size", "4",
                                 "--train.precision", "bf16", "--optim.grad_clip", "5",
                                 "--train.deepspeed.overlap_comm", "true", "--train.deepspeed.reduce_bucket_size", "7"])
    ds = ds_for(cfg)
    batch = (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"])
    assert batch == (4, 3, 24)
    assert ds["gradient_clipping"] == (5.0 if stage else 0.0)  # ZeRO-0: the trainer clips itself
    assert ds["bf16"] == {"enabled": True} and ds["fp16"]["enabled"] is False
    zero = ds["zero_optimization"]
    assert zero["stage"] == stage
    if stage == 0:
        assert zero == {"stage": 0}
    else:
        assert zero["overlap_comm"] is True and zero["reduce_bucket_size"] == 7
        assert ("allgather_bucket_size" in zero) == (stage < 3)
        assert ("stage3_prefetch_bucket_size" in zero) == (stage == 3)


def test_example_json_restates_the_generated_defaults():
    """The one example JSON users copy changes nothing at ZeRO-2 defaults: it cannot drift from the generator."""
    cfg = load_run_config(None, [])
    assert cfg.train.ds_config is None and cfg.train.zero_stage == 2
    merged = ds_for(cfg, template=EXAMPLE)
    comment = merged.pop("_comment")
    assert "train.ds_config" in comment
    assert merged == ds_for(cfg)


def test_user_json_wins_for_keys_it_sets(tmp_path):
    user = tmp_path / "ds.json"
    user.write_text(json.dumps({"zero_optimization": {"reduce_bucket_size": 123, "round_robin_gradients": True},
                                "fp16": {"initial_scale_power": 8}, "wall_clock_breakdown": True,
                                "train_micro_batch_size_per_gpu": 4}))
    cfg = load_run_config(None, ["--train.ds_config", str(user), "--data.batch_size", "4",
                                 "--train.deepspeed.reduce_bucket_size", "999"])
    ds = ds_for(cfg)
    zero = ds["zero_optimization"]
    assert zero["reduce_bucket_size"] == 123 and zero["round_robin_gradients"] is True and zero["stage"] == 2
    assert zero["allgather_bucket_size"] == cfg.train.deepspeed.allgather_bucket_size  # generated keys stay
    assert ds["fp16"]["initial_scale_power"] == 8 and ds["fp16"]["loss_scale_window"] == 1000
    assert ds["wall_clock_breakdown"] is True and ds["train_micro_batch_size_per_gpu"] == 4


@pytest.mark.parametrize("keys", list(TRAINER_OWNED))
def test_trainer_owned_keys_must_agree(tmp_path, keys):
    cfg = load_run_config(None, [])
    generated = ds_for(cfg)
    want = generated
    for key in keys:
        want = want[key]
    other = (not want) if isinstance(want, bool) else want + 1
    data: dict = {}
    node = data
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = other
    user = tmp_path / "ds.json"
    user.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=f"'{'.'.join(keys)}' is .* set {TRAINER_OWNED[keys].split()[0]}") as e:
        ds_for(cfg, template=user)
    assert "\n" not in str(e.value)
    node[keys[-1]] = want  # the same value is accepted
    user.write_text(json.dumps(data))
    assert ds_for(cfg, template=user) == generated


@pytest.mark.parametrize("text, message", [
    ('{"optimizer": {"type": "Adam"}}', "remove 'optimizer'"),
    ('{"scheduler": {}}', "remove 'scheduler'"),
    ('{"a": 1,}', r"ds.json:1: invalid JSON"),
    ("[1, 2]", "top level must be a JSON object"),
])
def test_bad_user_json_is_one_line(tmp_path, text, message):
    user = tmp_path / "ds.json"
    user.write_text(text)
    cfg = load_run_config(None, [])
    with pytest.raises(ConfigError, match=message) as e:
        ds_for(cfg, template=user)
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="DeepSpeed config not found"):
        ds_for(cfg, template=tmp_path / "missing.json")


def test_bad_typed_field_names_the_key():
    with pytest.raises(ConfigError, match="reduce_bucket_size must be >= 1"):
        load_run_config(None, ["--train.deepspeed.reduce_bucket_size", "0"])
    with pytest.raises(ConfigError, match="unknown key 'train.deepspeed.overlap'"):
        load_run_config(None, ["--train.deepspeed.overlap", "true"])


def test_every_recipe_generates_a_deepspeed_config():
    """No recipe names a DeepSpeed JSON that is not there; each resolves to a generated config for its stage."""
    recipes = sorted((REPO / "launch" / "configs").rglob("*.yaml"))
    assert recipes
    for recipe in recipes:
        if recipe.name == "common.yaml":
            continue
        cfg = load_run_config(recipe)
        ds = ds_for(cfg)
        assert ds["zero_optimization"]["stage"] == cfg.train.zero_stage, recipe
        assert ds["bf16"]["enabled"] == (cfg.train.precision == "bf16"), recipe
