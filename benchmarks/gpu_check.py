"""One command for the first GPU hour: does everything the design promises on the GPU hold? (``make gpu-check``)

    .venv/bin/python benchmarks/gpu_check.py                 # CUDA: the full check (<= 8 min on one H100/H200)
    .venv/bin/python benchmarks/gpu_check.py --smoke         # no GPU: the same script on tiny shapes, interpreter

Sections, one printed line per case (``PASS`` / ``FAIL`` / ``SKIP`` and what was measured), all rows written to
``<out>/gpu_check.{json,csv}`` with a plot ``gpu_check.png``:

1. ``numerics``: every Triton kernel (temporal; spatial with both backward modes; contrastive) in bf16, fp16 and
   fp32 at ALPRO's shapes (197 tokens, 12 x 64 heads, B 16/32, T 4/8/16; contrastive local 16 ... 16,384 rows
   against gathered 256 ... 32,768, D 256), forward and backward against an fp64 reference with FlashAttention's
   rule: error <= 2x the error of the same maths in PyTorch in that dtype + a floor. First every dtype x shape
   with what autotuning picks, then, at the first shape of each dtype, every shipped config of every kernel
   forced in turn (``forced_config``); past a 200 s budget the remaining cases are SKIP lines.
2. ``speed``: forward and forward+backward at ALPRO's shapes in bf16 with ``triton.testing.do_bench``: naive
   PyTorch (the TimeSformer maths), SDPA on pre-laid-out q/k/v (``sdpa_raw``), SDPA including the layout copies
   (``sdpa``, what the model would run), xformers when installed, Triton (autotuned; the winning config of each
   kernel is recorded) and Triton with ``deterministic=True`` (pinned configs, no atomics). GB/s of minimum
   traffic and the fraction of the HBM peak; the spatial pass also with the opt-in narrower tail tiles
   (``triton_tail``, ``set_tail_tiles(16)``); the contrastive loss (reference / chunked / Triton / Triton with the
   opt-in column split, ``set_column_split("auto")``). Both opt-in variants are also checked in section 1.
3. ``dali``: DALI ``mixed`` (NVDEC) decoding of H.264 clips (keyframe every 6 frames, B-frames) against PyAV at
   the same frame indices, before any resize: luma PSNR >= 40 dB (RGB PSNR is reported too; it also measures the
   two libraries' different chroma upsampling), and clips/s of each.
   ``augment``: ``data.augment_on: device`` (the GPU default): the device step (RandAugment ops, normalisation)
   on the GPU against the loader's CPU transform of the same uint8 clips and drawn ops, at 224 px: worst error
   <= 0.5 grey levels (TF32 convolutions and CUDA's bilinear rounding differ from the CPU's), and ms per clip of
   each. Smoke mode runs it on the CPU, where the two must be bit-identical.
4. ``train``: 30 pre-training steps of ``alpro-base`` at 224 px on the GPU (bf16, ZeRO-2, NCCL, one process,
   all four losses, a frozen prompter trained for 2 steps first): samples/s, MFU from ``bench_model.py``'s FLOP
   count, peak memory, data-wait share (the trainer's own ``metrics.jsonl``).

Smoke mode (no CUDA; ``make test`` runs it through tests/test_gpu_check.py, < 60 s) runs sections 1 and 2 with
the Triton kernels under the interpreter (``TRITON_INTERPRET=1``) on tiny shapes (every shipped config forced in
turn at fp16, the other dtypes with the interpreter's config), timing with ``time.perf_counter`` instead of
``do_bench``, and section 3 with DALI on the CPU on VP9 clips (the CPU decoder cannot read H.264); section 4
needs CUDA, NCCL and alpro-base's memory: smoke mode reports it as SKIP, and ``--train-on-cpu`` runs that
section's code end to end on the ``debug`` preset instead (gloo, bf16, 4 steps, ~1-2 min; tested as a slow test).
Exit status 1 when any case FAILs.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/ (bench_kernels, bench_model, sources)
FLOOR = {"fp32": 1e-5, "fp16": 1e-3, "bf16": 1e-2}  # FlashAttention's rule: 2x PyTorch's error + this floor
PSNR_MIN_DB = 40.0
BF16_PEAK_TFLOPS = {"H200": 989, "H100": 989, "A100": 312}  # dense bf16 tensor-core peak, vendor datasheets


class Report:
    """Collects one row per case and prints it as it comes."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, section: str, case: str, status: str, detail: str = "", **values) -> dict:
        row = {"section": section, "case": case, "status": status, "detail": detail, **values}
        self.rows.append(row)
        print(f"{status:4s}  {section:9s} {case:64s} {detail}", flush=True)
        return row

    @property
    def failed(self) -> list[dict]:
        return [r for r in self.rows if r["status"] == "FAIL"]


# ------------------------------------------------------------------------------------------------ numerics


def _err(a, ref) -> float:
    return (a.double() - ref).abs().max().item()


def _fa_rule(errors: dict[str, tuple[float, float]], dtype: str) -> tuple[bool, str]:
    worst = max(errors, key=lambda k: errors[k][0] - 2 * errors[k][1])
    ok = all(k <= 2 * p + FLOOR[dtype] for k, p in errors.values())
    kern, pt = errors[worst]
    return ok, f"worst {worst}: kernel err {kern:.2e} vs 2 x PyTorch {dtype} {pt:.2e} + {FLOOR[dtype]:g}"


