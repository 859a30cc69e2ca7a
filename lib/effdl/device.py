"""What the accelerator in front of you can do: the notebooks' device cell calls :func:`report`.

A Colab T4 is sm_75: no bf16 tensor cores, no Triton attention kernels, no SDPA flash backend.
Chapters read :func:`capabilities` to choose paths and to say plainly what they skip, and put
their live tensors on :func:`live_device` — the one device rule: CUDA when present, else CPU.

``EFFDL_SIMULATE_GPU=t4`` (tests only) makes :func:`capabilities` describe a T4 while tensors stay
on the CPU, so every chapter's GPU branches (skips, dtype choices, the ``gpu`` profile's settings
at smoke sizes; see :func:`effdl.profile.sizes`) run in CI on a machine without a GPU.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class Capabilities:
    device: str                 # "cuda" or "cpu"
    name: str                   # e.g. "Tesla T4", "NVIDIA H100 80GB HBM3", or the CPU
    compute_capability: tuple[int, int] | None
    memory_gib: float | None
    bf16: bool                  # fast bf16 (sm_80+)
    triton_gpu: bool            # Triton kernels of this course can run on the GPU (sm_80+)
    triton_interpreter: bool    # TRITON_INTERPRET=1 is set and triton imports (CPU testing)
    sdpa_flash: bool            # SDPA's flash backend needs sm_80+
    threads: int
    simulated: bool = False     # EFFDL_SIMULATE_GPU: a described GPU, tensors on the CPU

    def as_dict(self) -> dict:
        return asdict(self)


def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


SIMULATE_ENV = "EFFDL_SIMULATE_GPU"
#: GPUs a test can simulate: name, compute capability, memory (GiB)
SIMULATED_GPUS = {"t4": ("Tesla T4", (7, 5), 14.7), "a100": ("NVIDIA A100-SXM4-40GB", (8, 0), 39.4)}


def simulated_gpu() -> str | None:
    """The GPU named by ``$EFFDL_SIMULATE_GPU`` (lower case), or ``None``; a clear error if unknown."""
    name = os.environ.get(SIMULATE_ENV, "").strip().lower()
    if not name:
        return None
    if name not in SIMULATED_GPUS:
        raise ValueError(f"{SIMULATE_ENV}={name!r} is not a GPU the course can simulate; "
                         f"use one of {', '.join(SIMULATED_GPUS)} or unset it")
    return name


def _cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo), else what ``platform`` knows."""
    import platform

    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def live_device(caps: Capabilities | None = None) -> torch.device:
    """Where every chapter's live cells put their tensors: CUDA when present, else the CPU."""
    caps = caps or capabilities()
    return torch.device("cuda" if caps.device == "cuda" and not caps.simulated else "cpu")


def capabilities() -> Capabilities:
    """Probe the current machine, afresh on every call; never raises without a GPU.

    Not cached, on purpose (a probe is cheap): ``threads`` follows
    ``torch.set_num_threads`` and ``triton_interpreter`` follows ``$TRITON_INTERPRET``,
    and a session may change either.
    """
    interp = os.environ.get("TRITON_INTERPRET") == "1" and _triton_importable()
    sim = simulated_gpu()
    if sim:
        name, cc, mem = SIMULATED_GPUS[sim]
        # why triton_gpu=False even for an sm_80 part: no GPU is there to compile for
        return Capabilities(device="cuda", name=f"{name} (simulated; tensors on the CPU)",
                            compute_capability=cc, memory_gib=mem, bf16=cc >= (8, 0), triton_gpu=False,
                            triton_interpreter=interp, sdpa_flash=cc >= (8, 0),
                            threads=torch.get_num_threads(), simulated=True)
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        cc = (props.major, props.minor)
        sm80 = cc >= (8, 0)
        return Capabilities(
            device="cuda", name=props.name, compute_capability=cc,
            memory_gib=round(props.total_memory / 2**30, 1), bf16=sm80,
            triton_gpu=sm80 and _triton_importable(), triton_interpreter=interp,
            sdpa_flash=sm80, threads=torch.get_num_threads(),
        )
    return Capabilities(
        device="cpu", name=_cpu_name(), compute_capability=None,
        memory_gib=None, bf16=False, triton_gpu=False, triton_interpreter=interp,
        sdpa_flash=False, threads=torch.get_num_threads(),
    )


def report(chapter: str | None = None) -> Capabilities:
    """Print what this runtime supports and what the course will skip; return the capabilities.

    With ``chapter``, also how long that chapter's ``gpu`` profile takes on a free Colab T4
    (:func:`effdl.estimate.describe`).
    """
    import platform

    from effdl import __version__
    from effdl.profile import current

    c = capabilities()
    sm = f", sm_{''.join(map(str, c.compute_capability))}, {c.memory_gib} GiB" if c.compute_capability else ""
    print(f"device: {c.device} — {c.name}{sm}")
    cuda = f", CUDA {torch.version.cuda}" if c.device == "cuda" and not c.simulated else ""
    print(f"effdl {__version__}, Python {platform.python_version()}, torch {torch.__version__}{cuda}")
    shaped = " (gpu-shaped: the gpu profile's settings at smoke sizes)" if c.simulated else ""
    print(f"{c.threads} CPU threads, size setting: {current()}{shaped if current() == 'smoke' else ''}")
    if c.device == "cpu":
        print("no GPU: live results are measured on this CPU; GPU results, where a chapter has\n"
              "  them, come from recorded runs")
    else:
        no = "no (needs sm_80+)"
        print(f"bf16: {'yes' if c.bf16 else no}; SDPA flash backend: {'yes' if c.sdpa_flash else no}")
        triton_note = "no (need sm_80+ and triton) — the PyTorch paths run instead"
        print(f"Triton kernels of this course: {'yes' if c.triton_gpu else triton_note}")
    if chapter:
        from effdl.estimate import describe

        print(describe(chapter))
    return c
