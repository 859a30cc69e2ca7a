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
    "make_requests", "decode", "preprocess", "classify", "postprocess", "make_pipeline",
    "stage_times", "time_to_accuracy", "time_to_result",
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
    """Time the four convolutions interleaved, round by round; rows with FLOPs (by hand and
    counted), time and achieved GFLOP/s.

    ``time_vs_dense``: the median over rounds of the variant's time / the dense one's in
    the same round, with its quartiles ``time_vs_dense_q1``/``_q3`` (the spread to report).
    """
    from effdl.measure import interleaved, quartiles

    b, c, hw = S.conv
    variants = conv_variants(b, c, hw, device)
    res = interleaved({name: fn for name, (fn, _, _) in variants.items()},
                      rounds=repeat or S.repeat, warmup=warmup or S.warmup, device=device)
    dense = res["dense"].times_ms
    rows = []
    for name, (fn, flops, nbytes) in variants.items():
        t = res[name]
        q1, ratio, q3 = quartiles([a / d for a, d in zip(t.times_ms, dense)])
        rows.append(dict(case="conv", kernel=name, flops=flops, flops_counted=count_flops(fn), bytes=nbytes,
                         intensity=arithmetic_intensity(flops, nbytes), ms=t.median_ms, ms_iqr=t.iqr_ms,
                         gflops=flops / t.median_ms / 1e6, flops_vs_dense=flops / variants["dense"][1],
                         time_vs_dense=ratio, time_vs_dense_q1=q1, time_vs_dense_q3=q3))
    return rows


_C = math.sqrt(2.0 / math.pi)


