"""Weights in and out: our safetensors files, the original ALPRO's and LAVIS's checkpoints, a timm ViT, a HF BERT.

Nothing here unpickles arbitrary objects: ``.safetensors`` files are read with safetensors, anything else with
``torch.load(weights_only=True)``. Key names are mapped to ours by :func:`map_key` (the table is in
``docs/checkpoint_keys.md``); TimeSformer's spatial and temporal position embeddings are resized by nearest
interpolation when the checkpoint's grid or frame count differs from the model's. Every load returns a
:class:`LoadReport` that says what was loaded, resized, missing, unexpected or deliberately ignored.
"""

from __future__ import annotations

import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed

from alpro.config import to_dict
from alpro.errors import AlproError
from alpro.fileio import atomic_path
from alpro.models.text_encoder import TextEncoder
from alpro.models.video_encoder import resize_pos_embed, resize_time_embed

if TYPE_CHECKING:
    from alpro.models.config import ModelConfig

# Keys other code bases store that carry nothing we use, each with the reason it is dropped.
IGNORED_KEYS: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"(^|\.)embeddings\.position_ids$"),
     "BERT's arange(max_positions) buffer: recomputed, not a weight (non-persistent in transformers 5)"),
    (re.compile(r"(^|\.)video_encoder\.head\."),
     "TimeSformer's 400-way Kinetics classifier: built by the original but never called by ALPRO"),
    (re.compile(r"(^|\.)bert\.pooler\."), "BERT pooler: ALPRO never uses it"),
    (re.compile(r"(^|\.)cls\.seq_relationship\."), "BERT next-sentence head: not an ALPRO objective"),
)
# Keys that the original's classes inherit from AlproBaseModel but never use, dropped when the model they load
# into is of that kind (matched on our names, after the model's own prefix).
UNUSED_BY_TASK: dict[str, tuple[re.Pattern, str]] = {
    "prompter": (re.compile(r"vtm_head\."),
                 "the original Prompter inherits AlproBaseModel's itm_head; its VTC-only forward never calls it"),
    "retrieval": (re.compile(r"text_encoder\.cls\."),
                  "AlproForVideoTextRetrieval's text encoder is a BertForMaskedLM whose MLM head its forward never "
                  "calls"),
    "qa": (re.compile(r"(temp$|vision_proj\.|text_proj\.|vtm_head\.)"),
           "AlproForSequenceClassification inherits AlproBaseModel's VTC projections, temperature and itm_head; "
           "its forward uses only the classifier"),
}
TEXT_ONLY_REASON = ("the original Prompter's BERT has fusion layers and an MLM head that its VTC-only forward never "
                    "runs; ours builds only the text layers")
SKIP_REASON = "skipped by the caller (the prompt buffers are rebuilt from the entity list)"
# Renames of the original / LAVIS names to ours, applied to the key after an optional "prompter." prefix.
RENAMES = (
    ("visual_encoder.model.", "video_encoder."),
    ("text_encoder.bert.", "text_encoder.bert."),
    ("text_encoder.cls.", "text_encoder.cls."),
    ("text_encoder.", "text_encoder.bert."),  # LAVIS and the original QA model: BertModel without "bert."
    ("itm_head.", "vtm_head."),
    ("mpm_head.", "pem_head."),
    ("classifier.", "qa_head."),
)


@dataclass
class LoadReport:
    """What a load did. ``ok`` means nothing the model needs was missing and nothing was left over."""

    path: str
    source: str  # "alpro" (ours), "original" (salesforce/ALPRO), "lavis", "timm-vit" or "hf-bert"
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    resized: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = field(default_factory=dict)
    kept_init: list[str] = field(default_factory=list)
    reasons: dict[str, str] = field(default_factory=dict)
    """Why each ``ignored`` key was dropped (one of the reasons above)."""

    @property
    def ok(self) -> bool:
        return not self.missing and not self.unexpected

    def __str__(self) -> str:
        lines = [f"loaded {self.loaded} tensors from {self.path} ({self.source} layout)"]
        for key, (old, new) in self.resized.items():
            lines.append(f"  resized {key}: {tuple(old)} -> {tuple(new)}")
        for name, keys in (("missing (left at init)", self.missing), ("unexpected (not used)", self.unexpected),
                           ("kept at init by design", self.kept_init), ("ignored", self.ignored)):
            if keys:
                lines.append(f"  {name}: {len(keys)} -- {_summarise(keys)}")
        return "\n".join(lines)


