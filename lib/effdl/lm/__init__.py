"""effdl.lm — the course's shared small language model (a library, not a chapter).

A byte-level causal transformer trained offline on the Python standard library's own
sources, for the chapters that need a real trained model: language-model inference (KV
cache, batching, speculative decoding), fitting in memory (quantization, LoRA) and the
KV-cache part of token compression.

- :mod:`effdl.lm.data`     — the byte corpus, its split by file, its digest
- :mod:`effdl.lm.model`    — :class:`LMConfig`, :class:`ByteLM` (forward, prefill,
  decode_step) and :class:`KVCache`
- :mod:`effdl.lm.generation` — greedy generation, naive and cached
- :mod:`effdl.lm.train`    — ``train.train(config, train_config, corpus)``: AdamW with
  warmup + cosine; :func:`bits_per_byte`
- :mod:`effdl.lm.profiles` — the two models' sizes per profile (target and draft)
- :mod:`effdl.lm.store`    — :func:`load`: train on first use, then read from disk

Typical use::

    from effdl import lm
    model = lm.load("target")     # trains once (cpu profile: ~2 min), then cached
    print(lm.decode(lm.generate(model, "def __init__(self", 80)[0]))
"""

# ``train`` is the module effdl.lm.train, on purpose (call ``lm.train.train(...)``):
# a function of that name here would hide the module
from effdl.lm import train
from effdl.lm.data import Corpus, load_corpus, unigram_bits_per_byte
from effdl.lm.generation import decode, encode, generate, generate_cached, generate_naive
from effdl.lm.model import ByteLM, KVCache, LMConfig, kv_bytes_per_token
from effdl.lm.profiles import SIZES, Sizes, sizes
from effdl.lm.store import CACHE_ENV, cache_dir, load
from effdl.lm.train import TrainConfig, bits_per_byte

__all__ = ["ByteLM", "CACHE_ENV", "Corpus", "KVCache", "LMConfig", "SIZES", "Sizes",
           "TrainConfig", "bits_per_byte", "cache_dir", "decode", "encode", "generate",
           "generate_cached", "generate_naive", "kv_bytes_per_token", "load",
           "load_corpus", "sizes", "train", "unigram_bits_per_byte"]
