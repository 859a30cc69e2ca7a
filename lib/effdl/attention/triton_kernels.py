"""Triton kernels: FlashAttention-2 forward and backward (prefill), split-KV decoding (Flash-Decoding).

Imported lazily (``effdl.attention.triton_attention`` imports this module on first call), so the
package works without Triton or a GPU.  Runs on CUDA sm_80+ (autotuned), or on the CPU under
``TRITON_INTERPRET=1`` (one small fixed configuration; fp32/fp16 only: the interpreter's bf16 is broken).

Speed tricks, each with its reason:

- ``exp2`` instead of ``exp``: the scale is folded into ``log2(e)·scale`` once, and ``exp2`` is the
  GPU's native special-function instruction (``exp`` is ``exp2`` plus a multiply per element); the
  backward turns the saved logsumexp into log2 units once per row for the same reason;
- two loops per query tile: the tiles fully left of the diagonal run with no mask at all, only the
  few tiles crossing the diagonal or the sequence end pay for masking; tiles right of the diagonal
  are never visited (causal tile skipping), and the heaviest query tiles of a causal run start first;
  the backward's key-tile programs do the same from the other side (skip the query tiles above the
  diagonal, mask the diagonal and the ragged last tile only);
- fp32 accumulators and statistics, P (and dS) cast to the input dtype for the tensor-core products;
- backward: dK, dV accumulated in registers by one program per key tile and written once; dQ by a
  second pass with one program per query tile, so no atomics and the same bits on every run;
- decode: one program per (sequence, K/V head, key chunk), the query heads sharing that K/V head as
  the rows of its query tile (each key tile read once per group), with enough chunks to give every SM
  many programs — the memory system, not the arithmetic, is the limit — then a small merge kernel.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from effdl.attention.decode import split_chunk
from effdl.attention.tiled import flash2_backward
from effdl.validate import check_qkv

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def check_triton_device(t: torch.Tensor) -> None:
    """Raise a clear error where these kernels cannot run."""
    if t.device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(t.device)
        if major < 8:
            raise RuntimeError(
                f"the course's Triton attention kernels need an sm_80+ GPU (A100, L4, H100...); this one is "
                f"sm_{major}{minor} (a Colab T4 is sm_75): use tiled_attention or SDPA instead"
            )
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"Triton attention supports fp16, bf16 and fp32, got {t.dtype}")
        return
    if t.device.type == "cpu" and interpreting():
        if t.dtype not in (torch.float16, torch.float32):
            raise TypeError(
                "under TRITON_INTERPRET=1 only fp32 and fp16 work (the interpreter's bf16 "
                f"gives garbage); got {t.dtype}"
            )
        return
    raise RuntimeError(
        f"Triton kernels need a CUDA GPU, or the CPU with TRITON_INTERPRET=1 set before triton is imported "
        f"(tensors are on {t.device})"
    )


# ----------------------------------------------------------------------------------------------
# Prefill forward
# ----------------------------------------------------------------------------------------------

@triton.jit
def _fwd_tile(
    acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, mask_d, N_K, off,
    stride_kn, stride_vn, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Fold key tile [start_n, start_n + BLOCK_N) into the running (acc, l_i, m_i),
    log2 domain."""
    cols = start_n + offs_n
    if MASKED:
        k = tl.load(
            k_ptrs + start_n * stride_kn,
            mask=(cols[None, :] < N_K) & mask_d[:, None],
            other=0.0,
        )
    elif EVEN_D:
        k = tl.load(k_ptrs + start_n * stride_kn)
    else:
        k = tl.load(k_ptrs + start_n * stride_kn, mask=mask_d[:, None], other=0.0)
    if IEEE:
        qk = tl.dot(q, k, input_precision="ieee")  # fp32 inputs: no TF32 rounding
    else:
        qk = tl.dot(q, k)                          # (BLOCK_M, BLOCK_N), fp32
    if MASKED:
        keep = cols[None, :] < N_K
        if CAUSAL:
            # bottom-right alignment
            keep = keep & (cols[None, :] <= offs_m[:, None] + off)
        qk = tl.where(keep, qk * qk_scale, float("-inf"))
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        m_ij = tl.where(m_ij == float("-inf"), 0.0, m_ij)  # rows that see nothing yet
        qk = qk - m_ij[:, None]
    else:
        m_ij = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        qk = qk * qk_scale - m_ij[:, None]
    p = tl.exp2(qk)
    alpha = tl.exp2(m_i - m_ij)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    if MASKED:
        v = tl.load(
            v_ptrs + start_n * stride_vn,
            mask=(cols[:, None] < N_K) & mask_d[None, :],
            other=0.0,
        )
    elif EVEN_D:
        v = tl.load(v_ptrs + start_n * stride_vn)
    else:
        v = tl.load(v_ptrs + start_n * stride_vn, mask=mask_d[None, :], other=0.0)
    if IEEE:
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision="ieee")
    else:
        acc = tl.dot(p.to(v.dtype), v, acc)
    return acc, l_i, m_ij


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, qk_scale,
    stride_qz, stride_qh, stride_qm, stride_qd,
    stride_kz, stride_kh, stride_kn, stride_kd,
    stride_vz, stride_vh, stride_vn, stride_vd,
    stride_oz, stride_oh, stride_om, stride_od,
    H, N_Q, N_K,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, IEEE: tl.constexpr,
):
    num_m = tl.cdiv(N_Q, BLOCK_M)
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = num_m - 1 - pid_m                      # heaviest tiles first
    zh = tl.program_id(1)
    z, h = zh // H, zh % H
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    q_ptrs = (
        Q + z * stride_qz + h * stride_qh
        + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
    )
    k_ptrs = (
        K + z * stride_kz + h * stride_kh
        + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd
    )
    v_ptrs = (
        V + z * stride_vz + h * stride_vh
        + offs_n[:, None] * stride_vn + offs_d[None, :] * stride_vd
    )
    q = tl.load(q_ptrs, mask=(offs_m[:, None] < N_Q) & mask_d[None, :], other=0.0)
    m_i = tl.zeros([BLOCK_M], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    off = N_K - N_Q
    if CAUSAL:
        hi = tl.minimum(N_K, start_m + BLOCK_M + off)  # keys ≥ hi: masked for all rows
        full = tl.minimum(start_m + off + 1, N_K)      # keys < full: seen by all rows
    else:
        hi = N_K
        full = N_K
    full = tl.maximum(full, 0) // BLOCK_N * BLOCK_N
    for start_n in range(0, full, BLOCK_N):            # stage 1: no masks
        acc, l_i, m_i = _fwd_tile(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, mask_d, N_K,
            off, stride_kn, stride_vn, qk_scale, False, CAUSAL, EVEN_D, IEEE,
        )
    for start_n in range(full, hi, BLOCK_N):           # stage 2: diagonal and tail
        acc, l_i, m_i = _fwd_tile(
            acc, l_i, m_i, q, k_ptrs, v_ptrs, start_n, offs_m, offs_n, mask_d, N_K,
            off, stride_kn, stride_vn, qk_scale, True, CAUSAL, EVEN_D, IEEE,
        )
    empty = l_i == 0.0
    acc = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(
        empty,
        float("-inf"),
        (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453,
    )
    o_ptrs = (
        O + z * stride_oz + h * stride_oh
        + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    )
    tl.store(
        o_ptrs,
        acc.to(O.dtype.element_ty),
        mask=(offs_m[:, None] < N_Q) & mask_d[None, :],
    )
    tl.store(LSE + zh * N_Q + offs_m, lse, mask=offs_m < N_Q)


def _fwd_configs():
    # why these four: 128-row query tiles keep the tensor cores busy on sm_80/sm_90; 64 vs 128 key
    # columns and 4 vs 8 warps trade registers against parallelism; 2-4 stages hide HBM latency
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
            for bm, bn, w, st in [(128, 64, 4, 3), (128, 128, 8, 3), (128, 64, 8, 2), (64, 64, 4, 4)]]


def _prune_fwd(configs, named_args, **kwargs):
    # why: 128 x 128 tiles at head dim 256 overflow shared memory; tiny N needs no 128-row tiles
    d = named_args.get("HEAD_DIM", kwargs.get("HEAD_DIM", 64))
    n = named_args.get("N_Q", kwargs.get("N_Q", 1 << 20))
    keep = [c for c in configs if not (d > 128 and c.kwargs["BLOCK_N"] > 64)]
    keep = [c for c in keep if c.kwargs["BLOCK_M"] <= max(64, triton.next_power_of_2(n))]
    return keep or configs[:1]


_attn_fwd_tuned = triton.autotune(
    configs=_fwd_configs(), key=["N_Q", "N_K", "HEAD_DIM", "CAUSAL", "IEEE"],
    prune_configs_by={"early_config_prune": _prune_fwd},
)(_attn_fwd)


def _to4d(t: torch.Tensor) -> torch.Tensor:
    """(..., N, d) -> (B, H, N, d) view, folding extra leading dims."""
    if t.ndim == 4:
        return t
    if t.ndim == 2:
        return t[None, None]
    if t.ndim == 3:
        return t[None]
    return t.reshape(-1, t.shape[-3], t.shape[-2], t.shape[-1])


def attention_forward(q, k, v, causal: bool = False, scale: float | None = None, tuned: bool = True,
                      blocks: tuple[int, int] | None = None):
    """Run the prefill kernel: returns ``(out, lse)``, out like q (with v's head dim), lse fp32.

    ``tuned=False`` skips autotuning (one fixed 64 x 64 configuration): quick to compile, for tests.
    ``blocks=(BLOCK_M, BLOCK_N)`` forces a tile shape (tests run the autotuner's shapes in the interpreter).
    """
    scale = check_qkv(q, k, v, scale)
    check_triton_device(q)
    if q.shape[-1] != v.shape[-1]:
        raise ValueError(f"the Triton kernel needs v's head dim ({v.shape[-1]}) equal to q's ({q.shape[-1]})")
    if q.shape[-1] > 256:
        raise ValueError(f"head dim {q.shape[-1]} > 256 is not supported by the Triton kernel")
    shape = q.shape
    q4, k4, v4 = _to4d(q), _to4d(k), _to4d(v)
    B, H, nq, d = q4.shape
    nk = k4.shape[2]
    out = torch.empty_like(q4)
    lse = torch.empty((B, H, nq), dtype=torch.float32, device=q.device)
    if nq == 0 or B * H == 0:
        return out.reshape(shape), lse.reshape(shape[:-1])
    block_d = max(16, triton.next_power_of_2(d))
    ieee = q.dtype == torch.float32
    args = (q4, k4, v4, out, lse, scale * LOG2E,
            *q4.stride(), *k4.stride(), *v4.stride(), *out.stride(), H, nq, nk)
    if blocks is not None or interpreting():
        bm, bn = blocks or (32, 32)
        grid = (triton.cdiv(nq, bm), B * H)
        _attn_fwd[grid](*args, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=bm, BLOCK_N=bn, CAUSAL=causal, IEEE=ieee)
    elif not tuned:
        grid = (triton.cdiv(nq, 64), B * H)
        _attn_fwd[grid](*args, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=64, BLOCK_N=64, CAUSAL=causal, IEEE=ieee,
                        num_warps=4, num_stages=2)
    else:
        grid = lambda meta: (triton.cdiv(nq, meta["BLOCK_M"]), B * H)  # noqa: E731
        _attn_fwd_tuned[grid](*args, HEAD_DIM=d, BLOCK_D=block_d, CAUSAL=causal, IEEE=ieee)
    return out.reshape(shape), lse.reshape(shape[:-1])


# ----------------------------------------------------------------------------------------------
# Prefill backward
# ----------------------------------------------------------------------------------------------

def _dot_precision(dtype: torch.dtype) -> str | None:
    """The kernels' ``tl.dot`` input precision: "ieee" for fp32 inputs (exact fp32 products, no TF32
    rounding), else None (Triton's default; 16-bit inputs are exact in the tensor cores anyway)."""
    return "ieee" if dtype == torch.float32 else None


@triton.jit
def _load_rows(ptrs, rows, n_rows, mask_d, MASKED: tl.constexpr, EVEN_D: tl.constexpr):
    """A (rows, BLOCK_D) tile; masks only what can be out of range: rows past
    ``n_rows`` where MASKED, the padded head dims where d is not a power of two."""
    if MASKED:
        x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & mask_d[None, :], other=0.0)
    elif EVEN_D:
        x = tl.load(ptrs)
    else:
        x = tl.load(ptrs, mask=mask_d[None, :], other=0.0)
    return x


