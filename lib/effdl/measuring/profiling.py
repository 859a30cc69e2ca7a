"""Where the time of a training step goes: ``torch.profiler``'s operator table and timeline.

A stopwatch around a step gives one number.  The profiler records every operator the step
runs (name, input shapes, start, duration, thread; on a GPU every kernel with its stream) and
exports them as a Chrome trace: JSON that Perfetto (ui.perfetto.dev) or chrome://tracing draw as
a timeline.  This module

- builds a small but realistic step (a DataLoader, an MLP, SGD): :func:`make_training_step`;
- profiles a few steps of it: :func:`profile_step`, and tabulates the operators: :func:`op_table`;
- reads an exported trace back (:func:`trace_events`), finds the steps in it
  (:func:`step_windows`), measures how much of a step a lane is idle (:func:`idle_fraction`),
  sums a step's phases (:func:`step_phases`) and draws the timeline (:func:`plot_timeline`);
- records the small trace the exercise "Read a profile" reads (:func:`record_slow_step`, shipped
  as :data:`SLOW_STEP_TRACE`), turns a trace into plain events (:func:`complete_events`) and
  answers the exercise (:func:`self_times`, :func:`read_profile`).
"""

from __future__ import annotations

import base64
import functools
import gzip
import json
import os
import platform
import random
import threading
import warnings
from collections.abc import Callable, Sequence
from decimal import Decimal
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
    "SLOW_STEP_TRACE", "record_slow_step", "complete_events", "main_thread", "self_times",
    "read_profile",
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


def _load(path: str | Path, *, exact: bool = False) -> dict:
    """The trace as a dict; ``exact``: fractional numbers as ``Decimal`` (a time stamp in µs since
    1970 has more digits than a float keeps below the microsecond)."""
    raw = Path(path).read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip's magic number
        raw = gzip.decompress(raw)
    doc = json.loads(raw, parse_float=Decimal if exact else float)
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
    ax = ax or plt.subplots(figsize=(9, 4.2))[1]
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
                    ha="center", va="center", fontsize=9, clip_on=True)
    for (y, color), spans in bars.items():
        ax.broken_barh(spans, (y, row_h * 0.9), color=color, edgecolor="white",
                       linewidth=0.3)
    ax.set_yticks([i + 0.5 for i in range(len(rows))], rows, fontsize=9)
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



# ------------------------------------------------------------------------------ reading a trace by hand
#: the trace of the exercise "Read a profile": one training step with a slow, Python-heavy data stage,
#: recorded by :func:`record_slow_step` (how, when and where: the trace's ``effdl`` entry)
SLOW_STEP_TRACE = Path(__file__).resolve().parent / "data" / "slow_step_trace.json.gz"


def record_slow_step(path: str | Path = SLOW_STEP_TRACE, *, batch: int = 128, features: int = 48,
                     width: int = 256, depth: int = 3, threads: int = 1, warmup: int = 3,
                     seed: int = 0, note: str = "") -> Path:
    """Record one training step whose data stage is slow, and write its Chrome trace to ``path``.

    The step: ``load_batch`` builds the batch one sample at a time in Python (each sample's list
    of floats normalized and jittered, as a hand-written ``Dataset.__getitem__`` does), then one
    ``torch.tensor`` call; ``model`` holds ``forward``, ``backward`` and the SGD step (momentum,
    weight decay) of an MLP.  A ``log_metrics`` thread, started after the forward pass, computes
    the batch's accuracy and the weights' largest spectral norm (an SVD per layer); the step waits
    for it, then reads the loss and the metrics (``aten::item``).

    ``warmup`` steps run unrecorded first, all with ``threads`` intra-op threads (one: the main
    thread and the logging thread then each keep a core of a two-core machine).  The profiler
    records CPU operators on every thread, without shapes (a small file).  The trace's ``effdl``
    entry says how it was recorded, with ``note`` (say there which of several recordings you kept
    and why: a shared machine's timings vary from one to the next).
    """
    from torch.profiler import record_function

    torch.manual_seed(seed)
    rng = random.Random(seed)
    rows = [[rng.gauss(0.5, 2.0) for _ in range(features)] for _ in range(8 * batch)]  # parsed records
    labels = [rng.randrange(10) for _ in rows]
    model = make_mlp(width, depth, n_in=features, seed=seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    history: list[float] = []

    def load_batch():
        with record_function("load_batch"):
            picked = rng.sample(range(len(rows)), batch)
            samples = []
            for i in picked:  # the slow stage: Python work per sample, per feature
                row = rows[i]
                mean = sum(row) / len(row)
                std = (sum((v - mean) ** 2 for v in row) / len(row)) ** 0.5
                samples.append([(v - mean) / std + rng.gauss(0.0, 0.01) for v in row])
            return torch.tensor(samples), torch.tensor([labels[i] for i in picked])

    def log_metrics(logits, y, out):
        torch.set_num_threads(threads)  # why: a new thread would start a pool as large as the machine
        with record_function("log_metrics"):
            out["accuracy"] = (logits.argmax(1) == y).float().mean()
            weights = [p.detach() for p in model.parameters() if p.dim() == 2]
            out["spectral_norm"] = max(torch.linalg.matrix_norm(w, ord=2) for w in weights)

    def step():
        x, y = load_batch()
        with record_function("model"):
            with record_function("forward"):
                logits = model(x)
                loss = F.cross_entropy(logits, y)
            metrics: dict = {}
            logger = threading.Thread(target=log_metrics, args=(logits.detach(), y, metrics))
            logger.start()
            opt.zero_grad(set_to_none=True)
            with record_function("backward"):
                loss.backward()
            opt.step()
        logger.join()  # the main thread waits for the logging thread
        history.append(loss.item())
        return {k: float(v) for k, v in metrics.items()}

    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for _ in range(warmup):
            step()
        prof = _profile_all_threads(step)
    finally:
        torch.set_num_threads(saved_threads)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.json")
    prof.export_chrome_trace(str(tmp))
    doc = json.loads(tmp.read_text())
    tmp.unlink()
    doc["effdl"] = {
        "recorded_by": "effdl.measuring.profiling.record_slow_step",
        "arguments": dict(batch=batch, features=features, width=width, depth=depth, threads=threads,
                          warmup=warmup, seed=seed),
        "what": "one SGD step of an MLP (torch.profiler, CPU operators on all threads, no shapes): "
                "load_batch (Python work per sample, then torch.tensor), model (forward, backward, "
                "SGD step), a log_metrics thread started after the forward pass, which the main "
                "thread waits for before reading the loss and the metrics (aten::item)",
        "torch": torch.__version__, "python": platform.python_version(),
        "machine": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
        "note": note,
    }
    text = json.dumps(doc, separators=(",", ":")).encode()
    path.write_bytes(gzip.compress(text, mtime=0) if path.suffix == ".gz" else text)
    return path


def _profile_all_threads(fn: Callable[[], Any]) -> torch.profiler.profile:
    """``fn()`` under ``torch.profiler``, CPU operators of every thread recorded (no shapes)."""
    from torch.profiler import ProfilerActivity, profile

    kwargs: dict[str, Any] = {}
    try:  # why: without it the profiler records only the thread that started it
        from torch._C._profiler import _ExperimentalConfig

        kwargs["experimental_config"] = _ExperimentalConfig(profile_all_threads=True)
    except (ImportError, TypeError):  # an older torch: other threads are left out
        pass
    with warnings.catch_warnings(), _quiet_stderr_fd():
        warnings.simplefilter("ignore")
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False, **kwargs) as prof:
            fn()
    return prof


