"""Sizes of the measuring chapter, per profile (read them with ``effdl.profile.sizes("measuring")``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    # timing
    warmup: int                     # untimed calls before every measurement
    repeat: int                     # timed calls per measurement
    peak_repeat: int                # timed calls of the peak matmul / copy (the fastest one counts)
    single_shots: int               # single host-clock timings drawn to show run-to-run noise
    cache_fractions: tuple[float, ...]  # buffers summed warm and cold, as fractions of the last-level cache
    cache_rounds: int               # interleaved rounds of the warm-vs-cold comparison
    # profiling
    profile_mlp: tuple[int, int, int]   # (width, depth, batch) of the profiled training step
    profile_steps: int              # steps recorded by the profiler (after one warm-up step)
    # roofline of this machine
    peak_matmul_n: int              # square fp32 matmul that measures peak compute
    copy_mib: int                   # buffer copied / read to measure memory bandwidth (MiB, ≫ last-level cache)
    matmul_sizes: tuple[int, ...]   # square matmuls placed on the roofline
    elementwise_numel: int          # elements of the add and sum kernels (keep 4·numel bytes > last-level cache)
    softmax_shape: tuple[int, int]  # (rows, cols) of the softmax kernel (also larger than the cache)
    attention: tuple[int, int, int, int]    # (batch, heads, seq, head_dim) of the naive-attention kernel
    # memory
    mlp_width: int                  # width of the MLP used for parameters vs activations
    mlp_depth: int
    mlp_batches: tuple[int, ...]    # batch sizes at which its training step's peak memory is measured
    attention_mem_seqs: tuple[int, ...]     # sequence lengths of the naive-attention memory sweep
    # fewer FLOPs is not faster
    conv: tuple[int, int, int]      # (batch, channels, height=width) of the convolution case
    gelu_numel: int                 # elements of the fused-vs-unfused GELU case
    # overheads outside the model
    pipeline_images: int            # images in one request batch of the serving pipeline
    pipeline_raw_size: int          # side of the raw (encoded) images
    # time-to-result
    ttr_batches: tuple[int, ...]    # batch sizes compared on time-to-accuracy
    ttr_target: float               # test accuracy that counts as "done"
    ttr_max_epochs: int
    ttr_seeds: tuple[int, ...]      # each batch size is trained once per seed; the median time is reported
    ttr_lrs: tuple[float, ...]      # learning rates tried for each batch size (the first: the single
                                    # rate); geometric, up to (largest batch / smallest) × the first
    ttr_fresh_seeds: tuple[int, ...]  # seeds the tuned rate is reported on (the tuning, on
                                      # ttr_seeds, never saw them)


SIZES = {
    "smoke": Sizes(
        warmup=1, repeat=3, peak_repeat=3, single_shots=12,
        cache_fractions=(0.5,), cache_rounds=3, profile_mlp=(64, 1, 16), profile_steps=2,
        peak_matmul_n=256, copy_mib=8, matmul_sizes=(16, 64, 128), elementwise_numel=1 << 16,
        softmax_shape=(64, 128), attention=(1, 2, 128, 32),
        mlp_width=64, mlp_depth=2, mlp_batches=(8, 32), attention_mem_seqs=(64, 128, 256),
        conv=(1, 16, 16), gelu_numel=1 << 14,
        pipeline_images=8, pipeline_raw_size=64,
        ttr_batches=(16, 256), ttr_target=0.5, ttr_max_epochs=2, ttr_seeds=(0,),
        ttr_lrs=(0.05, 0.2, 0.8), ttr_fresh_seeds=(1,),
    ),
    "cpu": Sizes(
        warmup=2, repeat=11, peak_repeat=15, single_shots=40,
        cache_fractions=(0.125, 0.5, 2.0), cache_rounds=15, profile_mlp=(256, 2, 64), profile_steps=8,
        peak_matmul_n=1024, copy_mib=64, matmul_sizes=(8, 32, 128, 512, 1024),
        elementwise_numel=1 << 24, softmax_shape=(8192, 1024), attention=(1, 4, 1024, 64),
        mlp_width=512, mlp_depth=4, mlp_batches=(64, 256, 1024, 2048),
        attention_mem_seqs=(256, 512, 1024, 2048),
        conv=(8, 128, 28), gelu_numel=1 << 22,
        pipeline_images=64, pipeline_raw_size=256,
        ttr_batches=(16, 128, 1024), ttr_target=0.95, ttr_max_epochs=60, ttr_seeds=(0, 1, 2),
        ttr_lrs=(0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2), ttr_fresh_seeds=(3, 4, 5),
    ),
    "gpu": Sizes(
        warmup=5, repeat=20, peak_repeat=20, single_shots=60,
        cache_fractions=(0.125, 0.5, 2.0), cache_rounds=20, profile_mlp=(1024, 4, 256), profile_steps=8,
        peak_matmul_n=8192, copy_mib=1024, matmul_sizes=(64, 256, 1024, 4096, 8192),
        elementwise_numel=1 << 26, softmax_shape=(16384, 4096), attention=(4, 16, 4096, 64),
        mlp_width=2048, mlp_depth=8, mlp_batches=(256, 1024, 4096, 8192),
        attention_mem_seqs=(1024, 2048, 4096, 8192),
        conv=(64, 256, 56), gelu_numel=1 << 26,
        pipeline_images=64, pipeline_raw_size=256,
        ttr_batches=(16, 128, 1024), ttr_target=0.95, ttr_max_epochs=60, ttr_seeds=(0, 1, 2),
        ttr_lrs=(0.05, 0.1, 0.2, 0.4, 0.8, 1.6, 3.2), ttr_fresh_seeds=(3, 4, 5),
    ),
}


def work(S: Sizes):
    """Dominant work of the chapter's live cells at sizes ``S`` (see :mod:`effdl.estimate`)."""
    from math import ceil

    from effdl.estimate import Work

    reps = S.warmup + S.repeat

    def matmul(n, times):
        return times * Work(flops32=2 * n ** 3, bytes=12 * n * n, ops=1)

    def attention(b, h, n, d, times):                    # naive: S and P written and read
        return times * Work(flops32=4 * b * h * n * n * d, bytes=16 * b * h * n * n, ops=6)

    w = matmul(S.matmul_sizes[-2], S.single_shots + reps)                 # timers and clocks
    llc = 64 * 2 ** 20      # the cache flushed (effdl.measure's fallback: errs on the long side)
    w += sum(((S.cache_rounds + 2) * Work(bytes=2 * f * llc + 2 * 2 * llc, ops=3)  # warm vs cold
              for f in S.cache_fractions), Work())
    pw, pd, pb = S.profile_mlp                                            # the profiled steps
    w += (S.profile_steps + 1) * Work(flops32=6 * pb * pw * pw * pd, ops=30 * pd + 2 * pb,
                                      host_steps=50 * (pd + pb))
    r, c = S.softmax_shape
    w += 4 * S.repeat * Work(bytes=2 * 6 * r * c * 4, ops=6)              # softmax: five ops vs one
    w += 2 * S.repeat * Work(bytes=2 * 3 * r * c * 4, ops=2)              # fresh output vs out=
    w += sum((3 * Work(flops32=2 * b * S.mlp_width ** 2 * S.mlp_depth, ops=8 * S.mlp_depth)
              for b in S.mlp_batches), Work())                            # training memory
    b, h, _, d = S.attention
    w += sum((attention(b, h, n, d, 1) for n in S.attention_mem_seqs), Work())
    w += matmul(S.peak_matmul_n, S.warmup + S.peak_repeat)                # the roofline's peaks
    w += (S.warmup + S.peak_repeat) * Work(bytes=2 * S.copy_mib * 2 ** 20, ops=1)
    w += sum((matmul(n, reps + 1) for n in S.matmul_sizes), Work())       # kernels on the roofline
    w += (reps + 1) * Work(bytes=16 * S.elementwise_numel, ops=2)
    w += attention(*S.attention, reps + 1) + matmul(512, reps)
    bc, ch, hw = S.conv                                                   # four convolutions
    w += reps * Work(flops32=2 * bc * ch * ch * hw * hw * 9 * 1.3, bytes=4 * 4 * bc * ch * hw * hw, ops=8)
    w += reps * Work(bytes=(18 + 2 + 2) * 4 * S.gelu_numel, ops=10)       # GELU 8 kernels, 1, tanh
    # the serving pipeline, on the host on every machine: PNG encoding of the requests once
    # (~26 ms an image, cached), then per timed call of decode and of end_to_end a PNG
    # decode (~4.4 ms an image), a resize and normalization per image; 2 versions, then
    # their end-to-end calls interleaved
    step_us = 2.0                                       # effdl.estimate.T4.host_step_us
    per_image = (4400 + 300) / step_us                  # decode + preprocess, in host steps
    reps_p = max(3, S.repeat // 2)
    calls = 2 * (2 * (S.warmup + reps_p) + 1) + 2 * (1 + reps_p)  # + end to end, paired
    w += Work(host_steps=26000 / step_us * S.pipeline_images)
    w += calls * Work(host_steps=per_image * S.pipeline_images,
                      host_flops=50 * S.pipeline_images * S.pipeline_raw_size ** 2)
    # time to result: an MLP on the digits (1437 training samples) on the host (an upper
    # bound: runs stop at the accuracy): every rate of the grid (the first is the single
    # rate), then the best again on fresh seeds
    runs = len(S.ttr_seeds) * len(S.ttr_lrs) + len(S.ttr_fresh_seeds)
    w += sum((Work(host_steps=12 * ceil(int(0.8 * 1797) / bt) * S.ttr_max_epochs * runs)
              for bt in S.ttr_batches), Work())
    return w
