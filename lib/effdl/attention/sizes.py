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
        batch=1, heads=8, head_dim=64, seq_lens=(1024, 2048, 4096, 8192), target_N=4096, tile_N=4096,
        tiles=((64, 64), (128, 128), (256, 256), (512, 512), (1024, 1024), (2048, 2048)),
        matmul_tiles=(64, 128, 256, 512, 1024, 2048), grad_N=2048,
        io_N=(256, 512, 1024, 2048), io_d=(32, 64, 128), io_M=(1024, 4096, 16384, 65536), triton_N=1024,
        decode_L=(4096, 32768, 131072), decode_batch=1, decode_heads=8,
        suite_N=(1024, 4096, 16384), suite_tokens=16384, suite_hidden=2048, suite_head_dims=(64, 128),
        warmup=3, repeat=10,
    ),
}
