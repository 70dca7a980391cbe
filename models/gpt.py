"""A small GPT: a nanoGPT-style decoder-only transformer for next-token prediction.

The default vocabulary of 256 is bytes, so any text corpus works without a tokenizer.
Reference: Karpathy's nanoGPT `model.py` (same module names, initialisation and weight tying).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from models.base import ModelSpec, bounded, check_bounds, randint


@dataclass(frozen=True)
class GPTConfig:
    # Limits lie beyond the largest published models (~100 layers, n_embd ~25k, vocabularies ~256k) and
    # keep sizes far from overflow; the registry also caps the total parameter count.
    n_layer: int = bounded(4, minimum=1, maximum=1024)
    n_head: int = bounded(4, minimum=1, maximum=1024)
    n_embd: int = bounded(128, minimum=1, maximum=2**16)
    block_size: int = bounded(128, minimum=1, maximum=2**20)  # sequence length of a training sample
    vocab_size: int = bounded(256, minimum=1, maximum=2**22)  # default: bytes
    dropout: float = bounded(0.0, minimum=0.0, exclusiveMaximum=1.0)
    bias: bool = True  # bias in Linear and LayerNorm layers

    def __post_init__(self) -> None:
        check_bounds(self)
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd must be divisible by n_head (got {self.n_embd} and {self.n_head})")


class CausalSelfAttention(nn.Module):
    """Multi-head attention where each position sees only itself and earlier positions."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.n_head = config.n_head
        self.dropout = config.dropout
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # Fused kernel (flash / memory-efficient where available): no T x T mask tensor is stored.
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class _Trunk(nn.Module):
    """nanoGPT's `transformer` ModuleDict as a module with typed attributes (same parameter names)."""

    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.h = nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)


class GPT(nn.Module):
    """Token ids [B, T] -> next-token logits [B, T, vocab_size]."""

    def __init__(self, config: GPTConfig, gradient_checkpointing: bool = False) -> None:
        super().__init__()
        self.config = config
        self.gradient_checkpointing = gradient_checkpointing
        self.transformer = _Trunk(config)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        # Weight tying (Press & Wolf, 2017): the input embedding doubles as the output projection.
        self.transformer.wte.weight = self.lm_head.weight

        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):  # GPT-2: scale residual projections by depth
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        t = idx.size(1)
        if t > self.config.block_size:
            raise ValueError(f"sequence length {t} exceeds block_size {self.config.block_size}")
        pos = torch.arange(t, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)  # keep block inputs, recompute the rest
            else:
                x = block(x)
        return self.lm_head(self.transformer.ln_f(x))


def parameter_count(config: GPTConfig) -> int:
    """Parameters of `GPT(config)`, counted without building it (lm_head shares wte's weight)."""
    e, bias = config.n_embd, int(config.bias)
    layer_norm = e + bias * e
    attention = (e * 3 * e + bias * 3 * e) + (e * e + bias * e)
    mlp = (e * 4 * e + bias * 4 * e) + (4 * e * e + bias * e)
    block = 2 * layer_norm + attention + mlp
    embeddings = config.vocab_size * e + config.block_size * e
    return embeddings + config.n_layer * block + layer_norm


def build(config: GPTConfig, gradient_checkpointing: bool = False) -> GPT:
    return GPT(config, gradient_checkpointing)


def make_batch(
    config: GPTConfig, batch_size: int, device: torch.device | str, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token sequences; targets are the inputs shifted by one, as in language-model training."""
    tokens = randint(config.vocab_size, (batch_size, config.block_size + 1), device, generator)
    return tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()


def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(outputs.reshape(-1, outputs.size(-1)), targets.reshape(-1))


SPEC = ModelSpec(
    name="gpt",
    description="nanoGPT-style decoder-only transformer over byte tokens (next-token prediction).",
    config_type=GPTConfig,
    build=build,
    make_batch=make_batch,
    loss=loss,
    input_shape=lambda config: [config.block_size],
    input_dtype="int64",
    num_classes=lambda config: config.vocab_size,
    supports_gradient_checkpointing=True,
    parameter_count=parameter_count,
)
