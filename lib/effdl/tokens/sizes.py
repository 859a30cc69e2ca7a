"""Sizes of the token-compression chapter per profile (``effdl.profile.sizes("tokens")``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    page: tuple[int, int]          # page (H, W) in pixels
    crop: int                      # sub-image side; pages are cut into (H/crop)*(W/crop) crops
    patch: int                     # ViT patch side
    glyph_px: int                  # text size on the page
    dim: int                       # ViT width, depth, heads
    depth: int
    heads: int
    reduce_at: int                 # the reducer runs before this block
    n_train: int                   # training pages (generated in the notebook, nothing cached)
    n_test: int
    train_steps: int
    train_batch: int
    lr: float
    train_time_limit_s: float      # stop training early on a slow machine
    finetune_steps: int            # short fine-tune with TCC in the loop
    keeps: tuple[float, ...]       # budgets of the trade-off sweep
    bench_batch: int               # the "batch 64" of the latency columns
    repeat: int                    # timing repeats
    cost_tokens: tuple[int, ...]   # token counts of the "why tokens cost" sweep
    kv_tokens: int                 # KV-cache section: the cost model's context length, width, depth
    kv_dim: int
    kv_depth: int
    kv_bits: tuple[int, ...]       # mean bits per value of the KV codec's settings
    kv_windows: int                # held-out windows (of the LM's training length) read
    count_train: int               # the counting task: training and test pages,
    count_test: int
    count_steps: int               # its keep-all training steps,
    count_keeps: tuple[float, ...]  # and the budgets of its sweep
    train_threads: int | None = None  # CPU threads while training (None: as ``threads``); 2 on the
    # 2-core site builder: training's larger ops gain ~20 % from a second thread, timings do not
    threads: int | None = None     # CPU threads for training and timing (None: torch's default).
    # why 1 on `smoke` and `cpu`: tests and the site run on a shared 2-core machine; two threads
    # competing with other processes gave 10x timing outliers, one thread gives steady numbers
    # (and trains as fast there)


SIZES = {
    "smoke": Sizes(
        page=(48, 48), crop=24, patch=8, glyph_px=5, dim=16, depth=3, heads=2, reduce_at=0,
        n_train=96, n_test=32, train_steps=3, train_batch=16, lr=1e-3, train_time_limit_s=20,
        finetune_steps=2, keeps=(0.5,), bench_batch=8, repeat=1, cost_tokens=(16, 64),
        kv_tokens=64, kv_dim=32, kv_depth=2, kv_bits=(4, 6), kv_windows=2, count_train=96, count_test=32, count_steps=3,
        count_keeps=(0.5,), threads=1,
    ),
    "cpu": Sizes(
        page=(96, 96), crop=48, patch=8, glyph_px=5, dim=32, depth=6, heads=2, reduce_at=0,
        n_train=3000, n_test=500, train_steps=200, train_batch=32, lr=1e-3, train_time_limit_s=100,
        finetune_steps=30, keeps=(0.7, 0.5, 0.25), bench_batch=64, repeat=5,
        cost_tokens=(16, 36, 64, 144, 256, 576), kv_tokens=1024, kv_dim=128, kv_depth=4,
        kv_bits=(3, 4, 5, 6, 7, 8), kv_windows=24, count_train=3000, count_test=500,
        count_steps=360, count_keeps=(0.5, 0.35), train_threads=2, threads=1,
    ),
    "gpu": Sizes(
        # sized for a free Colab T4 by effdl.estimate; at 4096 tokens, batch 64,
        # the attention scores alone would take 17 GB
        page=(128, 128), crop=64, patch=8, glyph_px=6, dim=128, depth=8, heads=4, reduce_at=0,
        n_train=4000, n_test=1000, train_steps=800, train_batch=128, lr=1e-3, train_time_limit_s=300,
        finetune_steps=100, keeps=(0.7, 0.5, 0.35, 0.25), bench_batch=32, repeat=20,
        cost_tokens=(64, 256, 1024, 2048), kv_tokens=4096, kv_dim=256, kv_depth=8,
        kv_bits=(3, 4, 5, 6, 7, 8), kv_windows=16, count_train=4000, count_test=1000,
        count_steps=800, count_keeps=(0.7, 0.5, 0.35),
    ),
}


def work(S: Sizes):
    """Dominant work of the chapter's live cells at sizes ``S`` (see :mod:`effdl.estimate`)."""
    from math import ceil

    from effdl.estimate import Work
    from effdl.tokens.vit import block_flops

    n = (S.page[0] // S.patch) * (S.page[1] // S.patch) + 1          # patch tokens + [CLS]

    def forward(pages, tokens=n):                  # scores: written, softmaxed, read (4 passes)
        scores = 4 * 4 * S.heads * tokens * tokens + 10 * 4 * tokens * S.dim
        return Work(flops32=pages * S.depth * block_flops(tokens, S.dim), bytes=pages * S.depth * scores,
                    ops=12 * S.depth)

    def evaluate(pages=S.n_test, batch=256):
        return ceil(pages / batch) * forward(batch)

    # rendering the pages with matplotlib on the host: about 2.5 Python steps per patch
    w = Work(host_steps=2.5 * n * (S.n_train + S.n_test))
    w += (S.train_steps + S.finetune_steps) * 3 * forward(S.train_batch)
    methods = 7                                                        # reducers.REDUCERS
    w += (1 + methods + 6 + 2) * evaluate()                           # keep-all, each method, TCC's knobs
    w += len(S.keeps) * methods * evaluate()                          # the trade-off table's accuracy
    w += (S.repeat + 1) * len(S.keeps) * methods * (4 * forward(1) + forward(S.bench_batch))
    for t in S.cost_tokens:                                            # cost against token count
        w += (S.repeat + 1) * forward(S.bench_batch, t)
    # the counting task: its pages, its training, one-shot and per-layer sweeps (~9 passes/budget)
    w += Work(host_steps=2.5 * n * (S.count_train + S.count_test))
    w += S.count_steps * 3 * forward(S.train_batch)
    w += (1 + 9 * len(S.count_keeps)) * evaluate(S.count_test)
    # the KV-cache section, on the host: the shared LM (at most kv_depth layers of width kv_dim)
    # over kv_windows windows of its training length (at most 512 bytes, effdl.lm.profiles):
    # a prefill, a decode per layer and width (sensitivity), two per codec setting; timings
    window = min(S.kv_tokens, 512)
    passes = S.kv_windows * (2 + 2 * S.kv_depth + 2 * (1 + len(S.kv_bits))) + 2 * S.repeat
    w += Work(host_flops=passes * S.kv_depth * block_flops(window, S.kv_dim, 4.0))
    return w