def _group(key: str) -> str:
    """'prompter.video_encoder.blocks.3.attn.qkv.weight' -> 'prompter.video_encoder.*', 'pem_head.0.bias' ->
    'pem_head.*': at most two module names, stopping at a layer index."""
    path: list[str] = []
    for part in key.split(".")[:-1]:
        if part.isdigit() or len(path) == 2:
            break
        path.append(part)
    return ".".join(path) + ".*" if path else key


def _summarise(keys: list[str], limit: int = 8) -> str:
    """One readable line for a report of hundreds of keys: groups with counts, single keys in full."""
    groups: dict[str, list[str]] = {}
    for key in keys:
        groups.setdefault(_group(key), []).append(key)
    ranked = sorted(groups.items(), key=lambda g: -len(g[1]))
    shown = [f"{g} ({len(ks)})" if len(ks) > 1 else ks[0] for g, ks in ranked[:limit]]
    return ", ".join(shown) + (f", ... {len(groups) - limit} more groups" if len(groups) > limit else "")


# ---------------------------------------------------------------------------------------------------- reading


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat ``name -> tensor`` dict from a safetensors file or a weights-only torch checkpoint.

    Accepts the usual wrappers (``{"model": ...}``, ``{"module": ...}``, ``{"state_dict": ...}``) and strips
    DDP's ``module.`` prefix.
    """
    path = Path(path)
    if not path.is_file():
        raise AlproError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        state = load_file(str(path))
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise AlproError(f"{path}: not a weights-only checkpoint ({first}); re-save its state_dict with "
                             "torch.save(model.state_dict()) or as safetensors") from None
        for wrapper in ("model", "module", "state_dict"):
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
                break
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise AlproError(f"{path}: expected a mapping of parameter names to tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def detect_source(keys: list[str]) -> str:
    """"alpro" (ours), "original" (salesforce/ALPRO names) or "lavis" (its text keys lack ``bert.``)."""
    if any(k.startswith(("video_encoder.", "prompter.video_encoder.")) for k in keys):
        return "alpro"
    if any(k.startswith(("visual_encoder.", "prompter.visual_encoder.")) for k in keys):
        original = any(".bert." in k or k.startswith(("mpm_head.", "prompter.")) for k in keys)
        # the original QA model is a BertModel like LAVIS's, but keeps the inherited itm_head next to its classifier
        original = original or (any(k.startswith("classifier.") for k in keys)
                                and any(k.startswith("itm_head.") for k in keys))
        return "original" if original else "lavis"
    raise AlproError("unrecognised checkpoint layout: no video_encoder.* or visual_encoder.model.* keys")


def map_key(key: str) -> str:
    """Original / LAVIS key -> our key (``prompter.`` prefixes carry through)."""
    prefix = "prompter." if key.startswith("prompter.") else ""
    rest = key[len(prefix):]
    for old, new in RENAMES:
        if rest.startswith(old):
            return prefix + new + rest[len(old):]
    return key


def convert_state_dict(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """Any supported layout -> our key names. Returns the mapped dict and the detected source."""
    source = detect_source(list(state))
    if source == "alpro":
        return dict(state), source
    return {map_key(k): v for k, v in state.items()}, source


# ----------------------------------------------------------------------------------------------------- loading


def _aliases(model: nn.Module) -> set[str]:
    """State-dict keys that are a second name for a tied tensor (the MLM decoder = word embeddings)."""
    seen: dict[int, str] = {}
    aliases = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.data_ptr() in seen and tensor.numel() > 0:
            aliases.add(name)
        else:
            seen[tensor.data_ptr()] = name
    return aliases


def _resize_video_embeddings(state: dict[str, torch.Tensor], target: dict[str, torch.Tensor],
                             report: LoadReport) -> None:
    """Nearest-resize every ``*video_encoder.time_embed`` / ``*.pos_embed`` to the model's frame count / grid."""
    for key, value in list(state.items()):
        if key not in target or value.shape == target[key].shape:
            continue
        if key.endswith("video_encoder.time_embed"):
            state[key] = resize_time_embed(value.float(), target[key].shape[1]).to(value.dtype)
        elif key.endswith("video_encoder.pos_embed"):
            side = round((target[key].shape[1] - 1) ** 0.5)
            state[key] = resize_pos_embed(value.float(), (side, side)).to(value.dtype)
        else:
            continue
        report.resized[key] = (tuple(value.shape), tuple(state[key].shape))


def ignore_reason(key: str) -> str | None:
    """The reason a key of any layout is never loaded (:data:`IGNORED_KEYS`), or None."""
    return next((reason for pattern, reason in IGNORED_KEYS if pattern.search(key)), None)


