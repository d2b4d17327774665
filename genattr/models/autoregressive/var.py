"""VAR next-scale generator (``FoundationVision/VAR`` ``var.py`` layout and parameter names).

One class for the released depths (16/20/24/30: width 64·depth, heads = depth, ``attn_l2_norm``) and the twin's
tiny variants (explicit width/heads). Tokens of all scales are predicted in one teacher-forced pass under a
block-causal mask; the first scale is predicted from SOS = class_emb(label) + ``pos_start``.

The tokenizer is held by reference (not a sub-module, as upstream's ``vae_proxy``), so the generator's
state dict is exactly the released ``var_d{depth}.pth``.
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from torch import nn

from genattr.models.autoregressive.common import KVCache, sample_logits, scoring_mode, top_k_top_p_mask


class SelfAttention(nn.Module):
    """Multi-head attention with q/v biases (k bias fixed to 0) and VAR's optional l2-normalised q·k."""

    def __init__(self, dim: int, heads: int, *, attn_l2_norm: bool, attn_drop: float, proj_drop: float) -> None:
        super().__init__()
        self.heads, self.head_dim = heads, dim // heads
        self.attn_l2_norm = attn_l2_norm
        if attn_l2_norm:
            self.scale = 1.0
            self.scale_mul_1H11 = nn.Parameter(torch.full((1, heads, 1, 1), 4.0).log())
            self.max_scale_mul = math.log(100)
        else:
            self.scale = 0.25 / math.sqrt(self.head_dim)
        self.mat_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias, self.v_bias = nn.Parameter(torch.zeros(dim)), nn.Parameter(torch.zeros(dim))
        self.register_buffer("zero_k_bias", torch.zeros(dim))
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop) if proj_drop > 0 else nn.Identity()
        self.attn_drop = attn_drop

    def forward(
        self, x: torch.Tensor, attn_bias: torch.Tensor | None, cache: KVCache | None = None, block: int = 0
    ) -> torch.Tensor:
        b, n, c = x.shape
        bias = torch.cat((self.q_bias, self.zero_k_bias, self.v_bias))
        q, k, v = F.linear(x, self.mat_qkv.weight, bias).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        if self.attn_l2_norm:
            q = F.normalize(q, dim=-1).mul(self.scale_mul_1H11.clamp_max(self.max_scale_mul).exp())
            k = F.normalize(k, dim=-1)
        if cache is not None:
            k, v = cache.extend(block, k, v)
        drop = self.attn_drop if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, dropout_p=drop, scale=self.scale)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, c)))


class AdaLNSelfAttn(nn.Module):
    """Transformer block whose LayerNorm scale/shift and residual gates come from the class embedding."""

    def __init__(
        self,
        dim: int,
        heads: int,
        *,
        mlp_ratio: float,
        eps: float,
        attn_l2_norm: bool,
        drop: float,
        attn_drop: float,
        drop_path: float,
    ) -> None:
        super().__init__()
        self.C = dim
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.attn = SelfAttention(dim, heads, attn_l2_norm=attn_l2_norm, attn_drop=attn_drop, proj_drop=drop)
        self.ffn = Mlp(dim, round(dim * mlp_ratio), act_layer=partial(nn.GELU, approximate="tanh"), drop=drop)
        self.ln_wo_grad = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        attn_bias: torch.Tensor | None,
        cache: KVCache | None = None,
        block: int = 0,
    ) -> torch.Tensor:
        g1, g2, s1, s2, sh1, sh2 = self.ada_lin(cond).view(-1, 1, 6, self.C).unbind(2)
        h = self.attn(self.ln_wo_grad(x).mul(s1.add(1)).add(sh1), attn_bias, cache, block)
        x = x + self.drop_path(h.mul(g1))
        return x + self.drop_path(self.ffn(self.ln_wo_grad(x).mul(s2.add(1)).add(sh2)).mul(g2))


