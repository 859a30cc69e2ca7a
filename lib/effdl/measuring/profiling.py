"""Where the time of a training step goes: ``torch.profiler``'s operator table and timeline.

A stopwatch around a step gives one number.  The profiler records every operator the step
runs (name, input shapes, start, duration, thread; on a GPU every kernel with its stream) and
exports them as a Chrome trace: JSON that Perfetto (ui.perfetto.dev) or chrome://tracing draw as
a timeline.  This module

- builds a small but realistic step (a DataLoader, an MLP, SGD): :func:`make_training_step`;
- profiles a few steps of it: :func:`profile_step`, and tabulates the operators: :func:`op_table`;
- reads an exported trace back (:func:`trace_events`), finds the steps in it
  (:func:`step_windows`), measures how much of a step a lane is idle (:func:`idle_fraction`),
  sums a step's phases (:func:`step_phases`) and draws the timeline (:func:`plot_timeline`).
"""

from __future__ import annotations

import base64
import functools
import gzip
import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from effdl.measure import _quiet_stderr_fd, resolve_device
from effdl.measuring.memory import make_mlp

__all__ = [
    "make_training_step", "sgd_step", "profile_step", "op_table", "export_trace", "trace_events",
    "step_windows", "lanes", "idle_fraction", "step_phases", "op_durations",
    "plot_timeline", "short_name", "download_link",
]

#: trace categories that are work (an operator on a CPU thread, a kernel or copy on a GPU),
#: as opposed to annotations that only mark a region of code
WORK_CATEGORIES = frozenset({"cpu_op", "kernel", "gpu_memcpy", "gpu_memset"})
#: categories that run on a GPU stream, not on a CPU thread
GPU_CATEGORIES = frozenset({"kernel", "gpu_memcpy", "gpu_memset", "gpu_user_annotation"})


# ------------------------------------------------------------------------------ the step
def make_training_step(
    width: int = 256,
    depth: int = 2,
    batch: int = 64,
    *,
    samples: int = 4096,
    features: int = 64,
    device=None,
    seed: int = 0,
) -> Callable[[], float]:
    """One SGD step of an MLP, fed by a ``DataLoader``, as a zero-argument callable.

    The data sit in host memory as a ``TensorDataset``; the default loader indexes it one
    sample at a time and stacks the samples.  Each call is :func:`sgd_step` on the next
    batch.
    """
    from torch.utils.data import DataLoader, TensorDataset

    dev = resolve_device(device)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, features, generator=g)
    y = torch.randint(0, 10, (samples,), generator=g)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True,
                        generator=g)
    model = make_mlp(width, depth, n_in=features, seed=seed).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    return functools.partial(sgd_step, model, opt, _epochs(loader), dev)


def _epochs(loader):
    """The loader's batches, epoch after epoch (a new shuffle each epoch)."""
    while True:
        yield from loader


def sgd_step(model, opt, batches, device) -> float:
    """Take the next batch, move it to ``device``, run forward and backward inside named
    ``record_function`` regions, step the optimizer; return the loss as a Python float
    (on a GPU this waits for the step to finish, as logging the loss does)."""
    xb, yb = (t.to(device) for t in next(batches))
    with torch.profiler.record_function("forward"):
        loss = F.cross_entropy(model(xb), yb)
    opt.zero_grad(set_to_none=True)
    with torch.profiler.record_function("backward"):
        loss.backward()
    opt.step()
    return loss.item()


def profile_step(
    step: Callable[[], Any], device=None, *, steps: int = 3, warmup: int = 1,
    record_shapes: bool = True,
) -> torch.profiler.profile:
    """Run ``step()`` ``warmup + steps`` times under ``torch.profiler``; record the last
    ``steps``.

    The profiler's schedule skips the warm-up steps (first calls pay for set-up) and
    marks each recorded step with a ``ProfilerStep#k`` region.  On CUDA it records the
    GPU's kernels too (``ProfilerActivity.CUDA``).
    """
    from torch.profiler import ProfilerActivity, profile, schedule

    if steps < 1 or warmup < 0:
        raise ValueError(f"need steps >= 1 and warmup >= 0, got {steps}, {warmup}")
    dev = resolve_device(device)
    activities = [ProfilerActivity.CPU]
    if dev.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    plan = schedule(wait=0, warmup=warmup, active=steps, repeat=1)
    # why: the profiler's C++ side prints start/stop lines and warns about its schedule
    with warnings.catch_warnings(), _quiet_stderr_fd():
        warnings.simplefilter("ignore")
        with profile(activities=activities, record_shapes=record_shapes,
                     schedule=plan) as prof:
            for _ in range(warmup + steps):
                step()
                prof.step()
    prof.recorded_steps = steps  # what op_table divides by
    return prof


