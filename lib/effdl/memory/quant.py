"""Weight quantization: absmax int8, group-wise int4 and NF4, with honest byte counts.

Every scheme stores integer *codes* and floating-point *scales*; a weight is read back
as ``code · scale`` (a table look-up first, for NF4).  What each one keeps:

- ``"int8"``: one scale for the whole tensor, ``s = absmax / 127``, codes in
  [-127, 127];
- ``"int8_channel"``: one scale per output channel (row of ``W``, shape (out, in));
- ``"int4"``: group-wise absmax: each row is cut into groups of ``group_size``
  consecutive inputs, ``s = absmax(group) / 7``, codes in [-7, 7], two per byte;
- ``"nf4"``: QLoRA's 4-bit NormalFloat (Dettmers, Pagnoni, Holtzman, Zettlemoyer,
  2023, "QLoRA: Efficient Finetuning of Quantized LLMs", arXiv:2305.14314).  The
  flattened tensor is cut into blocks of 64; each block is divided by its absmax
  (so it lies in [-1, 1]) and every value is rounded to the nearest of 16 fixed
  levels, :data:`NF4_LEVELS`, two 4-bit codes per byte.

The NF4 levels are quantiles of N(0, 1) rescaled to [-1, 1]: 8 on the positive side
and 7 on the negative side, so that 0 is a level exactly (padding and exact zeros
survive) and the 16 codes are all used.  :data:`NF4_LEVELS` is the table of
bitsandbytes (``bitsandbytes-foundation/bitsandbytes``, the NF4 look-up of its
kernels and ``functional.py``), code ``i`` ↦ ``NF4_LEVELS[i]``, copied digit for
digit: a file quantized here decodes with the same table there.

Double quantization (``double_quant=True``, NF4 only), as QLoRA's Section 3: the
fp32 block scales (32 bits per 64 weights = 0.5 bit per weight) are quantized
again.  They are all positive, so their mean is subtracted first (QLoRA does this
too, to use a symmetric format); the centred scales are cut into blocks of 256,
each divided by its own absmax (one fp32 per 256 scales) and stored as 8-bit
floats.  What differs: bitsandbytes stores those 8 bits in its own "dynamic"
8-bit float map; here they are ``torch.float8_e4m3fn`` (also an 8-bit float, so
the same storage, 8 + 32/256 bits per block = 0.127 bit per weight as QLoRA
reports, but not bit-identical codes).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NF4_LEVELS", "SCHEMES", "QuantizedTensor", "QuantLinear", "quantize",
           "quantize_model", "absmax_int8", "absmax_int8_channel", "int4_groupwise",
           "nf4_blockwise", "pack_4bit", "unpack_4bit", "double_quantize_scales",
           "rms_error"]

#: bitsandbytes' NF4 table: code i decodes to NF4_LEVELS[i] (times the block absmax)
NF4_LEVELS = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
    0.33791524171829224, 0.44070982933044434, 0.5626170039176941,
    0.7229568362236023, 1.0,
])

SCHEMES = ("int8", "int8_channel", "int4", "nf4")
NF4_BLOCK = 64              # QLoRA / bitsandbytes default block size
DQ_BLOCK = 256              # block size of the second quantization (QLoRA)


# ---------------------------------------------------------------- packing 4-bit codes

def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Codes in [0, 15], any shape -> uint8 (ceil(n / 2),): code 2j in the high
    nibble of byte j, code 2j + 1 in the low one (bitsandbytes' order); an odd
    count is padded with a 0 code."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() and int(flat.max()) > 15:
        raise ValueError("4-bit codes must lie in [0, 15]; got "
                         f"{int(flat.max())}; offset signed codes by 8 first")
    if flat.numel() % 2:
        flat = torch.cat([flat, flat.new_zeros(1)])
    pairs = flat.view(-1, 2)                                       # (n / 2, 2)
    return (pairs[:, 0] << 4) | pairs[:, 1]


def unpack_4bit(packed: torch.Tensor, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_4bit`: the first ``n`` codes, uint8 (n,)."""
    hi, lo = packed >> 4, packed & 0x0F
    return torch.stack([hi, lo], dim=1).reshape(-1)[:n]


# ---------------------------------------------------------------- the schemes

def _absmax_scale(x: torch.Tensor, qmax: int, dim=None) -> torch.Tensor:
    a = x.abs().amax() if dim is None else x.abs().amax(dim=dim, keepdim=True)
    # why clamp: an all-zero group would divide by zero; any scale decodes it to 0
    return a.clamp_min(torch.finfo(torch.float32).tiny) / qmax


def absmax_int8(w: torch.Tensor):
    """Per tensor: (int8 codes like w, scale ()) with w ≈ codes · scale."""
    s = _absmax_scale(w.float(), 127)
    return torch.round(w.float() / s).clamp(-127, 127).to(torch.int8), s


