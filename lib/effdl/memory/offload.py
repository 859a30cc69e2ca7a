"""Layer offloading: run a stack of layers while only k of them live on the device.

Abbasi and Lim 2024, "Superpipeline: A Universal Approach for Reducing GPU Memory
Usage in Large Models", arXiv:2410.08791: keep the layers in CPU memory, move each
to the GPU just before it runs and drop it after; the paper reports up to 60 % less
GPU memory at acceptable speed, with two knobs trading memory for speed.  Here the
knob is ``k``, the number of device *slots* (layer-sized buffers): at most k layers
are resident at any time.

Two schedules:

- ``"sync"``: load layer i into its slot, run it, go on (the copy and the compute
  take turns; time ≈ Σ (copy_i + compute_i));
- ``"prefetch"``: while layer i computes, layers i+1 .. i+k-1 are being copied into
  the other slots, so with k ≥ 2 the copies hide behind the compute (time ≈
  Σ max(copy_i, compute_i) once the pipe is full).  k = 1 leaves no free slot to copy
  into while a layer runs, so prefetching degenerates to ``"sync"``.

How the copy runs: on CUDA, the host weights sit in pinned memory and the copies are
issued ``non_blocking`` on a side stream; an event per slot says "loaded" (the compute
stream waits on it) and another "free again" (the copy stream waits on it before
overwriting).  On a CPU, the two memory pools are two sets of CPU tensors (the host
copy and the slots), and the copy runs on a background thread.  ``bandwidth`` (bytes
per second) models the link: each copy then also takes ``bytes / bandwidth`` seconds
(a sleep, which releases the interpreter so compute goes on), so the overlap of the
two schedules shows on a CPU, where a real memcpy is nearly free (CPU only: on CUDA
the copies are real and asynchronous, and a sleep would only stall the host).

The slots are copies of the first layer's module: every layer must have the same
parameter and buffer shapes (true of ByteLM's blocks).  Outputs are bit-for-bit those
of the all-resident stack: the same ops run on the same weights.
"""

from __future__ import annotations

import copy
import time
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from torch import nn

__all__ = ["OffloadExecutor", "offloaded_forward", "module_bytes"]


def module_bytes(m: nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size()
               for t in [*m.parameters(), *m.buffers()])


def _tensors(m: nn.Module) -> list[torch.Tensor]:
    return [*m.parameters(), *m.buffers()]


