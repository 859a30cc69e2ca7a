"""The measurements of the inference chapter, one function per section.

Every timing here is interleaved (:func:`effdl.measure.interleaved`): the versions being
compared run round by round, so a drift of the shared machine cannot pass for a
difference; each row keeps the median and the quartiles of its rounds.
"""

from __future__ import annotations

import statistics

import numpy as np
import torch

from effdl.inference import serving
from effdl.inference.speculative import speculative_greedy
from effdl.lm.generation import generate
from effdl.lm.model import ByteLM, LMConfig, kv_bytes_per_token
from effdl.measure import count_flops, interleaved, quartiles

__all__ = ["REAL_CONFIGS", "ROW_FIELDS", "calibrate", "generation_sweep", "kinetics", "load_models",
           "draft_cost", "kv_table", "kvpred_rows", "ppd_rows", "predicted_speedup",
           "prompt_of", "prompts_of", "row", "serving_rows", "speculative_rows",
           "step_costs"]

#: the fields of every benchmark row (``None`` where one does not apply)
ROW_FIELDS = ("method", "batch", "prompt_len", "gen_len", "ttft_ms", "tpot_ms",
              "tokens_per_s", "kv_bytes", "acceptance", "speedup")


def row(method: str, **fields) -> dict:
    """A benchmark row with every field of :data:`ROW_FIELDS` (others may follow)."""
    out = {k: None for k in ROW_FIELDS}
    out.update(method=method, **fields)
    return out


def prompts_of(length: int, count: int, device=None) -> list[torch.Tensor]:
    """``count`` held-out prompts (seeds 0, 1, ...): timings averaged over several
    texts, since how predictable a continuation is varies from text to text."""
    return [prompt_of(length, seed=i, device=device) for i in range(count)]


def prompt_of(length: int, seed: int = 0, split: str = "held_out",
              device=None) -> torch.Tensor:
    """A real prompt: ``length`` bytes of held-out standard-library source, (1, length).

    Why real text and not random bytes: speculative decoding and PPD accept guesses only
    where the text is predictable, and random bytes are not text.
    """
    from effdl.lm.data import load_corpus

    data = getattr(load_corpus(1_000_000), split)
    g = torch.Generator().manual_seed(seed)
    i = int(torch.randint(0, len(data) - length, (1,), generator=g))
    return data[i:i + length].long()[None].to(device)


def _device(model: ByteLM) -> torch.device:
    return model.embed.weight.device


def _spread(times: list[float]) -> dict:
    q1, med, q3 = quartiles(times)
    return {"ms": med, "ms_q1": q1, "ms_q3": q3}


def load_models(device=None) -> tuple[ByteLM, ByteLM]:
    """The profile's two trained models of :mod:`effdl.lm`, ``(large, draft)``: the
    large model speculative decoding speeds up, and its small draft (trained on first
    use, then read from the disk cache)."""
    from effdl import lm

    return lm.load("target", device=device), lm.load("draft", device=device)


# ------------------------------------------------------------------ naive loop vs KV cache

