"""Sizes of the attention chapter per profile (``effdl.profile.sizes("attention")``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    batch: int
    heads: int
    head_dim: int
    seq_lens: tuple[int, ...]                 # prefill sweep: naive / tiled / SDPA time and peak memory
    target_N: int                             # the largest N: tiled vs SDPA vs naive compared there
    tile_N: int                               # sequence length of the tile-size sweep
    tiles: tuple[tuple[int, int], ...]        # (block_q, block_k) pairs of the sweep
    matmul_tiles: tuple[int, ...]             # square tile sides of the matmul-efficiency sweep
    grad_N: int                               # backward: gradients and memory, naive vs tiled
    io_N: tuple[int, ...]                     # IO simulator sweeps
    io_d: tuple[int, ...]
    io_M: tuple[int, ...]
    triton_N: int                             # Triton kernel demo (interpreter on the CPU)
    decode_L: tuple[int, ...]                 # decode sweep: cache lengths
    decode_batch: int
    decode_heads: int
    # the GPU suite's prefill sweep (as FlashAttention's benchmarks: a fixed number of tokens per
    # batch and a fixed hidden size, so batch = tokens / N and heads = hidden / d)
    suite_N: tuple[int, ...]
    suite_tokens: int
    suite_hidden: int
    suite_head_dims: tuple[int, ...]          # fp16 sweeps these; bf16 only the largest
    warmup: int
    repeat: int


SIZES = {
    "smoke": Sizes(
        batch=1, heads=2, head_dim=32, seq_lens=(64, 128), target_N=256, tile_N=256,
        tiles=((32, 32), (64, 128), (256, 256)), matmul_tiles=(16, 64), grad_N=96,
        io_N=(64, 128), io_d=(16, 32), io_M=(1024, 4096, 16384), triton_N=40,
        decode_L=(256, 1024), decode_batch=1, decode_heads=2,
        suite_N=(32, 64, 128), suite_tokens=128, suite_hidden=32, suite_head_dims=(8, 16),
        warmup=0, repeat=1,
    ),
    "cpu": Sizes(
        batch=1, heads=4, head_dim=64, seq_lens=(512, 1024, 2048, 4096), target_N=4096, tile_N=2048,
        tiles=((64, 64), (128, 128), (256, 256), (512, 512), (512, 1024), (1024, 1024), (1024, 2048)),
        matmul_tiles=(32, 64, 128, 256, 512, 1024), grad_N=2048,
        io_N=(256, 512, 1024, 2048), io_d=(32, 64, 128), io_M=(1024, 4096, 16384, 65536), triton_N=64,
        decode_L=(4096, 16384, 65536), decode_batch=1, decode_heads=8,
        suite_N=(256, 1024, 4096), suite_tokens=4096, suite_hidden=256, suite_head_dims=(64,),
        warmup=1, repeat=3,
    ),
    "gpu": Sizes(
        # a T4 (15 GiB): naive attention's two N x N fp32 matrices at N = 8192 take 2 x 2 GiB
        batch=1, heads=8, head_dim=64, seq_lens=(1024, 2048, 4096, 8192), target_N=4096,
        # the tile-size lesson runs on the host CPU on every machine: the cpu profile's sizes
        tile_N=2048, tiles=((64, 64), (128, 128), (256, 256), (512, 512), (512, 1024), (1024, 1024)),
        matmul_tiles=(32, 64, 128, 256, 512, 1024), grad_N=2048,
        io_N=(256, 512, 1024, 2048), io_d=(32, 64, 128), io_M=(1024, 4096, 16384, 65536), triton_N=1024,
        decode_L=(4096, 32768, 131072), decode_batch=1, decode_heads=8,
        suite_N=(1024, 4096, 16384), suite_tokens=16384, suite_hidden=2048, suite_head_dims=(64, 128),
        warmup=3, repeat=10,
    ),
}


def work(S: Sizes):
    """Dominant work of the chapter's live cells at sizes ``S`` (see :mod:`effdl.estimate`)."""
    from math import ceil

    from effdl.attention.tiled import DEFAULT_BLOCK_K, DEFAULT_BLOCK_Q
    from effdl.estimate import Work

    B, H, d = S.batch, S.heads, S.head_dim
    reps = S.warmup + S.repeat + 1                      # + one peak-memory run

    def fused(N, causal=False):                         # SDPA: O(N d) traffic
        return Work(flops32=4 * B * H * N * N * d * (0.5 if causal else 1), bytes=16 * B * H * N * d, ops=4)

    def naive(N):                                        # S and P: written once, read once
        return Work(flops32=4 * B * H * N * N * d, bytes=16 * B * H * N * N, ops=6)

    def tiled(N, bq=DEFAULT_BLOCK_Q, bk=DEFAULT_BLOCK_K, causal=False, host=False):
        steps = ceil(N / bq) * ceil(N / bk) * (0.6 if causal else 1)
        f = 4 * B * H * N * N * d * (0.5 if causal else 1)
        return Work(host_flops=f, host_steps=12 * steps) if host else \
            Work(flops32=f, bytes=8 * B * H * N * d * ceil(N / bk), ops=12 * steps)

    w = Work()
    for N in S.seq_lens:                                 # section 1: naive vs SDPA
        w += reps * (naive(N) + fused(N))
    for N in sorted(set(S.seq_lens) | {S.target_N}):     # section 2: the three, both masks
        for c in (False, True):
            w += reps * (naive(N) + tiled(N, causal=c) + fused(N, c))
    # the interleaved comparison: naive, the textbook loop (128 x 128 tiles), tiled, SDPA
    w += (S.repeat + 3) * (naive(S.target_N) + tiled(S.target_N) + tiled(S.target_N, 128, 128)
                           + fused(S.target_N))
    # section 6 on a GPU: fp16 prefill at target_N, tiled + Triton + four SDPA backends, both masks
    w += reps * 2 * (tiled(S.target_N) + 5 * fused(S.target_N))
    for bq, bk in S.tiles:                               # the CPU appendix, on the host
        w += 2 * reps * tiled(S.tile_N, bq, bk, host=True)
    for b in S.matmul_tiles:
        w += 2 * reps * Work(host_flops=2 * H * 2 ** 22 * d, host_steps=max(1, 2 ** 22 // (b * b)))
    w += reps * 3 * (naive(S.grad_N) + tiled(S.grad_N))  # backward: about twice the forward again
    for L in S.decode_L:                                 # decode: K and V read once per impl
        w += 3 * reps * Work(bytes=2 * S.decode_batch * S.decode_heads * L * d * 4, ops=20)
    w += Work(host_steps=4 * len(S.io_d) * len(S.io_M) * sum((N / 32) ** 2 for N in S.io_N))  # simulator
    return w