def _is_annotation(e) -> bool:
    """A ``record_function`` region (or a profiler step), not an operator."""
    named = e.key.startswith("ProfilerStep") or "#" in e.key
    return bool(getattr(e, "is_user_annotation", False) or named)


def op_table(prof, top: int = 10, *, step: str = "mean") -> list[dict]:
    """The operators that took the most self time, one row per (operator, input shapes).

    ``step="mean"``: ``key_averages(group_by_input_shape=True)``, divided by the number of
    recorded steps.  ``step="fastest"``: the operators of the shortest recorded step only
    (the one the machine's neighbours disturbed least; a mean over steps is dominated by
    the disturbed ones).  Annotations (``record_function`` regions) are left out.  Self
    time excludes the operators called from inside; times are milliseconds per step;
    ``share`` is of all operators' self CPU time.  On CUDA, ``self_device_ms`` is the
    kernels' time.
    """
    if step not in ("mean", "fastest"):
        raise ValueError(f"step must be 'mean' or 'fastest', got {step!r}")
    if step == "fastest":
        ops, steps = _fastest_step_ops(prof), 1
    else:
        steps = getattr(prof, "recorded_steps", 1)
        ops = [_OpRow.of(e) for e in prof.key_averages(group_by_input_shape=True)
               if not _is_annotation(e)]
    total = sum(o.self_us for o in ops) or 1.0
    ops.sort(key=lambda o: o.self_us, reverse=True)
    return [dict(
        op=o.name, shapes=o.shapes,
        calls=o.count // steps if o.count % steps == 0 else o.count / steps,
        self_ms=o.self_us / steps / 1e3, total_ms=o.total_us / steps / 1e3,
        share=o.self_us / total, self_device_ms=o.device_us / steps / 1e3,
    ) for o in ops[:top]]


class _OpRow:
    """One (operator, input shapes) group: calls and summed times in µs."""

    def __init__(self, name: str, shapes: str):
        self.name, self.shapes = name, shapes
        self.count, self.self_us, self.total_us, self.device_us = 0, 0.0, 0.0, 0.0

    @staticmethod
    def _shapes(e) -> str:
        shapes = [list(s) for s in e.input_shapes if s] if e.input_shapes else []
        return str(shapes) if shapes else ""

    @classmethod
    def of(cls, e, count: int | None = None) -> _OpRow:
        row = cls(e.key, cls._shapes(e))
        row.add(e, e.count if count is None else count)
        return row

    def add(self, e, count: int = 1) -> None:
        self.count += count
        self.self_us += e.self_cpu_time_total
        self.total_us += e.cpu_time_total
        self.device_us += getattr(e, "self_device_time_total", 0.0)


def _fastest_step_ops(prof) -> list[_OpRow]:
    """The operators of the shortest ``ProfilerStep`` region, grouped by name and shapes."""
    events = prof.events()
    steps = [e for e in events if e.name.startswith("ProfilerStep")]
    if not steps:
        raise ValueError("no ProfilerStep regions: profile with profile_step()")
    win = min(steps, key=lambda e: e.time_range.elapsed_us()).time_range
    groups: dict[tuple[str, str], _OpRow] = {}
    for e in events:
        if _is_annotation(e) or not win.start <= e.time_range.start < win.end:
            continue
        key = (e.key, _OpRow._shapes(e))
        groups.setdefault(key, _OpRow(*key)).add(e)
    return list(groups.values())


# ------------------------------------------------------------------------------ the trace
def export_trace(prof, path: str | Path) -> Path:
    """Write the Chrome trace (gzip-compressed when ``path`` ends in ``.gz``)."""
    path = Path(path)
    if path.suffix == ".gz":
        tmp = path.with_suffix("")
        prof.export_chrome_trace(str(tmp))
        path.write_bytes(gzip.compress(tmp.read_bytes()))
        tmp.unlink()
    else:
        prof.export_chrome_trace(str(path))
    return path