def gelu_unfused(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """GELU (tanh form) written op by op: eight kernels, each reading and writing the
    whole tensor.  ``out`` (like ``x``) receives the result and every intermediate, so
    the eight kernels allocate nothing large (default: one fresh buffer)."""
    out = torch.empty_like(x) if out is None else out
    t = torch.pow(x, 3, out=out)           # pow
    t.mul_(0.044715).add_(x)               # mul, add
    t.mul_(_C).tanh_().add_(1.0)           # mul, tanh, add
    return t.mul_(x).mul_(0.5)             # mul, mul


def gelu_fused(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The same function as one kernel: read x once, write the result once (into ``out``
    when given)."""
    if out is None:
        return F.gelu(x, approximate="tanh")
    return torch.ops.aten.gelu.out(x, approximate="tanh", out=out)


#: per element: pow (2 multiplies), ×0.0447, +, ×√(2/π), tanh (counted 1), +1, ×x, ×0.5
GELU_FLOPS_PER_ELEMENT = 9
#: kernels of gelu_unfused and (inputs + outputs) each touches, in elements per element of x
GELU_UNFUSED_ACCESSES = 2 + 2 + 3 + 2 + 2 + 2 + 3 + 2  # pow, mul, add, mul, tanh, add, mul, mul


def fusion_case(S, device=None, *, warmup: int | None = None, repeat: int | None = None) -> list[dict]:
    """The same FLOPs, different traffic: the unfused GELU moves 9× the bytes of the fused one.

    Three versions timed interleaved, each writing into a preallocated output: eight
    kernels, the fused one, and a ``tanh`` alone (one kernel, the same bytes as the fused
    GELU: the cost of its one expensive instruction).  Rows for the two GELUs;
    ``ratio``/``ratio_q1``/``ratio_q3``: the unfused / fused time per round (median,
    quartiles); the fused row's ``vs_tanh*``: fused / tanh alone, likewise.
    """
    from effdl.measure import interleaved, quartiles

    dev = resolve_device(device)
    n = S.gelu_numel
    x = torch.randn(n, device=dev)
    o1, o2, o3 = (torch.empty_like(x) for _ in range(3))
    e = x.element_size()
    fns = {"GELU, 8 kernels": lambda: gelu_unfused(x, out=o1),
           "GELU, fused": lambda: gelu_fused(x, out=o2),
           "tanh alone": lambda: torch.tanh(x, out=o3)}
    res = interleaved(fns, rounds=repeat or S.repeat, warmup=warmup or S.warmup, device=dev)
    t8, t1, th = (res[k].times_ms for k in fns)
    q = {"ratio": quartiles([a / b for a, b in zip(t8, t1)]),
         "vs_tanh": quartiles([a / b for a, b in zip(t1, th)])}
    flops = GELU_FLOPS_PER_ELEMENT * n
    rows = []
    for name, nbytes in (("GELU, 8 kernels", GELU_UNFUSED_ACCESSES * n * e),
                         ("GELU, fused", elementwise_bytes(n, 1, 1, e))):
        ms = res[name].median_ms
        rows.append(dict(case="fusion", kernel=name, flops=flops, bytes=nbytes,
                         intensity=arithmetic_intensity(flops, nbytes), ms=ms,
                         ms_iqr=res[name].iqr_ms, gflops=flops / ms / 1e6, gbs=nbytes / ms / 1e6))
    for key, (q1, med, q3) in q.items():
        row = rows[0] if key == "ratio" else rows[1]
        row.update({key: med, f"{key}_q1": q1, f"{key}_q3": q3})
    rows[1]["tanh_ms"] = res["tanh alone"].median_ms
    return rows


# --------------------------------------------------------------------------------------------------
# The model is not the whole job: a small image-classification service
# --------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def make_requests(n: int, size: int, seed: int = 0) -> tuple[bytes, ...]:
    """``n`` PNG-encoded RGB images of ``size``×``size`` (smooth random pictures): what a client sends.

    Cached: encoding a PNG costs far more than decoding it, and the same requests serve
    every version of the pipeline.
    """
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
    return tuple(out)


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


def decode(requests) -> list:
    """PNG bytes → RGB images, one request at a time."""
    from PIL import Image

    return [Image.open(io.BytesIO(b)).convert("RGB") for b in requests]


def preprocess(images, input_size: int = 32, device=None) -> torch.Tensor:
    """Resize, scale to [0, 1] and normalize each image, as a request handler does;
    stack them into one (n, 3, input_size, input_size) batch."""
    import numpy as np
    from PIL import Image

    out = []
    for img in images:
        small = img.resize((input_size, input_size), Image.BILINEAR)
        arr = np.asarray(small, dtype=np.float32) / 255.0        # (h, w, 3)
        t = torch.from_numpy(arr).permute(2, 0, 1)               # (3, h, w)
        out.append((t - _MEAN) / _STD)
    return torch.stack(out).to(resolve_device(device))


def classify(net: torch.nn.Module, x: torch.Tensor, batched: bool = True
             ) -> torch.Tensor:
    """Logits of a batch: one call of ``net`` on all of it, or one call per image (each
    pays Python and dispatch overhead)."""
    with torch.no_grad():
        if batched:
            return net(x)
        return torch.cat([net(x[i:i + 1]) for i in range(x.shape[0])])


def postprocess(logits: torch.Tensor) -> list[dict]:
    """Top-1 label and its probability for each image."""
    p = torch.softmax(logits.float(), dim=-1).cpu()
    return [{"label": LABELS[int(i)], "score": round(float(s), 4)}
            for s, i in zip(*p.max(dim=-1))]


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

    :func:`decode`, :func:`preprocess`, :func:`classify` (a small CNN with ``model_width``
    channels; ``batched=False`` calls it once per image), :func:`postprocess`.  Each stage
    runs on the previous stage's output computed once here, so each can be timed alone;
    ``end_to_end`` runs all four in order.
    """
    dev = resolve_device(device)
    requests = make_requests(n_images, raw_size, seed)
    net = _small_cnn(model_width, seed=seed).to(dev)
    images = decode(requests)
    batch = preprocess(images, input_size, dev)
    logits = classify(net, batch, batched)

    def end_to_end():
        x = preprocess(decode(requests), input_size, dev)
        return postprocess(classify(net, x, batched))

    return {
        "decode": lambda: decode(requests),
        "preprocess": lambda: preprocess(images, input_size, dev),
        "model": lambda: classify(net, batch, batched),
        "postprocess": lambda: postprocess(logits),
        "end_to_end": end_to_end,
    }


def stage_times(stages: Mapping[str, Callable[[], Any]], *, warmup: int = 2, repeat: int = 5,
                device=None) -> list[dict]:
    """Median time of each stage (``end_to_end`` excluded from the shares), its quartiles
    (``ms_q1``, ``ms_q3``) and its share of the total."""
    rows = []
    for name, fn in stages.items():
        res = benchmark(fn, warmup=warmup, repeat=repeat, device=device)
        q1, _, q3 = res.quartiles_ms
        rows.append(dict(stage=name, ms=res.median_ms, ms_iqr=res.iqr_ms, ms_q1=q1, ms_q3=q3))
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
    target (``None`` if none did), ``seconds_q1``/``seconds_q3`` their quartiles and
    ``seconds_min``/``seconds_max`` their range (with three seeds, report the range),
    ``reached`` counts them; ``runs`` keeps every seed's epochs to the target (``None``:
    not reached).  A median over seeds, not one lucky run, is part of the protocol.
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
            seconds_min=min(done, default=None), seconds_max=max(done, default=None),
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
    was stopped}, ``stopped_at``: {rate: the epochs its runs were allowed}, and
    ``on_edge``: the chosen rate is the smallest or largest of ``lrs`` (a larger grid
    might find a better one).
    """
    if not lrs:
        raise ValueError("need at least one learning rate to tune over")
    if set(tune_seeds) & set(seeds):
        raise ValueError(f"tuning seeds {tune_seeds} and fresh seeds {seeds} overlap")
    done = {(r["batch"], r["lr"], r["seed_list"]): r for r in known}
    grids, caps, best_lr = {}, {}, {}
    for b in batches:
        scores: dict[float, float] = {}
        caps[b] = {}
        for lr in lrs:
            best = min(scores.values(), default=math.inf)
            # why: a run that needs more epochs than the best median so far cannot make
            # its rate win (its upper median would exceed it too): stop it there
            cap = int(min(max_epochs, best))
            known_row = done.get((b, lr, tuple(tune_seeds)))
            row = known_row or time_to_result(
                [b], tune_seeds, lr=lr, max_epochs=cap, **kwargs)[0]
            caps[b][lr] = max_epochs if known_row else cap
            scores[lr] = _score(row)
        best_lr[b] = min(lrs, key=scores.get)
        grids[b] = {lr: t if t < math.inf else None for lr, t in scores.items()}
    rows = time_to_result(batches, seeds, lr=best_lr, max_epochs=max_epochs, **kwargs)
    for row in rows:
        b = row["batch"]
        row.update(grid=grids[b], stopped_at=caps[b],
                   on_edge=len(lrs) > 1 and best_lr[b] in (min(lrs), max(lrs)))
    return rows


def rank_by_time(rows) -> str:
    """Batch sizes from the fastest to the slowest time to accuracy, e.g. ``"128 < 16"``;
    ``≈`` joins neighbours whose ranges over the seeds (``seconds_min``–``seconds_max``)
    overlap, a tie the seeds cannot break (a chain of ties whose ends do not overlap says so);
    those that never reached it last, marked."""
    done = sorted((r for r in rows if r["seconds_to_target"] is not None),
                  key=lambda r: r["seconds_to_target"])
    out = ""
    for prev, r in zip([None, *done], done):
        if prev is not None:
            lo = r.get("seconds_min", r["seconds_to_target"])
            hi = prev.get("seconds_max", prev["seconds_to_target"])
            out += " ≈ " if lo <= hi else " < "
        out += str(r["batch"])
    if len(done) > 2 and " < " not in out:  # a chain of ties can still hold a clear pair
        first, last = done[0], done[-1]
        if first.get("seconds_max", first["seconds_to_target"]) < last.get(
                "seconds_min", last["seconds_to_target"]):
            out += f" (yet {first['batch']} < {last['batch']}: their ranges do not overlap)"
    failed = [f"{r['batch']} (not reached)" for r in rows if r["seconds_to_target"] is None]
    return " < ".join(([out] if out else []) + failed)
