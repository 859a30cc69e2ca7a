"""Quantized Side Tuning (QST) for the course's ByteLM.

Zhang, Zhao, Miao, Oliaro, Zhang, Li, Jiang, Jia 2024, "Quantized Side Tuning: Fast
and Memory-Efficient Tuning of Quantized Large Language Models", arXiv:2401.07159
(ACL 2024).  The idea: LoRA still back-propagates through the whole big model, so
every activation of it is kept for backward.  QST never back-propagates through it:

1. the base model is quantized to 4 bits (NF4) and frozen; it runs forward only,
   under ``torch.no_grad()``, and hands out its hidden states h_0 (embeddings),
   h_1 .. h_L (after each block);
2. a *side network* of width d / r (r the reduction factor; the paper uses 16)
   reads them: each h_i is downsampled, ``z_i = down_i(h_i)`` (B, T, d / r), and
   side block i gets a gated mix of it and the previous side state, as in Ladder
   Side Tuning:  ``s_i = block_i((1 - β_i) · z_i + β_i · s_{i-1})``, with
   ``β_i = sigmoid(learned scalar)`` and ``s_0 = z_0``;
3. the side output is upsampled to d and mixed with the base's last hidden state,
   ``h = α · h_L + (1 - α) · up(s_L)``, α learned and initialized to 1, so the
   tuned model starts exactly where the pretrained one is; ``h`` then goes through
   the base's (frozen) final norm and head.  (A consequence of α = 1: on the first
   step only α gets a gradient, (1 - α) = 0 cuts the side network off; it starts
   learning once α has moved.)

Only the side network (down, blocks, up, β, α) is trained: the activations kept for
backward are those of a network d / r wide, and the optimizer states are those of its
parameters.  Gradients cannot reach the base: it ran without a graph.

Where this differs from the paper, to stay small: the side blocks are the course's
own transformer blocks (:class:`effdl.lm.model.Block`, RoPE attention + GELU MLP)
at width d / r, where the paper's side layers carry low-rank adapters; downsampling
is a trainable linear map (``downsample="linear"``) or the gradient-free average
pooling over groups of r features (``"avgpool"``), two of the paper's options
(it also studies LoRA/Adapter downsamplers and max pooling); there is no task head,
the language-model head of the base is reused.
"""

from __future__ import annotations

import torch
from torch import nn

from effdl.lm.model import Block, ByteLM, LMConfig, rope_tables

__all__ = ["QSTModel", "base_hidden_states"]


@torch.no_grad()
def base_hidden_states(base: ByteLM, idx: torch.Tensor) -> list[torch.Tensor]:
    """[h_0 = embeddings, h_1, .., h_L], each (B, T, d), computed without a graph."""
    T = idx.shape[1]
    cos, sin = base.rope_cos[:T], base.rope_sin[:T]
    x = base.embed(idx)                                             # (B, T, d)
    hs = [x]
    for block in base.blocks:
        x = block(x, cos, sin)
        hs.append(x)
    return hs


class _AvgPoolDown(nn.Module):
    """(B, T, d) -> (B, T, d / r): the mean of each group of r features (no weights)."""

    def __init__(self, r: int):
        super().__init__()
        self.r = r

    def forward(self, h):
        return h.unflatten(-1, (-1, self.r)).mean(-1)


class QSTModel(nn.Module):
    """A frozen ``base`` (ByteLM, quantized or not) with a trainable side network.

    ``reduction``: r, the side width is d / r; ``side_heads``: heads of the side
    blocks (their head dim must be even, for RoPE); ``downsample``: ``"linear"``
    or ``"avgpool"``.  ``forward(idx)`` -> logits (B, T, 256).
    """

    def __init__(self, base: ByteLM, reduction: int = 4, side_heads: int = 1,
                 downsample: str = "linear"):
        super().__init__()
        c = base.config
        if not isinstance(reduction, int) or reduction < 1 or c.d_model % reduction:
            raise ValueError(f"reduction={reduction!r} must divide d_model="
                             f"{c.d_model}; pick a divisor such as 2 or 4")
        if downsample not in ("linear", "avgpool"):
            raise ValueError(f"downsample must be 'linear' or 'avgpool', got "
                             f"{downsample!r}")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        d_side = c.d_model // reduction
        self.side_config = sc = LMConfig(n_layer=c.n_layer, n_head=side_heads,
                                         d_model=d_side, max_len=c.max_len,
                                         mlp_mult=c.mlp_mult)
        L = c.n_layer
        make_down = (lambda: nn.Linear(c.d_model, d_side, bias=False)) \
            if downsample == "linear" else (lambda: _AvgPoolDown(reduction))
        self.down = nn.ModuleList(make_down() for _ in range(L + 1))
        self.blocks = nn.ModuleList(Block(sc) for _ in range(L))
        self.gate = nn.Parameter(torch.zeros(L))        # β_i = sigmoid(0) = 1/2
        self.up = nn.Linear(d_side, c.d_model, bias=False)
        self.alpha = nn.Parameter(torch.ones(()))        # starts at the base model
        cos, sin = rope_tables(sc.head_dim, sc.max_len, sc.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        dev = base.embed.weight.device
        self.to(dev)

    def side_parameters(self):
        return [p for n, p in self.named_parameters() if not n.startswith("base.")]

    def forward(self, idx):
        T = idx.shape[1]
        hs = base_hidden_states(self.base, idx)          # L + 1 × (B, T, d), no graph
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        s = self.down[0](hs[0])                                     # (B, T, d / r)
        for i, block in enumerate(self.blocks):
            beta = torch.sigmoid(self.gate[i])
            z = self.down[i + 1](hs[i + 1])                         # (B, T, d / r)
            s = block((1 - beta) * z + beta * s, cos, sin)
        h = self.alpha * hs[-1] + (1 - self.alpha) * self.up(s)     # (B, T, d)
        return self.base.head(self.base.norm(h))                    # (B, T, 256)
