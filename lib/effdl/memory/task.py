"""The fine-tuning data of the chapter "Fitting in memory": C++ headers.

The shared language model (:mod:`effdl.lm`) learned Python, from the standard library.
Its downstream data is a language it has not seen: the C++ headers that ship inside
PyTorch's own wheel (``<torch>/include/**/*.h``, some 9,000 files).  Every machine that
runs the course has them, with no download and no licence beyond PyTorch's own; the
bytes depend on the installed torch version, which the digest records.

The split and order follow :mod:`effdl.lm.data`: a file goes to ``train`` or
``held_out`` by a hash of its path, files are taken in a hash order up to the byte
budget, joined with the same separator byte.  The score of a tuned model is its
next-byte accuracy and cross-entropy on the held-out headers
(:func:`heldout_scores`).
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import torch
import torch.nn.functional as F

from effdl.lm.data import SEP, Corpus, _order_key, split_of

__all__ = ["header_files", "load_headers", "heldout_scores"]


def _root() -> Path:
    return Path(torch.__file__).parent / "include"


def header_files(root: str | Path | None = None) -> list[str]:
    """Relative paths of the ``*.h`` files under ``root`` (default: torch's include)."""
    root = Path(root) if root is not None else _root()
    if not root.is_dir():
        raise ValueError(f"{str(root)!r} is not a folder; the default is the include "
                         "folder of the installed torch (a wheel without headers? "
                         "reinstall torch from PyPI)")
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*.h"))


@functools.lru_cache(maxsize=4)
def _read(max_bytes: int, held_out_fraction: float, root: str | None):
    base = Path(root) if root is not None else _root()
    budget = {"train": round(max_bytes * (1 - held_out_fraction)),
              "held_out": round(max_bytes * held_out_fraction)}
    parts: dict[str, list[bytes]] = {"train": [], "held_out": []}
    names: dict[str, list[str]] = {"train": [], "held_out": []}
    size = {"train": 0, "held_out": 0}
    files = header_files(base)
    if not files:
        raise ValueError(f"no *.h files under {str(base)!r}; point root at a folder of "
                         "C++ headers")
    for rel in sorted(files, key=_order_key):
        side = split_of(rel, held_out_fraction)
        if size[side] >= budget[side]:
            continue
        # why drop non-ASCII bytes: the model's vocabulary is bytes, but it never saw
        # UTF-8 sequences in training; a few headers carry them in comments
        text = bytes(b for b in (base / rel).read_bytes() if 0 < b < 128)
        parts[side].append(text)
        names[side].append(rel)
        size[side] += len(text) + 1
    joined = {s: bytes([SEP]).join(parts[s])[:budget[s]] for s in parts}
    for side, data in joined.items():
        if len(data) < 1024:
            raise ValueError(f"only {len(data)} {side} bytes of headers (max_bytes="
                             f"{max_bytes}); raise max_bytes")
    digest = hashlib.sha256(joined["train"] + joined["held_out"]).hexdigest()
    return (joined["train"], joined["held_out"], tuple(names["train"]),
            tuple(names["held_out"]), digest)


def load_headers(max_bytes: int, held_out_fraction: float = 0.2,
                 root: str | Path | None = None) -> Corpus:
    """The C++ headers as a :class:`effdl.lm.data.Corpus` of ``max_bytes`` in all."""
    if type(max_bytes) is not int or max_bytes < 4096:
        raise ValueError(f"max_bytes must be an int >= 4096, got {max_bytes!r}")
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError("held_out_fraction must lie strictly between 0 and 1, got "
                         f"{held_out_fraction!r}")
    train, held, tf, hf, digest = _read(max_bytes, float(held_out_fraction),
                                        None if root is None else str(root))
    as_ids = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)
    return Corpus(as_ids(train), as_ids(held), tf, hf, digest)


@torch.no_grad()
def heldout_scores(model, data: torch.Tensor, seq_len: int, windows: int) -> dict:
    """Next-byte accuracy (%) and cross-entropy (bits per byte) of ``model`` on
    ``windows`` evenly spaced windows of ``data`` (they overlap only when the data is
    shorter than ``windows · seq_len``)."""
    n = data.numel() - 1
    if windows < 1 or n < seq_len:
        raise ValueError(f"need windows >= 1 and data longer than seq_len={seq_len}")
    starts = torch.linspace(0, n - seq_len, windows).long()
    idx = starts[:, None] + torch.arange(seq_len + 1)             # (W, seq + 1)
    dev = next(model.parameters()).device
    w = data[idx].long().to(dev)
    logits = model(w[:, :-1]).float()                             # (W, seq, 256)
    ce = F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten())
    acc = (logits.argmax(-1) == w[:, 1:]).float().mean()
    return {"accuracy": 100 * float(acc), "bits_per_byte": float(ce) / 0.6931471805599453}