def attention_errors(op: str, B: int, T: int, N: int, H: int, Dh: int, dtype, det: bool | None, device: str,
                     seed: int = 0) -> dict[str, tuple[float, float]]:  # fmt: skip
    """{output: (Triton's max error, PyTorch-in-dtype's max error)} against fp64, forward and d qkv."""
    import torch

    from alpro.kernels import attention as A

    g = torch.Generator(device=device).manual_seed(seed)
    C = H * Dh
    rows = N * T if op == "temporal" else 1 + N * T
    qkv = torch.randn(B, rows, 3 * C, generator=g, device=device).to(dtype)
    shapes = [(B, N * T, C)] if op == "temporal" else [(B, T, C), (B, N * T, C)]
    grads = [torch.randn(s, generator=g, device=device) for s in shapes]
    fn = A.temporal_attention if op == "temporal" else A.spatial_attention

    def run(x, backend, **kw):
        x = x.detach().requires_grad_()
        out = fn(x, T, H, backend=backend, **kw)
        out = (out,) if op == "temporal" else out
        (dx,) = torch.autograd.grad(out, [x], [gr.to(o.dtype) for o, gr in zip(out, grads)])
        return [o.detach() for o in out], dx

    out_k, d_k = run(qkv, "triton", deterministic=det)
    out_r, d_r = run(qkv.double(), "reference")
    out_p, d_p = run(qkv, "reference")
    errors = {f"out{i}": (_err(out_k[i], out_r[i]), _err(out_p[i], out_r[i])) for i in range(len(out_k))}
    errors["dqkv"] = (_err(d_k, d_r), _err(d_p, d_r))
    return errors


def contrastive_errors(M: int, G: int, D: int, dtype, device: str, seed: int = 0) -> dict[str, tuple[float, float]]:
    """Loss and gradients (features, temperature) of the gathered InfoNCE, Triton vs fp64 and PyTorch-in-dtype."""
    import torch
    import torch.nn.functional as F

    from alpro.kernels import contrastive as CL

    g = torch.Generator(device=device).manual_seed(seed)
    va = F.normalize(torch.randn(G, D, generator=g, device=device), dim=-1).to(dtype)
    ta = F.normalize(torch.randn(G, D, generator=g, device=device), dim=-1).to(dtype)
    offset = (G - M) // 2 // max(M, 1) * M  # a middle rank's block

    def run(v, t, temp, backend):
        v, t, temp = (x.detach().requires_grad_() for x in (v, t, temp))
        loss = CL.contrastive_loss(v[offset:offset + M], t[offset:offset + M], v, t, temp, offset, backend)
        loss.backward()
        return loss.detach(), v.grad, t.grad, temp.grad

    temp = torch.tensor(0.07, device=device)
    kern = run(va, ta, temp, "triton")
    ref = run(va.double(), ta.double(), temp.double(), "reference")
    same = run(va, ta, temp, "reference")
    names = ("loss", "d_video", "d_text", "d_temp")
    return {n: (_err(kern[i], ref[i]), _err(same[i], ref[i])) for i, n in enumerate(names)}


@contextlib.contextmanager
def column_split(splits):
    """The contrastive kernels' opt-in column split (kernels/contrastive_triton.py), restored afterwards."""
    from alpro.kernels import contrastive_triton as ctr

    previous = ctr.get_column_split()
    ctr.set_column_split(splits)
    try:
        yield
    finally:
        ctr.set_column_split(previous)


@contextlib.contextmanager
def tail_tiles(width: int):
    """The spatial forward's opt-in narrower tail tiles (kernels/attention_triton.py), restored afterwards."""
    from alpro.kernels import attention_triton as att

    previous = att.get_tail_tiles()
    att.set_tail_tiles(width)
    try:
        yield
    finally:
        att.set_tail_tiles(previous)


def _kernel_names(op: str, det: bool | None) -> list[str]:
    if op == "temporal":
        return ["temporal_fwd", "temporal_bwd"]
    return ["spatial_fwd", "spatial_bwd_dq", "spatial_bwd_dkdv"]


def _shipped(name: str, arch: int, dtype, head_dim: int, T: int | None) -> list:
    """The configs a GPU of ``arch`` would autotune over for this kernel and input (what gets forced in turn)."""
    import triton

    from alpro.kernels import attention_triton as att
    from alpro.kernels import contrastive_triton as ctr
    from alpro.kernels.triton_support import dot_precision, tl_dtype

    meta = {"BLOCK_D": max(16, triton.next_power_of_2(head_dim)), "MM_DTYPE": tl_dtype(dtype),
            "PRECISION": dot_precision(dtype)}  # what a GPU launch with this dtype uses (no interpreter upcast)
    if name.startswith("lse"):
        return ctr.candidates(name, arch, meta)
    return att.candidates(name, arch, meta, T if name.startswith("temporal") else None)


