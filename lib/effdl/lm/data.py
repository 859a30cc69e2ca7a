"""The byte corpus: the Python standard library's own sources, as token ids 0..255.

Every machine that runs the course has this text: no download, no dataset licence, and
it is the kind of text a small model learns quickly (indentation, keywords, names that
repeat).  The corpus is built deterministically:

1. every ``*.py`` file under ``sysconfig.get_paths()["stdlib"]``, sorted by its path
   relative to that folder, except those under :data:`EXCLUDED_DIRS` (tests,
   third-party packages, generated tables);
2. each file goes to ``train`` or ``held_out`` by a hash of its relative path
   (:func:`split_of`), so a file's side never depends on the size cap or on which
   other files exist;
3. files are taken in a hash order (:func:`_order_key`), so a small cap samples the
   whole library rather than the first letters of the alphabet, until each side
   holds its share of ``max_bytes``; the last file is cut at the cap;
4. the files of a side are joined with :data:`SEP` (byte 0, which no source file
   contains: the model sees it as "end of file").

A byte is its own token id: the vocabulary is 256 and there is no tokenizer to ship.
:attr:`Corpus.digest` names the corpus by its file list, sizes and bytes; it differs
between Python versions (their standard libraries differ), which is what a cache keyed
by it needs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["Corpus", "EXCLUDED_DIRS", "SEP", "load_corpus", "random_windows",
           "source_files", "split_of", "unigram_bits_per_byte"]

#: the byte between two files (no ``*.py`` file of the standard library contains it)
SEP = 0
#: folders left out: tests (``test``, ``tests``, ``idle_test``), third-party packages,
#: and generated data rather than code (``pydoc_data``'s text dump, codec tables)
EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages",
                           "dist-packages", "pydoc_data", "encodings", "__pycache__"})


@dataclass(frozen=True)
class Corpus:
    train: torch.Tensor            # (n_train,) uint8: byte values are the token ids
    held_out: torch.Tensor         # (n_held_out,) uint8
    train_files: tuple[str, ...]   # relative paths, in the order they were joined
    held_out_files: tuple[str, ...]
    digest: str                    # sha256 of the file list, the sizes and the bytes


def _hash01(text: str) -> float:
    """A number in [0, 1) from ``text``, the same in every run (unlike ``hash``)."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2.0**64


def split_of(relpath: str, held_out_fraction: float = 0.1) -> str:
    """``"held_out"`` for about ``held_out_fraction`` of the files, else ``"train"``.

    Decided by the file's path alone, so the split is disjoint by file (no held-out
    byte comes from a file the model trained on) and stable.
    """
    return "held_out" if _hash01(f"split:{relpath}") < held_out_fraction else "train"


def _order_key(relpath: str) -> float:
    return _hash01(f"order:{relpath}")


def source_files(root: str | Path | None = None) -> list[str]:
    """The corpus's candidate files: relative paths of ``*.py`` under ``root``, sorted.

    ``root`` defaults to the running Python's standard library.
    """
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ValueError(f"root {str(root)!r} is not a folder; pass the folder of the "
                         "sources (default: the standard library, "
                         "sysconfig.get_paths()['stdlib'])")
    found = []
    for folder, dirs, files in os.walk(root):
        # why prune while walking: site-packages can hold far more than the library
        dirs[:] = [d for d in dirs if d not in EXCLUDED_DIRS]
        rel = Path(folder).relative_to(root)
        found += [(rel / f).as_posix() for f in files if f.endswith(".py")]
    return sorted(found)


@functools.lru_cache(maxsize=8)
def _read(max_bytes: int, held_out_fraction: float, root: str | None):
    """(train bytes, held-out bytes, train files, held-out files, digest), cached."""
    base = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    budget = {"train": round(max_bytes * (1 - held_out_fraction)),
              "held_out": round(max_bytes * held_out_fraction)}
    parts: dict[str, list[bytes]] = {"train": [], "held_out": []}
    names: dict[str, list[str]] = {"train": [], "held_out": []}
    size = {"train": 0, "held_out": 0}
    for rel in sorted(source_files(base), key=_order_key):
        side = split_of(rel, held_out_fraction)
        if size[side] >= budget[side]:
            continue
        text = (base / rel).read_bytes()
        parts[side].append(text)
        names[side].append(rel)
        size[side] += len(text) + 1
    joined = {s: bytes([SEP]).join(parts[s])[:budget[s]] for s in parts}
    for side in joined:
        if not joined[side]:
            raise ValueError(f"the {side} side of the corpus is empty (max_bytes="
                             f"{max_bytes}, held_out_fraction={held_out_fraction}); "
                             "raise max_bytes or the fraction")
    listing = {s: [[n, len(p)] for n, p in zip(names[s], parts[s])] for s in parts}
    sha = {s: hashlib.sha256(joined[s]).hexdigest() for s in joined}
    digest = hashlib.sha256(json.dumps([listing, sha], sort_keys=True).encode())
    return (joined["train"], joined["held_out"], tuple(names["train"]),
            tuple(names["held_out"]), digest.hexdigest())


def load_corpus(max_bytes: int, held_out_fraction: float = 0.1,
                root: str | Path | None = None) -> Corpus:
    """The corpus, ``max_bytes`` in all (train + held out); see the module docstring.

    Reading is cached per process (the bytes are immutable); each call returns fresh
    tensors, so a caller may change them without touching anyone else's copy.
    """
    if type(max_bytes) is not int or max_bytes < 1024:       # (bool is no size)
        raise ValueError("max_bytes must be an int >= 1024 (bytes of text in all), "
                         f"got {max_bytes!r}")
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError("held_out_fraction must lie strictly between 0 and 1, "
                         f"got {held_out_fraction!r}")
    train, held, train_files, held_files, digest = _read(
        max_bytes, float(held_out_fraction), None if root is None else str(root))
    # why bytearray: torch.frombuffer wants a writable buffer, and a copy keeps the
    # cached bytes intact
    as_ids = lambda b: torch.frombuffer(bytearray(b), dtype=torch.uint8)
    return Corpus(as_ids(train), as_ids(held), train_files, held_files, digest)


def random_windows(data: torch.Tensor, batch: int, length: int,
                   generator: torch.Generator):
    """``batch`` random windows of ``data``: inputs and next-byte targets,
    (batch, length) int64 each."""
    if data.ndim != 1 or data.numel() <= length:
        raise ValueError(f"data must be a 1-D tensor longer than length={length}, got "
                         f"shape {tuple(data.shape)}; use more data or shorter windows")
    start = torch.randint(0, data.numel() - length, (batch,), generator=generator)
    idx = start[:, None] + torch.arange(length + 1)        # (batch, length + 1)
    # why uint8 storage, int64 here: the corpus takes 8x less memory; nn.Embedding
    # wants int64
    w = data[idx].long()
    return w[:, :-1], w[:, 1:]


def unigram_bits_per_byte(train: torch.Tensor, held_out: torch.Tensor) -> float:
    """Held-out cross-entropy, in bits per byte, of the byte frequencies of ``train``.

    The baseline a language model must beat: it knows which bytes are common and
    nothing about context.  Add-one smoothing gives unseen bytes a small probability.
    """
    counts = torch.bincount(train.long(), minlength=256).double() + 1.0   # (256,)
    logp = torch.log2(counts / counts.sum())
    return float(-logp[held_out.long()].mean())
