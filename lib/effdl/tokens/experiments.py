"""Helpers the token-compression chapter's notebook calls: the model, the pages, and the
measurements (accuracy, latency, FLOPs per reducer and budget; the KV codec's size and error).

Rows ``{"method", "keep", "mean_tokens_kept_frac", "accuracy", "ms_batch1", "ms_batch64", "gflops"}``
(``keep_all`` is the model with no reducer at all) and ``{"method": "kv", "bits", "group",
"ratio_vs_fp16", "attn_rel_err", "loss_rel_increase", ...}`` (see :func:`kv_rows`).
``python -m effdl.bench tokens`` calls the same functions.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from effdl.measure import interleaved
from effdl.tokens import kvcache
from effdl.tokens.documents import make_documents
from effdl.tokens.perlayer import evit_layers, forward_per_layer, per_layer_flops
from effdl.tokens.reducers import REDUCERS, make
from effdl.tokens.train import evaluate
from effdl.tokens.vit import Block, TinyViT, block_flops

__all__ = ["build_model", "datasets", "method_fn", "measure_methods", "token_cost", "kv_rows",
           "tcc_summary", "kv_model", "kv_windows", "cache_tensors", "query_tensors",
           "continuation_loss", "quantize_cache", "layer_sensitivity", "sensitivity_table",
           "predicted_increase", "allocate_bits", "even_bits", "delta_pays",
           "kv_premises", "codec_row", "ttft_s", "crossover_gbps", "ttft_timings",
           "count_datasets", "count_sweep", "per_layer_setting", "crop_budgets",
           "count_latency", "count_reducer", "count_comparison"]


def build_model(S, seed: int = 0) -> TinyViT:
    """The chapter's ViT at the profile's sizes (random init, seeded)."""
    torch.manual_seed(seed)
    return TinyViT(image_size=S.page, crop=S.crop, patch=S.patch, dim=S.dim, depth=S.depth, heads=S.heads,
                   reduce_at=S.reduce_at)


def datasets(S, seed: int = 0):
    """``(train_images, train_labels), (test_images, test_labels, test_info)`` for the profile."""
    train_set = make_documents(S.n_train, seed, size=S.page, glyph_px=S.glyph_px, grid=S.patch)
    test_set = make_documents(S.n_test, seed + 1, size=S.page, glyph_px=S.glyph_px, grid=S.patch, return_info=True)
    return train_set, test_set


def method_fn(method: str, keep: float):
    return None if method == "keep_all" else make(method, keep=keep)


def measure_methods(model, images, labels, *, keeps, batch: int = 64, repeat: int = 5, methods=None,
                    device=None, latency: bool = True, progress: bool = True) -> list[dict]:
    """Accuracy, mean kept fraction, latency (batch 1 and ``batch``) and GFLOPs per method and budget.

    ``keep_all`` runs the model with no reducer (the naive baseline, one row).  Latency is measured
    in ``repeat`` interleaved rounds (:func:`effdl.measure.interleaved`: every configuration once
    per round), so that a change in the machine's load hits all of them alike; the median over
    rounds is reported.  Batch-1 latency is
    the mean over 4 different pages (adaptive methods keep different counts per page).  GFLOPs are
    per page, analytic (:meth:`TinyViT.flops`) at the mean kept count.
    """
    dev = torch.device(device or "cpu")
    methods = list(methods or REDUCERS)
    pairs = [(m, 1.0) for m in methods if m == "keep_all"] + [(m, k) for m in methods if m != "keep_all" for k in keeps]
    model = model.to(dev).eval()
    images, labels = images.to(dev), labels.to(dev)
    rows = []
    for method, keep in tqdm(pairs, desc="accuracy", disable=not progress, leave=False):
        ev = evaluate(model, images, labels, method_fn(method, keep))
        rows.append({"method": method, "keep": keep,
                     "mean_tokens_kept_frac": ev["kept_frac"],
                     "accuracy": ev["accuracy"],
                     "gflops": model.flops(ev["kept_frac"] * model.n_patches) / 1e9})
    if not latency:
        return rows
    singles = [images[i:i + 1] for i in range(min(4, images.shape[0]))]
    xb = images[:batch]
    calls = {}
    for i, (method, keep) in enumerate(pairs):
        fn, gen = method_fn(method, keep), torch.Generator().manual_seed(0)
        calls[i, 1] = lambda fn=fn, gen=gen: [model(p, fn, generator=gen) for p in singles]
        calls[i, 64] = lambda fn=fn, gen=gen: model(xb, fn, buckets=4, generator=gen)
    with torch.no_grad():
        res = interleaved(calls, rounds=repeat, warmup=1, device=dev)
    for i, row in enumerate(rows):
        row.update(ms_batch1=res[i, 1].median_ms / len(singles), ms_batch64=res[i, 64].median_ms,
                   ms_batch64_iqr=res[i, 64].iqr_ms, batch=int(xb.shape[0]))
    return rows


def token_cost(dim: int, heads: int, depth: int, token_counts, *, batch: int = 64, repeat: int = 5,
               device=None) -> list[dict]:
    """Latency and FLOPs of ``depth`` ViT blocks against the number of tokens N (random tokens).

    FLOPs are analytic (:func:`block_flops`), with the share spent in attention (∝ N²) against
    the linear layers (∝ N).
    """
    dev = torch.device(device or "cpu")
    torch.manual_seed(0)
    blocks = torch.nn.ModuleList(Block(dim, heads) for _ in range(depth)).to(dev).eval()

    def run_blocks(x):
        for b in blocks:
            x, _, _ = b(x)
        return x

    inputs = {n: torch.randn(batch, n, dim, device=dev) for n in token_counts}
    with torch.no_grad():  # interleaved rounds, as in measure_methods
        res = interleaved({n: (lambda x=x: run_blocks(x)) for n, x in inputs.items()},
                          rounds=repeat, warmup=1, device=dev)
    rows = []
    for n in token_counts:
        ms = res[n].median_ms
        flops = depth * batch * block_flops(n, dim, blocks[0].mlp_ratio)
        attn = depth * batch * 4 * n * n * dim  # QKᵀ and PV: 2·N²·d FLOPs each
        rows.append({"n_tokens": n, "batch": batch, "ms": ms, "gflops": flops / 1e9,
                     "attn_flops_frac": attn / flops, "us_per_token": 1e3 * ms / (batch * n)})
    return rows


# ------------------------------------------------------- the KV cache of a trained LM
# The chapter compresses the cache of the course's trained byte-level model (effdl.lm,
# a shared library; a chapter never imports another chapter).  Shapes: a window batch
# has B sequences; k, v are (B, L, H_kv, T, d), one sequence's (L, H_kv, T, d) as the
# codec takes them.


def kv_model():
    """The course's trained byte-level language model (:func:`effdl.lm.load`), in eval
    mode, on the CPU.

    Trained (once, then cached) on the live device; the KV section runs on the CPU,
    where the range coder runs (its timings are the CPU's, on every profile).
    """
    from effdl import lm

    return lm.load(lm.store.NAMES[0], verbose=False).cpu()


def kv_windows(model, n: int, *, length: int | None = None, cont: int | None = None):
    """``n`` held-out windows of ``length`` bytes, evenly spaced: ``(context,
    continuation)``.

    ``length`` defaults to the windows the model was trained on (``seq_len``; past it a
    byte model predicts less well), ``cont`` to an eighth of it.  Returns context ``(n,
    length - cont)`` and continuation ``(n, cont)``, int64.  The held-out files were
    never trained on.
    """
    from effdl import lm

    T = min(length or lm.sizes().target_train.seq_len, model.config.max_len)
    cont = cont or max(4, T // 8)
    data = lm.load_corpus(lm.sizes().corpus_bytes).held_out.long()
    starts = torch.linspace(0, data.numel() - T - 1, n).long()
    w = data[starts[:, None] + torch.arange(T)]                       # (n, T)
    return w[:, :T - cont], w[:, T - cont:]


def cache_tensors(cache) -> tuple[torch.Tensor, torch.Tensor]:
    """The valid prefix of an :class:`effdl.lm.KVCache`: k, v ``(B, L, H_kv, T, d)``."""
    n = cache.length
    return (torch.stack([t[:, :, :n] for t in cache.k], 1),
            torch.stack([t[:, :, :n] for t in cache.v], 1))


@torch.no_grad()
def query_tensors(model, idx) -> torch.Tensor:
    """The queries (after RoPE) of one sequence ``idx`` ``(1, T)``: ``(L, H, T, d)``."""
    from effdl.lm.model import apply_rope

    outs = []
    hooks = [b.attn.wq.register_forward_hook(lambda m, i, o: outs.append(o))
             for b in model.blocks]
    try:
        model(idx[:1])
    finally:
        for h in hooks:
            h.remove()
    c, T = model.config, idx.shape[1]
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    return torch.stack([apply_rope(o.view(1, T, c.n_head, c.head_dim).transpose(1, 2),
                                   cos, sin)[0] for o in outs])


@torch.no_grad()
def continuation_loss(model, cache, cont, k=None, v=None) -> float:
    """Mean next-byte loss (nats) of ``cont[:, 1:]`` decoded after ``cache`` (teacher
    forcing).

    ``k, v`` ``(B, L, H_kv, T, d)``: replace the cached prefix first (a copy; ``cache``
    is left as it is).  The first continuation byte is predicted by the prefill's last
    logits, which no cache change can alter, so it is left out.
    """
    from effdl.lm import KVCache

    c = KVCache([t.clone() for t in cache.k], [t.clone() for t in cache.v],
                cache.length)
    if k is not None:
        for layer in range(len(c.k)):
            c.k[layer][:, :, :c.length] = k[:, layer]
            c.v[layer][:, :, :c.length] = v[:, layer]
    logits, _ = model.decode_step(cont, c)                              # (B, n, 256)
    return float(torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1).double(), cont[:, 1:].flatten()))


def quantize_cache(k, v, bits, group: int = 8):
    """k, v ``(B, L, H_kv, T, d)`` through the codec's quantizer
    (:func:`kvcache.delta_quantize`).

    ``bits``: one entry per layer, ``None`` to leave that layer exact.  Each (sequence,
    layer, K/V) is quantized as :func:`kvcache.compress` does: one row per token, all
    heads.
    """
    k, v = k.clone(), v.clone()
    B, L, H, T, d = k.shape
    for t in (k, v):
        for b in range(B):
            for layer, nb in enumerate(bits):
                if nb is not None:
                    x = t[b, layer].float().permute(1, 0, 2).reshape(T, H * d)
                    x_hat = kvcache.delta_quantize(x, nb, group)[2]
                    t[b, layer] = x_hat.reshape(T, H, d).permute(1, 0, 2).to(t.dtype)
    return k, v


def layer_sensitivity(model, cache, cont, bits: int | None = 3,
                      group: int = 8) -> list[float]:
    """Relative increase of the continuation loss when ONE layer's K and V are quantized
    to ``bits`` (every other layer exact): one number per layer.  ``bits=None``: no
    layer is quantized (the increase is exactly 0).
    """
    base = continuation_loss(model, cache, cont)
    k, v = cache_tensors(cache)
    out = []
    for layer in range(k.shape[1]):
        spec = [None] * k.shape[1]
        spec[layer] = bits
        kq, vq = quantize_cache(k, v, spec, group)
        out.append(continuation_loss(model, cache, cont, kq, vq) / base - 1)
    return out


def sensitivity_table(model, cache, cont, widths=(2, 3), group: int = 8) -> dict:
    """``{bits: [loss increase of layer 0, 1, ...]}``: :func:`layer_sensitivity` per
    width."""
    return {b: layer_sensitivity(model, cache, cont, b, group) for b in widths}


def predicted_increase(table: dict, layer: int, bits: int) -> float:
    """Loss increase of ``layer`` alone at ``bits``: measured when ``bits`` is in
    ``table``; past the widest measured width ``w``, ``table[w] · 4**-(bits - w)`` (one
    more bit halves the step, and the squared error falls 4×).
    """
    if bits in table:
        return table[bits][layer]
    w = max(table)
    if bits < w:
        raise ValueError(f"no measurement at {bits} bits; measured {sorted(table)}")
    return table[w][layer] * 4.0 ** -(bits - w)


def allocate_bits(table: dict, budget: int, *, high: int = 12) -> list[int]:
    """Bits per layer summing to ``budget``: each bit goes where it removes the most
    loss.

    ``table``: ``{bits: [loss increase per layer]}`` (:func:`sensitivity_table`).  Every
    layer starts at the narrowest measured width; each next bit goes to the layer whose
    predicted increase falls most from one more bit (:func:`predicted_increase`), ties
    to the earlier layer.
    """
    low, L = min(table), len(next(iter(table.values())))
    if not L * low <= budget <= L * high:
        raise ValueError(f"budget must lie in [{L * low}, {L * high}] bits for {L} "
                         f"layers in [{low}, {high}] bits each, got {budget}")
    bits = [low] * L

    def gain(i):  # loss removed by one more bit in layer i
        return (predicted_increase(table, i, bits[i])
                - predicted_increase(table, i, bits[i] + 1))

    for _ in range(budget - L * low):
        i = max((j for j in range(L) if bits[j] < high), key=gain)
        bits[i] += 1
    return bits


def even_bits(budget: int, n_layers: int) -> list[int]:
    """The budget spread evenly; a remainder goes to the first layers (CacheGen's rule
    of thumb: shallow layers are the sensitive ones).
    """
    q, r = divmod(budget, n_layers)
    return [q + (i < r) for i in range(n_layers)]


def _entropy_bits(q: torch.Tensor) -> float:
    """Empirical entropy of each column of integers ``q`` (N, C), in bits, averaged over
    C."""
    total = 0.0
    for col in q.T:
        p = torch.unique(col, return_counts=True)[1].double() / col.numel()
        total += float(-(p * p.log2()).sum())
    return total / q.shape[1]


@torch.no_grad()
def kv_premises(model, cache, *, bits: int = 6, group: int = 8) -> list[dict]:
    """CacheGen's premises, measured per layer on a cache ``(B, L, H_kv, T, d)``.

    For keys (as cached, after RoPE), keys with RoPE undone, and values: the mean cosine
    similarity of neighbouring tokens; the empirical entropy (bits per value, per
    channel) of the quantized integers at ``bits`` bits, coded raw, as deltas to the
    previous token and as deltas to the group's anchor; and the spread of the channels'
    scales (largest over median per-channel standard deviation).
    """
    from effdl.lm.model import apply_rope

    k, v = cache_tensors(cache)
    B, L, H, T, d = k.shape
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    k_pre = apply_rope(k.flatten(0, 1), cos, -sin).view(k.shape)  # rotate back
    rows = []
    for layer in range(L):
        for kind, t in (("K", k), ("K before RoPE", k_pre), ("V", v)):
            xs = [t[b, layer].float().permute(1, 0, 2).reshape(T, H * d)
                  for b in range(B)]
            cos_nb = torch.cat([F.cosine_similarity(x[1:], x[:-1], dim=-1) for x in xs])
            raw, prev, anchor = [], [], []
            for x in xs:
                q, step = kvcache.quantize_tokens(x, bits)
                raw.append(q)
                prev.append(torch.round((x[1:] - x[:-1]) / step[1:, None]).long())
                qd = kvcache.delta_quantize(x, bits, group)[0]
                anchor.append(qd[torch.arange(T) % group != 0])
            std = torch.cat(xs).std(0)                                 # (C,)
            rows.append({"layer": layer, "tensor": kind,
                         "neighbour_cos": float(cos_nb.mean()),
                         "bits_raw": _entropy_bits(torch.cat(raw)),
                         "bits_vs_prev": _entropy_bits(torch.cat(prev)),
                         "bits_vs_anchor": _entropy_bits(torch.cat(anchor)),
                         "ch_spread": float(std.max() / std.median())})
    return rows


def codec_row(model, cache, cont, bits, *, group: int = 8, q0=None, label=None) -> dict:
    """One codec setting on every sequence of ``cache``: real bytes, and the loss it
    costs.

    ``bits``: an int (uniform) or one int per layer.  Each sequence is compressed on its
    own (:func:`kvcache.compress`), decompressed, put back in the cache, and the
    continuation decoded from it.  ``q0``: the queries of sequence 0
    (:func:`query_tensors`), for the attention-output error.
    """
    k, v = cache_tensors(cache)
    L = k.shape[1]
    spec = [int(bits)] * L if isinstance(bits, int) else [int(b) for b in bits]
    blobs = [kvcache.compress(k[b], v[b], bits=spec, group=group)
             for b in range(k.shape[0])]
    back = [kvcache.decompress(blob) for blob in blobs]
    k2 = torch.stack([kb for kb, _ in back]).to(k.dtype)
    v2 = torch.stack([vb for _, vb in back]).to(v.dtype)
    base = continuation_loss(model, cache, cont)
    loss = continuation_loss(model, cache, cont, k2, v2)
    nbytes, fp16 = sum(map(len, blobs)), kvcache.fp16_bytes(k, v)
    row = {"method": "kv", "allocation": label or ("uniform" if isinstance(bits, int)
                                                   else "layer-wise"),
           "bits": bits if isinstance(bits, int) else "/".join(map(str, spec)),
           "layer_bits": spec, "mean_bits": sum(spec) / L, "group": group,
           "bytes": nbytes,
           "ratio_vs_fp16": fp16 / nbytes, "bits_per_value": 8 * nbytes / k.numel() / 2,
           "loss_rel_increase": loss / base - 1}
    if q0 is not None:
        row["attn_rel_err"] = kvcache.relative_error(
            kvcache.attention_output(q0, k[0], v[0]),
            kvcache.attention_output(q0, k2[0], v2[0]))
    return row


def delta_pays(premises) -> bool:
    """Whether coding deltas against anchors takes fewer bits than coding values, summed
    over the :func:`kv_premises` rows of the cached tensors (K after RoPE, and V)."""
    rows = [r for r in premises if r["tensor"] in ("K", "V")]
    return sum(r["bits_vs_anchor"] for r in rows) < sum(r["bits_raw"] for r in rows)


def kv_rows(S, *, model=None, means=None, table=None, group: int | None = None,
            progress: bool = True) -> list[dict]:
    """Even against measured bits per layer at the same total, for each mean width in
    ``means`` (default: 2.5 and ``S.kv_bits``), on ``S.kv_windows`` held-out windows of
    the trained language model.

    Rows ``{"method": "kv", "allocation", "bits", "layer_bits", "mean_bits", "group",
    "bytes", "ratio_vs_fp16", "bits_per_value", "loss_rel_increase", "attn_rel_err"}``;
    ``bits`` is an int when every layer has the same width, else ``"b0/b1/..."``.
    ``table``: the per-layer sensitivities (default: measured here at 2 and 3 bits);
    ``group``: the anchor interval (default: 8 if delta coding pays on this cache, else
    1).
    """
    model = model or kv_model()
    ctx, cont = kv_windows(model, S.kv_windows)
    with torch.no_grad():
        _, cache = model.prefill(ctx)
    if group is None:
        group = 8 if delta_pays(kv_premises(model, cache)) else 1
    table = table or sensitivity_table(model, cache, cont, (2, 3), group)
    q0 = query_tensors(model, ctx[:1])
    L = model.config.n_layer
    rows = []
    means = means or (2.5, *S.kv_bits)
    for m in tqdm(means, desc="kv", disable=not progress, leave=False):
        budget = round(m * L)
        for label, spec in (("even", even_bits(budget, L)),
                            ("measured", allocate_bits(table, budget))):
            bits = spec[0] if len(set(spec)) == 1 else spec
            rows.append(codec_row(model, cache, cont, bits, group=group, q0=q0,
                                  label=label))
    return rows


def ttft_s(nbytes: float, gbps, decode_s: float = 0.0):
    """Time to first token when the cache is fetched: ``8·nbytes / bandwidth +
    decode_s`` (seconds; ``gbps`` in Gbit/s, a number or an array).  The first token's
    own decode step is the same in every case and left out.
    """
    return 8 * nbytes / (np.asarray(gbps, dtype=float) * 1e9) + decode_s


def crossover_gbps(nbytes: float, recompute_s: float, decode_s: float = 0.0) -> float:
    """The bandwidth (Gbit/s) above which fetching ``nbytes`` and decoding them beats
    recomputing the prefill; ``inf`` when decoding alone takes longer than recomputing.
    """
    spare = recompute_s - decode_s
    return 8 * nbytes / spare / 1e9 if spare > 0 else math.inf


def ttft_timings(model, ctx, blobs: dict, *, repeat: int = 7) -> dict:
    """Seconds (median of interleaved rounds) of the prefill of ``ctx`` ``(1, T)`` and
    of turning each blob back into a cache: ``{"prefill": s, name: s, ...}``.

    ``blobs``: name -> ``bytes`` from :func:`kvcache.compress`, or a float16 tensor (the
    plain cache: decoding is reading it back as float32).
    """
    def decode(blob):
        if isinstance(blob, torch.Tensor):
            return lambda: blob.float()
        return lambda: kvcache.decompress(blob)

    calls = {"prefill": lambda: model.prefill(ctx)}
    calls.update({name: decode(b) for name, b in blobs.items()})
    with torch.no_grad():
        res = interleaved(calls, rounds=repeat, warmup=1)
    return {name: r.median_ms / 1e3 for name, r in res.items()}


def tcc_summary(rows) -> list[dict]:
    """TCC against the others, read off benchmark rows: one dict per comparison with its number.

    The most accurate TCC row keeping at most half of the tokens on average is compared with
    keep-all (accuracy difference, batch-64 speed-up) and with every fixed-ratio baseline's accuracy
    interpolated at the same mean kept fraction; for the KV codec, the best compression ratio among
    the settings with attention-output error ≤ 1e-2.
    """
    import numpy as np

    vit = [r for r in rows if r.get("method") not in ("kv", "blocks") and r.get("task") != "count"]
    base = next(r for r in vit if r["method"] == "keep_all")
    cands = [r for r in vit if r["method"] == "tcc" and r["mean_tokens_kept_frac"] <= 0.5]
    if not cands:
        return [{"comparison": "TCC at <= 50% tokens", "note": "no TCC budget kept <= 50% of the tokens"}]
    t = max(cands, key=lambda r: (r["accuracy"], r["mean_tokens_kept_frac"]))
    frac = t["mean_tokens_kept_frac"]
    out = [{"comparison": "TCC accuracy - keep-all accuracy", "kept_frac": frac,
            "value": 100 * (t["accuracy"] - base["accuracy"]), "unit": "points"}]
    for m in dict.fromkeys(r["method"] for r in vit if r["method"] not in ("keep_all", "tcc")):
        pts = sorted((r["mean_tokens_kept_frac"], r["accuracy"]) for r in vit if r["method"] == m)
        acc = float(np.interp(frac, [p[0] for p in pts], [p[1] for p in pts]))
        out.append({"comparison": f"TCC accuracy - {m} accuracy, same budget", "kept_frac": frac,
                    "value": 100 * (t["accuracy"] - acc), "unit": "points"})
    if "ms_batch64" in t:
        out.append({"comparison": "keep-all time / TCC time, batch 64", "kept_frac": frac,
                    "value": base["ms_batch64"] / t["ms_batch64"], "unit": "x"})
    kv = [r for r in rows if r.get("method") == "kv"]
    ok = [r for r in kv if r["attn_rel_err"] <= 1e-2]
    if ok:
        best = max(ok, key=lambda r: r["ratio_vs_fp16"])
        out.append({"comparison": f"KV size fp16 / compressed, error <= 1e-2 (bits {best['bits']})",
                    "value": best["ratio_vs_fp16"], "unit": "x"})
    return out


# --- the counting task: where the answer is spread over the page ------------------------------

def count_datasets(S, seed: int = 0):
    """Counting pages (:func:`effdl.tokens.density.make_count_documents`) for the profile:
    ``(train_images, train_labels), (test_images, test_labels, test_info)``; ``test_info`` has
    the exact count of each page and of each crop (``crop_count``)."""
    from effdl.tokens.density import make_count_documents

    train_set = make_count_documents(S.count_train, seed, size=S.page, glyph_px=S.glyph_px)
    test_set = make_count_documents(S.count_test, seed + 1, size=S.page, glyph_px=S.glyph_px,
                                    crop=S.crop, return_info=True)
    return train_set, test_set


def _per_layer_run(model, images, method, **kw):
    """(logits, FLOPs fraction of keep-all) of :func:`effdl.tokens.perlayer.forward_per_layer`."""
    logits, info = forward_per_layer(model, images, method, return_info=True, **kw)
    return logits, per_layer_flops(model, info["tokens"]) / model.flops()


def per_layer_setting(model, method: str, flops_frac: float, images) -> dict:
    """The per-layer option whose FLOPs come closest to ``flops_frac`` of keep-all.

    ToMe: the ``r`` merged in every block; EViT: the ``keep_rate`` at its default depths (searched
    on a 0.05 grid).  ``images``: a few pages (token counts do not depend on content).
    """
    if method not in ("tome", "evit"):
        raise ValueError(f"method must be 'tome' or 'evit', got {method!r}")
    if not 0 < flops_frac <= 1:
        raise ValueError(f"flops_frac must be in (0, 1], got {flops_frac}")
    n = model.n_patches
    if method == "tome":  # r merges per block (each block merges at most half of what is left)
        grid = [{"r": r} for r in range(0, n // 2 + 1)]
    else:
        grid = [{"keep_rate": k / 20} for k in range(1, 21)]
    best, gap = None, math.inf
    with torch.no_grad():
        for opt in grid:
            try:
                _, frac = _per_layer_run(model, images[:2], method, **opt)
            except ValueError:  # r too large for the token count
                continue
            if abs(frac - flops_frac) < gap:
                best, gap = opt, abs(frac - flops_frac)
    return best


def count_reducer(method: str, keep: float):
    """A reducer by name, plus ``"tcc+fuse"``: TCC whose dropped patches are averaged into one
    token per crop (``reducers.tcc(..., fuse="mean")``, this course's addition)."""
    if method == "tcc+fuse":
        return make("tcc", keep=keep, fuse="mean")
    return make(method, keep=keep)


@torch.no_grad()
def count_sweep(model, images, labels, *, keeps, methods=("random_drop", "pool", "evit", "tome",
                "tcc", "tcc+fuse"), per_layer=("tome", "evit", "evit-discard"), batch: int = 250,
                task: str = "count") -> list[dict]:
    """Accuracy against the fraction of keep-all FLOPs, every method, every budget.

    One-shot reducers (before block 0) run at each ``keep``; each per-layer method
    (:mod:`effdl.tokens.perlayer`) at the setting whose FLOPs match the one-shot EViT's at that
    ``keep`` (:func:`per_layer_setting`), so rows of one budget compare at equal FLOPs where
    the method can reach them.  ``"evit-discard"`` is a control: per-layer EViT's choice of
    tokens with its fused token left out.
    Rows ``{"task", "method", "where", "setting", "keep", "flops_frac", "kept_frac", "accuracy"}``;
    the first row is keep-all.
    """
    model = model.eval()
    dev = next(model.parameters()).device  # pages may sit on the host, as in the chapter
    images, labels = images.to(dev), labels.to(dev)
    full = evaluate(model, images, labels)
    pages = int(images.shape[0])
    rows = [{"task": task, "method": "keep_all", "where": "-", "setting": "-", "keep": 1.0,
             "flops_frac": 1.0, "kept_frac": 1.0, "accuracy": full["accuracy"], "pages": pages}]
    for keep in keeps:
        fracs = {}
        for m in methods:
            ev = evaluate(model, images, labels, count_reducer(m, keep))
            frac = model.flops(ev["kept_frac"] * model.n_patches) / model.flops()
            fracs[m] = frac
            rows.append({"task": task, "method": m, "where": "before block 0",
                         "setting": f"keep={keep:g}", "keep": keep, "flops_frac": frac,
                         "kept_frac": ev["kept_frac"], "accuracy": ev["accuracy"],
                         "pages": pages})
        goal = fracs.get("evit", model.flops(keep * model.n_patches) / model.flops())
        for m in per_layer:
            base = "evit" if m == "evit-discard" else m
            opt = per_layer_setting(model, base, goal, images)
            (key, val), = opt.items()
            if m == "evit-discard":  # the control: EViT's choice, its fused token left out
                opt = {**opt, "fuse": "none"}
            correct, frac = 0, 1.0
            for i in range(0, images.shape[0], batch):
                logits, frac = _per_layer_run(model, images[i:i + batch], base, **opt)
                correct += int((logits.argmax(-1) == labels[i:i + batch]).sum())
            rows.append({"task": task, "option": opt,
                         "method": "evit per layer, discard" if m == "evit-discard"
                         else f"{m} per layer",
                         "where": "every block" if m == "tome" else "blocks "
                         + ",".join(map(str, evit_layers(len(model.blocks)))),
                         "setting": f"{key}={val:g}", "keep": keep, "flops_frac": frac,
                         "kept_frac": float("nan"), "pages": pages,
                         "accuracy": correct / images.shape[0]})
    return rows


def count_latency(model, images, rows, *, batch: int = 64, repeat: int = 5, device=None) -> list[dict]:
    """Add ``ms_batch64`` (median over ``repeat`` interleaved rounds, a batch of ``batch`` pages)
    and its spread (``ms_batch64_iqr``) to every row of :func:`count_sweep`, in place."""
    dev = torch.device(device or "cpu")
    model = model.to(dev).eval()
    xb = images[:batch].to(dev)
    calls = {}
    for i, r in enumerate(rows):
        if r["method"] == "keep_all":
            calls[i] = lambda: model(xb)
        elif "option" in r:  # per layer
            calls[i] = lambda r=r: forward_per_layer(model, xb, r["method"].split()[0],
                                                     **r["option"])  # "tome" or "evit"
        else:
            fn, gen = count_reducer(r["method"], r["keep"]), torch.Generator().manual_seed(0)
            calls[i] = lambda fn=fn, gen=gen: model(xb, fn, buckets=4, generator=gen)
    with torch.no_grad():
        res = interleaved(calls, rounds=repeat, warmup=1, device=dev)
    for i, r in enumerate(rows):
        r.update(ms_batch64=res[i].median_ms, ms_batch64_iqr=res[i].iqr_ms, batch=int(xb.shape[0]))
    return rows


def count_comparison(rows, method: str = "tcc+fuse", tol: float = 0.05,
                     exclude=("tcc",)) -> list[dict]:
    """For each budget: ``method`` against the most accurate *other* method whose FLOPs lie
    within ``tol`` (absolute, as a fraction of keep-all) of its own, and against keep-all.
    ``exclude``: methods left out of the comparison (default: the paper's TCC, the same
    method without its fused tokens).

    Rows ``{"keep", "flops_frac", "accuracy_%", "best_other", "other_flops", "other_%",
    "gain_pts", "se_pts", "vs_keep_all_pts"}``; ``best_other`` is ``"-"`` when no method is that
    close.  ``se_pts``: the standard error of the gain if the two accuracies were independent
    binomial estimates on the rows' ``pages`` (both run on one test set: an approximation).
    """
    full = next(100 * r["accuracy"] for r in rows if r["method"] == "keep_all")
    out = []
    for r in rows:
        if r["method"] != method:
            continue
        near = [o for o in rows if o["method"] not in (method, "keep_all", *exclude)
                and abs(o["flops_frac"] - r["flops_frac"]) <= tol]
        best = max(near, key=lambda o: o["accuracy"], default=None)
        acc = 100 * r["accuracy"]
        se = float("nan")
        if best and r.get("pages"):
            var = sum(p * (1 - p) for p in (r["accuracy"], best["accuracy"])) / r["pages"]
            se = 100 * math.sqrt(var)
        out.append({"keep": r["keep"], "flops_frac": r["flops_frac"], "accuracy_%": acc,
                    "best_other": best["method"] if best else "-",
                    "other_flops": best["flops_frac"] if best else float("nan"),
                    "other_%": 100 * best["accuracy"] if best else float("nan"),
                    "gain_pts": acc - 100 * best["accuracy"] if best else float("nan"),
                    "se_pts": se, "vs_keep_all_pts": acc - full})
    return out


def crop_budgets(model, images, keep: float, **options) -> dict:
    """TCC's per-crop view of ``images``: density, tokens kept per crop, and the kept patches.

    Returns ``{"density": (B, C), "per_crop": (B, C), "kept": (B, C) kept per crop incl.
    outliers, "mask": (B, n_patches) bool}`` from one TCC pass at ``keep``.
    """
    with torch.no_grad():
        gen = torch.Generator().manual_seed(0)
        _, info = model(images, make("tcc", keep=keep, **options), generator=gen,
                        return_info=True)
    mask = info["assign"] >= 0  # dropped patches have no output slot (-1)
    kept = mask.reshape(mask.shape[0], model.n_crops, model.tokens_per_crop).sum(-1)
    return {"density": info["density"], "per_crop": info["per_crop"], "kept": kept,
            "mask": mask}
