"""KV Prediction: a small auxiliary model reads the prompt, the base model answers.

Time to first token (TTFT) is the prefill: the base model runs every prompt token
through every layer to build its KV cache, then gives the first token.  KV Prediction
(M. Horton, Q. Cao, C. Sun, Y. Jin, S. Mehta, M. Rastegari, M. Nabi, "KV Prediction
for Improved Time to First Token", arXiv:2410.08391, 2024; code in apple/corenet,
``projects/kv-prediction``) lets a small *auxiliary* model run the prompt instead and
*predicts* the base model's cache from the auxiliary one with learned linear maps:

1. the auxiliary model prefills the prompt but its last token, positions [0, T - 1);
2. for each base layer i, a linear map reads the auxiliary layer ``layer_map[i]``'s
   K (and, with another map, V) at each position, all K/V heads concatenated
   (H_kv_aux · d_aux numbers), and writes the base layer's K (V) for that position
   (H_kv · d numbers): the predicted base cache for [0, T - 1);
3. ONE base decode step on the last prompt token, from the predicted cache, gives the
   first token's logits and writes the last position's true base K/V; from then on
   the base decodes as usual (``base.decode_step``), never querying the auxiliary
   model again.

Which auxiliary layer feeds which base layer (:func:`default_layer_map`): base layer i
reads auxiliary layer floor(i · L_aux / L_base), so each auxiliary layer feeds a run of
consecutive base layers, early to early and late to late.  The paper's configurations
do the same kind of thing (OpenELM-1.1B from OpenELM-270M: 0, 0, 1, 1, ..., 11, 11, 12,
13, 14, 15); for the course's 4-layer base and 2-layer auxiliary it is 0, 0, 1, 1.

What is trained (:func:`train_kv_predictor`): the base is frozen.  Its loss is the base
model's next-token cross-entropy when it decodes from the predicted cache, plus a KV
consistency loss between the predicted and the true base cache.  The paper also trains
the auxiliary model (plus its own next-token loss); here that is ``train_aux=True``.

Keys and RoPE.  The base's cache holds keys *after* RoPE (rotated by their position).
A fixed linear map applied to rotated auxiliary keys would have to commute with the
rotation of every position, which only works when both models rotate with the same
frequencies.  So the predictor works where the paper's does (its caches hold keys
before RoPE): it un-rotates the auxiliary keys, maps them, and rotates the result with
the base's tables.  That costs two element-wise rotations; V has no RoPE.

Where this course's version differs from the paper, to train in about a minute on one
CPU thread with models trained in three:

- loss on a continuation: the paper runs the base once over a whole sequence with the
  predicted cache (every position attends to predicted K/V, its own included);
  here a window is split into a prompt and a continuation, and the continuation is
  teacher-forced through ``base.decode_step`` from the predicted cache, exactly as at
  inference (predicted K/V before the last prompt token, true ones from there on);
- consistency loss: the paper sums an L1 distance over layers, weight 1; here it is a
  mean squared error per layer divided by the true cache's mean square (a relative
  error, so its weight means the same for K and V and for every layer);
- the auxiliary model is frozen by default (``train_aux=False``): a pretrained small
  model is already a usable prompt reader, and training only the 2 · L_base linear
  maps is cheaper; ``train_aux=True`` fine-tunes a copy of it, as the paper does;
- no z-loss, no label smoothing; AdamW, warmup then cosine
  (:func:`effdl.lm.train.lr_at`).

What it buys here (cpu profile, one thread, batch 1, prompt 256): about 4.8x fewer
FLOPs to the first token (auxiliary prefill 75 M, predictor 17 M, one base step 2 M,
against 453 M for the base prefill), but much less in wall-clock time.  Models this
small are bound by per-operation overhead, not FLOPs: one base decode step costs a
third of a 256-token base prefill, and the auxiliary prefill a quarter of it, so the
time saved is bounded well below 4.8x; it grows with the prompt (:func:`ttft`).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from effdl.lm.data import Corpus, random_windows
from effdl.lm.model import ByteLM, KVCache, LMConfig, apply_rope, rope_tables
from effdl.lm.train import TrainConfig, lr_at
from effdl.measure import benchmark

__all__ = ["KVPredictor", "continuation_loss", "default_layer_map",
           "load_kv_predictor", "predict_cache", "train_kv_predictor", "ttft"]

FORMAT = 1                      # bump when the cache file layout changes


# ---------------------------------------------------------------- checks


def check_pair(base_config: LMConfig, aux_config: LMConfig) -> None:
    """Base and auxiliary must read the same tokens over the same context."""
    for name in ("vocab", "max_len"):
        b, a = getattr(base_config, name), getattr(aux_config, name)
        if b != a:
            raise ValueError(f"base and auxiliary models have different {name} ({b} "
                             f"vs {a}); KV prediction needs one family: pass an "
                             f"auxiliary model with {name}={b}")


def check_prompt(config: LMConfig, prompt) -> None:
    """A (B, T) id tensor with 2 <= T <= max_len."""
    if not isinstance(prompt, torch.Tensor) or prompt.dtype not in (torch.int64,
                                                                    torch.int32):
        raise ValueError("prompt must be an int64 tensor of shape (batch, T); use "
                         "torch.tensor(ids)[None]")
    if prompt.ndim != 2 or prompt.shape[0] < 1:
        raise ValueError(f"prompt must have shape (batch, T), got "
                         f"{tuple(prompt.shape)}; add a batch dimension with p[None]")
    T = prompt.shape[1]
    if T < 2:
        raise ValueError(f"the prompt has {T} token(s): KV prediction needs at least "
                         "2 (the auxiliary model reads all but the last, the base the "
                         "last); with one token just call base.prefill")
    if T > config.max_len:
        raise ValueError(f"the prompt has {T} tokens but the context holds max_len="
                         f"{config.max_len}; shorten the prompt")


def _positive_int(name: str, v, least: int = 1) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < least:
        raise ValueError(f"{name} must be an int >= {least}, got {v!r}")


# ---------------------------------------------------------------- the predictor


def default_layer_map(base_layers: int, aux_layers: int) -> tuple[int, ...]:
    """Base layer i reads auxiliary layer floor(i · aux_layers / base_layers)."""
    return tuple(i * aux_layers // base_layers for i in range(base_layers))


def _unrope(x, cos, sin):
    """The inverse of :func:`effdl.lm.model.apply_rope`, x (B, H, T, d).

    Why divide by cos² + sin²: the tables are rounded to fp32, so cos² + sin² is 1 only
    to about 1e-7; dividing makes un-rotate then rotate exact (to x's rounding).
    """
    n = cos * cos + sin * sin                                    # (T, d/2)
    return apply_rope(x, cos / n, -sin / n)


class KVPredictor(nn.Module):
    """Linear maps from an auxiliary model's KV cache to a base model's, per layer.

    ``k_maps[i]``, ``v_maps[i]``: ``nn.Linear(H_kv_aux · d_aux, H_kv · d)`` (with bias,
    as in the paper) from auxiliary layer ``layer_map[i]`` to base layer i, applied to
    each position alone.  Keys are mapped before RoPE (see the module docstring).
    ``aux``: a fine-tuned copy of the auxiliary model when trained with
    ``train_aux=True`` (it then replaces the one passed to :func:`predict_cache`), else
    None.
    """

    def __init__(self, base_config: LMConfig, aux_config: LMConfig,
                 layer_map: tuple[int, ...] | list[int] | None = None):
        super().__init__()
        check_pair(base_config, aux_config)
        b, a = base_config, aux_config
        layer_map = tuple(layer_map if layer_map is not None
                          else default_layer_map(b.n_layer, a.n_layer))
        if len(layer_map) != b.n_layer or not all(
                isinstance(j, int) and 0 <= j < a.n_layer for j in layer_map):
            raise ValueError(f"layer_map must give, for each of the {b.n_layer} base "
                             f"layers, an auxiliary layer in [0, {a.n_layer}); got "
                             f"{layer_map!r}")
        self.base_config, self.aux_config, self.layer_map = b, a, layer_map
        d_in, d_out = a.n_kv_head * a.head_dim, b.n_kv_head * b.head_dim
        self.k_maps = nn.ModuleList(nn.Linear(d_in, d_out) for _ in range(b.n_layer))
        self.v_maps = nn.ModuleList(nn.Linear(d_in, d_out) for _ in range(b.n_layer))
        self.aux: ByteLM | None = None
        # why tables of our own (not persistent): derived from the configs, and a
        # predictor cast with .to(dtype) casts them with it
        for name, c in (("base", b), ("aux", a)):
            cos, sin = rope_tables(c.head_dim, c.max_len, c.rope_base)
            self.register_buffer(f"{name}_cos", cos, persistent=False)
            self.register_buffer(f"{name}_sin", sin, persistent=False)

    @torch.no_grad()
    def set_identity(self) -> KVPredictor:
        """Every map the identity (needs equal K/V widths): with aux == base and the
        default layer map, the predicted cache is the base's own (a test oracle)."""
        for m in [*self.k_maps, *self.v_maps]:
            if m.weight.shape[0] != m.weight.shape[1]:
                raise ValueError("set_identity needs H_kv · head_dim equal in both "
                                 f"models, got {tuple(m.weight.shape)}")
            m.weight.copy_(torch.eye(m.weight.shape[0]))
            m.bias.zero_()
        return self

    def _map(self, lin: nn.Linear, x, heads: int):
        """x (B, H_a, T, d_a) -> lin per position -> (B, heads, T, d_b)."""
        B, _, T, _ = x.shape
        y = lin(x.transpose(1, 2).reshape(B, T, -1))             # (B, T, heads·d_b)
        return y.view(B, T, heads, -1).transpose(1, 2)

    def forward(self, aux_cache: KVCache) -> tuple[list, list]:
        """Predicted base K and V for the auxiliary cache's positions [0, T):
        two lists of L_base tensors (B, H_kv, T, d), keys rotated (post-RoPE)."""
        T, H = aux_cache.length, self.base_config.n_kv_head
        ca, sa = self.aux_cos[:T], self.aux_sin[:T]              # (T, d_a/2)
        cb, sb = self.base_cos[:T], self.base_sin[:T]            # (T, d_b/2)
        # un-rotate each auxiliary layer once, even when it feeds several base layers
        pre = {j: _unrope(aux_cache.k[j][:, :, :T], ca, sa)
               for j in set(self.layer_map)}
        ks, vs = [], []
        for i, j in enumerate(self.layer_map):
            k = self._map(self.k_maps[i], pre[j], H)     # (B, H, T, d), pre-RoPE
            ks.append(apply_rope(k, cb, sb))
            vs.append(self._map(self.v_maps[i], aux_cache.v[j][:, :, :T], H))
        return ks, vs

    def predict(self, aux_cache: KVCache, base: ByteLM) -> KVCache:
        """A base cache holding the predicted K/V at [0, aux_cache.length)."""
        return _as_cache(base, *self(aux_cache))


def _as_cache(base: ByteLM, ks, vs) -> KVCache:
    """K/V lists of (B, H_kv, T, d) -> a base cache of length T."""
    cache = base.new_cache(ks[0].shape[0])
    for i, (k, v) in enumerate(zip(ks, vs)):
        cache.write(i, k, v)       # (differentiable: a copy into the reserved buffer)
    cache.length = ks[0].shape[2]
    return cache


def _aux_of(predictor: KVPredictor, aux: ByteLM) -> ByteLM:
    """The auxiliary model that runs: the predictor's tuned copy if it has one."""
    return predictor.aux if predictor.aux is not None else aux


# ---------------------------------------------------------------- inference


def predict_cache(base: ByteLM, aux: ByteLM, predictor: KVPredictor, prompt):
    """First token by KV prediction: ``(first_logits (B, 256), base cache)``.

    The auxiliary model prefills prompt[:, :-1], the predictor turns its cache into a
    base cache for those T - 1 positions, and one base decode step on the last prompt
    token gives the logits of the token after the prompt and completes the cache
    (length T): continue with ``base.decode_step``.  Runs with autograd if enabled
    (training does); wrap in ``torch.no_grad()`` for inference.
    """
    check_pair(base.config, aux.config)
    check_prompt(base.config, prompt)
    _, aux_cache = _aux_of(predictor, aux).prefill(prompt[:, :-1])  # T - 1 positions
    cache = predictor.predict(aux_cache, base)
    logits, cache = base.decode_step(prompt[:, -1:], cache)         # (B, 1, 256)
    return logits[:, -1], cache


# ---------------------------------------------------------------- training


def _data(corpus, side: str) -> torch.Tensor:
    """Corpus -> its ``side`` (train / held_out); a 1-D tensor passes as it is."""
    data = getattr(corpus, side) if isinstance(corpus, Corpus) else corpus
    if not isinstance(data, torch.Tensor) or data.ndim != 1:
        raise ValueError("corpus must be an effdl.lm.Corpus or a 1-D tensor of byte "
                         f"ids, got {type(corpus).__name__}; use lm.load_corpus(...)")
    return data


def _check_lengths(config: LMConfig, prompt_len, cont_len) -> None:
    _positive_int("prompt_len", prompt_len, 2)
    _positive_int("cont_len", cont_len, 1)
    if prompt_len + cont_len - 1 > config.max_len:
        raise ValueError(f"prompt_len + cont_len - 1 = {prompt_len + cont_len - 1} "
                         f"exceeds max_len={config.max_len}; shorten one of them")


def _kv_loss(ks, vs, cache: KVCache) -> torch.Tensor:
    """Mean over layers and K/V of MSE / mean square of the truth (relative error)."""
    T, terms = cache.length, []
    for i, (k, v) in enumerate(zip(ks, vs)):
        for pred, true in ((k, cache.k[i][:, :, :T]), (v, cache.v[i][:, :, :T])):
            terms.append(F.mse_loss(pred, true) / true.pow(2).mean().clamp_min(1e-12))
    return torch.stack(terms).mean()


def train_kv_predictor(base: ByteLM, aux: ByteLM, steps: int = 300, batch: int = 8,
                       prompt_len: int = 128, cont_len: int = 32, lr: float = 1e-2,
                       corpus: Corpus | torch.Tensor | None = None, seed: int = 0,
                       train_aux: bool = False, kv_weight: float = 1.0,
                       aux_weight: float = 1.0, layer_map=None, warmup: int = 20,
                       ) -> tuple[KVPredictor, dict]:
    """Train a :class:`KVPredictor` for (base, aux) on ``corpus.train`` windows.

    Each step draws ``batch`` windows of prompt_len + cont_len bytes; the loss is

        CE(base decoding the continuation from the predicted prompt cache)
        + kv_weight · relative MSE(predicted, true base cache of prompt[:, :-1])
        [+ aux_weight · CE(aux on the prompt), with train_aux]

    The base is frozen (its parameters get no gradient).  ``train_aux=True``
    fine-tunes a copy of ``aux`` (``predictor.aux``) as the paper does; ``aux`` itself
    is never changed.  Returns ``(predictor in eval mode, log)``; log has per-step
    "loss", "ce", "kv" lists and "seconds".  Deterministic given ``seed``; the caller's
    random state is left as it was.
    """
    check_pair(base.config, aux.config)
    _positive_int("steps", steps)
    _positive_int("batch", batch)
    _check_lengths(base.config, prompt_len, cont_len)
    if corpus is None:
        from effdl.lm.data import load_corpus
        from effdl.lm.profiles import sizes

        corpus = load_corpus(sizes().corpus_bytes)
    data = _data(corpus, "train")
    w = base.embed.weight
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        predictor = KVPredictor(base.config, aux.config, layer_map)
    predictor.to(w.device, w.dtype)
    if train_aux:
        predictor.aux = copy.deepcopy(aux).train().requires_grad_(True)
    tc = TrainConfig(steps=steps, batch=batch, seq_len=prompt_len + cont_len, lr=lr,
                     warmup=min(warmup, steps), weight_decay=0.0)
    opt = torch.optim.AdamW(predictor.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    log = {"loss": [], "ce": [], "kv": [], "aux_ce": []}
    frozen = [p.requires_grad for p in base.parameters()]
    base.requires_grad_(False)        # why: no gradient may reach (or be stored on) it
    t0 = time.perf_counter()
    try:
        for step in range(steps):
            inp, tgt = random_windows(data, batch, prompt_len + cont_len - 1, g)
            inp, tgt = inp.to(w.device), tgt.to(w.device)
            prompt = inp[:, :prompt_len]                           # (B, P)
            with torch.no_grad():
                _, true_cache = base.prefill(prompt[:, :-1])       # (B, Hkv, P-1, d)
            # why no_grad for a frozen aux: its parameters would collect gradients
            with torch.set_grad_enabled(train_aux):
                aux_logits, aux_cache = _aux_of(predictor, aux).prefill(prompt[:, :-1])
            ks, vs = predictor(aux_cache)               # L_base x (B, Hkv, P-1, d)
            cache = _as_cache(base, ks, vs)
            # teacher forcing: feed the last prompt byte and the continuation but its
            # last byte; each logit predicts the next byte
            logits, _ = base.decode_step(inp[:, prompt_len - 1:], cache)  # (B, C, V)
            ce = F.cross_entropy(logits.flatten(0, 1),
                                 tgt[:, prompt_len - 1:].flatten())
            kv = _kv_loss(ks, vs, true_cache)
            loss = ce + kv_weight * kv
            aux_ce = torch.zeros(())
            if train_aux:
                aux_ce = F.cross_entropy(aux_logits.flatten(0, 1),
                                         tgt[:, :prompt_len - 1].flatten())
                loss = loss + aux_weight * aux_ce
            for group in opt.param_groups:
                group["lr"] = lr_at(step, tc)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(predictor.parameters(), 1.0)
            opt.step()
            for name, x in (("loss", loss), ("ce", ce), ("kv", kv), ("aux_ce", aux_ce)):
                log[name].append(float(x.detach()))
    finally:
        for p, flag in zip(base.parameters(), frozen):
            p.requires_grad_(flag)
    log.update(seconds=time.perf_counter() - t0, steps=steps, batch=batch,
               prompt_len=prompt_len, cont_len=cont_len, lr=lr, seed=seed,
               train_aux=train_aux, kv_weight=kv_weight, aux_weight=aux_weight,
               layer_map=list(predictor.layer_map))
    if predictor.aux is not None:
        predictor.aux.eval().requires_grad_(False)
    return predictor.eval().requires_grad_(False), log


# ---------------------------------------------------------------- cached on disk


def _weights_digest(model: nn.Module) -> str:
    """sha256 of a model's state_dict (names, shapes, dtypes and bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_kv_predictor(base: ByteLM, aux: ByteLM, cache_dir=None, verbose: bool = True,
                      corpus: Corpus | None = None, **train_kw) -> KVPredictor:
    """:func:`train_kv_predictor` once, then read from disk.

    The file lives next to the shared models (:func:`effdl.lm.store.cache_dir`), keyed
    by a hash of both models' weights, the corpus, the training arguments and this
    module's source; a file that can't be read or doesn't match is retrained.  The log
    is ``predictor.train_log``.
    """
    from effdl.lm.data import load_corpus
    from effdl.lm.profiles import sizes
    from effdl.lm.store import cache_dir as lm_cache_dir

    corpus = corpus if corpus is not None else load_corpus(sizes().corpus_bytes)
    what = {"format": FORMAT, "base": _weights_digest(base),
            "aux": _weights_digest(aux), "corpus": corpus.digest,
            "train": {k: train_kw[k] for k in sorted(train_kw)},
            "source": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()}
    key = hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode())
    key = key.hexdigest()
    path = lm_cache_dir(cache_dir) / f"kvpred-{key[:16]}.pt"
    predictor = None
    if path.exists():
        try:
            doc = torch.load(path, map_location="cpu", weights_only=True)
            if doc.get("key") != key:
                raise ValueError("key mismatch")
            predictor = KVPredictor(base.config, aux.config, tuple(doc["layer_map"]))
            if doc["train_aux"]:
                predictor.aux = copy.deepcopy(aux)
            w = base.embed.weight
            predictor.to(w.device, w.dtype).load_state_dict(doc["state_dict"])
            predictor.eval().requires_grad_(False)
            log = doc["log"]
        except Exception as exc:           # unreadable or stale: retrain, never trust
            if verbose:
                print(f"retraining the KV predictor ({type(exc).__name__}: {exc})")
            predictor = None
    if predictor is None:
        predictor, log = train_kv_predictor(base, aux, corpus=corpus, **train_kw)
        state = {k: v.detach().cpu() for k, v in predictor.state_dict().items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save({"format": FORMAT, "key": key,
                    "layer_map": list(predictor.layer_map),
                    "train_aux": predictor.aux is not None, "log": log,
                    "state_dict": state}, tmp)
        os.replace(tmp, path)   # why: a concurrent reader sees the old or the new file
        if verbose:
            print(f"trained the KV predictor in {log['seconds']:.1f} s: {path}")
    predictor.train_log, predictor.cache_file = log, path
    return predictor


# ---------------------------------------------------------------- evaluation


@torch.no_grad()
def continuation_loss(base: ByteLM, aux: ByteLM, predictor: KVPredictor,
                      corpus: Corpus | torch.Tensor, prompt_len: int = 256,
                      cont_len: int = 32, windows: int = 16, batch: int = 8,
                      unit: str = "bits") -> dict:
    """Next-byte loss on continuations of held-out prompts, three ways of starting.

    ``windows`` evenly spaced windows of ``corpus.held_out`` (or of a 1-D tensor):
    a prompt of ``prompt_len`` bytes, then ``cont_len`` bytes scored.  "base": the base
    with its own prefill cache; "kv_predicted": the base from :func:`predict_cache`;
    "aux": the auxiliary model alone (``aux`` as given), its own prefill and
    continuation ("aux_tuned" too when the predictor has a tuned copy).  Each is the
    mean over the continuation bytes, in bits (``unit="bits"``) or nats per byte;
    ``first_token`` holds the same for the first continuation byte alone (the TTFT one).
    """
    check_pair(base.config, aux.config)
    _check_lengths(base.config, prompt_len, cont_len)
    _positive_int("windows", windows)
    _positive_int("batch", batch)
    if unit not in ("bits", "nats"):
        raise ValueError(f"unit must be 'bits' or 'nats', got {unit!r}")
    data = _data(corpus, "held_out")
    n = prompt_len + cont_len                      # bytes a window holds
    if data.numel() < n:
        raise ValueError(f"the data holds {data.numel()} bytes, fewer than prompt_len "
                         f"+ cont_len = {n}; use more data or shorter windows")
    starts = torch.linspace(0, data.numel() - n, windows).long()
    dev, P = base.embed.weight.device, prompt_len
    models = {"base": base, "aux": aux}
    if predictor.aux is not None:
        models["aux_tuned"] = predictor.aux
    totals = {k: 0.0 for k in [*models, "kv_predicted"]}
    firsts = dict(totals)
    for s in starts.split(batch):
        win = data[s[:, None] + torch.arange(n)].long().to(dev)       # (b, P + C)
        tgt = win[:, P:]                                               # (b, C)
        scores = {}
        for name, m in models.items():
            # the full forward equals prefill + decode: the logits at P-1 .. P+C-2
            scores[name] = m(win[:, :-1])[:, P - 1:]                   # (b, C, V)
        first, cache = predict_cache(base, aux, predictor, win[:, :P])
        scores["kv_predicted"] = first[:, None]                       # (b, 1, V)
        if cont_len > 1:       # teacher-forced: the continuation but its last byte
            rest, _ = base.decode_step(win[:, P:-1], cache)            # (b, C-1, V)
            scores["kv_predicted"] = torch.cat([first[:, None], rest], 1)
        for name, logits in scores.items():
            ce = F.cross_entropy(logits.transpose(1, 2).double(), tgt,
                                 reduction="none")                      # (b, C)
            totals[name] += float(ce.sum())
            firsts[name] += float(ce[:, 0].sum())
    scale = 1 / math.log(2) if unit == "bits" else 1.0
    out = {k: v * scale / (windows * cont_len) for k, v in totals.items()}
    out["first_token"] = {k: v * scale / windows for k, v in firsts.items()}
    out.update(unit=f"{unit} per byte", windows=windows, prompt_len=P,
               cont_len=cont_len)
    return out


@torch.no_grad()
def ttft(base: ByteLM, aux: ByteLM, predictor: KVPredictor, prompt_len: int = 256,
         batch: int = 1, repeat: int = 20, warmup: int = 3, seed: int = 0) -> dict:
    """Time to first token in ms (medians): base prefill vs KV prediction.

    A random prompt of ``prompt_len`` bytes.  "base_ms": ``base.prefill``;
    "kvp_ms": :func:`predict_cache` (auxiliary prefill + predictor + one base step);
    "aux_ms": the auxiliary prefill alone (its share); "speedup": base / kvp.
    """
    check_pair(base.config, aux.config)
    _positive_int("prompt_len", prompt_len, 2)
    _positive_int("batch", batch)
    dev = base.embed.weight.device
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, base.config.vocab, (batch, prompt_len), generator=g)
    prompt = prompt.to(dev)
    check_prompt(base.config, prompt)
    kw = dict(repeat=repeat, warmup=warmup, device=dev)
    a = _aux_of(predictor, aux)
    res = {"base": benchmark(lambda: base.prefill(prompt), label="base prefill", **kw),
           "kvp": benchmark(lambda: predict_cache(base, aux, predictor, prompt),
                            label="KV prediction", **kw),
           "aux": benchmark(lambda: a.prefill(prompt[:, :-1]), label="aux prefill",
                            **kw)}
    out = {f"{k}_ms": r.median_ms for k, r in res.items()}
    out["speedup"] = out["base_ms"] / out["kvp_ms"]
    out["results"] = res
    return out