def section_numerics(rep: Report, plan: dict, device: str, arch: int, budget_s: float) -> None:
    import torch

    from alpro.kernels.triton_support import describe_config, forced_config

    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    default = "autotuned" if device == "cuda" else "interpreter config"
    t_start = time.perf_counter()

    def over_budget(case: str) -> bool:
        if time.perf_counter() - t_start > budget_s:
            rep.add("numerics", case, "SKIP", f"numerics time budget of {budget_s:.0f} s used up")
            return True
        return False

    H, Dh, N, D = plan["heads"], plan["head_dim"], plan["patches"], plan["dim"]
    # Phase 1, every dtype x shape with the default configs (autotuned on GPUs), then phase 2, the forced-config
    # sweeps: if the time budget runs out, what is left unchecked is the least important part.
    cases = []  # (kind, dtype name, shape, op, det, label, kernel name or "split", config)
    for dname in dtypes:
        for i, (B, T) in enumerate(plan["attention_shapes"]):
            cases += [("attention", dname, (B, T), op, det, default, None, None)
                      for op, det in (("temporal", None), ("spatial", False), ("spatial", True))]  # fmt: skip
            if i == 0:  # the opt-in narrower tail tiles of the spatial forward
                cases.append(("attention", dname, (B, T), "spatial", False, "tail tiles 16", "tail", 16))
        for M, G in plan["contrastive_shapes"]:
            split = plan["column_split"]
            cases += [("contrastive", dname, (M, G), "contrastive", None, default, None, None),
                      ("contrastive", dname, (M, G), "contrastive", None, f"column split {split}", "split", split)]
    for dname in plan["force_dtypes"]:  # every shipped config of every kernel, in turn, at the first shapes
        B, T = plan["attention_shapes"][0]
        for op, det in (("temporal", None), ("spatial", False), ("spatial", True)):
            cases += [("attention", dname, (B, T), op, det, f"{name}={describe_config(cfg)}", name, cfg)
                      for name in _kernel_names(op, det) for cfg in _shipped(name, arch, dtypes[dname], Dh, T)]
        M, G = plan["contrastive_shapes"][0]
        cases += [("contrastive", dname, (M, G), "contrastive", None, f"{name}={describe_config(cfg)}", name, cfg)
                  for name in ("lse_fwd", "lse_bwd_dx", "lse_bwd_dy") for cfg in _shipped(name, arch, dtypes[dname],
                                                                                           D, None)]  # fmt: skip

    for kind, dname, shape, op, det, label, name, cfg in cases:
        dtype = dtypes[dname]
        if kind == "attention":
            B, T = shape
            mode = "" if op == "temporal" else f" det={int(det)}"
            case = f"{op}{mode} {dname} B{B} T{T} L{1 + N} {H}x{Dh} {label}"
            run = functools.partial(attention_errors, op, B, T, N, H, Dh, dtype, det, device)
        else:
            B, G = shape
            case = f"contrastive {dname} local {B} gathered {G} D{D} {label}"
            run = functools.partial(contrastive_errors, B, G, D, dtype, device)
        if over_budget(case):
            continue
        try:
            if name is None:
                errors = run()
            elif name == "split":
                with column_split(cfg):
                    errors = run()
            elif name == "tail":
                with tail_tiles(cfg):
                    errors = run()
            else:
                with forced_config(name, cfg):
                    errors = run()
            ok, detail = _fa_rule(errors, dname)
            rep.add("numerics", case, "PASS" if ok else "FAIL", detail, dtype=dname, op=op, B=B,
                    **({"T": T} if kind == "attention" else {"G": G}),
                    errors=json.dumps({k: [f"{a:.3e}", f"{b:.3e}"] for k, (a, b) in errors.items()}))  # fmt: skip
        except Exception as e:  # one broken config must not hide the others
            rep.add("numerics", case, "FAIL", f"{type(e).__name__}: {e}"[:300])
        if device == "cuda":
            torch.cuda.empty_cache()


# --------------------------------------------------------------------------------------------------- speed


def _timer(device: str):
    """``triton.testing.do_bench`` (median, 20 %, 80 % quantiles in ms; L2 flushed) on GPUs; a plain
    ``perf_counter`` median of a few repeats on the CPU (smoke mode)."""
    if device == "cuda":
        import triton.testing

        return lambda fn, grads: triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], grad_to_none=grads)

    def bench(fn, grads):
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return [statistics.median(times), min(times), max(times)]

    return bench


