"""Train and evaluate the tiny document ViT: a short AdamW loop with a progress bar.

:func:`train` optimises on a fixed set of pages (optionally with a reducer in the loop: the "short
fine-tune" of a compression method); :func:`evaluate` returns accuracy and the mean fraction of
patch tokens a reducer kept.
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from effdl.measure import torch_threads

__all__ = ["train", "evaluate"]


def train(model, images, labels, *, steps: int, batch: int = 64, lr: float = 3e-3, weight_decay: float = 0.05,
          reducer=None, seed: int = 0, time_limit_s: float | None = None, progress: bool = True,
          threads: int | None = None) -> dict:
    """AdamW with linear warm-up and cosine decay for ``steps`` minibatches; returns a log.

    ``time_limit_s`` stops early (the schedule is not stretched) so a slow machine still finishes.
    ``threads``: torch CPU threads while training (None: leave as is; restored afterwards).
    Returns ``{"loss": [...], "steps": done, "seconds": wall}``.
    """
    with torch_threads(threads):
        return _train(model, images, labels, steps=steps, batch=batch, lr=lr,
                      weight_decay=weight_decay, reducer=reducer, seed=seed,
                      time_limit_s=time_limit_s, progress=progress)


def _train(model, images, labels, *, steps, batch, lr, weight_decay, reducer, seed, time_limit_s,
           progress) -> dict:
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"{images.shape[0]} images but {labels.shape[0]} labels")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    gen = torch.Generator().manual_seed(seed)
    dev = next(model.parameters()).device
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    log, t0, n = [], time.perf_counter(), images.shape[0]
    bar = tqdm(range(steps), desc="train", disable=not progress, leave=False)
    for step in bar:
        idx = torch.randint(0, n, (min(batch, n),), generator=gen)
        # why move per batch: the pages stay in host memory (and in the figures); only a batch
        # visits the model's device
        logits = model(images[idx].to(dev), reducer, generator=gen)
        loss = F.cross_entropy(logits, labels[idx].to(dev))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        log.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{sum(log[-10:]) / len(log[-10:]):.3f}")
        if time_limit_s is not None and time.perf_counter() - t0 > time_limit_s:
            break
    model.eval()
    return {"loss": log, "steps": len(log), "seconds": time.perf_counter() - t0}


@torch.no_grad()
def evaluate(model, images, labels, reducer=None, *, batch: int = 256, seed: int = 0) -> dict:
    """Accuracy and mean kept fraction of patch tokens of ``model`` with ``reducer`` on a set."""
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    correct, kept = 0, 0.0
    dev = next(model.parameters()).device
    for i in range(0, images.shape[0], batch):
        logits, info = model(images[i:i + batch].to(dev), reducer, generator=gen, return_info=True)
        correct += int((logits.argmax(-1).cpu() == labels[i:i + batch].cpu()).sum())
        kept += float(info["n_kept"].sum())
    n = images.shape[0]
    return {"accuracy": correct / n, "kept_frac": kept / (n * model.n_patches)}