@triton.jit
def _bwd_preprocess(
    O, DO, LSE, DELTA, LSE2, N_Q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Per query row: D_i = rowsum(dO_i ∘ O_i) in fp32 (Algorithm 2, line 4), and
    the logsumexp in log2 units, +inf where a row sees no key (so its P is 0)."""
    zh = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    in_m = offs_m < N_Q
    offs = zh * N_Q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    mask = in_m[:, None] & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + zh * N_Q + offs_m, tl.sum(o * do, 1), mask=in_m)
    # why once per row here: the main kernels then read log2-unit lse per tile,
    # with no multiply and no test for rows that see no key inside their loops
    lse = tl.load(LSE + zh * N_Q + offs_m, mask=in_m, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    tl.store(LSE2 + zh * N_Q + offs_m, lse2, mask=in_m)


@triton.jit
def _bwd_dkdv_tile(
    dk, dv, k, v, q_ptrs, do_ptrs, LSE2, DELTA, start_m, offs_m, offs_n, mask_d,
    N_Q, off, qk_scale,
    HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    EVEN_D: tl.constexpr, PREC: tl.constexpr,
):
    """Add query tile i = [start_m, start_m + BLOCK_M) to key tile j's (dK_j, dV_j).
    Transposed (keys as rows), so K_j and V_j stay the left operands."""
    rows = start_m + offs_m
    q = _load_rows(q_ptrs + start_m * HEAD_DIM, rows, N_Q, mask_d, MASKED, EVEN_D)
    do = _load_rows(do_ptrs + start_m * HEAD_DIM, rows, N_Q, mask_d, MASKED, EVEN_D)
    if MASKED:
        # rows past N_Q: lse2 = +inf makes their P 0, dO = 0 their dP
        lse2 = tl.load(LSE2 + rows, mask=rows < N_Q, other=float("inf"))
        delta = tl.load(DELTA + rows, mask=rows < N_Q, other=0.0)
    else:
        lse2 = tl.load(LSE2 + rows)
        delta = tl.load(DELTA + rows)
    # S_ijᵀ: (BLOCK_N, BLOCK_M), log2 units
    qkT = tl.dot(k, tl.trans(q), input_precision=PREC) * qk_scale
    if MASKED:
        if CAUSAL:                                      # bottom-right alignment
            keep = offs_n[:, None] <= rows[None, :] + off
            qkT = tl.where(keep, qkT, float("-inf"))
    pT = tl.exp2(qkT - lse2[None, :])                   # P_ijᵀ = exp(S_ij - L_i)
    dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=PREC)   # dV_j += P_ijᵀ dO_i
    dpT = tl.dot(v, tl.trans(do), input_precision=PREC)  # dP_ijᵀ = V_j dO_iᵀ
    dsT = pT * (dpT - delta[None, :])                   # dS = P ∘ (dP - D_i)
    dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=PREC)    # dK_j += dS_ijᵀ Q_i
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, DK, DV, LSE2, DELTA, sm_scale, N_Q, N_K,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, PREC: tl.constexpr,
):
    """One program: key tile j of one (batch, head), all the query tiles that see it."""
    start_n = tl.program_id(0) * BLOCK_N               # causal: heaviest tiles first
    zh = tl.program_id(1)
    offs_m = tl.arange(0, BLOCK_M)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    # tensors are contiguous (batch·head, N, d): one offset serves Q and dO
    q_offs = zh * N_Q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    kv_offs = zh * N_K * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    kv_mask = (offs_n[:, None] < N_K) & mask_d[None, :]
    k = tl.load(K + kv_offs, mask=kv_mask, other=0.0)   # K_j, V_j: read once
    v = tl.load(V + kv_offs, mask=kv_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634   # exp(x·scale) = exp2(x·qk_scale)
    LSE2 += zh * N_Q
    DELTA += zh * N_Q
    off = N_K - N_Q
    full_m = N_Q // BLOCK_M * BLOCK_M                   # query tiles below: no row mask
    mid = 0
    if CAUSAL:
        # query i sees key j iff j <= i + off: tiles above lo see none of K_j (skipped),
        # tiles from mid on see all of it (no causal mask)
        lo = tl.maximum(start_n - off, 0) // BLOCK_M * BLOCK_M
        mid = tl.maximum(start_n + BLOCK_N - 1 - off, 0)
        mid = (mid + BLOCK_M - 1) // BLOCK_M * BLOCK_M
        for start_m in range(lo, tl.minimum(mid, N_Q), BLOCK_M):   # diagonal: masked
            dk, dv = _bwd_dkdv_tile(
                dk, dv, k, v, Q + q_offs, DO + q_offs, LSE2, DELTA, start_m, offs_m,
                offs_n, mask_d, N_Q, off, qk_scale, HEAD_DIM, True, CAUSAL, EVEN_D,
                PREC,
            )
    for start_m in range(mid, full_m, BLOCK_M):                    # no mask at all
        dk, dv = _bwd_dkdv_tile(
            dk, dv, k, v, Q + q_offs, DO + q_offs, LSE2, DELTA, start_m, offs_m,
            offs_n, mask_d, N_Q, off, qk_scale, HEAD_DIM, False, CAUSAL, EVEN_D, PREC,
        )
    for start_m in range(tl.maximum(mid, full_m), N_Q, BLOCK_M):   # ragged last tile
        dk, dv = _bwd_dkdv_tile(
            dk, dv, k, v, Q + q_offs, DO + q_offs, LSE2, DELTA, start_m, offs_m,
            offs_n, mask_d, N_Q, off, qk_scale, HEAD_DIM, True, CAUSAL, EVEN_D, PREC,
        )
    # why the scale here, once: dK = scale · dSᵀ Q, with dS of the scaled scores
    tl.store(DK + kv_offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + kv_offs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _bwd_dq_tile(
    dq, q, do, lse2, delta, k_ptrs, v_ptrs, start_n, offs_m, offs_n, mask_d,
    N_K, off, qk_scale,
    HEAD_DIM: tl.constexpr, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
    EVEN_D: tl.constexpr, PREC: tl.constexpr,
):
    """Add key tile j = [start_n, start_n + BLOCK_N) to query tile i's dQ_i."""
    cols = start_n + offs_n
    k = _load_rows(k_ptrs + start_n * HEAD_DIM, cols, N_K, mask_d, MASKED, EVEN_D)
    v = _load_rows(v_ptrs + start_n * HEAD_DIM, cols, N_K, mask_d, MASKED, EVEN_D)
    # S_ij: (BLOCK_M, BLOCK_N), log2 units
    qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
    if MASKED:
        keep = cols[None, :] < N_K
        if CAUSAL:
            keep = keep & (cols[None, :] <= offs_m[:, None] + off)
        qk = tl.where(keep, qk, float("-inf"))
    p = tl.exp2(qk - lse2[:, None])                     # P_ij = exp(S_ij - L_i)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)  # dP_ij = dO_i V_jᵀ
    ds = p * (dp - delta[:, None])                      # dS = P ∘ (dP - D_i)
    return tl.dot(ds.to(k.dtype), k, dq, input_precision=PREC)   # dQ_i += dS_ij K_j


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, DQ, LSE2, DELTA, sm_scale, N_Q, N_K,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr, PREC: tl.constexpr,
):
    """One program: query tile i of one (batch, head), the key tiles it sees."""
    num_m = tl.cdiv(N_Q, BLOCK_M)
    pid_m = tl.program_id(0)
    if CAUSAL:
        pid_m = num_m - 1 - pid_m                       # heaviest tiles first
    zh = tl.program_id(1)
    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    q_offs = zh * N_Q * HEAD_DIM + offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    q_mask = (offs_m[:, None] < N_Q) & mask_d[None, :]
    q = tl.load(Q + q_offs, mask=q_mask, other=0.0)     # Q_i, dO_i, L_i, D_i: read once
    do = tl.load(DO + q_offs, mask=q_mask, other=0.0)
    in_m = offs_m < N_Q
    lse2 = tl.load(LSE2 + zh * N_Q + offs_m, mask=in_m, other=float("inf"))
    delta = tl.load(DELTA + zh * N_Q + offs_m, mask=in_m, other=0.0)
    kv_offs = zh * N_K * HEAD_DIM + offs_n[:, None] * HEAD_DIM + offs_d[None, :]
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    off = N_K - N_Q
    if CAUSAL:                                          # the forward's two stages
        hi = tl.minimum(N_K, start_m + BLOCK_M + off)  # keys ≥ hi: none seen
        full = tl.minimum(start_m + off + 1, N_K)      # keys < full: all seen
    else:
        hi = N_K
        full = N_K
    full = tl.maximum(full, 0) // BLOCK_N * BLOCK_N
    for start_n in range(0, full, BLOCK_N):            # stage 1: no masks
        dq = _bwd_dq_tile(
            dq, q, do, lse2, delta, K + kv_offs, V + kv_offs, start_n, offs_m, offs_n,
            mask_d, N_K, off, qk_scale, HEAD_DIM, False, CAUSAL, EVEN_D, PREC,
        )
    for start_n in range(full, hi, BLOCK_N):           # stage 2: diagonal and tail
        dq = _bwd_dq_tile(
            dq, q, do, lse2, delta, K + kv_offs, V + kv_offs, start_n, offs_m, offs_n,
            mask_d, N_K, off, qk_scale, HEAD_DIM, True, CAUSAL, EVEN_D, PREC,
        )
    tl.store(DQ + q_offs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


def _bwd_configs(outer: str, inner: str):
    # why: the outer tile (kept in registers with its fp32 gradient) large, the streamed
    # inner tile small, as in Triton's fused-attention tutorial; 8 warps for 128-row
    # outer tiles (their two fp32 accumulators), 2-3 stages to hide HBM latency
    return [triton.Config({outer: o, inner: i}, num_warps=w, num_stages=st)
            for o, i, w, st in [(128, 32, 8, 3), (64, 32, 4, 3), (64, 64, 4, 2), (128, 64, 8, 2)]]


_BWD_KEY = ["N_Q", "N_K", "HEAD_DIM", "CAUSAL", "PREC"]
_attn_bwd_dkdv_tuned = triton.autotune(configs=_bwd_configs("BLOCK_N", "BLOCK_M"), key=_BWD_KEY)(_attn_bwd_dkdv)
_attn_bwd_dq_tuned = triton.autotune(configs=_bwd_configs("BLOCK_M", "BLOCK_N"), key=_BWD_KEY)(_attn_bwd_dq)

#: The largest head dim the Triton backward takes: a dK/dV program keeps K_j, V_j and two fp32
#: accumulators of BLOCK_N x d in registers, which spill beyond d = 128 (FA2 needs special tiles
#: there); :class:`TritonAttentionFunction` falls back to the PyTorch recomputation above it.
BWD_MAX_HEAD_DIM = 128


def attention_backward(q, k, v, out, lse, dout, causal: bool = False, scale: float | None = None,
                       tuned: bool = True, blocks: tuple[int, int] | None = None):
    """FlashAttention-2's backward (Dao 2023, Algorithm 2) as three Triton kernels: ``(dq, dk, dv)``.

    ``out`` and ``lse`` are :func:`attention_forward`'s (lse: natural-log logsumexp of the scaled
    scores, -inf for rows that see no key), ``dout`` the gradient of ``out``.  Mapping to Algorithm 2:

    1. ``_bwd_preprocess``: D_i = rowsum(dO_i ∘ O_i) (line 4), once per row.
    2. ``_attn_bwd_dkdv``: one program per K/V tile j (the outer loop, line 5): K_j, V_j loaded once
       (line 6), dK_j, dV_j accumulated in fp32 registers (line 7) over the query tiles i that see
       tile j (line 8): Q_i, dO_i, L_i, D_i loaded (9), S_ij and P_ij = exp(S_ij − L_i) recomputed
       from the saved logsumexp (10-11), dV_j += P_ijᵀ dO_i (12), dP_ij = dO_i V_jᵀ (13),
       dS_ij = P_ij ∘ (dP_ij − D_i) (14), dK_j += dS_ijᵀ Q_i (16); written once (line 18).
    3. ``_attn_bwd_dq``: line 15's dQ_i += dS_ij K_j, which Algorithm 2 does with a read-modify-write
       of dQ_i inside the K/V loop (atomic adds on a GPU), is a second pass instead: one program per
       query tile i recomputes P_ij and dS_ij for its key tiles and writes dQ_i once.  That costs the
       recomputation of two products per tile (7 instead of 5 matmuls per tile in all) but no fp32 dQ
       buffer, no atomics, and the result is deterministic: the same bits on every run.

    The same steps in paper order, in PyTorch: :func:`effdl.attention.textbook.fa2_backward`.
    Causal masking is bottom-right aligned (query i sees key j iff j <= i + Nk − Nq); tiles no query
    of which sees a key are skipped, and only tiles crossing the diagonal (and the ragged last tile)
    pay for masks.  Gradients are like q, k, v; accumulation in fp32, products in the input dtype.
    ``tuned=False``: one fixed configuration; ``blocks=(outer, inner)``: force the tile shape (outer:
    the tile a program owns, inner: the tiles it streams; the interpreter's default is 32 x 32).
    """
    scale = check_qkv(q, k, v, scale)
    lead = q.shape[:-1]
    for name, t, shape in (("out", out, (*lead, v.shape[-1])), ("dout", dout, (*lead, v.shape[-1])),
                           ("lse", lse, lead)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != tuple(shape):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must have shape {tuple(shape)} (from attention_forward on these "
                             f"q, k, v), got {got}")
    if out.dtype != q.dtype or dout.dtype != q.dtype:
        raise TypeError(f"out and dout must have q's dtype {q.dtype}, got {out.dtype} and {dout.dtype}: "
                        f"cast them with .to(q.dtype)")
    if q.shape[-1] != v.shape[-1]:
        raise ValueError(f"the Triton kernel needs v's head dim ({v.shape[-1]}) equal to q's ({q.shape[-1]})")
    if q.shape[-1] > BWD_MAX_HEAD_DIM:
        raise ValueError(f"head dim {q.shape[-1]} > {BWD_MAX_HEAD_DIM} is not supported by the Triton "
                         "backward; use effdl.attention.flash2_backward")
    check_triton_device(q)
    # why contiguous: one (batch·head, N, d) layout lets one offset tensor address Q, dO, dQ (and K,
    # V, dK, dV), and a unit stride along d makes every load a wide vector load; a copy happens only
    # for inputs that are not already laid out so (e.g. a transposed (B, N, H, d) view)
    q4, k4, v4, o4, do4 = (_to4d(t).contiguous() for t in (q, k, v, out, dout))
    B, H, nq, d = q4.shape
    nk = k4.shape[2]
    if nq == 0 or nk == 0 or B * H == 0:                # no scores: all gradients are 0
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    dq, dk, dv = torch.empty_like(q4), torch.empty_like(k4), torch.empty_like(v4)  # all written
    block_d = max(16, triton.next_power_of_2(d))
    delta = torch.empty((B * H, nq), dtype=torch.float32, device=q.device)
    lse2 = torch.empty_like(delta)
    _bwd_preprocess[(triton.cdiv(nq, 64), B * H)](
        o4, do4, lse.reshape(B * H, nq).float().contiguous(), delta, lse2, nq,
        HEAD_DIM=d, BLOCK_D=block_d, BLOCK_M=64)
    args = (q4, k4, v4, do4)
    tail = (lse2, delta, scale, nq, nk)
    meta = dict(HEAD_DIM=d, BLOCK_D=block_d, CAUSAL=causal, PREC=_dot_precision(q.dtype))
    if blocks is not None or interpreting() or not tuned:
        outer, inner = blocks or ((32, 32) if interpreting() else (64, 32))
        fixed = {} if interpreting() else dict(num_warps=4, num_stages=2)
        _attn_bwd_dkdv[(triton.cdiv(nk, outer), B * H)](
            *args, dk, dv, *tail, BLOCK_M=inner, BLOCK_N=outer, **meta, **fixed)
        _attn_bwd_dq[(triton.cdiv(nq, outer), B * H)](
            *args, dq, *tail, BLOCK_M=outer, BLOCK_N=inner, **meta, **fixed)
    else:
        _attn_bwd_dkdv_tuned[lambda m: (triton.cdiv(nk, m["BLOCK_N"]), B * H)](*args, dk, dv, *tail, **meta)
        _attn_bwd_dq_tuned[lambda m: (triton.cdiv(nq, m["BLOCK_M"]), B * H)](*args, dq, *tail, **meta)
    return dq.reshape(q.shape), dk.reshape(k.shape), dv.reshape(v.shape)


def backward_path(head_dim: int) -> str:
    """Which backward :class:`TritonAttentionFunction` runs after the Triton forward.

    ``"triton"`` (:func:`attention_backward`) wherever the forward ran (CUDA sm_80+, or the CPU under
    TRITON_INTERPRET=1), except ``"torch"`` (:func:`effdl.attention.flash2_backward`, the same
    recomputation in PyTorch tiles) above :data:`BWD_MAX_HEAD_DIM`, where the kernels' tiles do not
    fit.  Neither is differentiable again: a double backward raises.
    """
    return "triton" if head_dim <= BWD_MAX_HEAD_DIM else "torch"


class TritonAttentionFunction(torch.autograd.Function):
    """Triton forward; Triton backward (:func:`attention_backward`) from the saved logsumexp, or the
    PyTorch recomputation where :func:`backward_path` says the kernels cannot serve."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, tuned=True):
        out, lse = attention_forward(q, k, v, causal, scale, tuned)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (causal, scale, tuned)
        return out

    @staticmethod
    @once_differentiable      # the kernels' gradients carry no graph: create_graph=True raises
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        causal, scale, tuned = ctx.args
        if backward_path(q.shape[-1]) == "triton":
            dq, dk, dv = attention_backward(q, k, v, out, lse, dout.to(q.dtype), causal, scale, tuned)
        else:
            dq, dk, dv = flash2_backward(q, k, v, out, lse, dout, causal, scale)
        return dq, dk, dv, None, None, None


def triton_attention(q, k, v, causal: bool = False, scale: float | None = None, tuned: bool = True) -> torch.Tensor:
    """Exact attention with the Triton FlashAttention-2 kernels (SDPA-shaped tensors); differentiable,
    with the Triton backward (see :func:`backward_path`)."""
    check_qkv(q, k, v, scale)
    return TritonAttentionFunction.apply(q, k, v, causal, scale, tuned)


# ----------------------------------------------------------------------------------------------
# Decode: split-KV partials + merge
# ----------------------------------------------------------------------------------------------

@triton.jit
def _decode_partial(Q, K, V, OP, LP, qk_scale,
                    stride_qz, stride_qh, stride_qm, stride_qd,
                    stride_kz, stride_kh, stride_kn, stride_kd,
                    stride_vz, stride_vh, stride_vn, stride_vd,
                    H_KV, GROUP, N_Q, L, CHUNK, NUM_SPLITS,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr, PREC: tl.constexpr):
    """One program: one key chunk of one K/V head, for BLOCK_R of the G·Nq query rows
    that read that head (row r = g·Nq + t: query head h_kv·G + g, position t)."""
    n_rows = GROUP * N_Q
    row_tiles = tl.cdiv(n_rows, BLOCK_R)
    pid = tl.program_id(0)                               # (z, h_kv, row tile)
    split = tl.program_id(1)
    zh_kv = pid // row_tiles
    z, h_kv = zh_kv // H_KV, zh_kv % H_KV
    r = (pid % row_tiles) * BLOCK_R + tl.arange(0, BLOCK_R)
    in_r = r < n_rows
    h = h_kv * GROUP + r // N_Q                          # each row's query head
    t = r % N_Q                                          # and query position
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q_ptrs = (Q + z * stride_qz + h[:, None] * stride_qh + t[:, None] * stride_qm
              + offs_d[None, :] * stride_qd)
    q = tl.load(q_ptrs, mask=in_r[:, None] & mask_d[None, :], other=0.0)
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, L)
    # why index the shared head instead of expanding the cache: decode is memory-bound,
    # and GQA's point is that G query heads read one K/V head; every key tile loaded
    # here serves all the rows of the group at once
    k_base = K + z * stride_kz + h_kv * stride_kh
    v_base = V + z * stride_vz + h_kv * stride_vh
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.zeros([BLOCK_R], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([BLOCK_R], dtype=tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n
        mask_n = cols < end
        kv_mask = mask_n[:, None] & mask_d[None, :]
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=kv_mask, other=0.0)
        # (BLOCK_R, BLOCK_N), log2 units
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        keep = mask_n[None, :]
        if CAUSAL:                                       # bottom-right alignment
            keep = keep & (cols[None, :] <= L - N_Q + t[:, None])
        s = tl.where(keep, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # rows that have seen no key yet: shift by 0, so that p = exp2(-inf) = 0
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - shift[:, None])
        alpha = tl.exp2(m_i - shift)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=kv_mask, other=0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PREC)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
    # partials by the merge kernel's row, (z·H + h)·Nq + t = zh_kv·G·Nq + r; lse in log2 units
    base = (zh_kv * n_rows + r) * NUM_SPLITS + split
    tl.store(OP + base[:, None] * BLOCK_D + offs_d[None, :], out, mask=in_r[:, None])
    tl.store(LP + base, lse, mask=in_r)


@triton.jit
def _decode_merge(OP, LP, O, stride_oz, stride_oh, stride_om, stride_od, H, N_Q, NUM_SPLITS,
                  HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
    row = tl.program_id(0)
    t = row % N_Q
    zh = row // N_Q
    z, h = zh // H, zh % H
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    mask_s = offs_s < NUM_SPLITS
    lse = tl.load(LP + row * NUM_SPLITS + offs_s, mask=mask_s, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp2(lse - m)                                                 # splits that saw nothing: 0
    part_ptrs = OP + (row * NUM_SPLITS + offs_s[:, None]) * BLOCK_D + offs_d[None, :]
    part = tl.load(part_ptrs, mask=mask_s[:, None], other=0.0)
    total = tl.sum(w, 0)
    out = tl.sum(part * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(O + z * stride_oz + h * stride_oh + t * stride_om + offs_d * stride_od,
             out.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)


def _decode_configs():
    return [triton.Config({"BLOCK_N": bn}, num_warps=w, num_stages=s)
            for bn, w, s in [(64, 4, 2), (128, 4, 2), (64, 2, 3), (128, 8, 2), (32, 4, 3), (256, 8, 2)]]


_decode_partial_tuned = triton.autotune(
    configs=_decode_configs(), key=["HEAD_DIM", "CHUNK", "N_Q", "GROUP", "CAUSAL", "PREC"],
)(_decode_partial)


def triton_decode(q, k, v, num_splits: int, causal: bool = True, scale: float | None = None,
                  tuned: bool = True, block_n: int | None = None) -> torch.Tensor:
    """Split-KV decode with the Triton kernels: partials per (K/V head, split), then the logsumexp merge.

    ``q`` (B, H, Nq, d) against a cache ``k``, ``v`` (B, H_kv, L, d), H_kv dividing H (grouped-query
    attention; H_kv = 1 is multi-query, H_kv = H the usual multi-head): query head h reads K/V head
    h // (H // H_kv), indexed in the kernel, never expanded.  One program serves the whole group: its
    G·Nq query rows (G = H / H_kv query heads, Nq positions each) are the rows of one query tile, so
    each key tile is loaded once per group and multiplied against all of them with one ``tl.dot``,
    which is what makes GQA cheaper to decode (a kernel with one program per query head would read
    the shared K/V once per query head).  Rows beyond 64 take further programs.

    The splits are :func:`effdl.attention.decode.split_chunk`'s with ``block=64``: up to
    ``num_splits`` chunks.  An empty cache (L = 0) gives zeros.
    """
    scale = check_qkv(q, k, v, scale, grouped=True)
    check_triton_device(q)
    if q.shape[-1] != v.shape[-1]:
        raise ValueError(f"the Triton decode kernel needs v's head dim ({v.shape[-1]}) equal to q's ({q.shape[-1]})")
    shape = q.shape
    q4, k4, v4 = _to4d(q), _to4d(k), _to4d(v)
    B, H, nq, d = q4.shape
    h_kv, L = k4.shape[1], k4.shape[2]
    group = H // h_kv
    out = torch.empty_like(q4)
    rows = B * H * nq
    # the library's one split-KV rule, in whole 64-key tiles once chunks reach 64 keys
    chunk = split_chunk(L, num_splits, block=64)
    if rows == 0 or L == 0:                              # L = 0: every row is 0
        return out.zero_().reshape(shape)
    block_d = max(16, triton.next_power_of_2(d))
    # why at least 16 rows: tl.dot's smallest tile; a group of 1-8 rows wastes some of the
    # product, which costs nothing here, since decode waits on memory, not arithmetic
    block_r = min(64, max(16, triton.next_power_of_2(group * nq)))
    programs = B * h_kv * triton.cdiv(group * nq, block_r)
    # program s reads keys [s·chunk, (s+1)·chunk) ∩ [0, L); CHUNK is an autotune key
    num_splits = -(-L // chunk)
    op = torch.empty((rows, num_splits, block_d), dtype=torch.float32, device=q.device)
    lp = torch.empty((rows, num_splits), dtype=torch.float32, device=q.device)
    args = (q4, k4, v4, op, lp, scale * LOG2E, *q4.stride(), *k4.stride(), *v4.stride(),
            h_kv, group, nq, L, chunk, num_splits)
    meta = dict(HEAD_DIM=d, BLOCK_D=block_d, BLOCK_R=block_r, CAUSAL=causal, PREC=_dot_precision(q.dtype))
    grid = (programs, num_splits)
    if block_n is not None or interpreting():
        _decode_partial[grid](*args, BLOCK_N=block_n or 32, **meta)
    elif not tuned:
        _decode_partial[grid](*args, BLOCK_N=64, **meta, num_warps=4, num_stages=2)
    else:
        _decode_partial_tuned[grid](*args, **meta)
    _decode_merge[(rows,)](op, lp, out, *out.stride(), H, nq, num_splits,
                           HEAD_DIM=d, BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(num_splits)))
    return out.reshape(shape)