def _load(path: str | Path) -> dict:
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip's magic number
        raw = gzip.decompress(raw)
    doc = json.loads(raw)
    return doc if isinstance(doc, dict) else {"traceEvents": doc}


def _lane(e: dict, thread_names: dict) -> str:
    """A timeline row: a GPU stream, or a CPU thread (named as the trace names it)."""
    if e.get("cat") in GPU_CATEGORIES:
        return f"GPU {e['pid']} stream {e['tid']}"
    return "CPU " + thread_names.get((e["pid"], e["tid"]), f"thread {e['tid']}")


def trace_events(path: str | Path) -> list[dict]:
    """The timed events of a Chrome trace (``.json`` or ``.json.gz``), oldest first.

    Each event: ``name``, ``cat`` (``cpu_op``, ``user_annotation``, ``kernel``, ...),
    ``lane``, ``ts`` (µs since the first event) and ``dur`` (µs).  Only complete events
    (``"ph": "X"``) on a numbered process and thread count; flows and metadata do not.
    """
    events = _load(path).get("traceEvents", [])
    names = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "thread_name"}
    timed = [e for e in events if e.get("ph") == "X" and "dur" in e
             and isinstance(e.get("pid"), int) and isinstance(e.get("tid"), int)]
    if not timed:
        raise ValueError(f"{path}: no timed events (is it a Chrome trace of a profile?)")
    t0 = min(float(e["ts"]) for e in timed)
    out = [dict(name=e["name"], cat=e.get("cat", ""), lane=_lane(e, names),
                ts=float(e["ts"]) - t0, dur=float(e["dur"])) for e in timed]
    return sorted(out, key=lambda e: (e["ts"], -e["dur"]))


def step_windows(events: Sequence[dict]) -> list[tuple[float, float]]:
    """(start, end) in µs of each ``ProfilerStep#k`` region, in order."""
    steps = [e for e in events if e["name"].startswith("ProfilerStep#")
             and e["cat"] not in GPU_CATEGORIES]
    return [(e["ts"], e["ts"] + e["dur"]) for e in sorted(steps, key=lambda e: e["ts"])]


def _busy_us(events: Sequence[dict], lane: str, t0: float, t1: float) -> float:
    """Length of the union of the lane's work intervals, clipped to [t0, t1]."""
    spans = sorted((max(e["ts"], t0), min(e["ts"] + e["dur"], t1)) for e in events
                   if e["lane"] == lane and e["cat"] in WORK_CATEGORIES)
    busy, end = 0.0, t0
    for a, b in spans:
        if b <= end:
            continue  # nested in (or ends before) work already counted
        busy += b - max(a, end)
        end = b
    return busy


def idle_fraction(events: Sequence[dict], lane: str, window: tuple[float, float]
                  ) -> float:
    """Share of ``window`` in which ``lane`` runs no work (no operator, kernel or copy).

    On a CPU thread that is time in Python, in the framework between operators, or
    waiting; on a GPU stream it is the GPU waiting for the host to launch the next
    kernel.
    """
    t0, t1 = window
    if t1 <= t0:
        raise ValueError(f"empty window {window}")
    return 1.0 - _busy_us(events, lane, t0, t1) / (t1 - t0)


def short_name(name: str) -> str:
    """``aten::addmm`` -> ``addmm``; ``Optimizer.step#SGD.step`` -> ``SGD.step``;
    ``enumerate(DataLoader)#...__next__`` -> ``DataLoader``."""
    if name.startswith("enumerate(DataLoader)"):
        return "DataLoader"
    if "#" in name:
        return name.split("#", 1)[1]
    if ": " in name:  # autograd::engine::evaluate_function: AddmmBackward0
        return name.rsplit(": ", 1)[1]
    return name.rsplit("::", 1)[-1]


def step_phases(events: Sequence[dict], window: tuple[float, float]) -> dict[str, float]:
    """Milliseconds of each annotated region (data loading, forward, backward, optimizer)
    inside ``window``, on the CPU, plus ``other``: the rest of the step."""
    t0, t1 = window
    phases: dict[str, float] = {}
    for e in events:
        inside = t0 <= e["ts"] and e["ts"] + e["dur"] <= t1
        if inside and e["cat"] == "user_annotation" and not e["name"].startswith("Profiler"):
            key = short_name(e["name"])
            phases[key] = phases.get(key, 0.0) + e["dur"] / 1e3
    phases["other"] = max(0.0, (t1 - t0) / 1e3 - sum(phases.values()))
    return phases


