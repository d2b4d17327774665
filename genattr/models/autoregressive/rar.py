"""RAR raster-order generator (``bytedance/1d-tokenizer`` ``modeling/rar.py`` layout and parameter names).

Sequence: [learned cls token, condition token, t0 … t_{n−1}]; the condition token's embedding plus a per-step
``timesteps_embeddings`` row drives adaLN in every block. The token table has V + 1 + K + 1 rows (codes, mask,
classes at class + V + 1, null class), 2026 for the released models, and the head predicts V codes.
Training may permute the order with probability ``random_ratio`` (target-aware position embeddings tell the
model which position comes next); scoring and sampling always use raster order.
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from genattr.models.autoregressive.common import KVCache, sample_logits, scoring_mode


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale) + shift


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, *, attn_drop: float, proj_drop: float, norm: partial) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm, self.k_norm = norm(self.head_dim), norm(self.head_dim)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, cache: KVCache | None = None, block: int = 0
    ) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if cache is not None:
            k, v = cache.extend(block, k, v)
        drop = self.attn_drop.p if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_hidden: int, *, drop: float, attn_drop: float, norm: partial) -> None:
        super().__init__()
        self.norm1 = norm(dim)
        self.attn = Attention(dim, heads, attn_drop=attn_drop, proj_drop=drop, norm=norm)
        self.norm2 = norm(dim)
        self.mlp = Mlp(dim, mlp_hidden, act_layer=nn.GELU, drop=drop)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None, c: torch.Tensor, cache: KVCache | None = None, block: int = 0
    ) -> torch.Tensor:
        sh_a, sc_a, g_a, sh_m, sc_m, g_m = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + g_a * self.attn(_modulate(self.norm1(x), sh_a, sc_a), mask, cache, block)
        return x + g_m * self.mlp(_modulate(self.norm2(x), sh_m, sc_m))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, norm: partial) -> None:
        super().__init__()
        self.norm_final = norm(dim, elementwise_affine=False)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        scale, shift = self.adaLN_modulation(c).chunk(2, dim=-1)
        return _modulate(self.norm_final(x), shift, scale)


class RARGenerator(nn.Module):
    """Class-conditional raster-order transformer; implements the ``TracedGenerator`` contract.

    Defaults are RAR-B (768 wide, 24 layers, 16 heads, MLP 3072). ``guidance_scale`` (w), ``guidance_scale_pow``
    and ``temperature`` are this variant's sampling settings (B: 16.0, 2.75, 1.0).
    ``pos_pad`` / ``timestep_pad`` are the spare rows upstream allocates (1024 / 100); tiny twins shrink them.
    """

    def __init__(
        self,
        *,
        hidden_size: int = 768,
        depth: int = 24,
        num_heads: int = 16,
        intermediate_size: int = 3072,
        image_seq_len: int = 256,
        codebook_size: int = 1024,
        num_classes: int = 1000,
        dropout: float = 0.1,
        attn_drop: float = 0.1,
        pos_pad: int = 1024,
        timestep_pad: int = 100,
        cond_drop_rate: float = 0.1,
        random_ratio: float = 0.0,
        guidance_scale: float = 16.0,
        guidance_scale_pow: float = 2.75,
        temperature: float = 1.0,
    ) -> None:
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        d = hidden_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.blocks = nn.ModuleList(
            Block(d, num_heads, intermediate_size, drop=dropout, attn_drop=attn_drop, norm=norm) for _ in range(depth)
        )
        self.embeddings = nn.Embedding(codebook_size + 1 + num_classes + 1, d)
        self.pos_embed = nn.Parameter(torch.zeros(1, image_seq_len + pos_pad, d))
        self.target_aware_pos_embed = nn.Parameter(torch.zeros(1, image_seq_len + pos_pad, d))
        self.timesteps_embeddings = nn.Parameter(torch.zeros(1, image_seq_len + timestep_pad, d))
        self.adaln_before_head = FinalLayer(d, norm)
        self.lm_head = nn.Linear(d, codebook_size)
        mask = torch.full((image_seq_len + 2, image_seq_len + 2), float("-inf")).triu_(1)
        self.register_buffer("attn_mask", mask, persistent=False)
        self.num_tokens = self.image_seq_len = image_seq_len
        self.vocab_size = self.codebook_size = codebook_size
        self.num_classes, self.null_class = num_classes, num_classes
        self.cond_drop_rate, self.random_ratio = cond_drop_rate, random_ratio
        self.guidance_scale, self.guidance_scale_pow, self.temperature = guidance_scale, guidance_scale_pow, temperature
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    def init_weights(self) -> None:
        """Upstream init: truncated normal (0.02) everywhere, adaLN-zero modulation layers."""
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for p in (self.pos_embed, self.target_aware_pos_embed, self.timesteps_embeddings):
            nn.init.trunc_normal_(p, std=0.02)
        for mod in [self.adaln_before_head, *self.blocks]:
            nn.init.zeros_(mod.adaLN_modulation[-1].weight)
            nn.init.zeros_(mod.adaLN_modulation[-1].bias)

    # ---- forward ----------------------------------------------------------------------------------------
    def condition_ids(self, labels: torch.Tensor) -> torch.Tensor:
        """Class index → token id (class + V + 1); the null class lands on the last row."""
        return labels + self.codebook_size + 1

    def forward_fn(
        self, tokens: torch.Tensor, cond_ids: torch.Tensor, orders: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits [B, n + 1, V]: position j (the condition token for j = 0) predicts the j-th token of ``orders``.

        ``tokens`` are already in the order ``orders`` [B, L] (training permutation); it permutes the position
        embeddings accordingly. ``None`` is raster order.
        """
        b, n = tokens.shape
        emb = self.embeddings(torch.cat((cond_ids.view(b, 1), tokens), 1))
        pos = self.pos_embed[:, 2 : 2 + self.image_seq_len].expand(b, -1, -1)
        tpos = self.target_aware_pos_embed[:, 2 : 2 + self.image_seq_len].expand(b, -1, -1)
        if orders is not None:
            pick = orders.unsqueeze(-1).expand(-1, -1, pos.shape[-1])
            pos, tpos = pos.gather(1, pick), tpos.gather(1, pick)
        x = torch.cat((self.cls_token.expand(b, -1, -1), emb), 1)  # [B, n + 2, D]
        x = x + torch.cat((self.pos_embed[:, :2].expand(b, -1, -1), pos), 1)[:, : n + 2]
        zero = x.new_zeros(b, 1, x.shape[-1])
        x = x + torch.cat((zero, tpos, zero), 1)[:, : n + 2]
        c = emb[:, :1] + self.timesteps_embeddings[:, : n + 2]
        mask = self.attn_mask[: n + 2, : n + 2]
        for blk in self.blocks:
            x = blk(x, mask, c)
        return self.lm_head(self.adaln_before_head(x[:, 1:], c[:, 1:]))

    def forward(
        self, tokens: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Training: (logits [B, L, V], targets [B, L]) with label drop and order permutation (``random_ratio``)."""
        b, n = tokens.shape
        if self.training and self.cond_drop_rate > 0:
            drop = torch.rand(labels.shape, generator=generator, device=labels.device) < self.cond_drop_rate
            labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        orders = None
        if self.training and self.random_ratio > 0:
            perm = torch.stack([torch.randperm(n, generator=generator) for _ in range(b)]).to(tokens.device)
            use = torch.rand(b, generator=generator) < self.random_ratio
            orders = torch.where(use.to(tokens.device)[:, None], perm, torch.arange(n, device=tokens.device)[None])
            tokens = tokens.gather(1, orders)
        return self.forward_fn(tokens[:, :-1], self.condition_ids(labels), orders), tokens

    # ---- the TracedGenerator contract ----------------------------------------------------------------
    def token_logits(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with scoring_mode(self):
            return self.forward_fn(tokens[:, :-1], self.condition_ids(labels))

    def guidance_ramp(self) -> torch.Tensor:
        """g_n = (w − 1)·(1 − cos(π (n/L)^pow))/2 + 1 for steps n = 0..L−1."""
        n = torch.arange(self.image_seq_len, dtype=torch.float64) / self.image_seq_len
        g = (self.guidance_scale - 1) * (1 - torch.cos(n.pow(self.guidance_scale_pow) * torch.pi)) / 2 + 1
        return g.float()

    def guided_logits(self, cond: torch.Tensor, uncond: torch.Tensor, start: int = 0) -> torch.Tensor:
        g = self.guidance_ramp()[start : start + cond.shape[1]].to(cond.device)[None, :, None]
        return (uncond + (cond - uncond) * g) / self.temperature

    def prefix_logits(self, prefix: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Logits [B, 1, V] of the next token after ``prefix`` (KV-free recomputation)."""
        with scoring_mode(self):
            return self.forward_fn(prefix, self.condition_ids(labels))[:, -1:]

    def cached_step(self, ids: torch.Tensor, cond_ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Logits [B, 1, V] of the next token after running only the new positions ``ids`` through the blocks.

        Position j of the model's sequence [cls, condition, t0, …] gets ``pos_embed[j]``, the target-aware
        embedding of the token it predicts (``target_aware_pos_embed[j + 1]``, none for the cls token) and adaLN
        condition embedding(condition) + ``timesteps_embeddings[j]``: exactly what :meth:`forward_fn` adds in
        raster order, so cached and recomputed logits agree. The first call passes the condition ids as ``ids``
        (the cls token is prepended here); later calls pass the token sampled last.
        """
        b = ids.shape[0]
        start = cache.length
        x = self.embeddings(ids)
        if start == 0:
            x = torch.cat((self.cls_token.expand(b, -1, -1), x), 1)
        end = start + x.shape[1]
        pos = torch.arange(start, end, device=ids.device)
        tpos = self.target_aware_pos_embed[0, (pos + 1).clamp_max(self.target_aware_pos_embed.shape[1] - 1)]
        tpos = torch.where((pos == 0)[:, None], torch.zeros_like(tpos), tpos)
        x = x + self.pos_embed[0, pos] + tpos
        c = self.embeddings(cond_ids).view(b, 1, -1) + self.timesteps_embeddings[:, start:end]
        mask = self.attn_mask[start:end, :end] if end - start > 1 else None
        for i, blk in enumerate(self.blocks):
            x = blk(x, mask, c, cache, i)
        return self.lm_head(self.adaln_before_head(x[:, -1:], c[:, -1:]))

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, generator: torch.Generator, *, kv_cache: bool = True) -> torch.Tensor:
        """Raster-order sampling with CFG; ``kv_cache=False`` recomputes the prefix every step (same tokens)."""
        b = labels.shape[0]
        both = torch.cat((labels, torch.full_like(labels, self.null_class)))
        cond_ids = self.condition_ids(both)
        tokens = labels.new_zeros(b, 0)
        with scoring_mode(self):
            cache = KVCache(len(self.blocks))
            for step in range(self.image_seq_len):
                if kv_cache:
                    logits = self.cached_step(
                        cond_ids.view(-1, 1) if step == 0 else tokens[:, -1:].repeat(2, 1), cond_ids, cache
                    )
                else:
                    logits = self.prefix_logits(tokens.repeat(2, 1), both)
                guided = self.guided_logits(logits[:b], logits[b:], start=step)
                tokens = torch.cat((tokens, sample_logits(guided, generator)), 1)
        return tokens
