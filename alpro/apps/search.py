"""Video search and zero-shot categorisation with a trained checkpoint (what users of the original asked for).

    alpro index demo_out/shards/test_video --run demo_out/runs/pretrain --out demo_out/index
    alpro search "a small red circle moves left" --index demo_out/index --top-k 5 --sheet hits.png
    alpro classify --index demo_out/index --top 3                  # labels = the run's entity list

``index`` embeds every clip once (uniform frames, no augmentation) and stores the normalised VTC features and,
unless ``--no-tokens``, the fp16 video tokens the fusion encoder needs. ``search`` ranks all clips by VTC cosine,
re-ranks the best ``--rerank`` by VTM match logit + cosine (LAVIS's retrieval score) and can draw a contact
sheet of the hits' frames, decoded straight from the shards. ``classify`` scores clips against entity prompts
averaged over the 12 video templates, as the prompter builds its pseudo-label targets.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from alpro.config import option, parse_command
from alpro.errors import AlproError


def _load_model(run: Path, task: str = "retrieval"):
    """(model, tokenizer, cfg) from a finished run's final/ directory, on CPU or the first GPU."""
    from alpro.data import build_tokenizer
    from alpro.models import build_model, load_checkpoint
    from alpro.train.evaluate import _load_run

    cfg, weights, final = _load_run(run, [])
    tokenizer = build_tokenizer(tokenizer_dir=final / "tokenizer")
    model = build_model(cfg.model, task, vocab_size=len(tokenizer))
    load_checkpoint(model, weights)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    return model.to(device).eval(), tokenizer, cfg, final


# -------------------------------------------------------------------------------------------------- index


FEAT_FILE, TOKENS_FILE, LEGACY_FILE = "video_feat.npy", "video_tokens.npy", "index.safetensors"
"""An index directory: the normalised VTC features (float32 (N, E)) and the fusion encoder's video tokens
(float16 (N, 1+P, D)) as ``.npy`` files written block by block and read memory-mapped; ``keys.json`` and
``meta.json`` beside them. Indexes written before issue 16 hold both arrays in ``index.safetensors`` (read lazily)."""
SEARCH_CHUNK = 65536
"""Clips scored per block by search and classify (their features: SEARCH_CHUNK x E x 4 bytes)."""


class _NpyRows:
    """A ``.npy`` file written a block of rows at a time: its header has room for any row count and is fixed
    when the file is closed, so no block stays in memory. Written to a temporary next to ``path`` and renamed."""

    HEADER = 128

    def __init__(self, stack, path: Path, dtype) -> None:
        from alpro.fileio import atomic_path

        self.tmp = stack.enter_context(atomic_path(path))
        self.file = stack.enter_context(open(self.tmp, "wb"))
        self.file.write(b"\0" * self.HEADER)
        self.dtype, self.row_shape, self.n = np.dtype(dtype), None, 0

    def append(self, rows: torch.Tensor) -> None:
        block = rows.detach().cpu().numpy().astype(self.dtype, copy=False)
        if self.row_shape is None:
            self.row_shape = block.shape[1:]
        self.file.write(np.ascontiguousarray(block).tobytes())
        self.n += len(block)

    def close(self) -> None:
        shape = (self.n, *(self.row_shape or ()))
        header = repr({"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": shape})
        header = header.encode("latin1")
        pad = self.HEADER - 10 - len(header) - 1
        if pad < 0:
            raise AlproError(f"{self.tmp}: array shape {shape} too long for the header")
        self.file.seek(0)
        self.file.write(b"\x93NUMPY\x01\x00" + (self.HEADER - 10).to_bytes(2, "little") + header + b" " * pad + b"\n")
        self.file.flush()