def _attention_runner(op: str, provider: str, qkv, T: int, H: int, backward: bool):
    """A closure running one pass with ``provider`` (forward, or forward+backward against fixed gradients)."""
    import torch
    import torch.nn.functional as F

    from alpro.kernels import attention as A

    fn = A.temporal_attention if op == "temporal" else A.spatial_attention
    if provider == "sdpa_raw":  # q, k, v already laid out (G, H, L, Dh): SDPA's best case, no copies timed
        B, L, C3 = qkv.shape
        C = C3 // 3
        if op == "temporal":
            seq = qkv.detach().reshape(B * (L // T), T, C3)
        else:
            N = (L - 1) // T
            cls = qkv.detach()[:, :1].unsqueeze(1).expand(B, T, 1, C3)
            patches = qkv.detach()[:, 1:].reshape(B, N, T, C3).transpose(1, 2)
            seq = torch.cat([cls, patches], dim=2).reshape(B * T, 1 + N, C3)
        G, Ls = seq.shape[:2]
        q, k, v = (x.contiguous().requires_grad_() for x in seq.reshape(G, Ls, 3, H, C // H).permute(2, 0, 3, 1, 4))
        do = torch.randn_like(q)

        def run():
            o = F.scaled_dot_product_attention(q, k, v)
            if backward:
                o.backward(do)

        return run, [q, k, v]
    backend = {"naive": "reference", "triton_det": "triton", "triton_tail": "triton"}.get(provider, provider)
    kw = {"deterministic": provider == "triton_det"} if provider.startswith("triton") else {}
    tail = 16 if provider == "triton_tail" else 0
    with tail_tiles(tail):
        outs = fn(qkv, T, H, backend=backend, **kw)
    outs = (outs,) if op == "temporal" else outs
    grads = [torch.randn_like(o) for o in outs]

    def run():
        with tail_tiles(tail):
            out = fn(qkv, T, H, backend=backend, **kw)
        if backward:
            torch.autograd.backward((out,) if op == "temporal" else out, grads)

    return run, [qkv]


_SHORT: dict = {}


def _winners(names: list[str]) -> str:
    """The config autotuning picked last for each kernel (empty when a config was pinned or interpreting)."""
    from alpro.kernels import attention_triton as att
    from alpro.kernels import contrastive_triton as ctr
    from alpro.kernels.triton_support import describe_config

    tuned = {**att.TUNED, **ctr.TUNED}
    return "; ".join(f"{n}: {describe_config(getattr(tuned[n], 'best_config', None))}" for n in names
                     if getattr(tuned[n], "best_config", None) is not None)  # fmt: skip


def section_speed(rep: Report, plan: dict, device: str, env: dict) -> None:
    import torch

    _SHORT.update({torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"})
    import torch.nn.functional as F
    from bench_kernels import attention_cost, hbm_peak

    from alpro.kernels import contrastive as CL

    bench = _timer(device)
    providers = ["naive", "sdpa_raw", "sdpa", "triton", "triton_det"]
    if device == "cuda":
        providers.insert(3, "xformers")
    peak = hbm_peak(env["device"])
    H, Dh, N = plan["heads"], plan["head_dim"], plan["patches"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for B, T in plan["speed_shapes"]:
        for op in ("temporal", "spatial"):
            rows = N * T if op == "temporal" else 1 + N * T
            qkv = torch.randn(B, rows, 3 * H * Dh, device=device, dtype=dtype, requires_grad=True)
            for backward in (False, True):
                mode = "fwd+bwd" if backward else "fwd"
                flops, traffic = attention_cost(op, B, T, N, H, Dh, qkv.element_size(), backward)
                base_ms = None
                for provider in providers + (["triton_tail"] if op == "spatial" else []):
                    case = f"{op} {mode} {_SHORT[dtype]} B{B} T{T} L{1 + N} {provider}"
                    if provider == "xformers" and not env.get("xformers"):
                        rep.add("speed", case, "SKIP", "xformers is not installed")
                        continue
                    try:
                        run, leaves = _attention_runner(op, provider, qkv, T, H, backward)
                        ms = bench(run, leaves)
                    except Exception as e:
                        rep.add("speed", case, "FAIL", f"{type(e).__name__}: {e}"[:300])
                        continue
                    base_ms = ms[0] if provider == "sdpa_raw" else base_ms
                    gbps = traffic / (ms[0] * 1e-3) / 1e9
                    winners = _winners(_kernel_names(op, None)) if provider == "triton" and device == "cuda" else ""
                    speedup = f", {base_ms / ms[0]:.2f}x sdpa_raw" if base_ms else ""
                    rep.add("speed", case, "PASS", f"{ms[0]:.3f} ms, {gbps:.3g} GB/s{speedup}"
                            + (f" | {winners}" if winners else ""), op=op, mode=mode, provider=provider, B=B, T=T,
                            ms_p50=round(ms[0], 4), ms_p20=round(ms[1], 4), ms_p80=round(ms[2], 4),
                            tflops=round(flops / (ms[0] * 1e-3) / 1e12, 3), gbps=round(gbps, 1),
                            hbm_fraction=round(gbps / peak, 3) if peak else None, autotune_winner=winners)  # fmt: skip
            del qkv
    for M, G in plan["contrastive_speed"]:
        D = plan["dim"]
        va = F.normalize(torch.randn(G, D, device=device), dim=-1).to(dtype).requires_grad_()
        ta = F.normalize(torch.randn(G, D, device=device), dim=-1).to(dtype).requires_grad_()
        temp = torch.tensor(0.07, device=device, requires_grad=True)
        for provider in ("reference", "chunked", "triton", "triton_split"):
            case = f"contrastive fwd+bwd {_SHORT[dtype]} local {M} gathered {G} D{D} {provider}"
            backend = "triton" if provider == "triton_split" else provider

            def run(backend=backend, M=M, va=va, ta=ta, temp=temp):
                CL.contrastive_loss(va[:M], ta[:M], va, ta, temp, 0, backend=backend).backward()

            try:
                with column_split(plan["column_split"] if provider == "triton_split" else 1):
                    ms = bench(run, [va, ta, temp])
            except Exception as e:
                rep.add("speed", case, "FAIL", f"{type(e).__name__}: {e}"[:300])
                continue
            winners = _winners(["lse_fwd", "lse_bwd_dx", "lse_bwd_dy"]) if provider == "triton" and device == "cuda" \
                else ""  # fmt: skip
            rep.add("speed", case, "PASS", f"{ms[0]:.3f} ms" + (f" | {winners}" if winners else ""), op="contrastive",
                    provider=provider, B=M, G=G, ms_p50=round(ms[0], 4), ms_p20=round(ms[1], 4),
                    ms_p80=round(ms[2], 4), autotune_winner=winners)  # fmt: skip


# ---------------------------------------------------------------------------------------------------- dali


def _alpro(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "alpro", *args], cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"alpro {args[0]} failed: {proc.stderr[-1500:]}")


def psnr_db(a, b) -> float:
    """PSNR of two uint8-range arrays, in dB."""
    import numpy as np

    mse = float(np.mean((np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * math.log10(255.0**2 / mse)


LUMA = (0.299, 0.587, 0.114)  # BT.601 weights: Y from RGB, where the decoders' chroma filters do not matter


def make_clip(path: Path, codec: str, width: int, height: int, frames: int, seed: int) -> None:
    """A smooth moving pattern with coloured blocks; keyframe every 6 frames (the sharder's default), B-frames in
    H.264 (what NVDEC must reorder)."""
    import av
    import numpy as np

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libvpx-vp9" if codec == "vp9" else "libx264", rate=10)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = ({"crf": "20", "g": "6"} if codec == "vp9"
                          else {"crf": "18", "x264-params": "keyint=6:bframes=2:threads=1"})  # fmt: skip
        for i in range(frames):
            img = np.stack([128 + 100 * np.sin((xx + 3 * i) / 9.0 + c + seed) for c in range(3)], -1)
            img[(yy // 16 + xx // 16 + i) % 5 == 0] = rng.integers(0, 255, 3)
            frame = av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24").reformat(format="yuv420p")
            frame.pts = i
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def pyav_frames(path: Path, indices: list[int]):
    """(T, H, W, 3) uint8 RGB frames at ``indices`` (decode order, as the loader's PyAV path counts frames)."""
    import av
    import numpy as np

    wanted, got = set(indices), {}
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                got[i] = frame.to_ndarray(format="rgb24")
            if i >= max(indices):
                break
    return np.stack([got[i] for i in indices])


def section_dali(rep: Report, plan: dict, device: str, work: Path) -> None:
    """DALI's video decoder (the loader's ``fn.decoders.video``, ``mixed`` = NVDEC on GPUs) against PyAV at the same
    frame indices, before any resize: PSNR of luma (the decoded picture) and of RGB (which also differs by the two
    libraries' chroma upsampling), and clips/s of each decoding the same batch."""
    import numpy as np

    from alpro.data.dali import dali_available

    codec = "h264" if device == "cuda" else "vp9"  # DALI's CPU decoder has no H.264
    width, height = plan["dali_size"]
    case = f"dali {'mixed (NVDEC)' if device == 'cuda' else 'cpu'} vs pyav, {codec} {width}x{height}"
    if not dali_available():
        rep.add("dali", case, "FAIL", "NVIDIA DALI is not installed (pip install nvidia-dali-cuda130)")
        return
    from nvidia.dali import fn, pipeline_def, types

    n, length = plan["dali_clips"], 24
    clips = []
    for i in range(n):
        path = work / f"dali_{codec}_{width}x{height}_{i}.mp4"
        if not path.is_file():
            make_clip(path, codec, width, height, length, seed=i)
        clips.append(path)
    indices = [[(3 * k + i) % length for k in range(4)] for i in range(n)]  # 4 sparse frames, off keyframes too
    indices = [sorted(set(x)) for x in indices]

    @pipeline_def(batch_size=n, num_threads=4, device_id=0 if device == "cuda" else None, prefetch_queue_depth=1,
                  exec_dynamic=True)  # fmt: skip
    def graph():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        frames = fn.external_source(name="frames", dtype=types.INT32, ndim=1)
        return fn.decoders.video(encoded, device="mixed" if device == "cuda" else "cpu", frames=frames)

    pipe = graph()
    pipe.build()
    data = [np.fromfile(p, dtype=np.uint8) for p in clips]

    def dali_run():
        pipe.feed_input("encoded", data)
        pipe.feed_input("frames", [np.asarray(x, dtype=np.int32) for x in indices])
        (out,) = pipe.run()
        return out.as_cpu() if device == "cuda" else out

    dali_run()  # warm-up: decoder creation
    t0 = time.perf_counter()
    out = dali_run()
    dali_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ref = [pyav_frames(p, idx) for p, idx in zip(clips, indices)]
    pyav_s = time.perf_counter() - t0
    got = [np.asarray(out[i]) for i in range(n)]
    luma = np.asarray(LUMA)
    y_psnr = min(psnr_db(g @ luma, r @ luma) for g, r in zip(got, ref))
    rgb_psnr = min(psnr_db(g, r) for g, r in zip(got, ref))
    shapes_ok = all(g.shape == r.shape for g, r in zip(got, ref))
    ok = shapes_ok and y_psnr >= PSNR_MIN_DB
    rep.add("dali", case, "PASS" if ok else "FAIL",
            f"worst clip luma PSNR {y_psnr:.1f} dB (>= {PSNR_MIN_DB:g}), RGB {rgb_psnr:.1f} dB, shapes equal "
            f"{shapes_ok}; dali {n / dali_s:.1f} clips/s, pyav {n / pyav_s:.1f} clips/s (4 frames each)",
            psnr_luma_db=round(y_psnr, 2), psnr_rgb_db=round(rgb_psnr, 2), dali_clips_per_s=round(n / dali_s, 2),
            pyav_clips_per_s=round(n / pyav_s, 2), clips=n)  # fmt: skip


# ------------------------------------------------------------------------------------------------- augment


AUGMENT_MAX_GREY = 0.5  # worst |device - CPU| in grey levels of 255


def section_augment(rep: Report, plan: dict, device: str) -> None:
    """``data.augment_on: device``: ``finish_batch`` on ``device`` against ``ClipTransform.apply`` on the CPU for
    the same cropped uint8 clips and every pre-training op pair; ms per clip of each."""
    import numpy as np
    import torch

    from alpro.config import from_dict
    from alpro.data import CLIP_STD, DataConfig
    from alpro.data.transforms import ClipParams, ClipTransform, finish_batch

    size, clips = plan["augment_size"], plan["augment_clips"]
    cfg = from_dict(DataConfig, {"frame_size": size, "num_frames": 4})
    tf = ClipTransform(cfg, "pretrain", train=True)
    g = np.random.default_rng(0)
    ops = [tuple(str(o) for o in g.choice(tf.ops, size=2, replace=False)) for _ in range(clips)]
    frames = torch.from_numpy(g.integers(0, 256, (clips, 4, size, size, 3), dtype=np.uint8))  # (B, T, H, W, C)
    tf.apply(frames[0].permute(0, 3, 1, 2).contiguous(), ClipParams(crop=None, ops=ops[0]))  # warm-up (grids)
    t0 = time.perf_counter()
    ref = torch.stack([tf.apply(f.permute(0, 3, 1, 2).contiguous(), ClipParams(crop=None, ops=o))
                       for f, o in zip(frames, ops)]).transpose(1, 2)  # (B, C, T, H, W)
    cpu_ms = 1000 * (time.perf_counter() - t0) / clips
    video = frames.to(device)
    finish_batch(video, ops, tf.magnitude, tf.frame_size)  # warm-up (grids, kernels)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = finish_batch(video, ops, tf.magnitude, tf.frame_size)
    if device == "cuda":
        torch.cuda.synchronize()
    dev_ms = 1000 * (time.perf_counter() - t0) / clips
    std = torch.tensor(CLIP_STD).view(1, 3, 1, 1, 1) * 255.0
    grey = float(((out.cpu() - ref).abs() * std).max())
    ok = grey == 0.0 if device == "cpu" else grey <= AUGMENT_MAX_GREY
    rule = "bit-identical on the CPU" if device == "cpu" else f"<= {AUGMENT_MAX_GREY} grey levels"
    rep.add("augment", f"augment_on device, {clips} clips x 4 frames {size}px, {device} vs cpu loader",
            "PASS" if ok else "FAIL", f"worst error {grey:.4f} grey levels ({rule}); device step {dev_ms:.2f} ms per "
            f"clip, loader's CPU transform {cpu_ms:.2f} ms per clip", max_grey=round(grey, 5),
            device_ms_per_clip=round(dev_ms, 3), cpu_ms_per_clip=round(cpu_ms, 3), clips=clips)


# --------------------------------------------------------------------------------------------------- train


def mfu(preset: str, samples_per_s: float, device_name: str, frames: int = 4) -> float | None:
    """Model FLOP utilisation of pre-training: 3x the forward FLOPs of the trained parts (bench_model's count on
    the meta device) plus the frozen prompter's forward, per sample, over the GPU's dense bf16 peak."""
    from bench_model import flop_rows

    rows = {r["component"]: r["gmac_per_clip"] for r in flop_rows(preset) if r["stage"] == "pretrain"}
    trained = rows["training_forward_total"] - rows.get("prompter_video_encoder", 0.0)
    flops_per_sample = 2e9 * (3 * trained + rows.get("prompter_video_encoder", 0.0))
    peak = next((v for k, v in BF16_PEAK_TFLOPS.items() if k in device_name), None)
    return None if peak is None else flops_per_sample * samples_per_s / (peak * 1e12)


def section_train(rep: Report, plan: dict, device: str, env: dict, work: Path, on_cpu: bool = False) -> None:
    """The real trainer under torchrun (one process; NCCL on the GPU, gloo on the CPU) on a synthetic corpus it
    builds first: a frozen prompter trained for 2 steps, then ``train_steps`` pre-training steps with all four
    losses. Throughput, data wait and peak memory come from the trainer's own ``metrics.jsonl``."""
    if on_cpu:
        plan = {**plan, **TRAIN_ON_CPU}
    preset, size, steps, precision = (plan[k] for k in ("train_preset", "train_size", "train_steps",
                                                        "train_precision"))  # fmt: skip
    case = f"pretrain {preset} {size} px, {steps} steps, {precision} ZeRO-2, 1 process ({device})"
    if device != "cuda" and not on_cpu:
        rep.add("train", case, "SKIP", "needs CUDA + NCCL (smoke mode; --train-on-cpu runs this section's code on "
                "the debug preset)")  # fmt: skip
        return
    resize = plan["train_resize"]
    corpus, shards = work / f"train_corpus_{plan['train_clips']}", work / f"train_shards_{resize}"
    if not (corpus / "manifest.jsonl").is_file():
        _alpro("synth", str(corpus), "--num-clips", str(plan["train_clips"]), "--quiet", "--overwrite")
    data = {}
    for name, media in (("video", "video"), ("image", "image")):
        data[name] = shards / name
        if not (data[name] / "index.json.zst").is_file():
            _alpro("shard", str(corpus / "manifest.jsonl"), str(data[name]), "--split", "train", "--media", media,
                   "--fps", "8", "--short-side", str(plan["train_short_side"]), "--no-progress")  # fmt: skip
    common = ["--model.preset", preset, "--data.frame_size", str(size), "--data.resize", str(resize),
              "--data.batch_size", str(plan["train_batch"]), "--data.num_workers", str(plan["train_workers"]),
              "--data.train.video", str(data["video"]), "--data.train.image", str(data["image"]),
              "--data.test.video", "null", "--train.precision", precision, "--train.zero_stage", "2",
              "--train.tensorboard", "false"]  # fmt: skip

    def train(stage: str, run: Path, n: int, *extra: str) -> list[dict]:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m",
               "alpro.train", "--config", str(REPO / "launch/configs/debug" / f"{stage}.yaml"), "--train.run_dir",
               str(run), *common, "--train.steps", str(n), "--train.log_interval", str(max(1, n // 6)), *extra]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"{stage} failed: {proc.stderr[-2000:]}")
        return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]

    try:
        stamp = f"{int(time.time())}_{os.getpid()}"
        prompter = work / f"prompter_{preset}_{stamp}"
        train("prompter", prompter, 2)
        rows = train("pretrain", work / f"pretrain_{preset}_{stamp}", steps, "--init.prompter",
                     str(prompter / "final/model.safetensors"), "--init.entities", str(corpus / "entities.txt"))
    except Exception as e:
        rep.add("train", case, "FAIL", f"{type(e).__name__}: {e}"[-600:])
        return
    windows = [r for r in rows if r.get("kind") == "train"][1:]  # the first interval is warm-up
    if not windows:
        rep.add("train", case, "FAIL", "the trainer logged no throughput interval after warm-up")
        return
    samples = statistics.mean(r["throughput/clips_per_s"] for r in windows)
    wait = statistics.mean(r["throughput/data_wait"] for r in windows)
    peak_gb = max(r.get("memory/peak_gb", 0.0) for r in windows)
    util = mfu(preset, samples, env["device"]) if device == "cuda" else None
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    finite = bool(losses) and all(math.isfinite(x) for x in losses)
    rep.add("train", case, "PASS" if finite else "FAIL",
            f"{samples:.1f} samples/s, MFU {'n/a' if util is None else f'{100 * util:.1f} %'}, peak {peak_gb:.1f} GB, "
            f"data wait {100 * wait:.1f} %, {len(losses)} losses finite {finite}", samples_per_s=round(samples, 2),
            mfu=None if util is None else round(util, 4), peak_gb=round(peak_gb, 2), data_wait=round(wait, 4),
            steps=steps)  # fmt: skip


# -------------------------------------------------------------------------------------------------- output

FULL = {
    "attention_shapes": [(16, 4), (16, 8), (32, 4), (32, 8), (16, 16), (32, 16)],
    "force_dtypes": ("bf16", "fp16", "fp32"),
    "heads": 12, "head_dim": 64, "patches": 196, "dim": 256,
    "contrastive_shapes": [(16, 256), (16, 16), (512, 4096), (4096, 32768), (16384, 16384)],
    "speed_shapes": [(16, 4), (32, 4), (16, 8), (32, 8), (16, 16)],
    "contrastive_speed": [(16, 256), (4096, 32768), (16384, 16384)],
    "dali_size": (400, 224), "dali_clips": 32, "augment_size": 224, "augment_clips": 32,
    "train_preset": "alpro-base", "train_size": 224, "train_resize": 256, "train_short_side": 256,
    "train_steps": 30, "train_batch": 16, "train_workers": 6, "train_clips": 320, "train_precision": "bf16",
    "numerics_budget_s": 200.0, "column_split": "auto",
}  # fmt: skip
SMOKE = {
    "attention_shapes": [(1, 2), (2, 3)],
    "force_dtypes": ("fp16",),
    "heads": 2, "head_dim": 32, "patches": 6, "dim": 64,
    "contrastive_shapes": [(8, 24)],
    "speed_shapes": [(1, 2)],
    "contrastive_speed": [(8, 24)],
    "dali_size": (96, 64), "dali_clips": 4, "augment_size": 64, "augment_clips": 8,
    "train_preset": "alpro-base", "train_size": 224, "train_resize": 256, "train_short_side": 256,
    "train_steps": 30, "train_batch": 16, "train_workers": 6, "train_clips": 320, "train_precision": "bf16",
    "numerics_budget_s": float("inf"), "column_split": 3,  # smoke mode checks every case, however loaded the CPU
}  # fmt: skip
# --train-on-cpu: section 4's code end to end on the debug preset (gloo, DeepSpeed bf16 on the CPU), ~1-2 min.
TRAIN_ON_CPU = {
    "train_preset": "debug", "train_size": 32, "train_resize": 36, "train_short_side": 40, "train_steps": 4,
    "train_batch": 4, "train_workers": 0, "train_clips": 24, "train_precision": "bf16",
}  # fmt: skip


def environment(device: str) -> dict:
    import torch
    from machine import machine_info

    versions = {"torch": torch.__version__}
    for name in ("triton", "xformers", "nvidia.dali", "deepspeed"):
        try:
            module = __import__(name, fromlist=["__version__"])
            versions[name.split(".")[-1]] = module.__version__
        except ImportError:
            versions[name.split(".")[-1]] = None
    gpu = torch.cuda.get_device_name() if device == "cuda" else f"cpu (smoke, TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')})"
    return machine_info(device=gpu, **versions)


def plot(rows: list[dict], path: Path, device: str) -> None:
    """Left: ms per provider for each attention case; right: PASS / FAIL / SKIP counts per section."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    timed = [r for r in rows if r["section"] == "speed" and r.get("ms_p50") and r.get("op") != "contrastive"]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    labels = sorted({f"{r['op']} {r['mode']} B{r['B']} T{r['T']}" for r in timed})
    providers = sorted({r["provider"] for r in timed})
    width = 0.8 / max(1, len(providers))
    for i, provider in enumerate(providers):
        ms = {f"{r['op']} {r['mode']} B{r['B']} T{r['T']}": r["ms_p50"] for r in timed if r["provider"] == provider}
        axes[0].bar([j + i * width for j in range(len(labels))], [ms.get(x, 0) for x in labels], width, label=provider)
    axes[0].set_xticks([j + 0.4 - width / 2 for j in range(len(labels))], labels, rotation=60, ha="right", fontsize=7)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("ms (median)")
    axes[0].set_title(f"divided attention ({device})")
    if providers:
        axes[0].legend(fontsize=7)
    sections = ["numerics", "speed", "dali", "augment", "train"]
    for k, (status, color) in enumerate((("PASS", "tab:green"), ("FAIL", "tab:red"), ("SKIP", "tab:gray"))):
        counts = [sum(r["section"] == s and r["status"] == status for r in rows) for s in sections]
        axes[1].bar([j + k * 0.27 for j in range(len(sections))], counts, 0.27, label=status, color=color)
    axes[1].set_xticks([j + 0.27 for j in range(len(sections))], sections)
    axes[1].set_title("cases per section")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write(rows: list[dict], env: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(out / "gpu_check.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, out / "gpu_check.png", env["device"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, Triton interpreter (default without CUDA)")
    parser.add_argument("--sections", default="numerics,speed,dali,augment,train", help="comma-separated subset")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="JSON/CSV/plot folder")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "alpro_gpu_check")
    parser.add_argument("--train-on-cpu", action="store_true",
                        help="smoke mode: run the training section on the debug preset on the CPU instead of SKIP")
    args = parser.parse_args(argv)

    import torch

    smoke = args.smoke or not torch.cuda.is_available()
    if smoke and torch.cuda.is_available() is False:
        os.environ["TRITON_INTERPRET"] = "1"  # before the first Triton kernel module is imported (lazily)
    device = "cuda" if not smoke else "cpu"
    if smoke and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        os.environ["TRITON_INTERPRET"] = "1"
    from alpro.kernels.triton_support import arch_family

    arch = arch_family(torch.cuda.get_device_capability()) if device == "cuda" else 90
    plan = SMOKE if smoke else FULL
    env = environment(device)
    env["mode"] = "smoke" if smoke else "full"
    print(f"gpu_check ({env['mode']}): {env['device']}, config family sm_{arch}, torch {env['torch']}, "
          f"triton {env['triton']}", flush=True)
    args.work.mkdir(parents=True, exist_ok=True)
    rep = Report()
    sections = {"numerics": lambda: section_numerics(rep, plan, device, arch, plan["numerics_budget_s"]),
                "speed": lambda: section_speed(rep, plan, device, env),
                "dali": lambda: section_dali(rep, plan, device, args.work),
                "augment": lambda: section_augment(rep, plan, device),
                "train": lambda: section_train(rep, plan, device, env, args.work, args.train_on_cpu and smoke)}  # fmt: skip
    t0 = time.perf_counter()
    for name in args.sections.split(","):
        t = time.perf_counter()
        try:
            sections[name]()
        except Exception as e:  # a section that breaks is a FAIL line, and the other sections still run
            rep.add(name, "section", "FAIL", f"{type(e).__name__}: {e}"[:300])
            traceback.print_exc()
        print(f"-- {name}: {time.perf_counter() - t:.1f} s", flush=True)
    env["seconds"] = round(time.perf_counter() - t0, 1)
    write(rep.rows, env, args.out)
    counts = {s: sum(r["status"] == s for r in rep.rows) for s in ("PASS", "FAIL", "SKIP")}
    print(f"gpu_check: {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP in {env['seconds']} s; "
          f"wrote {args.out / 'gpu_check.json'}, .csv, .png", flush=True)
    return 1 if rep.failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
