"""Training the byte model: AdamW, warmup then cosine decay, random corpus windows.

Everything random comes from ``TrainConfig.seed`` (the initial weights and the windows),
drawn from generators of its own: training twice gives the same model on the same
machine, and the caller's random state is left as it was.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from effdl.lm.data import Corpus, random_windows, unigram_bits_per_byte
from effdl.lm.model import ByteLM, LMConfig

__all__ = ["TrainConfig", "lr_at", "train", "bits_per_byte"]


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch: int                   # windows per step
    seq_len: int                 # bytes per window (<= the model's max_len)
    lr: float = 3e-3             # peak learning rate
    warmup: int = 20             # steps of linear warmup
    min_lr_frac: float = 0.1     # the cosine ends at lr · min_lr_frac
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    eval_bytes: int = 65_536     # held-out bytes scored at the end

    def as_dict(self) -> dict:
        return asdict(self)


def lr_at(step: int, tc: TrainConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup`` steps, then a cosine down to
    lr · min_lr_frac at the last step."""
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    progress = (step - tc.warmup) / max(1, tc.steps - tc.warmup)      # 0 -> 1
    cosine = 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))       # 1 -> 0
    return tc.lr * (tc.min_lr_frac + (1 - tc.min_lr_frac) * cosine)


@torch.no_grad()
def bits_per_byte(model: ByteLM, data: torch.Tensor, seq_len: int | None = None,
                  batch: int = 16) -> float:
    """Mean cross-entropy of ``data`` (1-D byte ids) under ``model``, in bits per byte.

    Windows of ``seq_len`` + 1 bytes (default: the model's max_len + 1) that overlap by
    one byte, so every byte after the first is predicted exactly once, from the bytes
    before it in its window; a tail shorter than a window is left out.
    """
    T = seq_len or model.config.max_len
    if data.ndim != 1 or data.numel() < T + 1:
        raise ValueError(f"data must be a 1-D tensor of at least seq_len + 1 = {T + 1} "
                         f"bytes, got shape {tuple(data.shape)}; pass more data or a "
                         "smaller seq_len")
    n = (data.numel() - 1) // T
    idx = torch.arange(n)[:, None] * T + torch.arange(T + 1)     # (n, T + 1)
    windows = data[idx].long()
    device = model.embed.weight.device
    was_training, total = model.training, 0.0
    model.eval()
    for w in windows.split(batch):
        w = w.to(device)
        logits = model(w[:, :-1])                                 # (b, T, 256)
        total += F.cross_entropy(logits.flatten(0, 1).float(), w[:, 1:].flatten(),
                                 reduction="sum").item()
    model.train(was_training)
    return total / (n * T) / math.log(2)


def _optimizer(model: ByteLM, tc: TrainConfig, device: torch.device):
    """AdamW; weight decay on matrices and embeddings only, not on norm scales."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": tc.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    # why fused on CUDA: one kernel for all parameters instead of several per tensor
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=tc.lr, betas=(0.9, 0.95), fused=fused)


def train(config: LMConfig, tc: TrainConfig, corpus: Corpus, device=None,
          threads: int | str | None = "auto"):
    """Train a fresh :class:`ByteLM`; return ``(model in eval mode, log)``.

    ``log``: ``steps``, ``seconds`` (the training loop), ``tokens`` (bytes seen),
    ``train_loss`` (per step, nats per byte), ``held_out_bpb`` and ``unigram_bpb``
    (the baseline, :func:`effdl.lm.data.unigram_bits_per_byte`) on the first
    ``eval_bytes`` held-out bytes, and where it ran.  ``threads``: CPU threads, as
    :func:`effdl.measure.cpu_thread_policy` takes them (``"auto"``: one thread when the
    machine is oversubscribed; the thread count is restored afterwards).
    """
    from effdl.measure import cpu_thread_policy

    if tc.seq_len > config.max_len:
        raise ValueError(f"seq_len ({tc.seq_len}) exceeds the model's max_len "
                         f"({config.max_len}); shorten the windows or raise max_len")
    device = torch.device(device or "cpu")
    # why a thread policy: on a shared 2-core machine a second busy thread can make
    # every step many times slower (each op waits at a barrier for a descheduled thread)
    with cpu_thread_policy(device, threads) as policy:
        model, log = _train(config, tc, corpus, device)
    log["threads"] = policy["threads_used"]
    return model, log


def _train(config: LMConfig, tc: TrainConfig, corpus: Corpus, device: torch.device):
    with torch.random.fork_rng(devices=[]):      # the caller's random state stays
        torch.manual_seed(tc.seed)
        model = ByteLM(config)
    model.to(device).train()
    opt = _optimizer(model, tc, device)
    gen = torch.Generator().manual_seed(tc.seed)
    # why bf16 autocast on recent GPUs: tensor cores; fp32 elsewhere (no loss scaling)
    amp = device.type == "cuda" and torch.cuda.is_bf16_supported()
    losses = torch.zeros(tc.steps, device=device)
    t0 = time.perf_counter()
    for step in range(tc.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, tc)
        x, y = (t.to(device, non_blocking=True)
                for t in random_windows(corpus.train, tc.batch, tc.seq_len, gen))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            logits = model(x)                                      # (B, T, 256)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        opt.step()
        losses[step] = loss.detach()    # why no .item(): a GPU would wait every step
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    model.eval()
    held = corpus.held_out[:tc.eval_bytes]
    window = min(config.max_len, held.numel() - 1)
    log = {"steps": tc.steps, "seconds": seconds,
           "tokens": tc.steps * tc.batch * tc.seq_len,
           "train_loss": losses.cpu().tolist(),
           "held_out_bpb": bits_per_byte(model, held, window),
           "unigram_bpb": unigram_bits_per_byte(corpus.train, held),
           "device": str(device), "torch": str(torch.__version__)}
    return model, log