def generation_sweep(model: ByteLM, totals, prompt: int, repeat: int) -> list[dict]:
    """Time greedy generation up to each total length, naive loop vs KV cache.

    The prompt is ``min(prompt, total // 4)`` tokens, the rest is generated.  One row
    per (method, total) with tokens/s over the generated tokens and the speed-up of the
    cache (per-round ratio, median)."""
    out = []
    # why one short warm-up, not one per size: a warm-up of the naive loop at the
    # longest length would cost as much as a timed round
    for cached in (False, True):
        generate(model, prompt_of(4, device=_device(model)), 8, cached=cached)
    for total in totals:
        p = max(1, min(prompt, total // 4))
        idx, n = prompt_of(p, device=_device(model)), total - p
        res = interleaved({"naive": lambda: generate(model, idx, n, cached=False),
                           "kv_cache": lambda: generate(model, idx, n, cached=True)},
                          rounds=repeat, warmup=0, device=_device(model))
        ratios = [a / b for a, b in zip(res["naive"].times_ms, res["kv_cache"].times_ms)]
        for method, r in res.items():
            s = _spread(r.times_ms)
            out.append(row(method, batch=1, prompt_len=p, gen_len=n,
                           tokens_per_s=n / s["ms"] * 1e3,
                           speedup=statistics.median(ratios) if method == "kv_cache"
                           else 1.0, total=total, **s))
    return out


@torch.no_grad()
def step_costs(model: ByteLM, prompt_lens, batches, context: int, repeat: int,
               steps: int = 16) -> list[dict]:
    """Prefill of each prompt length (batch 1) and one decode step at each batch size
    (context ``context``): the two kinds of forward a server runs, in ms.

    A decode sample runs ``steps`` consecutive steps and reports their mean: why not one
    step alone: a lone step pays the timer's and the cache's start-up around it, and
    measured 2-4x slower than the same step inside a generation loop."""
    fns, shapes, dev = {}, {}, _device(model)
    for p in prompt_lens:
        idx = prompt_of(p, device=dev)
        fns[f"prefill {p}"] = lambda idx=idx: model.prefill(idx)
        shapes[f"prefill {p}"] = ("prefill", 1, p)
    for b in batches:
        _, cache = model.prefill(prompt_of(context, device=dev).expand(b, -1).contiguous())
        tok = torch.zeros(b, 1, dtype=torch.long, device=dev)

        def step(cache=cache, tok=tok):                   # decode, then forget them
            for _ in range(steps):
                model.decode_step(tok, cache)
            cache.crop(context)
        fns[f"decode {b}"], shapes[f"decode {b}"] = step, ("decode", b, 1)
    res = interleaved(fns, rounds=repeat, warmup=2, device=dev)
    out = []
    for name, (kind, b, t) in shapes.items():
        per = steps if kind == "decode" else 1
        s = _spread([ms / per for ms in res[name].times_ms])
        out.append({"kind": kind, "batch": b, "tokens": b * t, **s})
    return out


def calibrate(costs: list[dict]) -> tuple[float, float]:
    """Least-squares ``t_fixed + t_per_token * tokens`` (seconds) through the measured
    forwards of :func:`step_costs`: the serving simulator's cost model, from this
    machine."""
    x = np.array([c["tokens"] for c in costs], float)
    y = np.array([c["ms"] for c in costs], float) / 1e3
    slope, intercept = np.polyfit(x, y, 1)
    return max(float(intercept), 1e-6), max(float(slope), 0.0)


# ---------------------------------------------------------------------------- serving

def trace_for(config: LMConfig, requests: int, rate: float, seed: int = 0):
    """A Poisson trace whose prompts and outputs fit the model's context: log-normal
    lengths with medians of an eighth of the context, clipped to 3/8 of it each."""
    L = config.max_len
    prompt = ("lognormal", L // 8, 0.8, 4, 3 * L // 8)
    output = ("lognormal", L // 8, 1.0, 4, 3 * L // 8)
    return serving.make_trace(requests, rate, prompt, output, seed=seed)


def serving_rows(config: LMConfig, requests: int, rate: float, batches, block: int,
                 t_fixed: float, t_per_token: float, seeds=(0, 1, 2)) -> list[dict]:
    """Static vs continuous batching on the same traces, for each batch size.

    The KV pool of continuous batching is what static batching reserves at the same
    batch size (``batch * max_len`` slots): equal memory.  One row per (scheduler,
    batch, seed) with throughput (tokens/s), p50/p95 latency (s), and the KV waste."""
    out = []
    for seed in seeds:
        trace = trace_for(config, requests, rate, seed)
        for b in batches:
            # "4x sequences": the same KV pool, but up to 4b sequences in it, which
            # only paging allows (a max-length reservation fits b)
            for sched, cap in (("static", b), ("continuous", b),
                               ("continuous, 4x sequences", 4 * b)):
                r = serving.run(sched.split(",")[0], trace, batch=cap,
                                max_len=config.max_len,
                                num_blocks=b * config.max_len // block,
                                block_size=block, t_fixed=t_fixed,
                                t_per_token=t_per_token)
                out.append({k: v for k, v in r.items()
                            if k not in ("finish", "generated")}
                           | {"method": sched, "batch": b, "seed": seed,
                              "p50_s": r["p50_ms"] / 1e3, "p95_s": r["p95_ms"] / 1e3})
    return out


# ------------------------------------------------------------------------ KV memory

#: published model configurations (each repository's config.json on the Hugging Face
#: Hub: meta-llama/Llama-2-7b-hf, meta-llama/Llama-2-70b-hf, meta-llama/Meta-Llama-3-8B,
#: mistralai/Mistral-7B-v0.1): layers, attention heads, KV heads, hidden size; the
#: parameter counts are computed from the same files
REAL_CONFIGS = {
    "Llama-2-7B": dict(n_layer=32, n_head=32, n_kv_head=32, d_model=4096,
                       params=6.74e9),
    "Llama-2-70B": dict(n_layer=80, n_head=64, n_kv_head=8, d_model=8192,
                        params=69.0e9),
    "Llama-3-8B": dict(n_layer=32, n_head=32, n_kv_head=8, d_model=4096, params=8.03e9),
    # Mistral-7B-v0.1 attends to the last 4096 tokens only: its cache stops growing there
    "Mistral-7B": dict(n_layer=32, n_head=32, n_kv_head=8, d_model=4096, params=7.24e9,
                       window=4096),
}


def kv_per_token(n_layer, n_head, n_kv_head, d_model, bytes_per=2, **_) -> int:
    """K and V of one token, every layer: 2 · layers · KV heads · head dim · bytes."""
    return 2 * n_layer * n_kv_head * (d_model // n_head) * bytes_per


def kv_table(model: ByteLM, context: int = 4096) -> list[dict]:
    """KV bytes per token and for one ``context``-token sequence: this model (fp32) and
    the published configurations (fp16), with what GQA saves against full heads."""
    c = model.config
    rows = [{"model": "large model here (fp32)", "layers": c.n_layer,
             "kv_heads": f"{c.n_kv_head}/{c.n_head}",
             "kv_per_token": kv_bytes_per_token(c, torch.float32),
             "without_gqa": kv_bytes_per_token(c, torch.float32) * c.n_head
             // c.n_kv_head}]
    for name, cfg in REAL_CONFIGS.items():
        full = dict(cfg, n_kv_head=cfg["n_head"])
        rows.append({"model": f"{name} (fp16)", "layers": cfg["n_layer"],
                     "kv_heads": f"{cfg['n_kv_head']}/{cfg['n_head']}",
                     "kv_per_token": kv_per_token(**cfg),
                     "without_gqa": kv_per_token(**full)})
    for r in rows:
        r["KiB per token"] = r["kv_per_token"] / 2**10
        r["without GQA"] = r["without_gqa"] / 2**10
        r[f"MiB per {context} tokens"] = r["kv_per_token"] * context / 2**20
        r[f"GiB per {context} tokens"] = r["kv_per_token"] * context / 2**30
    return rows


# -------------------------------------------------------------------- speculative

def _pool(stats: list):
    """One stats object whose counts are the sums of ``stats``' (several prompts)."""
    from dataclasses import fields

    first = stats[0]
    return type(first)(**{f.name: sum(getattr(s, f.name) for s in stats)
                          for f in fields(first)})


@torch.no_grad()
def draft_cost(target: ByteLM, draft: ByteLM, context: int, repeat: int,
               steps: int = 16) -> float:
    """c: the draft's decode step time over the large model's, at ``context``, batch 1
    (interleaved; the median of the per-round ratios of ``steps`` consecutive steps)."""
    fns = {}
    for name, m in (("large", target), ("draft", draft)):
        _, cache = m.prefill(prompt_of(context, device=_device(m)))
        tok = torch.zeros(1, 1, dtype=torch.long, device=_device(m))

        def run(m=m, cache=cache, tok=tok):
            for _ in range(steps):
                m.decode_step(tok, cache)
            cache.crop(context)
        fns[name] = run
    res = interleaved(fns, rounds=repeat, warmup=1, device=_device(target))
    return statistics.median(d / t for d, t in zip(res["draft"].times_ms,
                                                   res["large"].times_ms))


def predicted_speedup(alpha: float, k: int, c: float) -> float:
    """Leviathan et al.'s expected improvement in wall time (their Theorem 3.8):
    (1 - alpha^(k+1)) / ((1 - alpha)(k c + 1)), for a per-guess rate alpha and a draft
    step costing c of the large model's (one verification = one large step)."""
    tokens = (1 - alpha ** (k + 1)) / (1 - alpha) if alpha < 1 else k + 1
    return tokens / (k * c + 1)


def _speedups(res, base: str, name) -> dict:
    t, b = res[name].times_ms, res[base].times_ms
    q1, med, q3 = quartiles([x / y for x, y in zip(b, t)])
    return {"speedup": med, "speedup_q1": q1, "speedup_q3": q3}


def _verified_timings(model: ByteLM, prompts, n: int, ks, repeat: int, run, name: str):
    """Time ``run(prompt, k) -> (ids, stats)`` for each k against the model's own
    cached greedy generation, all ``prompts`` in turn per call, interleaved.

    Each output is first compared with the model's greedy output (a mismatch raises):
    both speculative decoding and PPD promise exactly that output.  Returns the
    interleaved results (keys ``"alone"`` and each k) and each k's stats pooled over
    the prompts."""
    refs = [generate(model, p, n, cached=True) for p in prompts]
    fns = {"alone": lambda: [generate(model, p, n, cached=True) for p in prompts]}
    stats = {}
    for k in ks:
        got = []
        for p, ref in zip(prompts, refs):
            ids, st = run(p, k)
            if not torch.equal(ids, ref):
                raise AssertionError(f"{name} with k={k} changed the output")
            got.append(st)
        stats[k] = _pool(got)
        fns[k] = lambda k=k: [run(p, k) for p in prompts]
    return interleaved(fns, rounds=repeat, warmup=1, device=_device(model)), stats


def _alone_row(res, prompts, n) -> dict:
    t = res["alone"].times_ms
    return row("large model alone", batch=1, prompt_len=prompts[0].shape[1], gen_len=n,
               tokens_per_s=n * len(prompts) / statistics.median(t) * 1e3,
               speedup=1.0, k=0, tokens_per_call=1.0, **_spread(t))


def speculative_rows(target: ByteLM, draft: ByteLM, prompts, n: int, ks,
                     repeat: int, c: float | None = None) -> list[dict]:
    """The large model alone vs speculative decoding with each draft length k, each
    timed on all ``prompts`` in turn, interleaved.

    Every speculative output is compared with the large model's own greedy output (a
    mismatch raises).  Per k, pooled over the prompts: ``alpha`` (per-guess rate),
    ``accept_rate`` (share of drafted tokens kept), tokens per large-model call, their
    expectation (1 - alpha^(k+1)) / (1 - alpha), the measured speed-up (median of
    per-round ratios, with quartiles) and, given the draft's relative cost ``c``, the
    speed-up :func:`predicted_speedup` expects."""
    res, stats = _verified_timings(
        target, prompts, n, ks, repeat,
        lambda p, k: speculative_greedy(target, draft, p, n, k), "speculative decoding")
    out = [_alone_row(res, prompts, n)]
    for k, st in stats.items():
        a = st.alpha
        out.append(row("speculative", batch=1, prompt_len=prompts[0].shape[1],
                       gen_len=n, acceptance=st.acceptance_rate,
                       accept_rate=st.acceptance_rate, alpha=a, k=k,
                       tokens_per_s=n * len(prompts)
                       / statistics.median(res[k].times_ms) * 1e3,
                       tokens_per_call=st.new_tokens / st.target_calls,
                       expected_per_call=predicted_speedup(a, k, 0.0),
                       predicted=None if c is None else predicted_speedup(a, k, c),
                       calls_per_token=st.target_calls_per_token,
                       **_speedups(res, "alone", k), **_spread(res[k].times_ms)))
    return out


# ----------------------------------------------------------- parallel prompt decoding

def ppd_rows(model: ByteLM, prompt_tokens, prompts, n: int, ks,
             repeat: int) -> list[dict]:
    """The model alone vs PPD with k guesses checked per step, each timed on all
    ``prompts`` in turn, interleaved, batch 1.

    Every PPD output is compared with the model's own greedy output (a mismatch
    raises).  Rows: per-guess rate, share of guesses kept, tokens per model call,
    speed-up (median of the per-round ratios, with quartiles), extra parameter bytes."""
    from effdl.inference.ppd import ppd_greedy

    res, stats = _verified_timings(
        model, prompts, n, ks, repeat,
        lambda p, k: ppd_greedy(model, prompt_tokens, p, n, k), "PPD")
    out = [_alone_row(res, prompts, n) | {"method": "model alone"}]
    for k, st in stats.items():
        out.append(row("ppd", batch=1, prompt_len=prompts[0].shape[1], gen_len=n,
                       tokens_per_s=n * len(prompts)
                       / statistics.median(res[k].times_ms) * 1e3,
                       acceptance=st.acceptance_rate, accept_rate=st.acceptance_rate,
                       alpha=st.alpha, k=k, tokens_per_call=st.tokens_per_forward,
                       extra_bytes=prompt_tokens.nbytes(),
                       **_speedups(res, "alone", k), **_spread(res[k].times_ms)))
    return out


# ------------------------------------------------------------------- KV prediction

def kvpred_rows(base: ByteLM, aux: ByteLM, predictor, prompt_len: int,
                repeat: int) -> list[dict]:
    """Time to first token, interleaved: the large model's prefill, KV prediction
    (auxiliary prefill + predicted cache + one large-model step) and the auxiliary
    prefill alone, on a held-out prompt, batch 1.  ``speedup``: the per-round ratio
    of the large model's prefill to KV prediction (median, with quartiles)."""
    from effdl.inference.kvpred import predict_cache

    prompt = prompt_of(prompt_len, device=_device(base))
    fns = {"large model prefill": lambda: base.prefill(prompt),
           "KV prediction": lambda: predict_cache(base, aux, predictor, prompt),
           "draft model prefill": lambda: aux.prefill(prompt)}
    with torch.no_grad():
        res = interleaved(fns, rounds=repeat, warmup=2, device=_device(base))
    full = res["large model prefill"].times_ms
    out = []
    for name, r in res.items():
        q1, med, q3 = quartiles([f / t for f, t in zip(full, r.times_ms)])
        out.append(row(name, batch=1, prompt_len=prompt_len,
                       ttft_ms=statistics.median(r.times_ms), speedup=med,
                       speedup_q1=q1, speedup_q3=q3, **_spread(r.times_ms)))
    return out


# ------------------------------------------------------------------------ Kinetics

def decode_token_cost(cfg: dict, context: int, batch: int = 1, bytes_per: int = 2):
    """FLOPs and bytes of generating one token per sequence at ``context`` tokens.

    Parameters: read once per step for the whole batch (2 FLOPs each per sequence;
    ``params`` counts the input embedding too, which a step only indexes).
    Attention: Q·K and P·V over the context, 4 · context · layers · heads · head dim
    FLOPs per sequence, and each sequence reads its own K and V (context · KV bytes per
    token).  Returns per-step totals for the batch."""
    head_dim = cfg["d_model"] // cfg["n_head"]
    context = min(context, cfg.get("window") or context)   # a sliding window caps it
    attn = 4 * context * cfg["n_layer"] * cfg["n_head"] * head_dim
    return {"param_bytes": cfg["params"] * bytes_per,
            "kv_bytes": batch * context * kv_per_token(**cfg, bytes_per=bytes_per),
            "param_flops": 2 * cfg["params"] * batch, "attn_flops": attn * batch}


def kinetics(contexts, batch: int = 1, configs=None) -> list[dict]:
    """Bytes and FLOPs per decode step as the context grows, per configuration; the
    context where the KV cache's traffic overtakes the weights' is ``crossover``."""
    configs = REAL_CONFIGS if configs is None else configs
    out = []
    for name, cfg in configs.items():
        cross = cfg["params"] * 2 / (batch * kv_per_token(**cfg))
        if cfg.get("window") and cross > cfg["window"]:
            cross = float("inf")                 # the capped cache never gets there
        for L in contexts:
            c = decode_token_cost(cfg, L, batch)
            out.append({"model": name, "context": L, "batch": batch, **c,
                        "kv_share": c["kv_bytes"] / (c["kv_bytes"] + c["param_bytes"]),
                        "crossover": cross})
    return out


def counted_step_flops(model: ByteLM, context: int) -> int:
    """FLOPs of one decode step of ``model`` at ``context``, counted by PyTorch's
    counter (:func:`effdl.measure.count_flops`): the formula's check on a real model."""
    _, cache = model.prefill(prompt_of(context, device=_device(model)))
    tok = torch.zeros(1, 1, dtype=torch.long, device=_device(model))
    backend = model.blocks[0].attn.backend
    # why split-KV for the count: its attention is plain matrix products, which the
    # counter sees; the fused CPU kernel of the default path is invisible to it
    model.set_decode_backend("split_kv")
    try:
        with torch.no_grad():
            return count_flops(lambda: model.decode_step(tok, cache))
    finally:
        model.set_decode_backend(backend)