def op_durations(events: Sequence[dict], lane: str, window: tuple[float, float]) -> list:
    """Durations (µs) of the outermost operators of ``lane`` inside ``window``: the calls
    Python made, each paying the framework's fixed cost once."""
    t0, t1 = window
    out, end = [], t0
    for e in events:
        if e["lane"] == lane and e["cat"] in WORK_CATEGORIES and t0 <= e["ts"] < t1:
            if e["ts"] >= end:  # not nested in the previous outermost operator
                out.append(e["dur"])
                end = e["ts"] + e["dur"]
    return out


# ------------------------------------------------------------------------------ the figure
def _depths(events: Sequence[dict]) -> list[int]:
    """Nesting depth of each event within its lane (0 = outermost), as a timeline stacks them."""
    depth, open_ends = [], {}
    for e in events:
        stack = open_ends.setdefault(e["lane"], [])
        while stack and stack[-1] <= e["ts"]:
            stack.pop()
        depth.append(len(stack))
        stack.append(e["ts"] + e["dur"])
    return depth


def lanes(events: Sequence[dict]) -> list[str]:
    """CPU threads first, then GPU streams, each in order of first activity."""
    first = {}
    for e in events:
        first.setdefault(e["lane"], e["ts"])
    return sorted(first, key=lambda lane: (lane.startswith("GPU"), first[lane]))


def plot_timeline(events: Sequence[dict], window: tuple[float, float] | None = None,
                  ax=None, max_depth: int = 4, label_min: float = 0.06):
    """One row per CPU thread and GPU stream; every event a bar at its time, nested
    events stacked below their parent (as Perfetto draws them).  ``window`` (µs) zooms in;
    bars wider than ``label_min`` of it are labelled."""
    import matplotlib.pyplot as plt

    t0, t1 = window or (0.0, max(e["ts"] + e["dur"] for e in events))
    ax = ax or plt.subplots(figsize=(10, 3.6))[1]
    shown = [e for e in events if not e["name"].startswith("ProfilerStep")]
    rows, row_h = lanes(shown), 1.0 / (max_depth + 1)
    colors = {"user_annotation": "0.75", "cpu_op": "C0", "kernel": "C2"}
    bars: dict[tuple[float, str], list] = {}  # why: one broken_barh per row and colour
    for e, d in zip(shown, _depths(shown)):
        a, b = max(e["ts"], t0), min(e["ts"] + e["dur"], t1)
        if b <= a or d > max_depth:
            continue
        y = rows.index(e["lane"]) + d * row_h
        bars.setdefault((y, colors.get(e["cat"], "C1")), []).append(
            ((a - t0) / 1e3, (b - a) / 1e3))
        if b - a > label_min * (t1 - t0):
            ax.text((a + b - 2 * t0) / 2e3, y + row_h * 0.45, short_name(e["name"]),
                    ha="center", va="center", fontsize=7, clip_on=True)
    for (y, color), spans in bars.items():
        ax.broken_barh(spans, (y, row_h * 0.9), color=color, edgecolor="white",
                       linewidth=0.3)
    ax.set_yticks([i + 0.5 for i in range(len(rows))], rows, fontsize=8)
    ax.set_ylim(len(rows), 0)  # first lane on top, nested events below their parents
    ax.set_xlim(0, (t1 - t0) / 1e3)
    ax.set_xlabel("time since the start of the window (ms)")
    return ax


def download_link(path: str | Path, text: str | None = None):
    """A link that downloads the file at ``path``: the file travels inside the link, so it
    works in Jupyter, on Colab and on a static web page alike."""
    from IPython.display import HTML

    path = Path(path)
    kind = "application/gzip" if path.suffix == ".gz" else "application/json"
    data = base64.b64encode(path.read_bytes()).decode()
    label = text or f"download {path.name} ({path.stat().st_size / 1024:.0f} KiB)"
    return HTML(f'<a download="{path.name}" href="data:{kind};base64,{data}">{label}</a>')

