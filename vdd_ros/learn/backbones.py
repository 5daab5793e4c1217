"""Observation-window backbones shared by the MoE student and the diffusion teacher.

Two kinds, selected by :class:`BackboneConfig`:

- ``mlp``: the flattened window (and optional extra input) through an MLP;
- ``transformer``: a small causal transformer with one token per observation frame and a
  learned positional embedding; the optional ``extra`` vector becomes one more token
  appended last. The features are the last token's output.

Both are written without data-dependent control flow so ``torch.onnx.export`` can trace them
with a dynamic batch dimension; attention is plain matmul + softmax with a constant causal mask.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from vdd_ros.learn.configs import BackboneConfig

ACTIVATION_MODULES = {"mish": nn.Mish, "relu": nn.ReLU, "silu": nn.SiLU}


def build_mlp(in_dim: int, hidden: int, layers: int, out_dim: int | None = None,
              activation: str = "mish") -> nn.Sequential:
    """``layers`` hidden Linear+activation layers, optionally followed by a linear output layer."""
    if activation not in ACTIVATION_MODULES:
        raise ValueError(f"build_mlp activation: expected one of {sorted(ACTIVATION_MODULES)}, got {activation!r}")
    modules: list[nn.Module] = []
    width = in_dim
    for _ in range(layers):
        modules += [nn.Linear(width, hidden), ACTIVATION_MODULES[activation]()]
        width = hidden
    if out_dim is not None:
        modules.append(nn.Linear(width, out_dim))
    return nn.Sequential(*modules)


class MLPBackbone(nn.Module):
    def __init__(self, config: BackboneConfig, obs_step_dim: int, history: int, extra_dim: int = 0):
        super().__init__()
        self.obs_dim = obs_step_dim * history
        self.extra_dim = extra_dim
        self.net = build_mlp(self.obs_dim + extra_dim, config.hidden, config.mlp_layers,
                             activation=config.activation)
        self.out_dim = config.hidden

    def forward(self, obs: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        if self.extra_dim == 0:
            return self.net(obs)
        if extra is None:
            raise ValueError(f"backbone built with extra_dim={self.extra_dim} needs an 'extra' input, got None")
        return self.net(torch.cat([obs, extra], dim=-1))


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention; token i attends to tokens 0..i (mask is a constant buffer)."""

    def __init__(self, dim: int, heads: int, tokens: int):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        mask = torch.full((tokens, tokens), float("-inf")).triu(1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, dim = x.shape
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scores = q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + self.mask
        out = torch.softmax(scores, dim=-1) @ v  # [B, heads, T, head_dim]
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, dim))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attn(ln(x)); x + ffn(ln(x))."""

    def __init__(self, dim: int, heads: int, tokens: int, ffn_hidden: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, tokens)
        self.norm2 = nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_hidden), nn.GELU(), nn.Linear(ffn_hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.ffn(self.norm2(x))


class CausalTransformerBackbone(nn.Module):
    def __init__(self, config: BackboneConfig, obs_step_dim: int, history: int, extra_dim: int = 0):
        super().__init__()
        self.obs_step_dim = obs_step_dim
        self.history = history
        self.extra_dim = extra_dim
        tokens = history + (1 if extra_dim > 0 else 0)
        dim = config.embed_dim
        self.obs_embed = nn.Linear(obs_step_dim, dim)
        self.extra_embed = nn.Linear(extra_dim, dim) if extra_dim > 0 else None
        self.position = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(TransformerBlock(dim, config.heads, tokens, config.hidden)
                                    for _ in range(config.transformer_layers))
        self.norm = nn.LayerNorm(dim)
        self.out_dim = dim

    def forward(self, obs: torch.Tensor, extra: torch.Tensor | None = None) -> torch.Tensor:
        frames = obs.reshape(obs.shape[0], self.history, self.obs_step_dim)
        x = self.obs_embed(frames)
        if self.extra_embed is not None:
            if extra is None:
                raise ValueError(f"backbone built with extra_dim={self.extra_dim} needs an 'extra' input, got None")
            x = torch.cat([x, self.extra_embed(extra).unsqueeze(1)], dim=1)
        x = x + self.position
        for block in self.blocks:
            x = block(x)
        return self.norm(x[:, -1])


def build_backbone(config: BackboneConfig, obs_step_dim: int, history: int, extra_dim: int = 0) -> nn.Module:
    """A backbone mapping ``obs [B, history*obs_step_dim]`` (+ ``extra [B, extra_dim]``) to ``[B, out_dim]``."""
    config.validate()
    for name, value, low in (("obs_step_dim", obs_step_dim, 1), ("history", history, 1), ("extra_dim", extra_dim, 0)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"build_backbone {name}: expected an integer >= {low}, got {value!r}")
    if config.kind == "mlp":
        return MLPBackbone(config, obs_step_dim, history, extra_dim)
    return CausalTransformerBackbone(config, obs_step_dim, history, extra_dim)
