"""Kernel test cases that run inside a :mod:`kernel_worker` process (interpreter on or off), not under pytest.

Each function returns measurements (errors against an fp64 reference, resource tables, resolved backends);
the tests in ``test_kernels_*.py`` hold the tolerances and assert on them.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from alpro.kernels import attention as A
from alpro.kernels import contrastive as CL

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "fp64": torch.float64}


def _err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return (a.double() - ref).abs().max().item()


def _errors(name: str, kernel: torch.Tensor, same_dtype: torch.Tensor, ref: torch.Tensor) -> dict:
    """{name: (kernel error, error of PyTorch in the input dtype)}, both as max abs difference to ``ref``."""
    return {name: (_err(kernel, ref), _err(same_dtype, ref))}


# ------------------------------------------------------------------------------------------------ attention


def _attention(op: str, qkv: torch.Tensor, T: int, H: int, backend: str, grads, **kw):
    """Forward + backward of one op; returns (outputs, d qkv) for the given upstream gradients."""
    qkv = qkv.detach().requires_grad_()
    fn = A.temporal_attention if op == "temporal" else A.spatial_attention
    out = fn(qkv, T, H, backend=backend, **kw)
    out = (out,) if op == "temporal" else out
    (dqkv,) = torch.autograd.grad(out, [qkv], [g.to(o.dtype) for o, g in zip(out, grads)])
    return out, dqkv


def attention_numerics(
    op: str, B: int, N: int, T: int, H: int, Dh: int, dtype: str, deterministic: bool | None = None,
    strided: bool = False, seed: int = 0, tail: int = 0,
) -> dict:  # fmt: skip
    """Triton (interpreted) vs fp64 reference, forward and backward; ``strided`` feeds a non-contiguous qkv;
    ``tail`` > 0 runs the spatial forward's opt-in narrower tail tiles."""
    from alpro.kernels import attention_triton

    attention_triton.set_tail_tiles(tail)
    try:
        return _attention_numerics(op, B, N, T, H, Dh, dtype, deterministic, strided, seed)
    finally:
        attention_triton.set_tail_tiles(0)


def _attention_numerics(op, B, N, T, H, Dh, dtype, deterministic, strided, seed) -> dict:
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(seed)
    C = H * Dh
    rows = N * T if op == "temporal" else 1 + N * T
    qkv = torch.randn(B, rows + strided, 3 * C, generator=g).to(dt)[
        :, int(strided) :
    ]  # strided: batch stride > rows*3C
    n_out = 1 if op == "temporal" else 2
    shapes = [(B, N * T, C)] if op == "temporal" else [(B, T, C), (B, N * T, C)]
    grads = [torch.randn(s, generator=g) for s in shapes][:n_out]

    t0 = time.perf_counter()
    out_k, d_k = _attention(op, qkv, T, H, "triton", grads, deterministic=deterministic)
    seconds = time.perf_counter() - t0
    out_r, d_r = _attention(op, qkv.double(), T, H, "reference", [x.double() for x in grads])
    out_p, d_p = _attention(op, qkv, T, H, "reference", grads)

    errors = {}
    for i in range(n_out):
        errors |= _errors(f"out{i}", out_k[i], out_p[i], out_r[i])
    errors |= _errors("dqkv", d_k, d_p, d_r)
    layout_ok = all(o.dtype == dt and o.shape == s for o, s in zip(out_k, shapes)) and d_k.shape == qkv.shape
    return {"errors": errors, "layout_ok": layout_ok, "seconds": seconds}