@torch.no_grad()
def build_index(shards: str, run: Path, out: Path, batch_size: int = 32, tokens: bool = True,
                progress: bool = True) -> dict[str, Any]:
    """Embed every clip of ``shards`` and write the index directory ``out``. Features and tokens go to disk
    batch by batch (memory: one batch, plus each clip's key and captions)."""
    from contextlib import ExitStack

    from tqdm import tqdm

    from alpro.config import apply_overrides, from_dict, to_dict
    from alpro.data import build_eval_loader
    from alpro.fileio import atomic_write
    from alpro.models.evaluation import embed_videos
    from alpro.train.config import RunConfig

    model, tokenizer, cfg, final = _load_model(run)
    device = next(model.parameters()).device
    data = apply_overrides(to_dict(cfg), ["--data.test.video", shards, "--data.eval_batch_size", str(batch_size)])
    cfg = from_dict(RunConfig, data)
    loader = build_eval_loader(cfg.data, "retrieval", tokenizer, 0, 1, split="test", seed=cfg.seed)
    keys, captions = [], []
    t0 = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as stack:
        feats = _NpyRows(stack, out / FEAT_FILE, np.float32)
        toks = _NpyRows(stack, out / TOKENS_FILE, np.float16) if tokens else None
        for batch in tqdm(loader, desc="indexing", unit="batch", disable=not progress):
            keep = batch.valid if batch.valid is not None else torch.ones(len(batch), dtype=torch.bool)
            idx = keep.nonzero().squeeze(1)
            if not len(idx):
                continue
            embeds, feat = embed_videos(model, batch.video[idx].to(device))
            feats.append(feat.float())
            if toks is not None:
                toks.append(embeds.half())
            keys += [batch.keys[i] for i in idx.tolist()]
            captions += [batch.all_texts[i] if batch.all_texts else [] for i in idx.tolist()]
        if not keys:
            raise AlproError(f"{shards}: no clips to index")
        for writer in (feats, toks):
            if writer is not None:
                writer.close()
    for stale in ((LEGACY_FILE,) if tokens else (LEGACY_FILE, TOKENS_FILE)):  # a former index in the same place
        (out / stale).unlink(missing_ok=True)
    atomic_write(out / "keys.json", json.dumps({"keys": keys, "captions": captions}))
    meta = {"run": str(Path(run).resolve()), "shards": shards, "num_clips": len(keys), "tokens": tokens,
            "frames": cfg.data.frames_for(train=False), "frame_size": cfg.data.frame_size,
            "seconds": time.perf_counter() - t0}
    atomic_write(out / "meta.json", json.dumps(meta, indent=1))
    return meta


class IndexArrays:
    """An index's arrays without loading them: ``feat(lo, hi)`` float32 rows, ``tokens(ids)`` float32 rows of
    the given clips (memory-mapped ``.npy``; a legacy ``index.safetensors`` through safetensors' lazy slices)."""

    def __init__(self, path: Path) -> None:
        self._st = None
        if (path / FEAT_FILE).is_file():
            self._feat = np.load(path / FEAT_FILE, mmap_mode="r")
            tok = path / TOKENS_FILE
            self._tok = np.load(tok, mmap_mode="r") if tok.is_file() else None
            if self._feat.ndim != 2 or (self._tok is not None and len(self._tok) != len(self._feat)):
                raise ValueError(f"{FEAT_FILE} / {TOKENS_FILE} disagree or are not (N, E) / (N, T, D)")
            self.n, self.has_tokens = len(self._feat), self._tok is not None
        else:
            from safetensors import safe_open

            self._st = safe_open(str(path / LEGACY_FILE), framework="pt")
            names = set(self._st.keys())
            if "video_feat" not in names:
                raise ValueError(f"{LEGACY_FILE} holds no video_feat")
            self.n = self._st.get_slice("video_feat").get_shape()[0]
            self.has_tokens = "video_tokens" in names

    def __len__(self) -> int:
        return self.n

    def feat(self, lo: int = 0, hi: int | None = None) -> torch.Tensor:
        hi = self.n if hi is None else min(hi, self.n)
        if self._st is not None:
            return self._st.get_slice("video_feat")[lo:hi].float()
        return torch.from_numpy(np.array(self._feat[lo:hi], dtype=np.float32))

    def tokens(self, ids: torch.Tensor) -> torch.Tensor:
        if self._st is not None:
            sl = self._st.get_slice("video_tokens")
            return torch.stack([sl[i:i + 1][0] for i in ids.tolist()]).float()
        return torch.from_numpy(np.array(self._tok[np.asarray(ids)], dtype=np.float32))