class OffloadExecutor:
    """Run ``layers`` (a list of same-shaped modules) in order, at most ``k`` of them
    on ``device`` at a time.  ``mode``: ``"sync"`` or ``"prefetch"``; ``bandwidth``:
    modelled link speed in bytes/s (None: real copies only).

    ``run(x, *args)`` returns the output of the last layer; afterwards ``stats`` holds
    ``seconds``, ``loads``, ``bytes_moved``, ``peak_resident_bytes`` (slots holding or
    receiving a layer, at their peak) and ``layer_bytes``.
    """

    def __init__(self, layers, k: int = 1, mode: str = "sync", device=None,
                 bandwidth: float | None = None):
        layers = list(layers)
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k (layers resident at once) must be an int >= 1, got "
                             f"{k!r}; k = 1 loads each layer just before it runs")
        if mode not in ("sync", "prefetch"):
            raise ValueError(f"mode must be 'sync' or 'prefetch', got {mode!r}")
        if not layers:
            raise ValueError("no layers to run; pass a non-empty list of modules")
        if bandwidth is not None and not bandwidth > 0:
            raise ValueError(f"bandwidth must be > 0 bytes/s (or None), got "
                             f"{bandwidth!r}")
        shapes = [[t.shape for t in _tensors(m)] for m in layers]
        if any(s != shapes[0] for s in shapes):
            raise ValueError("every layer must have the same parameter shapes (the "
                             "slots are copies of the first layer)")
        self.k, self.mode, self.bandwidth = min(k, len(layers)), mode, bandwidth
        self.device = torch.device(device or "cpu")
        self.cuda = self.device.type == "cuda"
        if self.cuda and bandwidth is not None:
            raise ValueError("bandwidth models a link on the CPU only; on CUDA the "
                             "real host-to-device copy is timed: pass bandwidth=None")
        # the host pool: one set of tensors per layer (pinned on CUDA: async copies)
        self.host = [[t.detach().cpu().pin_memory() if self.cuda else t.detach()
                      for t in _tensors(m)] for m in layers]
        self.layer_bytes = module_bytes(layers[0])
        self.slots = [copy.deepcopy(layers[0]).to(self.device).requires_grad_(False)
                      for _ in range(self.k)]
        self.in_slot = [None] * self.k          # which layer each slot holds
        self.ready: list[Future | torch.cuda.Event | None] = [None] * self.k
        self.stats: dict = {}
        if self.cuda:
            self.stream = torch.cuda.Stream(self.device)
            self.freed = [torch.cuda.Event() for _ in range(self.k)]
        self.pool = None if self.cuda else ThreadPoolExecutor(max_workers=1)

    # ------------------------------------------------------------ copying

    def _copy_into(self, slot: int, i: int):
        """Copy layer i's host tensors into slot ``slot`` (runs on the worker)."""
        for dst, src in zip(_tensors(self.slots[slot]), self.host[i]):
            dst.copy_(src, non_blocking=self.cuda)
        if self.bandwidth:
            time.sleep(self.layer_bytes / self.bandwidth)     # the modelled link

    def _load(self, i: int):
        slot = i % self.k
        if self.in_slot[slot] == i:                          # still resident
            return
        self.in_slot[slot] = i
        self.stats["loads"] += 1
        self.stats["bytes_moved"] += self.layer_bytes
        self._resident = min(self.k, self._resident + 1)
        self.stats["peak_resident_bytes"] = max(self.stats["peak_resident_bytes"],
                                                self._resident * self.layer_bytes)
        if self.cuda:
            with torch.cuda.stream(self.stream):
                # why wait: the slot's previous layer may still be computing
                self.stream.wait_event(self.freed[slot])
                self._copy_into(slot, i)
                ev = torch.cuda.Event()
                ev.record(self.stream)
            self.ready[slot] = ev
        elif self.mode == "prefetch":
            self.ready[slot] = self.pool.submit(self._copy_into, slot, i)
        else:
            self._copy_into(slot, i)
            self.ready[slot] = None

    def _wait(self, slot: int):
        r = self.ready[slot]
        if isinstance(r, Future):
            r.result()
        elif r is not None:                                  # a CUDA event
            torch.cuda.current_stream(self.device).wait_event(r)
        self.ready[slot] = None

    # ------------------------------------------------------------ running

    @torch.no_grad()
    def run(self, x, *args):
        """x -> layers[L-1](...layers[0](x, *args)..., *args)."""
        L = len(self.host)
        self.stats = {"loads": 0, "bytes_moved": 0, "peak_resident_bytes": 0,
                      "layer_bytes": self.layer_bytes, "k": self.k, "mode": self.mode}
        self._resident = sum(s is not None for s in self.in_slot)
        self.stats["peak_resident_bytes"] = self._resident * self.layer_bytes
        ahead = self.k - 1 if self.mode == "prefetch" else 0
        t0 = time.perf_counter()
        for i in range(L):
            for j in range(i, min(L, i + ahead + 1)):    # this layer and look-ahead
                self._load(j)
            slot = i % self.k
            self._wait(slot)
            x = self.slots[slot](x, *args)
            if self.cuda:
                self.freed[slot].record(torch.cuda.current_stream(self.device))
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.stats["seconds"] = time.perf_counter() - t0
        return x

    def evict_all(self):
        """Forget every resident layer: the next :meth:`run` loads all of them."""
        self.in_slot = [None] * self.k

    def close(self):
        if self.pool is not None:
            self.pool.shutdown()


def offloaded_forward(model, idx: torch.Tensor, executor: OffloadExecutor):
    """ByteLM's forward with its blocks run by ``executor``: logits (B, T, 256)."""
    T = idx.shape[1]
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    with torch.no_grad():
        x = executor.run(model.embed(idx), cos, sin)                # (B, T, d)
        return model.head(model.norm(x))
