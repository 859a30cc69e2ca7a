"""A makespan simulator for decode attention: how busy each way of cutting the work
keeps the SMs of a model GPU.

A decode batch: request r has a KV cache of L_r tokens and one new query token.  Its
work is ``heads_kv`` x ⌈L_r / tile⌉ key tiles.  One program serves one K/V head of a
request *and all the query heads of its GQA group*: they share every K/V tile it reads,
so the unit of work is a K/V head, not a query head.  The model GPU has ``sms`` SMs,
each running one program at a time.

Costs, in arbitrary time units (all are parameters):

- ``t_tile`` (1.0): one key tile — read K_j and V_j, update the softmax state.
- ``t_launch`` (0.5): the fixed cost of every piece of work — a program of "fixed" or
  "flash_decoding", a segment of one head in a "lean" worker: load q, set up the state,
  write the result.  Charging lean's segments the same as whole programs keeps the
  comparison about load balance alone.
- ``t_merge`` (0.1): for each (request, head) cut into p pieces, (p − 1) x t_merge to
  write and merge the extra partial results, charged to the piece holding the head's
  first tile (the one that merges).

Schedules:

- ``"fixed"``: no split, one program per (request, K/V head), dispatched in launch order
  to the least-loaded SM — a GPU's block scheduler starting each program on the SM that
  frees first.
- ``"flash_decoding"``: every (request, head) cut into the same number of splits,
  chosen from the batch by flash-attn's heuristic (:func:`flash_decoding_splits`):
  as few splits as fill the SMs' waves to within 85% of the best possible.  Each request's chunks are equal
  (:func:`~effdl.attention.decode.split_chunk` on its tiles), so a short request gets
  short chunks and the longest request's chunks decide the makespan.  Dispatched like
  "fixed".
- ``"lean"``: stream-K (Lean Attention, Sanovar et al. 2024): one worker per SM, the
  batch's tiles laid end to end (request by request, head by head) and cut into ``sms``
  equal ranges (±1 tile); a range crosses head and request boundaries.

Not modelled: memory-bandwidth contention (a tile costs the same wherever it runs),
the wait of a merging piece for the partials it needs, a separate combine kernel.
"""

from __future__ import annotations

import heapq
import math

from effdl.attention.decode import split_chunk

SCHEDULES = ("fixed", "flash_decoding", "lean")


def _positive_int(name, x):
    if not isinstance(x, int) or isinstance(x, bool) or x < 1:
        raise ValueError(f"{name} must be a positive int, got {x!r}")


def _check(contexts, heads_kv, sms, tile, t_tile, t_launch, t_merge):
    if not isinstance(contexts, (list, tuple)) or not contexts:
        raise ValueError(f"contexts must be a non-empty list of context lengths "
                         f"(one per request), got {contexts!r}")
    for i, L in enumerate(contexts):
        if not isinstance(L, int) or isinstance(L, bool) or L < 1:
            raise ValueError(f"contexts[{i}] must be a positive int (tokens in the KV "
                             f"cache), got {L!r}")
    for name, x in (("heads_kv", heads_kv), ("sms", sms), ("tile", tile)):
        _positive_int(name, x)
    if not (isinstance(t_tile, (int, float)) and math.isfinite(t_tile) and t_tile > 0):
        raise ValueError(f"t_tile must be a positive time, got {t_tile!r}")
    for name, x in (("t_launch", t_launch), ("t_merge", t_merge)):
        if not (isinstance(x, (int, float)) and math.isfinite(x) and x >= 0):
            raise ValueError(f"{name} must be a time >= 0, got {x!r}")