def spatial_backward_determinism(seed: int = 0) -> dict:
    """deterministic=True is bitwise repeatable; the atomic variant agrees with it to fp32 rounding."""
    g = torch.Generator().manual_seed(seed)
    B, N, T, H, Dh = 2, 40, 3, 2, 32  # 41 tokens: two 32-row tiles, so the CLS row gets several partials
    qkv = torch.randn(B, 1 + N * T, 3 * H * Dh, generator=g)
    grads = [torch.randn(B, T, H * Dh, generator=g), torch.randn(B, N * T, H * Dh, generator=g)]
    runs = [_attention("spatial", qkv, T, H, "triton", grads, deterministic=True)[1] for _ in range(2)]
    atomic = _attention("spatial", qkv, T, H, "triton", grads, deterministic=False)[1]
    return {"bitwise_equal": torch.equal(runs[0], runs[1]), "atomic_vs_deterministic": _err(atomic, runs[0].double())}


def attention_gradcheck(op: str) -> bool:
    """fp64 gradcheck of the Triton custom op (fp64 accumulation under the interpreter)."""
    g = torch.Generator().manual_seed(0)
    T, H, N, Dh = 3, 2, 2, 16
    rows = N * T if op == "temporal" else 1 + N * T
    qkv = torch.randn(1, rows, 3 * H * Dh, generator=g, dtype=torch.float64, requires_grad=True)
    fn = A.temporal_attention if op == "temporal" else A.spatial_attention
    return torch.autograd.gradcheck(lambda x: fn(x, T, H, backend="triton"), (qkv,), fast_mode=True)


def attention_compiled(seed: int = 0) -> dict:
    """torch.compile (aot_eager, fullgraph) through the custom ops' fake registrations, forward and backward."""
    g = torch.Generator().manual_seed(seed)
    B, N, T, H, Dh = 2, 5, 4, 2, 16
    qt = torch.randn(B, N * T, 3 * H * Dh, generator=g)
    qs = torch.randn(B, 1 + N * T, 3 * H * Dh, generator=g)

    def both(qt, qs, backend):  # .sum() makes stride-0 upstream gradients
        cls_out, patch_out = A.spatial_attention(qs, T, H, backend=backend)
        return A.temporal_attention(qt, T, H, backend=backend).sum() + cls_out.square().sum() + patch_out.sum()

    compiled = torch.compile(both, backend="aot_eager", fullgraph=True)
    results = []
    for fn, backend in ((both, "reference"), (both, "triton"), (compiled, "triton")):
        a, b = qt.clone().requires_grad_(), qs.clone().requires_grad_()
        loss = fn(a, b, backend)
        loss.backward()
        results.append((loss.detach(), a.grad, b.grad))
    ref = [x.double() for x in results[0]]
    return {
        "eager_vs_reference": max(_err(x, y) for x, y in zip(results[1], ref)),
        "compiled_vs_reference": max(_err(x, y) for x, y in zip(results[2], ref)),
    }


# ---------------------------------------------------------------------------------------------- contrastive


def _contrastive(backend: str, va, ta, temp, B: int, offset: int):
    va, ta = va.detach().requires_grad_(), ta.detach().requires_grad_()
    temp = temp.detach().requires_grad_()
    loss = CL.contrastive_loss(va[offset : offset + B], ta[offset : offset + B], va, ta, temp, offset, backend)
    loss.backward()
    return loss.detach(), va.grad, ta.grad, temp.grad


def contrastive_numerics(B: int, W: int, D: int, dtype: str, rank: int = 0, seed: int = 0, splits: int = 1) -> dict:
    """Triton (interpreted) vs fp64 reference: loss and gradients of the gathered features and temp; ``splits``
    column splits in the forward and dx kernels (partials combined by the launcher).

    Local rows are the ``rank``-th block of the gathered ``(B*W, D)`` features, as after all_gather_with_grad,
    so the gradients of the leaves include both the local-row and the gathered-column paths.
    """
    dt = DTYPES[dtype]
    g = torch.Generator().manual_seed(seed)
    va = F.normalize(torch.randn(B * W, D, generator=g), dim=-1).to(dt)
    ta = F.normalize(torch.randn(B * W, D, generator=g), dim=-1).to(dt)
    temp = torch.tensor(0.05)
    offset = rank * B

    from alpro.kernels import contrastive_triton

    t0 = time.perf_counter()
    contrastive_triton.set_column_split(splits)
    try:
        kern = _contrastive("triton", va, ta, temp, B, offset)
    finally:
        contrastive_triton.set_column_split(1)
    seconds = time.perf_counter() - t0
    ref = _contrastive("reference", va.double(), ta.double(), temp.double(), B, offset)
    same = _contrastive("reference", va, ta, temp, B, offset)
    errors = {}
    for i, name in enumerate(("loss", "d_video_all", "d_text_all", "d_temp")):
        errors |= _errors(name, kern[i], same[i], ref[i])
    return {"errors": errors, "loss_dtype": str(kern[0].dtype), "seconds": seconds}