class AdaLNBeforeHead(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.C = dim
        self.ln_wo_grad = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.ada_lin = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.ada_lin(cond).view(-1, 1, 2, self.C).unbind(2)
        return self.ln_wo_grad(x).mul(scale.add(1)).add(shift)


class VARGenerator(nn.Module):
    """Class-conditional next-scale transformer; implements the ``TracedGenerator`` contract.

    ``embed_dim`` / ``num_heads`` / ``drop_path_rate`` default to the released rule (64·depth, depth,
    0.1·depth/24). ``cfg``, ``top_k``, ``top_p`` are this variant's *sampling* settings (FID: 1.5, 900, 0.96).
    """

    derived_state_keys = ("lvl_1L", "attn_bias_for_masking")

    def __init__(
        self,
        *,
        depth: int = 16,
        embed_dim: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        vocab_size: int = 4096,
        Cvae: int = 32,  # noqa: N803 - upstream name
        patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        num_classes: int = 1000,
        norm_eps: float = 1e-6,
        attn_l2_norm: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float | None = None,
        cond_drop_rate: float = 0.1,
        cfg: float = 1.5,
        top_k: int = 900,
        top_p: float = 0.96,
        tokenizer: nn.Module | None = None,
    ) -> None:
        super().__init__()
        c = embed_dim or 64 * depth
        heads = num_heads or depth
        dpr = 0.1 * depth / 24 if drop_path_rate is None else drop_path_rate
        self.depth, self.C, self.num_heads = depth, c, heads
        self.V, self.Cvae = vocab_size, Cvae
        self.vocab_size = vocab_size
        self.patch_nums = tuple(patch_nums)
        self.num_tokens = self.L = sum(p * p for p in self.patch_nums)
        self.first_l = self.patch_nums[0] ** 2
        self.num_classes, self.null_class = num_classes, num_classes
        self.cond_drop_rate = cond_drop_rate
        self.cfg, self.top_k, self.top_p = cfg, top_k, top_p
        self._tokenizer = (tokenizer,)  # a reference, never part of the state dict

        init_std = math.sqrt(1 / c / 3)
        self.word_embed = nn.Linear(Cvae, c)
        self.class_emb = nn.Embedding(num_classes + 1, c)
        self.pos_start = nn.Parameter(torch.empty(1, self.first_l, c))
        self.pos_1LC = nn.Parameter(torch.empty(1, self.L, c))
        self.lvl_embed = nn.Embedding(len(self.patch_nums), c)
        self.shared_ada_lin = nn.Identity()
        rates = [dpr * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            AdaLNSelfAttn(
                c,
                heads,
                mlp_ratio=mlp_ratio,
                eps=norm_eps,
                attn_l2_norm=attn_l2_norm,
                drop=drop_rate,
                attn_drop=attn_drop_rate,
                drop_path=rates[i],
            )
            for i in range(depth)
        )
        d = torch.cat([torch.full((p * p,), i) for i, p in enumerate(self.patch_nums)]).view(1, self.L, 1)
        self.register_buffer("lvl_1L", d.transpose(1, 2)[:, 0].contiguous())
        mask = torch.where(d >= d.transpose(1, 2), 0.0, float("-inf")).reshape(1, 1, self.L, self.L)
        self.register_buffer("attn_bias_for_masking", mask.contiguous())
        self.head_nm = AdaLNBeforeHead(c, norm_eps)
        self.head = nn.Linear(c, vocab_size)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights(init_std)

    # ---- weights ----------------------------------------------------------------------------------------
    def init_weights(
        self, init_std: float, init_head: float = 0.02, init_adaln: float = 0.5, init_gamma: float = 1e-5
    ) -> None:
        """Upstream's init: truncated normals, scaled head, near-zero AdaLN gates (blocks start as identity)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=init_std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Embedding):
                nn.init.trunc_normal_(m.weight, std=init_std)
        for p in (self.pos_start, self.pos_1LC):
            nn.init.trunc_normal_(p, std=init_std)
        self.head.weight.data.mul_(init_head)
        self.head_nm.ada_lin[-1].weight.data.mul_(init_adaln)
        for blk in self.blocks:
            blk.attn.proj.weight.data.div_(math.sqrt(2 * self.depth))
            blk.ffn.fc2.weight.data.div_(math.sqrt(2 * self.depth))
            blk.ada_lin[-1].weight.data[2 * self.C :].mul_(init_adaln)
            blk.ada_lin[-1].weight.data[: 2 * self.C].mul_(init_gamma)

    @property
    def tokenizer(self) -> nn.Module:
        tok = self._tokenizer[0]
        if tok is None:
            raise RuntimeError("VARGenerator needs its tokenizer: call attach_tokenizer(tokenizer) first")
        return tok

    def attach_tokenizer(self, tokenizer: nn.Module) -> VARGenerator:
        self._tokenizer = (tokenizer,)
        return self

    # ---- forward ----------------------------------------------------------------------------------------
    def forward_inputs(self, labels: torch.Tensor, x_next: torch.Tensor) -> torch.Tensor:
        """Logits [B, first_l + l, V] for labels and teacher-forcing inputs ``x_next`` [B, l, Cvae] (a prefix)."""
        b = labels.shape[0]
        ed = self.first_l + x_next.shape[1]
        cond = self.class_emb(labels)
        x = cond.unsqueeze(1).expand(b, self.first_l, -1) + self.pos_start.expand(b, -1, -1)
        if x_next.shape[1]:
            x = torch.cat((x, self.word_embed(x_next.float())), 1)
        x = x + self.lvl_embed(self.lvl_1L[:, :ed].expand(b, -1)) + self.pos_1LC[:, :ed]
        bias = self.attn_bias_for_masking[:, :, :ed, :ed]
        for blk in self.blocks:
            x = blk(x, cond, bias)
        return self.head(self.head_nm(x.float(), cond).float()).float()

    def forward(
        self, tokens: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Training logits: labels become the null class with probability ``cond_drop_rate`` (train mode only)."""
        if self.training and self.cond_drop_rate > 0:
            drop = torch.rand(labels.shape, generator=generator, device=labels.device) < self.cond_drop_rate
            labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        return self.forward_inputs(labels, self.tokenizer.teacher_forcing_input(tokens))

    # ---- the TracedGenerator contract ----------------------------------------------------------------
    def token_logits(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with scoring_mode(self):
            return self.forward_inputs(labels, self.tokenizer.teacher_forcing_input(tokens))

    def guidance_ramp(self) -> torch.Tensor:
        """t per position [L]: t_s = cfg·s/(S−1) for every token of scale s."""
        return self.cfg * self.lvl_1L[0].float() / (len(self.patch_nums) - 1)

    def guided_logits(self, cond: torch.Tensor, uncond: torch.Tensor, start: int = 0) -> torch.Tensor:
        """(1+t)ℓ_c − tℓ_u per position; ``start`` is the position of the first column (for a sampler step)."""
        t = self.guidance_ramp()[start : start + cond.shape[1]].to(cond.device)[None, :, None]
        return (1 + t) * cond - t * uncond

    def support_mask(self, guided: torch.Tensor) -> torch.Tensor:
        """Tokens this variant's top-k / top-p sampler could draw at each position."""
        return top_k_top_p_mask(guided, self.top_k, self.top_p)

    def prefix_logits(self, prefix: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Logits of the next scale's tokens given complete earlier scales ``prefix`` (KV-free recomputation).

        The teacher-forcing input of a k-scale prefix is exactly the inputs of scales 1..k, so this equals the
        matching slice of :meth:`token_logits` (the block-causal mask hides later scales).
        """
        with scoring_mode(self):
            logits = self.forward_inputs(labels, self.tokenizer.teacher_forcing_input(prefix))
        return logits[:, prefix.shape[1] :]

    def cached_step(self, labels: torch.Tensor, x_scale: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
        """Logits of the next scale's tokens, running only that scale through the blocks.

        ``x_scale`` is the scale's teacher-forcing input [B, pn², Cvae] (``None`` for the first scale, whose
        input is SOS). Its queries attend to every cached earlier scale and to the whole scale itself, which is
        what the block-causal mask of :meth:`forward_inputs` allows, so no mask is needed.
        """
        b = labels.shape[0]
        start = cache.length
        cond = self.class_emb(labels)
        if x_scale is None:
            x = cond.unsqueeze(1).expand(b, self.first_l, -1) + self.pos_start.expand(b, -1, -1)
        else:
            x = self.word_embed(x_scale.float())
        end = start + x.shape[1]
        x = x + self.lvl_embed(self.lvl_1L[:, start:end].expand(b, -1)) + self.pos_1LC[:, start:end]
        for i, blk in enumerate(self.blocks):
            x = blk(x, cond, None, cache, i)
        return self.head(self.head_nm(x.float(), cond).float()).float()

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, generator: torch.Generator, *, kv_cache: bool = True) -> torch.Tensor:
        """Next-scale sampling with the CFG ramp and top-k / top-p; ``kv_cache=False`` recomputes the prefix."""
        b = labels.shape[0]
        both = torch.cat((labels, torch.full_like(labels, self.null_class)))
        tokens = labels.new_zeros(b, 0)
        with scoring_mode(self):
            cache = KVCache(len(self.blocks))
            for pn in self.patch_nums:
                if not kv_cache:
                    logits = self.prefix_logits(tokens.repeat(2, 1), both)
                elif tokens.shape[1] == 0:
                    logits = self.cached_step(both, None, cache)
                else:
                    # the conditional and unconditional halves share their tokens: build the input once
                    x_next = self.tokenizer.teacher_forcing_input(tokens)[:, -pn * pn :]
                    logits = self.cached_step(both, x_next.repeat(2, 1, 1), cache)
                guided = self.guided_logits(logits[:b], logits[b:], start=tokens.shape[1])
                tokens = torch.cat((tokens, sample_logits(guided, generator, top_k=self.top_k, top_p=self.top_p)), 1)
        return tokens