def flash_decoding_splits(n_tiles: list[int], heads_kv: int, sms: int,
                          max_splits: int = 128) -> int:
    """The batch's split count, by flash-attn's ``num_splits_heuristic``: one split
    if the programs almost fill the SMs (>= 80%); else the smallest count whose wave
    efficiency (programs / SMs over its ceiling) is within 85% of the best, among
    counts that change the chunk size (of the longest request's tiles)."""
    programs, n = len(n_tiles) * heads_kv, max(n_tiles)
    if programs >= 0.8 * sms:
        return 1
    top = min(max_splits, sms, n)

    def eligible(s):                                   # s - 1 splits would cut the same
        return s == 1 or -(-n // s) != -(-n // (s - 1))

    def efficiency(s):                                 # the last wave's filled fraction
        waves = programs * s / sms
        return waves / math.ceil(waves)

    best = max(efficiency(s) for s in range(1, top + 1) if eligible(s))
    return next(s for s in range(1, top + 1) if eligible(s) and efficiency(s) >= 0.85 * best)


def _pieces(schedule, n_tiles, heads_kv, sms, num_splits):
    """Each worker's or program's pieces of work, ``[(request, head, tiles), ...]``."""
    units = [(r, h, n) for r, n in enumerate(n_tiles) for h in range(heads_kv)]
    if schedule == "fixed":
        return [[u] for u in units]
    if schedule == "flash_decoding":
        programs = []
        for r, h, n in units:
            chunk = split_chunk(n, num_splits)         # whole tiles, equal but the last
            programs += [[(r, h, min(chunk, n - s))]
                         for s in range(0, n, chunk)]
        return programs
    total = sum(n for _, _, n in units)                # lean: cut the tiles end to end
    workers, unit, done = [], 0, 0                     # done: tiles of unit given
    for w in range(sms):
        want, segs = total // sms + (w < total % sms), []
        while want:
            r, h, n = units[unit]
            take = min(want, n - done)
            segs.append((r, h, take))
            want, done = want - take, done + take
            if done == n:
                unit, done = unit + 1, 0
        workers.append(segs)
    return [segs for segs in workers if segs]          # more SMs than tiles: idle ones


def _durations(programs, t_tile, t_launch, t_merge):
    """Per program its timeline ``[(duration, request or None), ...]``: None marks
    the overheads (launch of each piece, merges)."""
    parts, host = {}, {}
    for p, segs in enumerate(programs):
        for s, (r, h, _) in enumerate(segs):
            parts[r, h] = parts.get((r, h), 0) + 1
            host.setdefault((r, h), (p, s))            # the piece with the first tile
    timelines = []
    for p, segs in enumerate(programs):
        line = []
        for s, (r, h, n) in enumerate(segs):
            line += [(t_launch, None), (n * t_tile, r)]
            if host[r, h] == (p, s) and parts[r, h] > 1:
                line.append(((parts[r, h] - 1) * t_merge, None))
        timelines.append(line)
    return timelines


def simulate(schedule: str, contexts: list[int], heads_kv: int, sms: int,
             tile: int = 256, t_tile: float = 1.0, t_launch: float = 0.5,
             t_merge: float = 0.1, num_splits: int | None = None) -> dict:
    """Run one schedule of a decode batch on the model GPU (see the module doc).

    Returns ``{"schedule", "contexts", "heads_kv", "sms", "splits", "programs",
    "tiles", "tile_work", "overhead", "loads", "makespan", "utilization", "gantt"}``:
    ``loads`` the busy time of each SM, ``gantt`` per SM its ``(start, end, request)``
    intervals (request None: overhead), utilization = tile_work / (sms · makespan).
    ``num_splits`` overrides flash-decoding's split count.
    """
    _check(contexts, heads_kv, sms, tile, t_tile, t_launch, t_merge)
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose one of {SCHEDULES}")
    if num_splits is not None:
        _positive_int("num_splits", num_splits)
        if schedule != "flash_decoding":
            raise ValueError(f"num_splits is flash_decoding's; {schedule!r} takes none")
    n_tiles = [-(-L // tile) for L in contexts]        # key tiles per request and head
    if schedule == "flash_decoding" and num_splits is None:
        num_splits = flash_decoding_splits(n_tiles, heads_kv, sms)
    programs = _pieces(schedule, n_tiles, heads_kv, sms, num_splits)
    gantt = [[] for _ in range(sms)]
    free = [(0.0, sm) for sm in range(sms)]            # (time the SM frees, SM)
    lines = _durations(programs, t_tile, t_launch, t_merge)
    for p, line in enumerate(lines):
        if schedule == "lean":                         # persistent: worker p is SM p
            now, sm = 0.0, p
        else:                                          # launch order, least-loaded SM
            now, sm = heapq.heappop(free)
        for dt, request in line:
            if dt:                                     # no zero-length overheads
                gantt[sm].append((now, now + dt, request))
            now += dt
        if schedule != "lean":
            heapq.heappush(free, (now, sm))
    loads = [sum(e - s for s, e, _ in g) for g in gantt]
    tile_work = sum(e - s for g in gantt for s, e, r in g if r is not None)
    makespan = max(g[-1][1] for g in gantt if g)
    return {
        "schedule": schedule, "contexts": list(contexts), "heads_kv": heads_kv,
        "sms": sms, "splits": {"fixed": 1, "flash_decoding": num_splits}.get(schedule),
        "programs": len(programs), "tiles": heads_kv * sum(n_tiles),
        "tile_work": tile_work, "overhead": sum(loads) - tile_work, "loads": loads,
        "makespan": makespan, "utilization": tile_work / (sms * makespan),
        "gantt": gantt,
    }


def rows(batches: dict[str, list[int]], heads_kv: int, sms: int,
         schedules=SCHEDULES, **costs) -> list[dict]:
    """:func:`simulate` for every batch x schedule, as table rows (no per-SM lists):
    ``{"batch", "schedule", "B", "L_max", "tiles", "programs", "splits",
    "makespan", "utilization"}``.  ``costs``: tile, t_tile, t_launch, t_merge."""
    if not isinstance(batches, dict) or not batches:
        raise ValueError("batches must be a non-empty dict {name: contexts}")
    out = []
    for name, contexts in batches.items():
        for schedule in schedules:
            sim = simulate(schedule, contexts, heads_kv, sms, **costs)
            out.append({"batch": name, "schedule": schedule, "B": len(contexts),
                        "L_max": max(contexts),
                        **{k: sim[k] for k in ("tiles", "programs", "splits",
                                               "makespan", "utilization")}})
    return out


#: the batches of the chapter and the benchmark: one long context, equal contexts, a mix (one
#: 32k conversation among short ones), many short ones; 8 K/V heads on the H100's 132 SMs
BATCHES = {
    "1 x 128k": [131_072],
    "8 x 8k": [8192] * 8,
    "mixed": [32_768, 1024, 1536, 2048, 2560, 3072, 3584, 4096],
    "64 x 512": [512] * 64,
}


def bench_rows(batches: dict[str, list[int]] | None = None, heads_kv: int = 8,
               sms: int = 132) -> list[dict]:
    """Benchmark rows of every schedule on ``batches`` (default :data:`BATCHES`):
    ``{"name": "makespan", "batch", "schedule", "contexts", "sms", "makespan",
    "utilization", "vs_fixed"}``, ``contexts`` as text, ``vs_fixed`` the utilization
    over the unsplit schedule's on the same batch."""
    batches = BATCHES if batches is None else batches
    out = []
    for r in rows(batches, heads_kv, sms):
        ctx = batches[r["batch"]]
        out.append({"name": "makespan", "batch": r["batch"], "schedule": r["schedule"],
                    "contexts": ",".join(map(str, ctx)) if len(set(ctx)) > 1
                    else f"{len(ctx)}x{ctx[0]}",
                    "sms": sms, "makespan": r["makespan"], "utilization": r["utilization"]})
    fixed = {r["batch"]: r["utilization"] for r in out if r["schedule"] == "fixed"}
    for r in out:
        r["vs_fixed"] = r["utilization"] / fixed[r["batch"]]
    return out
