"""The Triton kernels themselves, run by Triton's interpreter on the CPU, against the PyTorch references.

The interpreter runs in a worker process (``kernel_worker``) because ``TRITON_INTERPRET=1`` must be set before
the kernels are defined and must not leak into other tests. Launches stay under ~100 programs (the interpreter
costs 5-10 ms per program per tile step).

Tolerance (FlashAttention's rule): against an fp64 reference, the kernel's max abs error is at most twice the
error of the same maths done by PyTorch in the input dtype, plus a floor for values PyTorch happens to get
exactly right. Inputs are N(0, 1) (attention) or unit vectors (contrastive).
"""

from __future__ import annotations

import pytest
from kernel_worker import KernelWorker

pytestmark = pytest.mark.triton

FLOOR = {"fp32": 1e-5, "fp16": 1e-3, "bf16": 1e-2}  # bf16 stores round toward zero in the interpreter


@pytest.fixture(scope="module")
def interp():
    worker = KernelWorker(interpret=True)
    yield worker
    worker.close()


def assert_fa_rule(errors: dict[str, tuple[float, float]], dtype: str) -> None:
    for name, (kernel, pytorch) in errors.items():
        assert kernel <= 2 * pytorch + FLOOR[dtype], (
            f"{name}: kernel error {kernel:.3g} > 2 x PyTorch {dtype} error {pytorch:.3g} + {FLOOR[dtype]}"
        )


# (op, B, N, T, H, Dh, dtype): odd token counts, T = 1..32 (3 and 12 are not powers of two), batch sizes that
# are not multiples of a tile, head dims 32/48/64/128, every dtype; 1 + 70 tokens span two 64-row tiles (online
# softmax across key tiles, a masked last tile, CLS partials from several tiles).
ATTENTION_CASES = [
    ("temporal", 3, 5, 4, 2, 32, "fp32"),
    ("temporal", 2, 13, 1, 2, 64, "fp32"),
    ("temporal", 1, 7, 8, 2, 64, "fp16"),
    ("temporal", 1, 3, 16, 2, 32, "bf16"),
    ("temporal", 1, 6, 3, 1, 128, "fp32"),
    ("temporal", 1, 5, 12, 1, 48, "fp16"),
    ("temporal", 1, 3, 32, 1, 32, "fp32"),
    ("spatial", 2, 5, 4, 2, 32, "fp32"),
    ("spatial", 3, 13, 1, 2, 64, "fp32"),
    ("spatial", 1, 9, 8, 1, 64, "fp16"),
    ("spatial", 1, 7, 16, 1, 32, "bf16"),
    ("spatial", 1, 70, 2, 1, 32, "fp32"),
    ("spatial", 1, 17, 2, 1, 128, "fp32"),
    ("spatial", 1, 6, 3, 2, 48, "bf16"),
    ("spatial", 1, 3, 32, 1, 32, "fp16"),
]


# The spatial backward runs in both variants; the temporal one has no atomics, so one run covers it.
ATTENTION_PARAMS = [
    pytest.param(*case, det, id="-".join(map(str, case)) + ("" if det is None else f"-det{int(det)}"))
    for case in ATTENTION_CASES
    for det in ((None,) if case[0] == "temporal" else (False, True))
]


@pytest.mark.parametrize("op,B,N,T,H,Dh,dtype,deterministic", ATTENTION_PARAMS)
def test_attention_matches_reference(interp, op, B, N, T, H, Dh, dtype, deterministic):
    res = interp.run("attention_numerics", op=op, B=B, N=N, T=T, H=H, Dh=Dh, dtype=dtype, deterministic=deterministic)
    assert res["layout_ok"]
    assert_fa_rule(res["errors"], dtype)


