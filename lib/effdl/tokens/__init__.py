"""Token compression: drop, pool or merge a ViT's tokens (TCC, ToMe, EViT, LAT) and compress KV caches.

- :func:`make_documents` — synthetic document pages (:mod:`effdl.tokens.documents`)
- :class:`TinyViT` — a ViT over page crops with a reducer hook (:mod:`effdl.tokens.vit`)
- :mod:`effdl.tokens.reducers` — ``keep_all, random_drop, pool, evit, tome, lat, tcc``
- :func:`train`, :func:`evaluate` — the short training loop (:mod:`effdl.tokens.train`)
- :mod:`effdl.tokens.kvcache` — ``compress(k, v) -> bytes`` / ``decompress(blob) -> (k, v)``
"""

from effdl.tokens import kvcache, reducers
from effdl.tokens.documents import KINDS, SYMBOLS, crop_pages, make_documents
from effdl.tokens.reducers import evit, keep_all, lat, pool, random_drop, tcc, tome
from effdl.tokens.train import evaluate, train
from effdl.tokens.vit import Reduced, TinyViT, TokenContext

__all__ = ["make_documents", "crop_pages", "KINDS", "SYMBOLS", "TinyViT", "TokenContext", "Reduced", "reducers",
           "keep_all", "random_drop", "pool", "evit", "tome", "lat", "tcc", "train", "evaluate", "kvcache"]