def _model_unused(model: nn.Module) -> list[tuple[re.Pattern, str]]:
    """(pattern, reason) for the keys the original's classes carry but this model deliberately lacks: the
    prompter's fusion layers and MLM head (a text-only BERT), the prompter's ``itm_head``, and the QA model's
    inherited VTC heads. Patterns are anchored at each such submodule's prefix (our names)."""
    rules = []
    for name, m in model.named_modules():
        prefix = re.escape(f"{name}.") if name else ""
        if isinstance(m, TextEncoder) and m.text_only:
            rules.append((re.compile(rf"^{prefix}(bert\.encoder\.layer\.\d+\.|cls\.)"), TEXT_ONLY_REASON))
        task = getattr(m, "task", None)
        if isinstance(task, str) and task in UNUSED_BY_TASK:
            pattern, reason = UNUSED_BY_TASK[task]
            rules.append((re.compile(rf"^{prefix}{pattern.pattern}"), reason))
    return rules


def _endswith(key: str, suffixes: tuple[str, ...]) -> bool:
    return bool(suffixes) and key.endswith(suffixes)


def load_checkpoint(model: nn.Module, path: str | Path, *, strict: bool = False,
                    skip: tuple[str, ...] = ()) -> LoadReport:
    """Load ours / the original's / LAVIS's weights into ``model`` (any task).

    ``skip``: key suffixes never loaded (e.g. the prompter's prompt buffers). With ``strict`` a missing or
    unexpected key raises :class:`AlproError`; otherwise they are listed in the report. Keys dropped on purpose
    are listed under ``ignored`` with their reason in ``reasons``.
    """
    return load_state(model, read_state_dict(path), str(path), strict=strict, skip=skip)


def load_state(model: nn.Module, state: dict[str, torch.Tensor], path: str = "<state_dict>", *,
               strict: bool = False, skip: tuple[str, ...] = ()) -> LoadReport:
    """:func:`load_checkpoint` for a state dict already in memory (``path`` only names it in messages)."""
    state, source = convert_state_dict(state)
    report = LoadReport(str(path), source)
    for key in list(state):
        reason = SKIP_REASON if _endswith(key, skip) else ignore_reason(key)
        if reason:
            report.ignored.append(key)
            report.reasons[key] = reason
            del state[key]
    target = model.state_dict()
    _resize_video_embeddings(state, target, report)
    unused = _model_unused(model)
    for key in sorted(k for k in state if k not in target):
        reason = next((r for pattern, r in unused if pattern.match(key)), None)
        if reason:
            report.ignored.append(key)
            report.reasons[key] = reason
        else:
            report.unexpected.append(key)
        del state[key]
    for key, value in state.items():
        if value.shape != target[key].shape:
            raise AlproError(f"{path}: {key} has shape {tuple(value.shape)} in the checkpoint but "
                             f"{tuple(target[key].shape)} in the model (a different config?)")
    result = model.load_state_dict(state, strict=False)
    aliases = _aliases(model)
    report.missing = sorted(k for k in result.missing_keys if k not in aliases and not _endswith(k, skip))
    report.loaded = len(state)
    report.ignored.sort()
    if strict and not report.ok:
        raise AlproError(f"strict load failed: {report}")
    return report


def load_vit_weights(model: nn.Module, path: str | Path) -> LoadReport:
    """Initialise the video encoder from a local timm ViT checkpoint (ImageNet-21k ViT-B/16 in the paper).

    As the original (``load_pretrained_imagenet``): the classifier is dropped, each block's temporal attention
    and its norm are copies of the spatial ones, ``temporal_fc`` and ``time_embed`` keep their zero init.
    A different image size resizes the spatial position embedding (bicubic, timm's ViT rule; the original
    silently skipped it).
    """
    encoder = getattr(model, "video_encoder", model)
    state = read_state_dict(path)
    report = LoadReport(str(path), "timm-vit")
    vit: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.startswith(("head.", "fc_norm.", "head_drop.")):
            report.ignored.append(key)
            continue
        vit[key] = value
        block = re.match(r"blocks\.\d+\.", key)
        if block and key[block.end():].startswith("attn."):
            vit[key.replace(".attn.", ".temporal_attn.", 1)] = value
        if block and key[block.end():].startswith("norm1."):
            vit[key.replace(".norm1.", ".temporal_norm1.", 1)] = value
    target = encoder.state_dict()
    if "pos_embed" in vit and vit["pos_embed"].shape != target["pos_embed"].shape:
        old = tuple(vit["pos_embed"].shape)
        side = round((target["pos_embed"].shape[1] - 1) ** 0.5)
        vit["pos_embed"] = resample_abs_pos_embed(vit["pos_embed"].float(), [side, side], num_prefix_tokens=1)
        report.resized["pos_embed"] = (old, tuple(vit["pos_embed"].shape))
    report.unexpected = sorted(k for k in vit if k not in target)
    for key in report.unexpected:
        del vit[key]
    for key, value in vit.items():
        if value.shape != target[key].shape:
            raise AlproError(f"{path}: ViT {key} has shape {tuple(value.shape)}, the video encoder needs "
                             f"{tuple(target[key].shape)} (width / patch size differ?)")
    missing = encoder.load_state_dict(vit, strict=False).missing_keys
    by_design = re.compile(r"^(time_embed|blocks\.\d+\.temporal_fc\.(weight|bias))$")
    report.ignored.sort()
    report.kept_init = sorted(k for k in missing if by_design.match(k))
    report.missing = sorted(k for k in missing if not by_design.match(k))
    report.loaded = len(vit)
    return report