def _read_index(path: Path) -> tuple[IndexArrays, dict[str, Any], dict[str, Any]]:
    from safetensors import SafetensorError

    if not ((path / FEAT_FILE).is_file() or (path / LEGACY_FILE).is_file()) or not (path / "meta.json").is_file():
        raise AlproError(f"{path}: not an index directory (run `alpro index` first)")
    try:
        arrays = IndexArrays(path)
        keys, meta = json.loads((path / "keys.json").read_text()), json.loads((path / "meta.json").read_text())
        if not isinstance(meta, dict) or not isinstance(keys, dict):
            raise ValueError("keys.json / meta.json is not a JSON object")
        if len(keys.get("keys", [])) != len(arrays):
            raise ValueError(f"keys.json lists {len(keys.get('keys', []))} clips, the arrays hold {len(arrays)}")
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as e:
        raise AlproError(f"{path}: damaged index ({e})") from None
    return arrays, keys, meta


def _top_cosines(arrays: IndexArrays, query: torch.Tensor, n: int, chunk: int = SEARCH_CHUNK
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``n`` best (cosine, clip) of ``arrays.feat() @ query``, ``chunk`` clips at a time."""
    best, where = torch.empty(0), torch.empty(0, dtype=torch.long)
    for lo in range(0, len(arrays), chunk):
        cos = arrays.feat(lo, lo + chunk) @ query
        best = torch.cat([best, cos])
        where = torch.cat([where, torch.arange(lo, lo + len(cos))])
        best, at = best.topk(min(n, len(best)))
        where = where[at]
    return best, where


# ------------------------------------------------------------------------------------------------- search


@torch.no_grad()
def search(query: str, index_dir: Path, top_k: int = 10, rerank: int = 32) -> list[dict[str, Any]]:
    """Ranked hits ``{rank, key, score, cosine, vtm_logit, caption}`` for a text query. Reads the index's
    features a block at a time and the tokens of the re-ranked candidates only."""
    from alpro.data.text import encode
    from alpro.models.evaluation import embed_texts

    arrays, keys, meta = _read_index(index_dir)
    model, tokenizer, cfg, _ = _load_model(Path(meta["run"]))
    device = next(model.parameters()).device
    ids, mask = encode(tokenizer, [query], cfg.data.max_text_len)
    text_embeds, text_feat = embed_texts(model, ids.to(device), mask.to(device))
    n = min(max(rerank, top_k), len(arrays))
    cand_cos, cand = _top_cosines(arrays, text_feat.float().cpu()[0], n)
    vtm = torch.full((n,), float("nan"))
    score = cand_cos.clone()
    if arrays.has_tokens and getattr(model, "vtm_head", None) is not None and rerank > 0:
        videos = arrays.tokens(cand).to(device=device, dtype=torch.float32)
        logits = model.vtm_logits(text_embeds.expand(n, -1, -1), mask.to(device).expand(n, -1), videos)
        vtm = logits[:, 1].float().cpu()
        score = vtm + cand_cos  # LAVIS: match logit + cosine
    order = score.argsort(descending=True)[:top_k]
    hits = []
    for rank, o in enumerate(order.tolist(), 1):
        i = int(cand[o])
        caps = keys["captions"][i]
        hits.append({"rank": rank, "key": keys["keys"][i], "score": float(score[o]), "cosine": float(cand_cos[o]),
                     "vtm_logit": float(vtm[o]), "caption": caps[0] if caps else ""})
    return hits


def contact_sheet(hits: list[dict[str, Any]], index_dir: Path, out: Path, frames: int = 4, size: int = 96,
                  title: str = "") -> Path:
    """A PNG grid: one row per hit, ``frames`` uniformly sampled frames decoded from the shards."""
    import numpy as np
    from PIL import Image, ImageDraw

    from alpro.data.decode import decode_picture, decode_video, meta_from_json, probe
    from alpro.data.samples import media_member, read_meta
    from alpro.data.sampling import sample_frames
    from alpro.data.shards import Reader, SampleError, resolve

    _, _, meta = _read_index(index_dir)
    shardset = resolve(meta["shards"], f"{index_dir}/meta.json shards")
    where = {}
    for shard in shardset.shards:
        for j, key in enumerate(shard.keys):
            where[key.decode()] = (shard, j)
    # An index can outlive or be moved away from its shards (rebuilt, filtered, another set under the same
    # path): draw the hits that exist, say which do not, and stop with one line when none does.
    missing = [h["key"] for h in hits if h["key"] not in where]
    hits = [h for h in hits if h["key"] in where]
    if not hits:
        raise AlproError(f"{index_dir}: none of the hits ({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''})"
                         f" is in the shards it names ({meta['shards']}); re-run `alpro index` on those shards")
    if missing:
        print(f"contact sheet: {len(missing)} hit(s) not in {meta['shards']} left out: {', '.join(missing[:5])}"
              + (" ..." if len(missing) > 5 else ""), file=sys.stderr)
    reader = Reader()
    label_h = 14
    sheet = Image.new("RGB", (frames * size, (size + label_h) * len(hits) + label_h), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((2, 1), title[: frames * size // 6], fill="black")
    for row, hit in enumerate(hits):
        shard, j = where[hit["key"]]
        y = label_h + row * (size + label_h)
        try:
            _, members = reader.sample(shard, j)
            kind, _, data = media_member(members)
            if kind == "image":
                pic = decode_picture(data)
                clip = torch.nn.functional.interpolate(pic[None].float(), size=(size, size)).byte()
                clip = clip.repeat(frames, 1, 1, 1)
            else:
                vmeta = meta_from_json(read_meta(members)) or probe(data)
                idx = sample_frames("uniform", vmeta.num_frames, frames)
                clip, _ = decode_video(data, np.asarray(idx), vmeta, size)
        except SampleError as e:  # a damaged sample: its row says why instead of stopping the sheet
            draw.text((2, y), f"#{hit['rank']} {hit['key']}: unreadable ({e})"[:90], fill="red")
            continue
        draw.text((2, y), f"#{hit['rank']} {hit['key']}  score {hit['score']:.2f}: {hit['caption']}"[:90],
                  fill="black")
        for f in range(frames):
            sheet.paste(Image.fromarray(clip[f].permute(1, 2, 0).numpy()), (f * size, y + label_h))
    reader.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out


# ----------------------------------------------------------------------------------------------- classify


@torch.no_grad()
def classify(index_dir: Path, labels: list[str], top: int = 3) -> list[dict[str, Any]]:
    """Zero-shot labels per clip: cosine with each label's prompt embedding averaged over the video templates."""
    from alpro.data import VIDEO_PROMPT_TEMPLATES
    from alpro.data.text import encode
    from alpro.models.evaluation import embed_texts

    arrays, keys, meta = _read_index(index_dir)
    model, tokenizer, cfg, _ = _load_model(Path(meta["run"]))
    device = next(model.parameters()).device
    label_feats = []
    for label in labels:
        prompts = [t.format(label) for t in VIDEO_PROMPT_TEMPLATES]
        ids, mask = encode(tokenizer, prompts, cfg.model.prompt_max_length)
        _, feat = embed_texts(model, ids.to(device), mask.to(device))
        label_feats.append(feat.float().mean(0).cpu())  # (E,) averaged, not re-normalised (as the prompter)
    values, idx = [], []
    labels_t = torch.stack(label_feats).t()
    for lo in range(0, len(arrays), SEARCH_CHUNK):  # (chunk, labels) at a time
        v, i = (arrays.feat(lo, lo + SEARCH_CHUNK) @ labels_t).topk(min(top, len(labels)), dim=1)
        values.append(v)
        idx.append(i)
    values, idx = torch.cat(values), torch.cat(idx)
    return [{"key": k, "labels": [labels[i] for i in row.tolist()], "scores": [round(float(v), 4) for v in vals]}
            for k, row, vals in zip(keys["keys"], idx, values)]


def _labels_for(args: ClassifyOptions, meta: dict[str, Any]) -> list[str]:
    from alpro.corpus.entities import read_entities

    if args.labels:
        path = Path(args.labels)
        if path.is_file():
            return read_entities(path)
        return [w.strip() for w in args.labels.split(",") if w.strip()]
    run = Path(meta["run"])
    for cand in (run / "entities.txt", run / "final" / "entities.txt"):
        if cand.is_file():
            return read_entities(cand)
    raise AlproError("no labels: pass --labels FILE_OR_COMMA_LIST (the run has no entities.txt)")


# -------------------------------------------------------------------------------------------------- CLIs


@dataclass
class IndexOptions:
    """The options of ``alpro index`` (parsed by :func:`alpro.config.parse_command`; help from these docstrings)."""

    shards: str
    """shard set: directory with index.json.zst, tar, glob or brace pattern"""
    run: Path = option(positional=False)
    """a finished run (its final/ weights are used)"""
    out: Path = option(positional=False)
    """index directory to write"""
    batch_size: int = 32
    """clips embedded per forward pass"""
    tokens: bool = True
    """store the video tokens for VTM re-ranking (--no-tokens: only the VTC features)"""


@dataclass
class SearchOptions:
    """The options of ``alpro search`` (parsed by :func:`alpro.config.parse_command`; help from these docstrings)."""

    query: str
    """the text to search for"""
    index: Path = option(positional=False)
    """an index directory written by alpro index"""
    top_k: int = 10
    """how many clips to list"""
    rerank: int = 32
    """VTC candidates re-ranked by VTM (0 = VTC only)"""
    sheet: Path | None = None
    """write a contact sheet PNG of the hits"""
    json: bool = False
    """print the hits as JSON"""


@dataclass
class ClassifyOptions:
    """The options of ``alpro classify`` (parsed by :func:`alpro.config.parse_command`; help from these
    docstrings)."""

    index: Path = option(positional=False)
    """an index directory written by alpro index"""
    labels: str | None = None
    """a 'word count' file or a comma list (default: the run's entities)"""
    top: int = 3
    """labels per clip"""
    out: Path | None = None
    """write one JSON line per clip here"""


def index_main(argv: list[str] | None = None) -> int:
    args = parse_command(IndexOptions, argv, prog="alpro index",
                         description="Embed a shard collection for search.")
    meta = build_index(args.shards, args.run, args.out, args.batch_size, tokens=args.tokens)
    print(f"indexed {meta['num_clips']} clips in {meta['seconds']:.1f}s -> {args.out}")
    return 0


def search_main(argv: list[str] | None = None) -> int:
    args = parse_command(SearchOptions, argv, prog="alpro search",
                         description="Text -> ranked clips over an index.")
    if args.top_k < 1:
        raise AlproError("--top-k must be >= 1")
    hits = search(args.query, args.index, args.top_k, args.rerank)
    if args.json:
        print(json.dumps(hits, indent=1))
    else:
        print(f"query: {args.query!r}")
        for h in hits:
            print(f"{h['rank']:>3}  {h['score']:7.3f}  (cos {h['cosine']:.3f})  {h['key']}  {h['caption']}")
    if args.sheet is not None:
        print(f"contact sheet: {contact_sheet(hits, args.index, args.sheet, title=args.query)}")
    return 0


def classify_main(argv: list[str] | None = None) -> int:
    args = parse_command(ClassifyOptions, argv, prog="alpro classify",
                         description="Zero-shot clip labels from entity prompts.")
    _, _, meta = _read_index(args.index)
    labels = _labels_for(args, meta)
    rows = classify(args.index, labels, args.top)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(f"wrote {len(rows)} clips x top {args.top} labels to {args.out}")
    else:
        for r in rows:
            print(f"{r['key']}: " + ", ".join(f"{lab} ({s:.3f})" for lab, s in zip(r["labels"], r["scores"])))
    return 0