def absmax_int8_channel(w: torch.Tensor):
    """Per output channel of w (out, in): (int8 codes (out, in), scales (out, 1))."""
    _check_matrix(w, "int8_channel")
    s = _absmax_scale(w.float(), 127, dim=1)                          # (out, 1)
    return torch.round(w.float() / s).clamp(-127, 127).to(torch.int8), s


def int4_groupwise(w: torch.Tensor, group_size: int = 64):
    """w (out, in) in groups of ``group_size`` inputs: (codes in [-7, 7] int8
    (out, in / g, g), scales (out, in / g, 1))."""
    _check_matrix(w, "int4")
    out, inp = w.shape
    if not isinstance(group_size, int) or group_size < 1 or inp % group_size:
        divisors = [d for d in range(1, inp + 1) if inp % d == 0]
        raise ValueError(f"group_size={group_size!r} must divide the input dimension "
                         f"{inp} of the weight {tuple(w.shape)}; pick one of "
                         f"{divisors}")
    g = w.float().reshape(out, inp // group_size, group_size)       # (out, G, g)
    s = _absmax_scale(g, 7, dim=2)                                  # (out, G, 1)
    return torch.round(g / s).clamp(-7, 7).to(torch.int8), s


def nf4_blockwise(w: torch.Tensor, block: int = NF4_BLOCK):
    """Flattened w in blocks of ``block``: (codes in [0, 15] uint8 (n,), absmax
    (n_blocks,)); w ≈ NF4_LEVELS[codes] · absmax of the code's block."""
    if not isinstance(block, int) or block < 1:
        raise ValueError(f"block must be a positive int, got {block!r}")
    flat = w.float().reshape(-1)
    n = flat.numel()
    pad = (-n) % block
    # why pad with zeros: 0 is an NF4 level, so padding never moves a block's absmax
    blocks = F.pad(flat, (0, pad)).view(-1, block)                  # (nb, block)
    absmax = blocks.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    x = blocks / absmax[:, None]                                    # in [-1, 1]
    # nearest level: the midpoints between neighbouring levels are the boundaries
    mids = (NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2                   # (15,)
    codes = torch.bucketize(x, mids.to(x.device))                   # (nb, block)
    return codes.reshape(-1)[:n].to(torch.uint8), absmax


def double_quantize_scales(scales: torch.Tensor, block: int = DQ_BLOCK):
    """QLoRA's second quantization of positive fp32 scales (n,): subtract their mean,
    then blocks of ``block`` as 8-bit floats with one fp32 absmax per block.
    Returns (fp8 codes (n,), block absmax (nb,), mean ())."""
    mean = scales.mean()
    centred = scales - mean
    pad = (-centred.numel()) % block
    b = F.pad(centred, (0, pad)).view(-1, block)                    # (nb, block)
    amax = b.abs().amax(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    codes = (b / amax[:, None]).to(torch.float8_e4m3fn)             # in [-1, 1]
    return codes.reshape(-1)[:scales.numel()], amax, mean


def _undo_double_quant(codes, amax, mean, block: int = DQ_BLOCK):
    n = codes.numel()
    c = F.pad(codes.float(), (0, (-n) % block)).view(-1, block)
    return (c * amax[:, None]).reshape(-1)[:n] + mean


def _check_matrix(w, scheme):
    if w.ndim != 2:
        raise ValueError(f"scheme {scheme!r} quantizes a weight matrix (out, in); got "
                         f"shape {tuple(w.shape)}; use 'int8' or 'nf4' for other "
                         "shapes")


# ---------------------------------------------------------------- the container

@dataclass
class QuantizedTensor:
    """A quantized tensor: ``data`` holds its tensors (codes, scales, ...), the rest
    says how to read them back.  ``dequantize()`` -> fp32 tensor of ``shape``."""

    scheme: str
    shape: tuple
    data: dict = field(default_factory=dict)
    group_size: int = 0                 # int4: inputs per group; nf4: block size

    @property
    def numel(self) -> int:
        return int(torch.Size(self.shape).numel())

    def dequantize(self) -> torch.Tensor:
        d = self.data
        if self.scheme in ("int8", "int8_channel"):
            return d["codes"].float() * d["scales"]
        if self.scheme == "int4":
            out, inp = self.shape
            codes = unpack_4bit(d["codes"], self.numel).to(torch.int8) - 8
            g = codes.view(out, inp // self.group_size, self.group_size)
            return (g.float() * d["scales"]).view(self.shape)
        # nf4
        absmax = d.get("scales")
        if absmax is None:
            absmax = _undo_double_quant(d["scale_codes"], d["scale_absmax"],
                                        d["scale_mean"])
        codes = unpack_4bit(d["codes"], self.numel).long()
        levels = NF4_LEVELS.to(codes.device)[codes]                 # (n,)
        block = self.group_size
        pad = (-self.numel) % block
        x = F.pad(levels, (0, pad)).view(-1, block) * absmax[:, None]
        return x.reshape(-1)[:self.numel].view(self.shape)

    def nbytes(self) -> int:
        """True storage: every tensor in ``data`` (codes, scales, second-level
        constants), at its own element size."""
        return sum(t.numel() * t.element_size() for t in self.data.values())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes() / self.numel


def quantize(w: torch.Tensor, scheme: str = "nf4", *, group_size: int = 64,
             block: int = NF4_BLOCK, double_quant: bool = False) -> QuantizedTensor:
    """Quantize ``w`` with ``scheme`` (one of :data:`SCHEMES`); see the module text.

    ``group_size``: int4's group (must divide the input dimension); ``block``: NF4's
    block; ``double_quant``: quantize NF4's block scales again (QLoRA).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of "
                         f"{', '.join(SCHEMES)}")
    if double_quant and scheme != "nf4":
        raise ValueError(f"double_quant applies to 'nf4' only, not {scheme!r}; "
                         "drop double_quant=True or use scheme='nf4'")
    w = w.detach()
    shape = tuple(w.shape)
    if scheme == "int8":
        codes, s = absmax_int8(w)
        return QuantizedTensor(scheme, shape, {"codes": codes, "scales": s})
    if scheme == "int8_channel":
        codes, s = absmax_int8_channel(w)
        return QuantizedTensor(scheme, shape, {"codes": codes, "scales": s})
    if scheme == "int4":
        codes, s = int4_groupwise(w, group_size)
        # why +8: signed codes in [-7, 7] become nibbles in [1, 15]
        packed = pack_4bit((codes + 8).to(torch.uint8))
        return QuantizedTensor(scheme, shape, {"codes": packed, "scales": s},
                               group_size)
    codes, absmax = nf4_blockwise(w, block)
    data = {"codes": pack_4bit(codes)}
    if double_quant:
        c, amax, mean = double_quantize_scales(absmax)
        data.update(scale_codes=c, scale_absmax=amax, scale_mean=mean)
    else:
        data["scales"] = absmax
    return QuantizedTensor(scheme, shape, data, block)


def rms_error(w: torch.Tensor, qt: QuantizedTensor) -> float:
    """Root-mean-square of ``w - qt.dequantize()``."""
    return float((w.detach().float() - qt.dequantize()).pow(2).mean().sqrt())


# ---------------------------------------------------------------- a quantized layer

class QuantLinear(nn.Module):
    """A linear layer whose weight is stored quantized and dequantized in every
    forward (the weight exists in full precision only for the duration of the
    matmul: memory at rest is ``weight_q.nbytes()``, not 4 bytes per weight).

    Nothing here is trainable (QLoRA freezes the quantized base; adapters go on top,
    :class:`effdl.memory.lora.LoRALinear`).  The bias, if any, stays in fp32.
    """

    def __init__(self, qt: QuantizedTensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = qt.shape
        self.scheme, self.group_size = qt.scheme, qt.group_size
        self._names = tuple(qt.data)
        for name, t in qt.data.items():     # buffers: .to(device) moves them along
            self.register_buffer(f"q_{name}", t)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: str = "nf4", **kw) -> QuantLinear:
        return cls(quantize(linear.weight, scheme, **kw), linear.bias)

    @property
    def weight_q(self) -> QuantizedTensor:
        data = {n: getattr(self, f"q_{n}") for n in self._names}
        shape = (self.out_features, self.in_features)
        return QuantizedTensor(self.scheme, shape, data, self.group_size)

    def forward(self, x):
        return _DequantLinear.apply(x, self)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"scheme={self.scheme!r}")


class _DequantLinear(torch.autograd.Function):
    """y = x Wᵀ + b with W dequantized in forward and *again* in backward.

    Why not ``F.linear(x, layer.weight_q.dequantize())``: autograd would keep the
    dequantized fp32 W (out, in) alive until backward, for every layer, which undoes
    the 4-bit storage during training; QLoRA's kernels recompute it instead.  W gets
    no gradient (frozen), so x is not saved either.
    """

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        w = layer.weight_q.dequantize().to(x.dtype)                 # (out, in)
        return F.linear(x, w, layer.bias)

    @staticmethod
    def backward(ctx, grad_out):
        w = ctx.layer.weight_q.dequantize().to(grad_out.dtype)      # (out, in)
        return grad_out @ w, None                                   # (.., in)


def quantize_model(model: nn.Module, scheme: str = "nf4", skip=("head",),
                   **kw) -> nn.Module:
    """A copy of ``model`` with every ``nn.Linear`` replaced by a :class:`QuantLinear`,
    except those whose qualified name (or last name part) is in ``skip`` (default:
    the output head, which QLoRA also keeps in 16 bits).  Embeddings and norms stay
    as they are.  ``kw`` goes to :func:`quantize`."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of "
                         f"{', '.join(SCHEMES)}")
    new = copy.deepcopy(model)
    targets = [(name, m) for name, m in new.named_modules()
               if isinstance(m, nn.Linear)
               and name not in skip and name.rsplit(".", 1)[-1] not in skip]
    for name, lin in targets:
        _set_module(new, name, QuantLinear.from_linear(lin, scheme, **kw))
    return new


def _set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)
