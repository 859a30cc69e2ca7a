"""Triton kernels: FlashAttention-2 forward (prefill) and split-KV decoding (Flash-Decoding).

Imported lazily (``effdl.attention.triton_attention`` imports this module on first call), so the
package works without Triton or a GPU.  Runs on CUDA sm_80+ (autotuned), or on the CPU under
``TRITON_INTERPRET=1`` (one small fixed configuration; fp32/fp16 only: the interpreter's bf16 is broken).

Speed tricks, each with its reason:

- ``exp2`` instead of ``exp``: the scale is folded into ``log2(e)·scale`` once, and ``exp2`` is the
  GPU's native special-function instruction (``exp`` is ``exp2`` plus a multiply per element);
- two loops per query tile: the tiles fully left of the diagonal run with no mask at all, only the
  few tiles crossing the diagonal or the sequence end pay for masking; tiles right of the diagonal
  are never visited (causal tile skipping), and the heaviest query tiles of a causal run start first;
- fp32 accumulators and statistics, P cast to the input dtype for the second tensor-core product;
- decode: one program per (sequence, head, query, key chunk) with enough chunks to give every SM
  many programs — the memory system, not the arithmetic, is the limit — then a small merge kernel.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

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


class TritonAttentionFunction(torch.autograd.Function):
    """Triton forward; backward recomputes P tile by tile in PyTorch from the saved logsumexp."""

    @staticmethod
    def forward(ctx, q, k, v, causal, scale, tuned=True):
        out, lse = attention_forward(q, k, v, causal, scale, tuned)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.args = (causal, scale)
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        causal, scale = ctx.args
        dq, dk, dv = flash2_backward(q, k, v, out, lse, dout, causal, scale)
        return dq, dk, dv, None, None, None


def triton_attention(q, k, v, causal: bool = False, scale: float | None = None, tuned: bool = True) -> torch.Tensor:
    """Exact attention with the Triton FlashAttention-2 forward kernel (SDPA-shaped tensors)."""
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
                    H, N_Q, L, CHUNK, NUM_SPLITS,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                    CAUSAL: tl.constexpr):
    row = tl.program_id(0)                                               # (z, h, t) flattened
    split = tl.program_id(1)
    t = row % N_Q
    zh = row // N_Q
    z, h = zh // H, zh % H
    offs_d = tl.arange(0, BLOCK_D)
    mask_d = offs_d < HEAD_DIM
    q = tl.load(Q + z * stride_qz + h * stride_qh + t * stride_qm + offs_d * stride_qd, mask=mask_d, other=0.0)
    q = q.to(tl.float32) * qk_scale
    start = split * CHUNK
    end = tl.minimum(start + CHUNK, L)
    if CAUSAL:
        end = tl.minimum(end, L - N_Q + t + 1)                           # bottom-right alignment
    k_base = K + z * stride_kz + h * stride_kh
    v_base = V + z * stride_vz + h * stride_vh
    offs_n = tl.arange(0, BLOCK_N)
    m_i = tl.zeros([1], dtype=tl.float32) - float("inf")
    l_i = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + offs_n
        mask_n = cols < end
        k = tl.load(k_base + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        s = tl.sum(k.to(tl.float32) * q[None, :], 1)                     # (BLOCK_N,): memory-bound, no MMA
        s = tl.where(mask_n, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 0))
        p = tl.exp2(s - m_new)
        alpha = tl.exp2(m_i - m_new)
        v = tl.load(v_base + cols[:, None] * stride_vn + offs_d[None, :] * stride_vd,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        l_i = l_i * alpha + tl.sum(p, 0)
        acc = acc * alpha + tl.sum(p[:, None] * v.to(tl.float32), 0)
        m_i = m_new
    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)
    lse = tl.where(empty, float("-inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))   # log2 units
    base = row * NUM_SPLITS + split
    tl.store(OP + base * BLOCK_D + offs_d, out)
    tl.store(LP + base + tl.arange(0, 1), lse)


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
    configs=_decode_configs(), key=["HEAD_DIM", "CHUNK", "N_Q", "CAUSAL"],
)(_decode_partial)


def triton_decode(q, k, v, num_splits: int, causal: bool = True, scale: float | None = None,
                  tuned: bool = True, block_n: int | None = None) -> torch.Tensor:
    """Split-KV decode with the Triton kernels: partials per (row, split), then the logsumexp merge.

    The splits are :func:`effdl.attention.decode.split_chunk`'s with ``block=64``: up to
    ``num_splits`` chunks.  An empty cache (L = 0) gives zeros.
    """
    scale = check_qkv(q, k, v, scale)
    check_triton_device(q)
    if q.shape[-1] != v.shape[-1]:
        raise ValueError(f"the Triton decode kernel needs v's head dim ({v.shape[-1]}) equal to q's ({q.shape[-1]})")
    shape = q.shape
    q4, k4, v4 = _to4d(q), _to4d(k), _to4d(v)
    B, H, nq, d = q4.shape
    L = k4.shape[2]
    out = torch.empty_like(q4)
    rows = B * H * nq
    # the library's one split-KV rule, in whole 64-key tiles once chunks reach 64 keys
    chunk = split_chunk(L, num_splits, block=64)
    if rows == 0 or L == 0:                              # L = 0: every row is 0
        return out.zero_().reshape(shape)
    block_d = max(16, triton.next_power_of_2(d))
    # program s reads keys [s·chunk, (s+1)·chunk) ∩ [0, L); CHUNK is an autotune key
    num_splits = -(-L // chunk)
    op = torch.empty((rows, num_splits, block_d), dtype=torch.float32, device=q.device)
    lp = torch.empty((rows, num_splits), dtype=torch.float32, device=q.device)
    args = (q4, k4, v4, op, lp, scale * LOG2E, *q4.stride(), *k4.stride(), *v4.stride(),
            H, nq, L, chunk, num_splits)
    if block_n is not None or interpreting():
        _decode_partial[(rows, num_splits)](*args, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_N=block_n or 32, CAUSAL=causal)
    elif not tuned:
        _decode_partial[(rows, num_splits)](*args, HEAD_DIM=d, BLOCK_D=block_d, BLOCK_N=64, CAUSAL=causal,
                                            num_warps=4, num_stages=2)
    else:
        _decode_partial_tuned[(rows, num_splits)](*args, HEAD_DIM=d, BLOCK_D=block_d, CAUSAL=causal)
    _decode_merge[(rows,)](op, lp, out, *out.stride(), H, nq, num_splits,
                           HEAD_DIM=d, BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(num_splits)))
    return out.reshape(shape)