@pytest.mark.parametrize("tail,dtype,det", [(16, "fp32", False), (16, "bf16", True), (32, "fp16", False)])
def test_spatial_tail_tiles_match_reference(interp, tail, dtype, det):
    """The opt-in narrower tail tiles of the spatial forward: 1 + 52 x 2 = 105 keys, i.e. one whole 64-wide tile
    and 41 keys left for 3 tiles of 16 (or 2 of 32); the backward runs on the forward's log-sum-exps."""
    res = interp.run("attention_numerics", op="spatial", B=1, N=52, T=2, H=1, Dh=32, dtype=dtype,
                     deterministic=det, tail=tail)  # fmt: skip
    assert res["layout_ok"]
    assert_fa_rule(res["errors"], dtype)


@pytest.mark.parametrize("op", ["temporal", "spatial"])
def test_attention_reads_strided_qkv(interp, op):
    """A qkv view with a batch stride larger than rows x 3C (e.g. a slice of a longer sequence)."""
    res = interp.run("attention_numerics", op=op, B=2, N=5, T=4, H=2, Dh=32, dtype="fp32", strided=True)
    assert res["layout_ok"]
    assert_fa_rule(res["errors"], "fp32")


def test_spatial_backward_determinism(interp):
    res = interp.run("spatial_backward_determinism")
    assert res["bitwise_equal"]
    assert res["atomic_vs_deterministic"] < 1e-5  # the atomics only reorder fp32 additions


@pytest.mark.parametrize("op", ["temporal", "spatial"])
def test_attention_gradcheck_fp64(interp, op):
    assert interp.run("attention_gradcheck", op=op)


def test_attention_under_torch_compile(interp):
    """The custom ops' fake registrations let torch.compile trace forward and backward (fullgraph)."""
    res = interp.run("attention_compiled")
    assert res["eager_vs_reference"] < 1e-4 and res["compiled_vs_reference"] < 1e-4  # fp32, sums of 160 rows


# (B, W, D, dtype, rank): ALPRO's single-rank 16 x 256, gathered layouts with a rank offset, sizes that are not
# multiples of the 32-row tile, a feature dim that is not a power of two.
CONTRASTIVE_CASES = [
    (16, 1, 256, "fp32", 0),
    (37, 3, 64, "fp32", 1),
    (40, 2, 256, "bf16", 1),
    (33, 2, 48, "fp16", 0),
]


@pytest.mark.parametrize("B,W,D,dtype,rank", CONTRASTIVE_CASES, ids=lambda v: str(v))
def test_contrastive_matches_reference(interp, B, W, D, dtype, rank):
    res = interp.run("contrastive_numerics", B=B, W=W, D=D, dtype=dtype, rank=rank)
    assert res["loss_dtype"] == "torch.float32"
    assert_fa_rule(res["errors"], dtype)


@pytest.mark.parametrize("splits,dtype", [(3, "fp32"), (4, "bf16"), (7, "fp16")])
def test_contrastive_column_split_matches_reference(interp, splits, dtype):
    """The opt-in column split (row blocks x column splits, partial log-sum-exps and dx summed in a fixed order):
    local 20 rows against 100 gathered columns, so the splits end inside column tiles."""
    res = interp.run("contrastive_numerics", B=20, W=5, D=64, dtype=dtype, rank=2, splits=splits)
    assert res["loss_dtype"] == "torch.float32"
    assert_fa_rule(res["errors"], dtype)


def test_contrastive_gradcheck_fp64(interp):
    op_ok, loss_ok = interp.run("contrastive_gradcheck")
    assert op_ok and loss_ok


def test_model_kernels_match_reference(interp):
    """Debug preset, pre-training (VTC + VTM + MLM): every loss and parameter gradient, kernels vs references."""
    res = interp.run("model_kernels_vs_reference", task="pretrain")
    assert all(n > 0 for n in res["triton_calls"].values()), res["triton_calls"]
    assert res["same_params"] and res["video_params"] > 0
    for name, (kernel, reference) in res["losses"].items():
        assert kernel == pytest.approx(reference, rel=1e-5, abs=1e-6), name
    # fp32 everywhere; 1e-6 absolute for gradients that are zero in exact maths (attention key biases).
    for name, (diff, ref_max) in res["grad_diff"].items():
        assert diff <= 1e-4 * ref_max + 1e-6, f"{name}: gradient differs by {diff:.2e} (max |g| {ref_max:.2e})"