def load_bert_weights(model: nn.Module, path: str | Path) -> LoadReport:
    """Initialise the text (and fusion) layers, embeddings and MLM head from a local Hugging Face BERT
    directory (bert-base-uncased in the paper). Layers beyond the model's (the prompter's text-only BERT) and
    an MLM head the model does not have are ignored."""
    from transformers import BertForMaskedLM

    text = getattr(model, "text_encoder", model)
    if not Path(path, "config.json").is_file():
        raise AlproError(f"{path}: not a Hugging Face BERT directory (no config.json)")
    hf, info = BertForMaskedLM.from_pretrained(str(path), local_files_only=True, output_loading_info=True)
    ours, theirs = text.bert.config, hf.config
    for name in ("hidden_size", "num_attention_heads", "intermediate_size", "vocab_size"):
        if getattr(ours, name) != getattr(theirs, name):
            raise AlproError(f"{path}: BERT {name} is {getattr(theirs, name)}, the model's is {getattr(ours, name)}")
    report = LoadReport(str(path), "hf-bert")
    target = text.state_dict()
    state = {}
    for key, value in hf.state_dict().items():
        if key in target:
            state[key] = value
        elif ignore_reason(key) or key.startswith(("bert.encoder.layer.", "cls.")):
            report.ignored.append(key)  # layers past ours / the MLM head of a model without one
        else:
            report.unexpected.append(key)
    result = text.load_state_dict(state, strict=False)
    aliases = _aliases(text)
    not_in_dir = set(info.get("missing_keys", []))
    report.missing = sorted(k for k in result.missing_keys if k not in aliases)
    report.missing += sorted(k for k in not_in_dir if k in state)  # random-initialised by from_pretrained
    report.loaded = len(state) - len(not_in_dir & set(state))
    return report


# ----------------------------------------------------------------------------------------------------- saving


def model_metadata(cfg: ModelConfig | dict | None, task: str | None) -> dict[str, str]:
    """The metadata that lets a tool rebuild the model from a weights file alone: ``alpro_config`` (the model
    config as JSON) and ``alpro_task``; either is left out when unknown."""
    meta = {}
    if cfg is not None:
        meta["alpro_config"] = json.dumps(cfg if isinstance(cfg, dict) else to_dict(cfg))
    if task is not None:
        meta["alpro_task"] = str(task)
    return meta


def write_safetensors(state: dict[str, torch.Tensor], path: str | Path,
                      metadata: dict[str, str] | None = None) -> Path:
    """The one safetensors writer. Tensors that share memory (tied weights: the MLM decoder = the word
    embeddings) are stored once, under their first name, as :func:`load_checkpoint` expects (it re-ties by the
    model's aliases); safetensors refuses shared tensors, and storing copies would double the tied matrix and
    untie it on load. Contiguous, on CPU, written atomically."""
    path = Path(path)
    seen: set[int] = set()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if tensor.numel() > 0 and tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        out[key] = tensor.detach().cpu().contiguous()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        save_file(out, str(tmp), metadata=dict(metadata or {}))
    return path


def save_safetensors(model: nn.Module, path: str | Path, metadata: dict[str, str] | None = None) -> Path:
    """Write ``model``'s weights to ``path`` (:func:`write_safetensors`), with its config and task in the
    file's metadata (:func:`model_metadata`); ``metadata`` adds to them."""
    meta = model_metadata(getattr(model, "cfg", None), getattr(model, "task", None))
    return write_safetensors(model.state_dict(), path, {**meta, **(metadata or {})})


def read_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a safetensors file (``alpro_config`` JSON, ``alpro_task``, ...)."""
    with safe_open(str(path), "pt") as f:
        return dict(f.metadata() or {})
