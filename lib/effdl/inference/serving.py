"""A serving simulator: static batching vs continuous batching with a paged KV cache.

No model runs here: an iteration's cost is a parameter.  The cost model is deliberately
simple and linear::

    t_iter = t_fixed + t_per_token * (tokens processed this iteration)

``t_fixed`` is what every forward pass pays whatever its batch (reading the weights; a
decode step is memory-bound), ``t_per_token`` the compute per token.  A prefill of a
p-token prompt processes p tokens and yields the first output token; a decode step
processes 1 token per running sequence and yields one more.  The defaults (10 ms,
0.1 ms) are rough magnitudes for a 7B model on one datacenter GPU, not measurements; a
chapter can calibrate both from :func:`effdl.inference.decode_costs`.

A sequence holds one KV slot per token it has read or written (prompt + generated).

Two schedulers:

- **static**: wait for ``batch`` requests (fewer at the end of the trace), run them as
  one rectangle, padded to the longest prompt and kept running until the longest output
  is done (finished rows idle in their slots, still computed as padding), then take the
  next batch.  Each sequence reserves ``max_len`` contiguous slots.  Generous to static:
  a request counts as finished at its own last token, not at the batch's end.
- **continuous** (iteration-level, Orca: Yu et al., OSDI 2022; with vLLM's paged KV
  cache: Kwon et al., SOSP 2023): before every iteration, first grow each running
  sequence by one slot; if a block is needed and none is free, preempt the most recently
  admitted sequence (free its blocks, put it back at the head of the queue, recompute
  its prompt plus what it had generated when readmitted: vLLM's recompute policy).
  Then, if nothing was preempted, admit waiting requests first-come-first-served while
  blocks and ``batch`` (the most running sequences) allow.  Finished sequences leave at
  once.

Each run reports throughput (generated tokens per second of simulated time, first
arrival to last finish), p50/p95 request latency (finish - arrival) and time to first
token, peak KV slots allocated, and the KV waste fraction **time-averaged** over
iterations (1 - sum(used * t_iter) / sum(allocated * t_iter)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from effdl.inference.paged import BlockAllocator, ContiguousAllocator, OutOfBlocks

__all__ = ["DEFAULT_OUTPUT", "DEFAULT_PROMPT", "Request", "make_trace", "rows", "run"]

# (kind, median, sigma, low, high): log-normal, clipped.  Output lengths spread widely
# (sigma 1: a tenth of answers are 3.6x the median or longer), which is what hurts both
# static batching (the batch waits for its longest answer) and max-length reservations.
DEFAULT_PROMPT = ("lognormal", 128, 0.8, 8, 1024)
DEFAULT_OUTPUT = ("lognormal", 128, 1.0, 4, 1024)


@dataclass(frozen=True)
class Request:
    """One request: arrival time (s), prompt length and output length (tokens)."""

    rid: int
    arrival: float
    prompt_len: int
    output_len: int


# ---------------------------------------------------------------------------- the trace


def _draw_lengths(rng: np.random.Generator, dist: tuple, n: int) -> np.ndarray:
    """n integer lengths from ("uniform", low, high) inclusive or
    ("lognormal", median, sigma, low, high), rounded and clipped to [low, high]."""
    kind = dist[0] if dist else None
    if kind == "uniform" and len(dist) == 3 and 1 <= dist[1] <= dist[2]:
        return rng.integers(dist[1], dist[2] + 1, size=n)
    if (
        kind == "lognormal"
        and len(dist) == 5
        and dist[1] > 0
        and 1 <= dist[3] <= dist[4]
    ):
        x = rng.lognormal(np.log(dist[1]), dist[2], size=n)
        return np.clip(np.rint(x), dist[3], dist[4]).astype(int)
    raise ValueError(
        f"length distribution must be ('uniform', low, high) or ('lognormal',"
        f" median, sigma, low, high) with 1 <= low <= high, got {dist!r}"
    )


def make_trace(
    n_requests: int = 200,
    rate: float = 10.0,
    prompt_len_dist=DEFAULT_PROMPT,
    output_len_dist=DEFAULT_OUTPUT,
    seed: int = 0,
) -> list[Request]:
    """Poisson arrivals at ``rate`` requests/s (exponential gaps, first at t = 0),
    prompt and output lengths drawn independently; the same seed, the same trace."""
    if not isinstance(n_requests, int) or n_requests < 1:
        raise ValueError(f"n_requests must be an int >= 1, got {n_requests!r}")
    if not rate > 0:
        raise ValueError(f"rate must be > 0 requests/s, got {rate!r}")
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, size=n_requests)
    arrivals = np.concatenate([[0.0], np.cumsum(gaps[1:])])
    p = _draw_lengths(rng, prompt_len_dist, n_requests)
    o = _draw_lengths(rng, output_len_dist, n_requests)
    return [
        Request(i, float(a), int(pi), int(oi))
        for i, (a, pi, oi) in enumerate(zip(arrivals, p, o))
    ]


# -------------------------------------------------------------------------- bookkeeping


class _Log:
    """What a run records: per-request first-token and finish times, KV use."""

    def __init__(self):
        self.first_token: dict[int, float] = {}
        self.finish: dict[int, float] = {}
        self.generated: dict[int, int] = {}
        self.iterations = 0
        self.peak_slots = 0
        self.peak_running = 0  # most sequences in one iteration
        self.kv_alloc_time = 0.0  # sum of allocated slots * t_iter
        self.kv_used_time = 0.0  # sum of used slots * t_iter

    def iteration(self, dt: float, allocated: int, used: int, running: int) -> None:
        self.iterations += 1
        self.peak_running = max(self.peak_running, running)
        self.peak_slots = max(self.peak_slots, allocated)
        self.kv_alloc_time += allocated * dt
        self.kv_used_time += used * dt

    def token(self, rid: int, t: float) -> None:
        self.first_token.setdefault(rid, t)
        self.generated[rid] = self.generated.get(rid, 0) + 1


def _summary(trace: list[Request], log: _Log) -> dict:
    arrival = {r.rid: r.arrival for r in trace}
    lat = np.array([log.finish[i] - arrival[i] for i in log.finish]) * 1e3
    ttft = np.array([log.first_token[i] - arrival[i] for i in log.finish]) * 1e3
    span = max(log.finish.values()) - min(arrival.values())
    waste = 1.0 - log.kv_used_time / log.kv_alloc_time if log.kv_alloc_time else 0.0
    return {
        "tokens_per_s": sum(log.generated.values()) / span,
        "p50_ms": float(np.percentile(lat, 50)),
        "p95_ms": float(np.percentile(lat, 95)),
        "ttft_p50_ms": float(np.percentile(ttft, 50)),
        "ttft_p95_ms": float(np.percentile(ttft, 95)),
        "peak_kv_slots": log.peak_slots,
        "kv_waste": waste,
        "peak_running": log.peak_running,
        "iterations": log.iterations,
        "sim_time_s": span,
        "finish": dict(log.finish),
        "generated": dict(log.generated),
    }


# ---------------------------------------------------------------------- static batching


def _static_batch(
    batch: list[Request], t: float, kv: ContiguousAllocator, log: _Log, cost
) -> float:
    """Run one padded batch from time t to its longest output; returns the end time."""
    seqs = [kv.sequence() for _ in batch]
    for s, r in zip(seqs, batch):
        s.append(r.prompt_len)
    width = len(batch)
    steps = max(r.output_len for r in batch)
    for step in range(
        1, steps + 1
    ):  # step 1 is the prefill, padded to the longest prompt
        tokens = width * max(r.prompt_len for r in batch) if step == 1 else width
        for s, r in zip(seqs, batch):
            if step <= r.output_len:
                s.append(1)  # the slot for the token this step yields
        dt = cost(tokens)
        log.iteration(dt, kv.allocated_slots, kv.used_slots, width)
        t += dt
        for r in batch:
            if step <= r.output_len:
                log.token(r.rid, t)
            if step == r.output_len:
                log.finish[r.rid] = t
    for s in seqs:
        s.free()
    return t


def _run_static(trace, batch, max_len, cost, **_) -> _Log:
    kv, log, t = ContiguousAllocator(max_len), _Log(), 0.0
    for start in range(0, len(trace), batch):
        group = trace[start : start + batch]
        t = max(t, max(r.arrival for r in group))  # wait for the batch to fill
        t = _static_batch(group, t, kv, log, cost)
    return log


# ------------------------------------------------------------------ continuous batching


class _Running:
    """A request in the batch: its KV sequence and the tokens generated so far."""

    def __init__(self, req: Request, seq, done: int):
        self.req, self.seq, self.done = req, seq, done
        self.prefill = req.prompt_len + done  # tokens to (re)compute this iteration


def _grow_running(running: list[_Running], waiting: list, done: dict) -> bool:
    """One more slot for every decoding sequence, preempting the most recently admitted
    one while no block is free.  Returns whether anything was preempted."""
    preempted = False
    for r in list(running):
        while r in running:
            try:
                r.seq.append(1)
                break
            except OutOfBlocks:
                victim = running.pop()  # most recently admitted
                victim.seq.free()
                done[victim.req.rid] = (
                    victim.done
                )  # recomputed from here on readmission
                waiting.insert(0, victim.req)
                preempted = True
    return preempted


def _admit(running, waiting, done, kv: BlockAllocator, batch: int) -> None:
    """Admit from the head of the queue while a slot in the batch and blocks allow."""
    while waiting and len(running) < batch:
        req = waiting[0]
        seq, d = kv.sequence(), done.get(req.rid, 0)
        try:
            seq.append(
                req.prompt_len + d + 1
            )  # prompt (+ recomputed output) + new token
        except OutOfBlocks:
            return  # first come, first served: nobody overtakes the head of the queue
        running.append(_Running(waiting.pop(0), seq, d))


def _run_continuous(trace, batch, max_len, cost, num_blocks, block_size) -> _Log:
    kv, log, t = BlockAllocator(num_blocks, block_size), _Log(), 0.0
    pending, waiting, running, done = list(trace), [], [], {}
    while pending or waiting or running:
        if not waiting and not running:
            t = max(t, pending[0].arrival)  # idle until the next request arrives
        while pending and pending[0].arrival <= t:
            waiting.append(pending.pop(0))
        for r in running:
            r.prefill = 0  # still here from last iteration: a decode step
        if not _grow_running(running, waiting, done) or not running:
            _admit(running, waiting, done, kv, batch)
        if not running:  # _check_config makes every request fit an empty pool
            raise RuntimeError(
                "no sequence could run although the pool is empty; "
                "this is a bug in the simulator"
            )
        tokens = sum(r.prefill or 1 for r in running)
        dt = cost(tokens)
        log.iteration(dt, kv.allocated_slots, kv.used_slots, len(running))
        t += dt
        for r in list(running):
            r.done += 1
            log.token(r.req.rid, t)
            if r.done == r.req.output_len:
                log.finish[r.req.rid] = t
                r.seq.free()  # leaves at once; its blocks serve the next iteration
                running.remove(r)
    return log


# ------------------------------------------------------------------------------ running

_SCHEDULERS = {"static": _run_static, "continuous": _run_continuous}


def _check_config(trace, batch, max_len, num_blocks, block_size, paged: bool) -> None:
    if not trace:
        raise ValueError("trace is empty; make one with make_trace(n_requests >= 1)")
    for name, v in (
        ("batch", batch),
        ("max_len", max_len),
        ("num_blocks", num_blocks),
        ("block_size", block_size),
    ):
        if not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an int >= 1, got {v!r}")
    if paged and max_len % block_size:
        raise ValueError(
            f"block_size={block_size} must divide max_len={max_len} so a "
            "max-length sequence fills whole blocks; pick a divisor"
        )
    if paged and num_blocks * block_size < max_len:
        raise ValueError(
            f"num_blocks * block_size = {num_blocks * block_size} slots cannot "
            f"hold one max_len={max_len} sequence; raise num_blocks"
        )
    for r in trace:
        if r.prompt_len < 1 or r.output_len < 1 or r.arrival < 0:
            raise ValueError(
                f"request {r.rid} has a negative or zero length or a negative "
                "arrival; lengths must be >= 1, arrivals >= 0"
            )
        if r.prompt_len + r.output_len > max_len:
            raise ValueError(
                f"request {r.rid} needs {r.prompt_len + r.output_len} slots > "
                f"max_len={max_len}; raise max_len or clip the trace"
            )


def run(
    scheduler: str,
    trace: list[Request],
    *,
    batch: int = 8,
    max_len: int = 2048,
    num_blocks: int | None = None,
    block_size: int = 16,
    t_fixed: float = 0.010,
    t_per_token: float = 1e-4,
) -> dict:
    """Simulate ``scheduler`` ("static" or "continuous") on ``trace``.

    ``batch``: static batch size, or the most running sequences for continuous.
    ``num_blocks`` (continuous only): KV blocks in the pool; ``None`` gives the memory
    static batching reserves at batch 8, ``8 * max_len`` slots, whatever ``batch`` is.
    """
    if scheduler not in _SCHEDULERS:
        raise ValueError(
            f"scheduler must be one of {sorted(_SCHEDULERS)}, got {scheduler!r}"
        )
    trace = sorted(trace, key=lambda r: r.arrival)
    num_blocks = (
        num_blocks if num_blocks is not None else 8 * max_len // max(block_size, 1)
    )
    _check_config(
        trace, batch, max_len, num_blocks, block_size, paged=scheduler == "continuous"
    )
    if t_fixed < 0 or t_per_token < 0 or t_fixed + t_per_token <= 0:
        raise ValueError("t_fixed and t_per_token must be >= 0 and not both 0")

    def cost(tokens: int) -> float:
        return t_fixed + t_per_token * tokens

    log = _SCHEDULERS[scheduler](
        trace, batch, max_len, cost, num_blocks=num_blocks, block_size=block_size
    )
    return {"method": scheduler, "batch": batch, **_summary(trace, log)}


def rows(
    trace: list[Request] | None = None,
    runs=(("static", 8), ("continuous", 64)),
    **config,
) -> list[dict]:
    """One table row per (scheduler, batch) in ``runs`` on ``trace`` (default:
    :func:`make_trace`'s defaults); per-request dictionaries left out."""
    trace = make_trace() if trace is None else trace
    out = []
    for scheduler, batch in runs:
        r = run(scheduler, trace, batch=batch, **config)
        out.append({k: v for k, v in r.items() if k not in ("finish", "generated")})
    return out
