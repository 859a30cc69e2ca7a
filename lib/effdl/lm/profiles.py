"""Sizes of the shared language models per profile (``effdl.lm.profiles.sizes()``).

Why not ``effdl/lm/sizes.py``: a package with a ``sizes`` module is a chapter by the
chapter contract (:mod:`effdl.chapters`), and ``effdl.lm`` is a library the chapters
share, not a chapter.  The table follows the chapters' pattern all the same: one frozen
dataclass per profile, read through :func:`sizes`.

Two models per profile, of one family (same vocabulary, context and code): the
``target``, and a smaller ``draft`` for speculative decoding.
"""

from __future__ import annotations

from dataclasses import dataclass

from effdl.lm.model import LMConfig
from effdl.lm.train import TrainConfig

__all__ = ["Sizes", "SIZES", "sizes"]


@dataclass(frozen=True)
class Sizes:
    corpus_bytes: int            # train + held out, bytes of standard-library source
    target: LMConfig
    draft: LMConfig
    target_train: TrainConfig
    draft_train: TrainConfig
    # CPU threads while training, as effdl.measure.cpu_thread_policy takes them.  Why 1
    # on small machines: the site is built with other notebooks running, and there a
    # second thread made each step up to 7x slower (ops wait at a barrier for a
    # descheduled thread) where, on an idle machine, it saves less than half
    threads: int | str | None


SIZES = {
    # seconds on a 2-core CPU, every code path (GQA in the target, MHA in the draft)
    "smoke": Sizes(
        corpus_bytes=262_144,
        target=LMConfig(n_layer=2, n_head=4, n_kv_head=2, d_model=48, max_len=64),
        draft=LMConfig(n_layer=1, n_head=2, d_model=32, max_len=64),
        target_train=TrainConfig(steps=100, batch=8, seq_len=64, lr=5e-3, warmup=10,
                                 eval_bytes=16_384),
        draft_train=TrainConfig(steps=100, batch=8, seq_len=64, lr=5e-3, warmup=10,
                                eval_bytes=16_384),
        threads=1,
    ),
    # both models within about 3 minutes on 2 CPU cores
    "cpu": Sizes(
        corpus_bytes=4_000_000,
        # max_len 512, trained on 256: the inference chapter times generations up to
        # 512 tokens (RoPE has no table to outgrow; text past 256 is less well predicted)
        target=LMConfig(n_layer=4, n_head=4, n_kv_head=2, d_model=128, max_len=512),
        draft=LMConfig(n_layer=2, n_head=2, d_model=64, max_len=512),
        target_train=TrainConfig(steps=340, batch=8, seq_len=256, lr=3e-3, warmup=30,
                                 eval_bytes=65_536),
        draft_train=TrainConfig(steps=300, batch=8, seq_len=256, lr=3e-3, warmup=30,
                                eval_bytes=65_536),
        threads=1,
    ),
    # a GPU: the whole standard library (less than corpus_bytes), a deeper and wider
    # target with a longer context.  Sized for a T4 (no bf16, so fp32): ~1.2 PFLOP for
    # the target, about 5 minutes at half of its 8 TFLOP/s (an estimate, not measured)
    "gpu": Sizes(
        corpus_bytes=16_000_000,
        target=LMConfig(n_layer=6, n_head=4, n_kv_head=2, d_model=256, max_len=512),
        draft=LMConfig(n_layer=2, n_head=2, d_model=128, max_len=512),
        target_train=TrainConfig(steps=2000, batch=32, seq_len=512, lr=2e-3,
                                 warmup=100, eval_bytes=1_048_576),
        draft_train=TrainConfig(steps=2000, batch=32, seq_len=512, lr=3e-3,
                                warmup=100, eval_bytes=1_048_576),
        threads="auto",                   # (a GPU run sets no CPU threads)
    ),
}


def sizes(profile: str | None = None) -> Sizes:
    """The table of ``profile`` (default: :func:`effdl.profile.current`)."""
    from effdl.profile import current

    return SIZES[current(profile)]
