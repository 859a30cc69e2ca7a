"""Sizes of the chapter "Fitting in memory" per profile (``effdl.profile.sizes("memory")``).

The model is the shared language model of :mod:`effdl.lm` (its ``target``, sized in
:mod:`effdl.lm.profiles`); the fine-tuning data are C++ headers
(:mod:`effdl.memory.task`).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Sizes:
    models: str                    # the effdl.lm profile of the model
    batches: tuple[int, ...]       # batch sizes of the memory sweep
    seqs: tuple[int, ...]          # sequence lengths of the memory sweep
    batch: int                     # batch of the step comparison
    seq: int                       # sequence length of it and of fine-tuning
    tune_batch: int                # fine-tuning batch
    steps: int                     # fine-tuning steps per method and seed
    seeds: tuple[int, ...]         # fine-tuning seeds
    lr_full: float                 # learning rates, per method (AdamW)
    lr_adapter: float              # LoRA, QLoRA and the side network
    lora_r: int                    # LoRA rank
    qst_reductions: tuple[int, ...]  # QST: side networks d_model / r wide, each r
    header_bytes: int              # C++ header bytes (train + held out)
    eval_windows: int              # held-out windows of every score
    repeat: int                    # interleaved timing rounds
    matmul_tokens: tuple[int, ...]  # rows of x in the dequantize-matmul timing
    offload_layers: int            # the offloading stack: layers,
    offload_d: int                 # their width,
    offload_batch: int             # and the batch and sequence it runs
    offload_seq: int
    offload_ks: tuple[int, ...]    # device slots k of the executor
    threads: int | None = 1
    # why 1 thread on smoke and cpu: see effdl.lm.profiles.Sizes.threads


SIZES = {
    "smoke": Sizes(models="smoke", batches=(1, 2), seqs=(16, 32), batch=2, seq=32,
                   tune_batch=2, steps=3, seeds=(0,), lr_full=1e-3, lr_adapter=3e-3, lora_r=4,
                   qst_reductions=(4,), header_bytes=65_536, eval_windows=2, repeat=2,
                   matmul_tokens=(1, 8), offload_layers=3, offload_d=32,
                   offload_batch=2, offload_seq=16, offload_ks=(1, 2)),
    "cpu": Sizes(models="cpu", batches=(1, 4, 16), seqs=(64, 256), batch=8, seq=256,
                 tune_batch=4, steps=60, seeds=(0, 1), lr_full=3e-3, lr_adapter=1e-2, lora_r=8,
                 qst_reductions=(4, 8), header_bytes=600_000, eval_windows=32, repeat=3,
                 matmul_tokens=(1, 64, 2048), offload_layers=8, offload_d=128,
                 offload_batch=8, offload_seq=256, offload_ks=(1, 2, 3, 4, 8)),
    # a GPU: the gpu-profile model of effdl.lm (6 layers, d 256)
    "gpu": Sizes(models="gpu", batches=(1, 8, 32), seqs=(128, 512), batch=16, seq=512,
                 tune_batch=8, steps=200, seeds=(0, 1, 2), lr_full=1e-3, lr_adapter=5e-3, lora_r=8,
                 qst_reductions=(4, 16), header_bytes=4_000_000, eval_windows=128, repeat=5,
                 matmul_tokens=(1, 64, 4096), offload_layers=16, offload_d=1024,
                 offload_batch=8, offload_seq=512, offload_ks=(1, 2, 3, 4, 16),
                 threads=None),
}


def work(S: Sizes):
    """Dominant work of the chapter's live cells at sizes ``S`` (see
    :mod:`effdl.estimate`): the fine-tuning runs (four methods, a forward and a
    backward each, counted as 6 FLOPs per parameter per token for every method, an
    upper bound for the frozen ones), the step comparison, the memory sweep, and the
    offloading runs; plus the training of the shared model on first use."""
    from effdl.estimate import Work
    from effdl.lm.profiles import SIZES as LM

    c = LM[S.models].target
    params = 12 * c.n_layer * c.d_model ** 2
    ops = 3 * (15 * c.n_layer + 6)                   # small ops per training step

    def steps(n, batch, seq):
        return Work(flops32=6 * params * batch * seq * n, bytes=16 * params * n,
                    ops=ops * n)

    # per seed: three methods for S.steps, each QST variant for about twice as many
    runs = 3 + 2 * len(S.qst_reductions)
    w = runs * len(S.seeds) * steps(S.steps, S.tune_batch, S.seq)
    w += (5 + len(S.qst_reductions)) * (S.repeat + 2) * steps(1, S.batch, S.seq)
    w += sum((steps(1, b, s) for b in S.batches for s in S.seqs), Work())
    p_off = 12 * S.offload_d ** 2 * S.offload_layers
    runs = 1 + 2 * len(S.offload_ks)
    w += Work(flops32=2 * p_off * S.offload_batch * S.offload_seq * runs * (S.repeat + 1),
              bytes=4 * p_off * runs * S.repeat, ops=15 * S.offload_layers * runs)
    tc = LM[S.models].target_train
    w += Work(flops32=6 * params * tc.steps * tc.batch * tc.seq_len,
              ops=ops * tc.steps)
    return w
