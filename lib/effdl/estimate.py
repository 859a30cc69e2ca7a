"""How long a chapter takes on a GPU it has never run on, estimated from what it computes.

Each chapter's ``sizes.py`` has ``work(S) -> Work``: the dominant arithmetic and memory traffic of
its live cells at sizes ``S`` — on the device, and on the host (pure-Python simulators, the
CPU-only demonstrations) — plus the number of small operations, each of which costs a launch
whatever its size.  :func:`seconds` turns that into time on a :class:`Machine` with the roofline
model of the measuring chapter, at a stated fraction of peak::

    t = (flops32 / peak32 + flops16 / peak16 + bytes / bandwidth) / efficiency
        + ops * launch + host_flops / host_peak + host_steps * step

It omits everything small (imports, figures, Python between operations), so it runs low.  To
correct that it is *calibrated*: ``.ci/time_notebooks.py`` records how long every chapter took in
the ``cpu`` profile on the machine that builds the site, together with that machine's measured
peaks; the same model, run for that machine, gives a ratio measured / modelled per chapter (≥ 1),
and :func:`chapter_minutes` multiplies the GPU estimate by it.  Scaling GPU time by a ratio that
comes mostly from host overheads errs on the long side, which is the side a promise of "ten
minutes on a T4" should err on.  Its job is to size the ``gpu`` profile (``tests/test_estimate.py``
holds every chapter to ten minutes).
"""

from __future__ import annotations

from dataclasses import dataclass, fields

__all__ = ["Machine", "T4", "Work", "seconds", "chapter_minutes", "calibration", "describe", "measure_machine"]

#: the recorded site build that calibrates the model
TIMINGS = "notebook-timings-cpu.json"


@dataclass(frozen=True)
class Machine:
    name: str
    fp32_tflops: float      # peak, FMA = 2 FLOPs
    fp16_tflops: float      # tensor cores
    gbs: float              # device-memory bandwidth, GB/s
    launch_us: float        # one small operation launched from Python (PyTorch eager)
    host_gflops: float      # the host CPU, all cores, fp32, achieved on large matrix products
    host_step_us: float     # one step of a pure-Python loop body (a simulator event, a small op)


#: Colab's free GPU: a T4 (sm_75; NVIDIA's datasheet: 8.1 TFLOP/s fp32, 65 fp16 tensor,
#: 320 GB/s) behind two slow vCPUs, whose Python launches cost ~10 µs per operation
T4 = Machine("Tesla T4 (Colab)", 8.1, 65.0, 320.0, launch_us=10.0, host_gflops=30.0, host_step_us=2.0)


@dataclass
class Work:
    """Dominant work of some cells; add them up with ``+``."""

    flops32: float = 0.0        # device, fp32
    flops16: float = 0.0        # device, fp16/bf16 on tensor cores
    bytes: float = 0.0          # device-memory traffic
    ops: float = 0.0            # small launched operations (fixed cost each)
    host_flops: float = 0.0     # CPU arithmetic that stays on the CPU on every machine
    host_steps: float = 0.0     # pure-Python loop steps (simulators, per-tile bookkeeping)

    def __add__(self, other: Work) -> Work:
        return Work(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def __mul__(self, k: float) -> Work:
        return Work(**{f.name: getattr(self, f.name) * k for f in fields(self)})

    __rmul__ = __mul__


def seconds(work: Work, machine: Machine = T4, efficiency: float = 0.5) -> float:
    """Estimated seconds of ``work`` on ``machine`` at ``efficiency`` of its peaks."""
    if not 0 < efficiency <= 1:
        raise ValueError(f"efficiency is a fraction of peak in (0, 1], got {efficiency}")
    device = (work.flops32 / (machine.fp32_tflops * 1e12) + work.flops16 / (machine.fp16_tflops * 1e12)
              + work.bytes / (machine.gbs * 1e9)) / efficiency
    host = work.host_flops / (machine.host_gflops * 1e9) + work.host_steps * machine.host_step_us * 1e-6
    return device + work.ops * machine.launch_us * 1e-6 + host


def _work(chapter: str, profile: str) -> Work:
    from effdl import chapters
    from effdl.profile import sizes

    mod = chapters.module(chapter, "sizes")
    if not hasattr(mod, "work"):
        raise AttributeError(f"effdl.{chapter}.sizes has no work(S): add one (see effdl.estimate)")
    return mod.work(sizes(chapter, profile))


def measure_machine() -> dict:
    """This CPU's peaks, as :func:`calibration` reads them back: fp32 matmul GFLOP/s, copy GB/s,
    microseconds per small PyTorch operation."""
    import torch

    from effdl.measure import benchmark
    from effdl.measuring.roofline import measure_roofline

    roof = measure_roofline("cpu", matmul_n=1024, copy_mib=64, warmup=2, repeat=7)
    s = torch.randn(32, 32)
    per_op = benchmark(lambda: [torch.exp(s) for _ in range(1000)], warmup=1, repeat=7).median_ms
    return {"fp32_gflops": roof.peak_flops / 1e9, "gbs": roof.peak_bandwidth / 1e9, "launch_us": per_op}


def calibration(chapter: str) -> tuple[float, str]:
    """(factor ≥ 1, where it comes from): recorded / modelled seconds of the site build's chapter."""
    import json

    from effdl.results import results_dir

    d = results_dir()
    path = d / TIMINGS if d else None
    if path is None or not path.exists():
        return 1.0, "uncalibrated (no recorded site build here)"
    doc = json.loads(path.read_text())
    peaks = doc["meta"].get("machine")
    row = next((r for r in doc["results"] if r["notebook"] == chapter and r["status"] == "ok"), None)
    if not peaks or row is None:
        return 1.0, f"uncalibrated ({TIMINGS} has no machine peaks or no {chapter} run)"
    cpu = Machine("site builder", peaks["fp32_gflops"] / 1e3, peaks["fp32_gflops"] / 1e3, peaks["gbs"],
                  peaks["launch_us"], host_gflops=peaks["fp32_gflops"], host_step_us=T4.host_step_us)
    modelled = seconds(_work(chapter, "cpu"), cpu)
    factor = max(1.0, row["seconds"] / modelled)
    return factor, f"x{factor:.1f}: the cpu build took {row['seconds']:.0f} s, the model says {modelled:.0f} s"


def chapter_minutes(chapter: str, profile: str = "gpu", machine: Machine = T4, calibrated: bool = True) -> float:
    """Estimated minutes of ``chapter``'s live cells in ``profile`` on ``machine``."""
    factor = calibration(chapter)[0] if calibrated else 1.0
    return factor * seconds(_work(chapter, profile), machine) / 60


def describe(chapter: str, machine: Machine = T4) -> str:
    """One line for the top of a chapter: its estimated time on a Colab T4."""
    m = chapter_minutes(chapter, "gpu", machine)
    gpu = machine.name.split(" (")[0]
    return (f"on a free Colab {gpu}, this chapter's gpu sizes take about {max(1, round(m))} min\n"
            "  (estimated from their FLOPs and bytes: effdl.estimate)")