def contrastive_gradcheck() -> tuple[bool, bool]:
    """fp64 gradchecks of the Triton log-sum-exp op and of the whole gathered loss (features and temp)."""
    g = torch.Generator().manual_seed(0)
    from alpro.kernels.contrastive_triton import similarity_lse_op

    x = torch.randn(5, 16, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(7, 16, generator=g, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(3.0, dtype=torch.float64, requires_grad=True)
    ok = torch.autograd.gradcheck(similarity_lse_op, (x, y, scale), fast_mode=True)
    B, W = 3, 2
    va = torch.randn(B * W, 16, generator=g, dtype=torch.float64, requires_grad=True)
    ta = torch.randn(B * W, 16, generator=g, dtype=torch.float64, requires_grad=True)
    temp = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)

    def loss(va, ta, temp):
        return CL.contrastive_loss(va[B:], ta[B:], va, ta, temp, B, backend="triton")

    return ok, torch.autograd.gradcheck(loss, (va, ta, temp), fast_mode=True)


# ---------------------------------------------------------------------------------------- compile-only (GPU)


def compile_shipped(arch: int) -> list[tuple[str, int, int, int]]:
    """(config, shared bytes, registers, spill bytes) of every shipped config compiled for sm_<arch>, as a launch at
    ALPRO's shapes specialises it."""
    from alpro.kernels import compile_check

    return [(name, r.shared, r.registers, r.spill_bytes) for name, r in compile_check.table(arch, jobs=2)]


def compile_large_offsets() -> list[str]:
    """Every kernel still compiles when its sizes and strides are 64-bit (what a launch past 2**31 elements gets)."""
    from alpro.kernels import compile_check

    seen, built = set(), []
    for job in compile_check.shipped_jobs(90):
        if job.name not in seen:
            seen.add(job.name)
            compile_check.compile_job(job, 90, int_type="i64")
            built.append(job.name)
    return built


def launch_specialisation() -> dict:
    """The signature compile_check builds for the launches at ALPRO's shapes: which integers Triton specialises."""
    from alpro.kernels import compile_check

    out = {}
    for job in compile_check.shipped_jobs(90):
        if job.name in out or job.dtype != torch.bfloat16:
            continue
        src, _ = compile_check._source(job, 90, None)
        names = [p.name for p in job.kernel.params]
        values = dict(zip(names, job.args))
        divisible = sorted(names[k[0]] for k, v in src.attrs.items() if ["tt.divisibility", 16] in v)
        out[job.name] = {"values": {k: v for k, v in values.items() if isinstance(v, int)}, "divisible": divisible}
    return out


def captured_configs(arch: int, deterministic: bool) -> dict[str, list[str]]:
    """The configs each launch of a bf16 training step would run with on sm_<arch>: the autotuning candidates, or
    the pinned one with ``deterministic``; and what a forced config does."""
    from alpro.kernels import attention_triton as att
    from alpro.kernels import triton_support as ts

    B, T, N, C, H = 2, 4, 196, 768, 12
    qkv_t = torch.empty(B, N * T, 3 * C, device="meta", dtype=torch.bfloat16)
    qkv_s = torch.empty(B, 1 + N * T, 3 * C, device="meta", dtype=torch.bfloat16)
    with ts.capture_launches(arch) as launches:
        att.temporal_forward(qkv_t, T, H, 0.125, deterministic)
        cls_out, patch_out, lse = att.spatial_forward(qkv_s, T, H, 0.125, deterministic)
        att.spatial_backward(torch.empty_like(cls_out), torch.empty_like(patch_out), qkv_s, cls_out, patch_out, lse,
                             T, H, 0.125, deterministic)  # fmt: skip
        with ts.forced_config("spatial_fwd", att.SPATIAL_FWD_CONFIGS[arch]["narrow"][-1]):
            att.spatial_forward(qkv_s, T, H, 0.125, deterministic)
    result = {}
    for i, launch in enumerate(launches):
        result[f"{i}:{launch.name}"] = [ts.describe_config(c) for c in launch.configs]
    result["first_candidates"] = {
        name: ts.describe_config(att.TABLES[name][arch]["narrow"][0]) for name in att.TABLES
    }
    return result


def tf32_launches(arch: int) -> dict:
    """fp32 launches with the TF32 switch on and off: the PRECISION each kernel gets and the configs it may use."""
    from alpro.kernels import attention_triton as att
    from alpro.kernels import triton_support as ts

    before = ts.tf32_enabled(), torch.backends.cudnn.allow_tf32
    out = {}
    try:
        for tf32 in (True, False):
            ts.set_tf32(tf32)
            qkv = torch.empty(2, 1 + 196 * 4, 3 * 768, device="meta", dtype=torch.float32)
            with ts.capture_launches(arch) as launches:
                att.spatial_forward(qkv, 4, 12, 0.125)
            (launch,) = launches
            out["tf32" if tf32 else "ieee"] = {
                "precision": launch.meta["PRECISION"],
                "configs": [ts.describe_config(c) for c in launch.configs],
                "table": [ts.describe_config(c) for c in att.SPATIAL_FWD_CONFIGS[arch]["wide" if tf32 else "ieee"]],
            }
            qkv_t = torch.empty(1, 196 * 32, 3 * 768, device="meta", dtype=torch.float32)
            with ts.capture_launches(arch):  # meta tensors count as launchable only while capturing
                out["tf32" if tf32 else "ieee"]["T32"] = att.check(qkv_t, 32, 12, "temporal_attention")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before
    return out


def grids(B: int, T: int, N: int, H: int) -> dict:
    """Launch grids of both passes at the smallest tiles (the most programs)."""
    from alpro.kernels import attention_triton as att

    return {
        "temporal": att.temporal_grid(B, N * T, T, H, block_m=32),
        "spatial": att.spatial_grid(B, T, 1 + N, H, block=16),
    }


def fallback_dispatch() -> dict:
    """With the interpreter off and no GPU: auto never touches Triton, explicit 'triton' says why it can't."""
    import sys

    g = torch.Generator().manual_seed(0)
    B, N, T, H, Dh = 2, 4, 4, 2, 16
    qt = torch.randn(B, N * T, 3 * H * Dh, generator=g)
    qs = torch.randn(B, 1 + N * T, 3 * H * Dh, generator=g)
    v = F.normalize(torch.randn(8, 32, generator=g), dim=-1)
    t = F.normalize(torch.randn(8, 32, generator=g), dim=-1)
    cls_out, patch_out = A.spatial_attention(qs, T, H)
    ref_cls, ref_patch = A.spatial_attention(qs, T, H, backend="reference")
    result = {
        "attention_auto": A._resolve(None, qt, T, H, "temporal_attention"),
        "contrastive_auto_small": CL._resolve(None, v, t),
        "contrastive_auto_large": CL._resolve(None, torch.empty(4096, 32), torch.empty(4096, 32)),
        "auto_vs_reference": max(
            _err(A.temporal_attention(qt, T, H), A.temporal_attention(qt, T, H, backend="reference").double()),
            _err(cls_out, ref_cls.double()),
            _err(patch_out, ref_patch.double()),
        ),
        "loss_auto_vs_reference": _err(CL.contrastive_loss(v, t), CL.contrastive_loss(v, t, backend="reference")),
    }
    # Nothing above may have imported a Triton kernel module (auto on CPU never uses the interpreter).
    result["triton_modules_imported"] = [m for m in sys.modules if m.endswith("_triton") and "alpro" in m]

    def error(call) -> str:
        try:
            call()
        except ValueError as e:
            return str(e)
        return ""

    result["errors"] = {
        "attention_triton": error(lambda: A.temporal_attention(qt, T, H, backend="triton")),
        "attention_xformers": error(lambda: A.spatial_attention(qs, T, H, backend="xformers")),
        "contrastive_triton": error(lambda: CL.contrastive_loss(v, t, backend="triton")),
    }
    return result


# ------------------------------------------------------------------------------------------------ model level


def model_kernels_vs_reference(task: str) -> dict:
    """The debug model's loss and every parameter gradient, Triton kernels (interpreted) vs reference paths."""
    import dataclasses

    from alpro.data.batch import Batch
    from alpro.kernels import set_attention_backend, set_contrastive_backend
    from alpro.models import LossConfig, ModelConfig, build_model

    cfg = ModelConfig.preset("debug")
    if task == "pretrain":  # PEM needs the prompter's prompt bank; VTC, VTM and MLM exercise every kernel
        cfg = dataclasses.replace(cfg, loss=LossConfig(pem=0.0))
    torch.manual_seed(0)
    model = build_model(cfg, task=task, vocab_size=cfg.text.vocab_size)
    g = torch.Generator().manual_seed(1)
    B, T, L, S = 2, 4, 8, cfg.vision.image_size  # B=2: the interpreter runs ~100 programs per pass
    ids = torch.randint(5, cfg.text.vocab_size, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    mask[1, L - 3 :] = 0
    mlm_labels = torch.full((B, L), -100)
    mlm_labels[:, 2:4] = ids[:, 2:4]
    mlm_ids = ids.clone()
    mlm_ids[:, 2:4] = 4
    batch = Batch(type="video", keys=[f"k{i}" for i in range(B)], video=torch.randn(B, 3, T, S, S, generator=g),
                  input_ids=ids, attention_mask=mask, mlm_input_ids=mlm_ids, mlm_labels=mlm_labels)  # fmt: skip

    from alpro.kernels import attention_triton, contrastive_triton

    calls = {"temporal_forward": 0, "spatial_backward": 0, "lse_forward": 0}  # prove the kernels really ran
    for module in (attention_triton, contrastive_triton):
        for name in calls:
            if hasattr(module, name):
                original = getattr(module, name)

                def counted(*args, _name=name, _original=original):
                    calls[_name] += 1
                    return _original(*args)

                setattr(module, name, counted)

    runs = {}
    for backend in ("triton", "reference"):
        set_attention_backend(backend)
        set_contrastive_backend(backend)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(2)  # same dropout / drop-path masks and hard-negative draws in both runs
        t0 = time.perf_counter()
        out = model(batch)
        out["loss"].backward()
        runs[backend] = (
            {k: v.detach() for k, v in out.items() if k.startswith("loss")},
            {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None},
            time.perf_counter() - t0,
        )
    set_attention_backend("auto")
    set_contrastive_backend("auto")

    (loss_k, grad_k, seconds), (loss_r, grad_r, _) = runs["triton"], runs["reference"]
    return {
        "losses": {k: (loss_k[k].item(), loss_r[k].item()) for k in loss_r},
        "triton_calls": calls,
        "same_params": grad_k.keys() == grad_r.keys(),
        "video_params": sum("video" in n for n in grad_k),
        # per parameter: (max |g_kernel - g_reference|, max |g_reference|)
        "grad_diff": {n: ((grad_k[n] - grad_r[n]).abs().max().item(), grad_r[n].abs().max().item()) for n in grad_r},
        "seconds": seconds,
    }