def complete_events(path: str | Path = SLOW_STEP_TRACE) -> list[dict]:
    """The complete events (``"ph": "X"``) of a Chrome trace's CPU threads, as plain data.

    Each event: ``name``, ``tid`` (the thread), ``ts`` (start, ns since the earliest event) and
    ``dur`` (ns), both integers, so that sums and comparisons are exact.  Sorted by start, longest
    first among events that start together: a parent comes before the events nested in it.
    """
    events = [e for e in _load(path, exact=True).get("traceEvents", [])
              if e.get("ph") == "X" and "dur" in e and e.get("cat") not in GPU_CATEGORIES
              and isinstance(e.get("pid"), int) and isinstance(e.get("tid"), int)]
    if not events:
        raise ValueError(f"{path}: no complete events on a CPU thread")
    ns = [(int(Decimal(e["ts"]) * 1000), int(Decimal(e["dur"]) * 1000)) for e in events]
    t0 = min(ts for ts, _ in ns)
    out = [dict(name=str(e["name"]), ts=ts - t0, dur=dur, tid=e["tid"])
           for e, (ts, dur) in zip(events, ns)]
    return sorted(out, key=lambda e: (e["ts"], -e["dur"]))  # a stable sort: ties keep their order


def main_thread(events: Sequence[dict]) -> int:
    """The thread that ran the step: the ``tid`` of the earliest event."""
    return min(events, key=lambda e: e["ts"])["tid"]


def _nest(events: Sequence[dict], tid: int) -> list[tuple[dict, int | None]]:
    """``(event, index of its parent or None)`` for the events of thread ``tid``, parents first.
    An event's parent is the innermost event of the same thread that it starts inside."""
    mine = sorted((e for e in events if e["tid"] == tid), key=lambda e: (e["ts"], -e["dur"]))
    out: list[tuple[dict, int | None]] = []
    open_: list[int] = []  # indices into out of the events that contain the current time
    for e in mine:
        while open_ and out[open_[-1]][0]["ts"] + out[open_[-1]][0]["dur"] <= e["ts"]:
            open_.pop()
        out.append((e, open_[-1] if open_ else None))
        open_.append(len(out) - 1)
    return out


def self_times(events: Sequence[dict], tid: int) -> dict[str, int]:
    """Self time (ns) of each name on thread ``tid``, summed over its events: an event's ``dur``
    minus the ``dur`` of its children (the events nested directly inside it, same thread)."""
    tree = _nest(events, tid)
    own = [e["dur"] for e, _ in tree]
    for e, parent in tree:
        if parent is not None:
            own[parent] -= e["dur"]
    total: dict[str, int] = {}
    for (e, _), t in zip(tree, own):
        total[e["name"]] = total.get(e["name"], 0) + t
    return total


def read_profile(events: Sequence[dict]) -> tuple[str, float]:
    """``(bottleneck, idle)`` of the main thread (:func:`main_thread`): the name with the largest
    summed self time (:func:`self_times`), and the share of the thread's wall span (first start to
    last end) that no top-level event covers."""
    tid = main_thread(events)
    own = self_times(events, tid)
    tree = _nest(events, tid)
    start = min(e["ts"] for e, _ in tree)
    span = max(e["ts"] + e["dur"] for e, _ in tree) - start
    busy = sum(e["dur"] for e, parent in tree if parent is None)
    return max(own, key=own.get), 1.0 - busy / span if span else 0.0
