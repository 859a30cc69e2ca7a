"""Cases where the obvious metric lies.

- Fewer FLOPs is not faster: dense vs grouped vs depthwise convolution (:func:`conv_case`); the same
  GELU as eight small kernels or one fused kernel (:func:`fusion_case`).
- The model is not the whole job: an image-serving pipeline where decoding, resizing, Python
  dispatch and post-processing take most of the time (:func:`make_pipeline`, :func:`stage_times`).
- A faster step is not a faster result: time-to-accuracy at several batch sizes (:func:`time_to_accuracy`,
  :func:`time_to_result`), with the learning rate tuned for each (:func:`tuned_time_to_result`).
"""

from __future__ import annotations

import functools
import io
import math
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from effdl.measure import benchmark, count_flops, resolve_device
from effdl.measuring.roofline import arithmetic_intensity, bytes_per_element, elementwise_bytes

__all__ = [
    "conv_flops", "conv_variants", "conv_case", "gelu_unfused", "gelu_fused", "fusion_case",
    "make_requests", "make_pipeline", "stage_times", "time_to_accuracy", "time_to_result",
    "tuned_time_to_result", "rank_by_time",
]


# --------------------------------------------------------------------------------------------------
# Fewer FLOPs is not faster
# --------------------------------------------------------------------------------------------------
def conv_flops(batch: int, c_in: int, c_out: int, hw: int, kernel: int = 3, groups: int = 1) -> int:
    """A same-padded, stride-1 convolution: each output value is a dot product of length
    (c_in / groups) · kernel², one multiply and one add per term."""
    if c_in % groups or c_out % groups:
        raise ValueError(f"channels ({c_in}, {c_out}) must be divisible by groups={groups}")
    return 2 * batch * c_out * hw * hw * (c_in // groups) * kernel * kernel


def conv_variants(batch: int, channels: int, hw: int, device=None, dtype=torch.float32, seed: int = 0):
    """Four ways to mix a (batch, C, hw, hw) feature map with a 3×3 window.

    Returns ``{name: (fn, flops_by_hand, min_bytes)}``: dense (groups=1), grouped (groups=8),
    depthwise (groups=C), and depthwise-separable (depthwise 3×3 then a dense 1×1).
    """
    dev = resolve_device(device)
    g = torch.Generator().manual_seed(seed)
    e = bytes_per_element(dtype)
    x = torch.randn(batch, channels, hw, hw, generator=g).to(dev, dtype)
    act = x.numel() * e  # one feature map
    out: dict[str, tuple[Callable[[], Any], int, int]] = {}
    for name, groups in (("dense", 1), ("grouped (g=8)", min(8, channels)), ("depthwise", channels)):
        w = (torch.randn(channels, channels // groups, 3, 3, generator=g) * 0.1).to(dev, dtype)
        out[name] = (lambda w=w, groups=groups: F.conv2d(x, w, padding=1, groups=groups),
                     conv_flops(batch, channels, channels, hw, 3, groups), 2 * act + w.numel() * e)
    w_dw = (torch.randn(channels, 1, 3, 3, generator=g) * 0.1).to(dev, dtype)
    w_pw = (torch.randn(channels, channels, 1, 1, generator=g) * 0.1).to(dev, dtype)
    out["depthwise-separable"] = (
        lambda: F.conv2d(F.conv2d(x, w_dw, padding=1, groups=channels), w_pw),
        conv_flops(batch, channels, channels, hw, 3, channels) + conv_flops(batch, channels, channels, hw, 1),
        4 * act + (w_dw.numel() + w_pw.numel()) * e,
    )
    return out


def conv_case(S, device=None, *, warmup: int | None = None, repeat: int | None = None) -> list[dict]:
    """Time the four convolutions; rows with FLOPs (by hand and counted), time and achieved GFLOP/s."""
    b, c, hw = S.conv
    rows = []
    for name, (fn, flops, nbytes) in conv_variants(b, c, hw, device).items():
        res = benchmark(fn, warmup=warmup or S.warmup, repeat=repeat or S.repeat, device=device)
        rows.append(dict(case="conv", kernel=name, flops=flops, flops_counted=count_flops(fn), bytes=nbytes,
                         intensity=arithmetic_intensity(flops, nbytes), ms=res.median_ms, ms_iqr=res.iqr_ms,
                         gflops=flops / res.median_ms / 1e6))
    dense = rows[0]
    for r in rows:
        r["flops_vs_dense"] = r["flops"] / dense["flops"]
        r["time_vs_dense"] = r["ms"] / dense["ms"]
    return rows


_C = math.sqrt(2.0 / math.pi)


def gelu_unfused(x: torch.Tensor) -> torch.Tensor:
    """GELU (tanh form) written op by op: eight kernels, each reading and writing the
    whole tensor."""
    inner = x + 0.044715 * x.pow(3)                 # pow, mul, add
    return 0.5 * x * (1.0 + torch.tanh(_C * inner))  # mul, tanh, add, mul, mul


def gelu_fused(x: torch.Tensor) -> torch.Tensor:
    """The same function as one kernel: read x once, write the result once."""
    return F.gelu(x, approximate="tanh")


#: per element: pow (2 multiplies), ×0.0447, +, ×√(2/π), tanh (counted 1), +1, ×x, ×0.5
GELU_FLOPS_PER_ELEMENT = 9
#: kernels of gelu_unfused and (inputs + outputs) each touches, in elements per element of x
GELU_UNFUSED_ACCESSES = 2 + 2 + 3 + 2 + 2 + 2 + 3 + 2  # pow, mul, add, mul, tanh, add, mul, mul


def fusion_case(S, device=None, *, warmup: int | None = None, repeat: int | None = None) -> list[dict]:
    """The same FLOPs, different traffic: the unfused GELU moves ~9× the bytes of the fused one."""
    dev = resolve_device(device)
    n = S.gelu_numel
    x = torch.randn(n, device=dev)
    e = x.element_size()
    rows = []
    for name, fn, nbytes in (("GELU, 8 kernels", lambda: gelu_unfused(x), GELU_UNFUSED_ACCESSES * n * e),
                             ("GELU, fused", lambda: gelu_fused(x), elementwise_bytes(n, 1, 1, e))):
        res = benchmark(fn, warmup=warmup or S.warmup, repeat=repeat or S.repeat, device=dev)
        flops = GELU_FLOPS_PER_ELEMENT * n
        rows.append(dict(case="fusion", kernel=name, flops=flops, bytes=nbytes,
                         intensity=arithmetic_intensity(flops, nbytes), ms=res.median_ms, ms_iqr=res.iqr_ms,
                         gflops=flops / res.median_ms / 1e6, gbs=nbytes / res.median_ms / 1e6))
    return rows


# --------------------------------------------------------------------------------------------------
# The model is not the whole job: a small image-classification service
# --------------------------------------------------------------------------------------------------
def make_requests(n: int, size: int, seed: int = 0) -> list[bytes]:
    """``n`` PNG-encoded RGB images of ``size``×``size`` (smooth random pictures): what a client sends."""
    import numpy as np
    from PIL import Image

    if n < 1 or size < 8:
        raise ValueError(f"need n >= 1 images of size >= 8, got n={n}, size={size}")
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((size, size), Image.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(buf.getvalue())
    return out


def _small_cnn(width: int = 32, n_classes: int = 10, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, width, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(width, 2 * width, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(2 * width, 2 * width, 3, padding=1), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(2 * width, n_classes),
    ).eval()


_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
LABELS = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def make_pipeline(
    n_images: int,
    raw_size: int,
    *,
    input_size: int = 32,
    batched: bool = True,
    model_width: int = 16,
    device=None,
    seed: int = 0,
) -> dict[str, Callable[[], Any]]:
    """The four stages of serving one request batch, each a zero-argument callable.

    ``decode`` (PNG bytes → pixels), ``preprocess`` (resize, to tensor, normalize — per
    image, as typical serving code does), ``model`` (a small CNN; ``batched=False``
    calls it once per image, paying Python and dispatch overhead per call;
    ``model_width`` sets its channels), ``postprocess`` (top-1 label and score per
    image).
    Each stage runs on the previous stage's output computed once here, so each can be
    timed alone; ``end_to_end`` runs all four in order.
    """
    import numpy as np
    from PIL import Image

    dev = resolve_device(device)
    requests = make_requests(n_images, raw_size, seed)
    net = _small_cnn(model_width, seed=seed).to(dev)

    def decode(reqs=requests):
        return [Image.open(io.BytesIO(b)).convert("RGB") for b in reqs]

    def preprocess(images=None):
        images = decoded if images is None else images
        out = []
        for img in images:  # per image, as a request handler does
            arr = (
                np.asarray(
                    img.resize((input_size, input_size), Image.BILINEAR),
                    dtype=np.float32,
                )
                / 255.0
            )
            t = torch.from_numpy(arr).permute(2, 0, 1)
            out.append((t - _MEAN) / _STD)
        return torch.stack(out).to(dev)

    @torch.no_grad()
    def model(x=None):
        x = batch if x is None else x
        if batched:
            return net(x)
        return torch.cat([net(x[i:i + 1]) for i in range(x.shape[0])])

    def postprocess(logits=None):
        logits = scores if logits is None else logits
        p = torch.softmax(logits.float(), dim=-1).cpu()
        return [
            {"label": LABELS[int(i)], "score": round(float(s), 4)}
            for s, i in zip(*p.max(dim=-1))
        ]

    decoded = decode()
    batch = preprocess(decoded)
    scores = model(batch)

    def end_to_end():
        return postprocess(model(preprocess(decode())))

    return {
        "decode": decode,
        "preprocess": preprocess,
        "model": model,
        "postprocess": postprocess,
        "end_to_end": end_to_end,
    }


def stage_times(stages: Mapping[str, Callable[[], Any]], *, warmup: int = 2, repeat: int = 5,
                device=None) -> list[dict]:
    """Median time of each stage (``end_to_end`` excluded from the shares) and its share of the total."""
    rows = []
    for name, fn in stages.items():
        res = benchmark(fn, warmup=warmup, repeat=repeat, device=device)
        rows.append(dict(stage=name, ms=res.median_ms, ms_iqr=res.iqr_ms))
    total = sum(r["ms"] for r in rows if r["stage"] != "end_to_end")
    for r in rows:
        r["share"] = r["ms"] / total if r["stage"] != "end_to_end" else float("nan")
    return rows


# --------------------------------------------------------------------------------------------------
# A faster step is not a faster result
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def _digits_tensors():
    from sklearn.datasets import load_digits

    d = load_digits()
    return torch.tensor(d.data, dtype=torch.float32) / 16.0, torch.tensor(d.target)


def _digits(seed: int = 0):
    x, y = _digits_tensors()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    cut = int(0.8 * len(y))
    tr, te = perm[:cut], perm[cut:]
    return x[tr], y[tr], x[te], y[te]


def time_to_accuracy(batch_size: int, *, lr: float = 0.05, target: float = 0.95,
                     max_epochs: int = 60, max_seconds: float | None = None,
                     hidden: int = 128, seed: int = 0) -> dict:
    """Train an MLP on sklearn's digits with SGD until test accuracy ≥ ``target``.

    Returns wall-clock seconds to the target (training plus the per-epoch evaluation;
    ``None`` if it was not reached within ``max_epochs`` epochs or ``max_seconds``
    seconds, or if the loss diverged), epochs and steps taken, training throughput
    (samples/s over the training steps only) and the final accuracy.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if lr <= 0 or (max_seconds is not None and max_seconds <= 0):
        raise ValueError(f"need lr > 0 and max_seconds > 0, got {lr}, {max_seconds}")
    xtr, ytr, xte, yte = _digits(seed)
    torch.manual_seed(seed)
    net = torch.nn.Sequential(torch.nn.Linear(64, hidden), torch.nn.ReLU(),
                              torch.nn.Linear(hidden, 10))
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    steps = 0
    train_s = 0.0
    t_start = time.perf_counter()
    reached, acc, epoch = None, 0.0, 0
    for epoch in range(1, max_epochs + 1):  # noqa: B007 - `epoch` is reported after the loop
        perm = torch.randperm(len(ytr), generator=g)
        t0 = time.perf_counter()
        for i in range(0, len(ytr), batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(net(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
        train_s += time.perf_counter() - t0
        with torch.no_grad():
            acc = (net(xte).argmax(-1) == yte).float().mean().item()
        elapsed = time.perf_counter() - t_start
        if acc >= target:
            reached = elapsed
            break
        # why: a diverged run (NaN loss) never recovers; a run past the budget has failed
        if not math.isfinite(loss.item()) or (max_seconds and elapsed > max_seconds):
            break
    return dict(batch=batch_size, seconds_to_target=reached, epochs=epoch, steps=steps,
                samples_per_s=steps and (epoch * len(ytr)) / train_s, accuracy=acc,
                target=target, lr=lr)


def time_to_result(batches, seeds=(0,), *, lr=0.05, **kwargs) -> list[dict]:
    """:func:`time_to_accuracy` for each batch size and seed; one row per batch size.

    ``lr``: one rate, or a dict {batch size: rate}.  The runs are interleaved (seed by
    seed, every batch size in turn), so a change in the machine's speed hits all batch
    sizes alike.  ``seconds_to_target`` is the median over the seeds that reached the
    target (``None`` if none did), ``seconds_q1``/``seconds_q3`` their quartiles (the
    seed spread), ``reached`` counts them; ``runs`` keeps every seed's epochs to the
    target (``None``: not reached).  A median over seeds, not one lucky run, is part of
    the protocol.
    """
    import statistics

    from effdl.measure import quartiles

    rate = lr if isinstance(lr, dict) else dict.fromkeys(batches, lr)
    by_batch: dict[int, list[dict]] = {b: [] for b in batches}
    for s in seeds:  # why: interleaved, as in effdl.measure.interleaved
        for b in batches:
            by_batch[b].append(time_to_accuracy(b, seed=s, lr=rate[b], **kwargs))
    rows = []
    for b, runs in by_batch.items():
        done = [r["seconds_to_target"] for r in runs if r["seconds_to_target"] is not None]
        q1, med, q3 = quartiles(done) if done else (None, None, None)
        rows.append(dict(
            batch=b, seconds_to_target=med, seconds_q1=q1, seconds_q3=q3,
            reached=len(done), seeds=len(runs), seed_list=tuple(seeds), lr=rate[b],
            runs=[r["epochs"] if r["seconds_to_target"] is not None else None
                  for r in runs],
            epochs=statistics.median(r["epochs"] for r in runs),
            steps=statistics.median(r["steps"] for r in runs),
            samples_per_s=statistics.median(r["samples_per_s"] for r in runs),
            target=runs[0]["target"],
        ))
    return rows


def _score(row: dict) -> float:
    """Upper median over ALL seeds of the epochs to the target, a seed that missed it
    counting as infinitely slow: a rate that fails for most seeds cannot win on its
    lucky ones."""
    import statistics

    return statistics.median_high(math.inf if t is None else t for t in row["runs"])


def tuned_time_to_result(batches, lrs, *, tune_seeds=(0, 1, 2), seeds=(3,),
                         known=(), max_epochs: int = 60, **kwargs) -> list[dict]:
    """Time to accuracy with the learning rate tuned for each batch size.

    For each batch size, run every rate in ``lrs`` on ``tune_seeds`` and pick the one
    that needs the fewest epochs (median over the seeds, :func:`_score`): within one
    batch size every rate costs the same per step, so fewest epochs is fastest, and
    counting epochs keeps the machine's noise out of the choice.  Then time the chosen
    rates on ``seeds``, which the tuning never saw: the best of several noisy results
    is optimistic on the runs that picked it.  ``known``: rows of :func:`time_to_result`
    already run (same batch, rate and seeds) that the grid reuses.  Rows as
    :func:`time_to_result`'s, plus ``grid``: {rate: its median epochs, ``None`` if it
    lost}.
    """
    if not lrs:
        raise ValueError("need at least one learning rate to tune over")
    if set(tune_seeds) & set(seeds):
        raise ValueError(f"tuning seeds {tune_seeds} and fresh seeds {seeds} overlap")
    done = {(r["batch"], r["lr"], r["seed_list"]): r for r in known}
    grids, best_lr = {}, {}
    for b in batches:
        scores: dict[float, float] = {}
        for lr in lrs:
            best = min(scores.values(), default=math.inf)
            # why: a run that needs more epochs than the best median so far cannot make
            # its rate win (its upper median would exceed it too): stop it there
            cap = int(min(max_epochs, best))
            row = done.get((b, lr, tuple(tune_seeds))) or time_to_result(
                [b], tune_seeds, lr=lr, max_epochs=cap, **kwargs)[0]
            scores[lr] = _score(row)
        best_lr[b] = min(lrs, key=scores.get)
        grids[b] = {lr: t if t < math.inf else None for lr, t in scores.items()}
    rows = time_to_result(batches, seeds, lr=best_lr, max_epochs=max_epochs, **kwargs)
    for row in rows:
        row["grid"] = grids[row["batch"]]
    return rows


def rank_by_time(rows) -> str:
    """Batch sizes from the fastest to the slowest time to accuracy, e.g. ``"128 < 16"``;
    those that never reached it last, marked."""
    done = sorted((r for r in rows if r["seconds_to_target"] is not None),
                  key=lambda r: r["seconds_to_target"])
    failed = [f"{r['batch']} (not reached)" for r in rows if r["seconds_to_target"] is None]
    return " < ".join([str(r["batch"]) for r in done] + failed)
