"""PRADA models: upstream-compatible full sizes (meta device), checkpoint loading, tokenizer round trips,
teacher forcing vs step-by-step sampling, deterministic scoring, guidance ramps and Algorithm 3."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from genattr.models.autoregressive.base import TracedGenerator
from genattr.models.autoregressive.common import KVCache, top_k_top_p_mask
from genattr.models.autoregressive.rar import RARGenerator
from genattr.models.autoregressive.var import VARGenerator
from genattr.models.tokenizers import optimized_quant as oq
from genattr.models.tokenizers.base import MultiScaleTokenizer, TracingTokenizer
from genattr.models.tokenizers.checkpoint import load_generator_checkpoint, load_tokenizer_checkpoint, save_checkpoint
from genattr.models.tokenizers.multi_scale import MultiScaleVQ
from genattr.models.tokenizers.optimized_quant import alg3_rounds, optimized_quantize, quant_loss, round_logits, tau_at
from genattr.models.tokenizers.single_scale import SingleScaleVQ
from genattr.utils.errors import ConfigError

# Key names and shapes of the released checkpoints, derived from upstream module code
# (FoundationVision/VAR models/{vqvae,basic_vae,quant,var,basic_var}.py; bytedance/1d-tokenizer
# modeling/{rar.py,modules/maskgit_vqgan.py}).
VAR_VAE_KEYS = {
    "encoder.conv_in.weight": (160, 3, 3, 3),
    "encoder.conv_in.bias": (160,),
    "encoder.down.0.block.0.conv1.weight": (160, 160, 3, 3),
    "encoder.down.0.downsample.conv.weight": (160, 160, 3, 3),
    "encoder.down.2.block.0.nin_shortcut.weight": (320, 160, 1, 1),
    "encoder.down.4.block.0.nin_shortcut.weight": (640, 320, 1, 1),
    "encoder.down.4.attn.1.qkv.weight": (1920, 640, 1, 1),
    "encoder.mid.attn_1.proj_out.weight": (640, 640, 1, 1),
    "encoder.conv_out.weight": (32, 640, 3, 3),
    "decoder.conv_in.weight": (640, 32, 3, 3),
    "decoder.mid.block_2.norm2.weight": (640,),
    "decoder.up.4.block.2.conv2.weight": (640, 640, 3, 3),
    "decoder.up.4.attn.2.norm.weight": (640,),
    "decoder.up.3.block.0.nin_shortcut.weight": (320, 640, 1, 1),
    "decoder.up.1.upsample.conv.weight": (160, 160, 3, 3),
    "decoder.conv_out.weight": (3, 160, 3, 3),
    "quant_conv.weight": (32, 32, 3, 3),
    "post_quant_conv.bias": (32,),
    "quantize.embedding.weight": (4096, 32),
    "quantize.ema_vocab_hit_SV": (10, 4096),
    "quantize.quant_resi.qresi_ls.0.weight": (32, 32, 3, 3),
    "quantize.quant_resi.qresi_ls.3.bias": (32,),
}
VAR_VAE_ABSENT = (
    "encoder.down.4.downsample.conv.weight",
    "decoder.up.0.upsample.conv.weight",
    "encoder.down.3.attn.0.qkv.weight",
)
MASKGIT_KEYS = {
    "encoder.conv_in.weight": (128, 3, 3, 3),
    "encoder.down.2.block.0.conv1.weight": (256, 128, 3, 3),
    "encoder.down.2.block.0.nin_shortcut.weight": (256, 256, 1, 1),
    "encoder.down.4.block.1.conv2.weight": (512, 512, 3, 3),
    "encoder.mid.1.norm2.weight": (512,),
    "encoder.conv_out.weight": (256, 512, 1, 1),
    "encoder.conv_out.bias": (256,),
    "decoder.conv_in.weight": (512, 256, 3, 3),
    "decoder.mid.0.conv1.weight": (512, 512, 3, 3),
    "decoder.up.4.block.0.conv1.weight": (512, 512, 3, 3),
    "decoder.up.3.block.0.conv1.weight": (256, 512, 3, 3),
    "decoder.up.3.block.0.nin_shortcut.weight": (256, 256, 1, 1),
    "decoder.up.4.upsample_conv.weight": (512, 512, 3, 3),
    "decoder.conv_out.weight": (3, 128, 3, 3),
    "quantize.embedding.weight": (1024, 256),
}
MASKGIT_ABSENT = ("encoder.conv_in.bias", "encoder.down.0.block.0.conv1.bias", "decoder.up.0.upsample_conv.weight")
VAR_D16_KEYS = {
    "class_emb.weight": (1001, 1024),
    "pos_start": (1, 1, 1024),
    "pos_1LC": (1, 680, 1024),
    "lvl_embed.weight": (10, 1024),
    "word_embed.weight": (1024, 32),
    "blocks.0.attn.scale_mul_1H11": (1, 16, 1, 1),
    "blocks.0.attn.q_bias": (1024,),
    "blocks.0.attn.zero_k_bias": (1024,),
    "blocks.15.attn.mat_qkv.weight": (3072, 1024),
    "blocks.15.ffn.fc1.weight": (4096, 1024),
    "blocks.15.ada_lin.1.weight": (6144, 1024),
    "head_nm.ada_lin.1.weight": (2048, 1024),
    "head.weight": (4096, 1024),
    "attn_bias_for_masking": (1, 1, 680, 680),
}
RAR_B_KEYS = {
    "cls_token": (1, 1, 768),
    "embeddings.weight": (2026, 768),
    "pos_embed": (1, 1280, 768),
    "target_aware_pos_embed": (1, 1280, 768),
    "timesteps_embeddings": (1, 356, 768),
    "blocks.0.attn.qkv.bias": (2304,),
    "blocks.23.attn.q_norm.weight": (48,),
    "blocks.0.mlp.fc1.weight": (3072, 768),
    "blocks.0.adaLN_modulation.1.weight": (4608, 768),
    "adaln_before_head.adaLN_modulation.1.weight": (1536, 768),
    "lm_head.weight": (1024, 768),
}
# published sizes (VAR README: 310M/600M/1.0B/2.0B; RAR README: 261M/461M/955M/1.5B)
VAR_PARAMS = {16: 310e6, 20: 600e6, 24: 1.0e9, 30: 2.0e9}
RAR_SIZES = {
    "b": (768, 24, 3072, 261e6),
    "l": (1024, 24, 4096, 461e6),
    "xl": (1280, 32, 5120, 955e6),
    "xxl": (1408, 40, 6144, 1.5e9),
}


def _shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check(shapes: dict, expected: dict, absent: tuple = ()) -> None:
    for key, shape in expected.items():
        assert key in shapes, f"missing upstream key {key}"
        assert shapes[key] == shape, f"{key}: {shapes[key]} != {shape}"
    for key in absent:
        assert key not in shapes, f"unexpected key {key}"


def test_full_size_tokenizers_match_upstream_keys() -> None:
    with torch.device("meta"):
        var_vae, maskgit = MultiScaleVQ(), SingleScaleVQ()
    _check(_shapes(var_vae), VAR_VAE_KEYS, VAR_VAE_ABSENT)
    _check(_shapes(maskgit), MASKGIT_KEYS, MASKGIT_ABSENT)
    assert var_vae.num_tokens == 680 and maskgit.num_tokens == 256
    # φ sharing: ticks linspace(1/12, 11/12, 4), scale si uses the nearest tick to si/9; the exact ties at
    # si = 2 and 7 fall to the later tick in float64, as in upstream's numpy argmin
    assert [var_vae.quantize.quant_resi.index(si / 9) for si in range(10)] == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3]


def test_full_size_generators_match_upstream_sizes() -> None:
    with torch.device("meta"):
        for depth, ref in VAR_PARAMS.items():
            gen = VARGenerator(depth=depth)
            n = sum(p.numel() for p in gen.parameters())
            # within 2%, or within the rounding of the published figure (VAR-d24 is 1.03B, printed "1.0B")
            assert abs(n - ref) <= max(0.02 * ref, 0.05e9 if ref >= 1e9 else 0), (depth, n)
            assert (gen.C, gen.num_heads) == (64 * depth, depth)
        _check(_shapes(VARGenerator(depth=16)), VAR_D16_KEYS)
        for name, (hidden, depth, mlp, ref) in RAR_SIZES.items():
            gen = RARGenerator(hidden_size=hidden, depth=depth, intermediate_size=mlp)
            n = sum(p.numel() for p in gen.parameters())
            assert abs(n - ref) <= 0.02 * ref, (name, n)
        _check(_shapes(RARGenerator()), RAR_B_KEYS)


def tiny_var_tok() -> MultiScaleVQ:
    torch.manual_seed(0)
    return MultiScaleVQ(
        vocab_size=64,
        z_channels=4,
        ch=8,
        ch_mult=(1, 2),
        num_res_blocks=1,
        share_quant_resi=2,
        patch_nums=(1, 2, 4),
        using_sa=False,
        norm_groups=4,
    )


def tiny_rar_tok() -> SingleScaleVQ:
    torch.manual_seed(0)
    return SingleScaleVQ(
        hidden_channels=8,
        channel_mult=(1, 2),
        num_res_blocks=1,
        z_channels=4,
        codebook_size=32,
        image_size=8,
        norm_groups=4,
    )


def tiny_var(tok: MultiScaleVQ, **kw) -> VARGenerator:
    torch.manual_seed(1)
    args = dict(
        depth=2,
        embed_dim=32,
        num_heads=2,
        vocab_size=64,
        Cvae=4,
        patch_nums=(1, 2, 4),
        num_classes=5,
        top_k=16,
        top_p=0.9,
        cfg=2.0,
        tokenizer=tok,
    )
    return VARGenerator(**{**args, **kw})


def tiny_rar(**kw) -> RARGenerator:
    torch.manual_seed(1)
    args = dict(
        hidden_size=32,
        depth=2,
        num_heads=2,
        intermediate_size=64,
        image_seq_len=16,
        codebook_size=32,
        num_classes=5,
        pos_pad=2,
        timestep_pad=2,
        guidance_scale=3.0,
        guidance_scale_pow=2.0,
        temperature=1.1,
    )
    return RARGenerator(**{**args, **kw})


def test_contracts_round_trip_and_greedy_determinism() -> None:
    x = torch.rand(3, 3, 8, 8)
    for tok in (tiny_var_tok(), tiny_rar_tok()):
        assert isinstance(tok, TracingTokenizer)
        with torch.no_grad():
            f = tok.encode_feature(x)
            tokens = tok.quantize(f)
            assert tokens.shape == (3, tok.num_tokens) and torch.equal(tokens, tok.quantize(f))  # greedy deterministic
            img = tok.decode_latent(tok.tokens_to_latent(tokens))
            assert img.shape == x.shape and img.dtype == torch.float32 and 0 <= img.min() and img.max() <= 1
            again = tok.quantize(tok.encode_feature(img))  # tokens → image → re-encode
            assert again.shape == tokens.shape
    var_tok = tiny_var_tok()
    assert isinstance(var_tok, MultiScaleTokenizer)
    tokens = torch.randint(64, (2, 21))
    tf = var_tok.teacher_forcing_input(tokens)
    assert tf.shape == (2, 20, 4)
    # the prefix form used by the step-by-step sampler is the leading part of the full input
    assert torch.equal(var_tok.teacher_forcing_input(tokens[:, :5]), tf[:, :20])
    assert torch.equal(var_tok.teacher_forcing_input(tokens[:, :1]), tf[:, :4])
    # single scale: a code's own embedding quantises back to that code
    rar_tok = tiny_rar_tok()
    t = torch.randperm(32)[:16].view(1, 16)
    assert torch.equal(rar_tok.quantize(rar_tok.tokens_to_latent(t)), t)


def test_checkpoint_loader_strict_and_clear_errors(tmp_path) -> None:
    tok = tiny_var_tok()
    path = tmp_path / "vae.safetensors"
    save_checkpoint(tok, path)
    fresh = MultiScaleVQ(
        **{
            **dict(vocab_size=64, z_channels=4, ch=8, ch_mult=(1, 2), num_res_blocks=1),
            **dict(share_quant_resi=2, patch_nums=(1, 2, 4), using_sa=False, norm_groups=4),
        }
    )
    load_tokenizer_checkpoint(fresh, path)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), tok.state_dict().values(), strict=True))
    # released checkpoints are weights-only torch files: same loader
    gen = tiny_rar()
    torch.save(gen.state_dict(), tmp_path / "rar.bin")
    load_generator_checkpoint(tiny_rar(), tmp_path / "rar.bin")
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokenizer_checkpoint(fresh, tmp_path / "missing.pth")
    with pytest.raises(ConfigError, match=r"missing \(e\.g\. .*quant_conv"):
        state = {k: v for k, v in gen.state_dict().items()}
        torch.save({k: v for k, v in tok.state_dict().items() if "quant_conv" not in k}, tmp_path / "bad.pth")
        load_tokenizer_checkpoint(fresh, tmp_path / "bad.pth")
    with pytest.raises(ConfigError, match="unexpected .*lm_head"):
        torch.save({**tok.state_dict(), "lm_head.weight": state["lm_head.weight"]}, tmp_path / "extra.pth")
        load_tokenizer_checkpoint(fresh, tmp_path / "extra.pth")
    with pytest.raises(ConfigError, match="another shape"):
        load_generator_checkpoint(tiny_rar(hidden_size=16), tmp_path / "rar.bin")


@pytest.mark.parametrize("family", ["var", "rar"])
def test_teacher_forced_logits_equal_stepwise_and_scoring_is_deterministic(family: str) -> None:
    tok = tiny_var_tok()
    gen = tiny_var(tok, drop_rate=0.2) if family == "var" else tiny_rar(dropout=0.2, attn_drop=0.2)
    assert isinstance(gen, TracedGenerator)
    labels = torch.tensor([0, 3])
    tokens = gen.sample(labels, torch.Generator().manual_seed(0))
    assert tokens.shape == (2, gen.num_tokens)
    full = gen.token_logits(tokens, labels)
    assert full.shape == (2, gen.num_tokens, gen.vocab_size)
    starts = [s.start for s in tok.scale_slices()] if family == "var" else range(gen.num_tokens)
    for start in starts:
        step = gen.prefix_logits(tokens[:, :start], labels)
        torch.testing.assert_close(step, full[:, start : start + step.shape[1]], rtol=1e-5, atol=1e-5)
    # scoring ignores train mode (dropout 0.2 here) and label drop, and restores the caller's mode
    gen.train()
    assert torch.equal(gen.token_logits(tokens, labels), full) and gen.training
    assert torch.equal(gen.token_logits(tokens, labels), full)
    # sampling is reproducible from the generator seed
    assert torch.equal(gen.sample(labels, torch.Generator().manual_seed(0)), tokens)


@pytest.mark.parametrize("family", ["var", "rar"])
def test_kv_cached_sampling_matches_recomputing_the_prefix(family: str) -> None:
    tok = tiny_var_tok()
    gen = tiny_var(tok) if family == "var" else tiny_rar()
    with torch.no_grad():  # leave the adaLN-zero init, so every embedding and gate reaches the logits
        for p in gen.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    labels = torch.tensor([0, 3, 5])
    tokens = gen.sample(labels, torch.Generator().manual_seed(0), kv_cache=True)
    assert torch.equal(tokens, gen.sample(labels, torch.Generator().manual_seed(0), kv_cache=False))
    # the cached logits themselves, step by step, against the full teacher-forced pass
    full = gen.token_logits(tokens, labels)
    cache = KVCache(len(gen.blocks))
    gen.eval()  # drop-path / dropout off, as sample() does
    with torch.no_grad():
        if family == "var":
            for si, sl in enumerate(tok.scale_slices()):
                x = None if si == 0 else tok.teacher_forcing_input(tokens[:, : sl.start])[:, -(sl.stop - sl.start) :]
                torch.testing.assert_close(gen.cached_step(labels, x, cache), full[:, sl], rtol=1e-5, atol=1e-5)
        else:
            cond = gen.condition_ids(labels)
            for p in range(gen.num_tokens):
                ids = cond.view(-1, 1) if p == 0 else tokens[:, p - 1 : p]
                torch.testing.assert_close(gen.cached_step(ids, cond, cache), full[:, p : p + 1], rtol=1e-5, atol=1e-5)
    assert cache.length == gen.num_tokens + (1 if family == "rar" else 0)  # RAR also caches its cls token


def test_guidance_ramps_match_the_samplers() -> None:
    gen = tiny_var(tiny_var_tok(), cfg=1.5)
    c, u = torch.randn(1, 21, 64), torch.randn(1, 21, 64)
    g = gen.guided_logits(c, u)
    torch.testing.assert_close(g[:, 0], c[:, 0])  # scale 0: t = 0
    torch.testing.assert_close(g[:, 5:], 2.5 * c[:, 5:] - 1.5 * u[:, 5:])  # last scale: t = cfg
    torch.testing.assert_close(g[:, 1:5], 1.75 * c[:, 1:5] - 0.75 * u[:, 1:5])  # si = 1 of 2: t = cfg/2
    rar = tiny_rar(guidance_scale=4.0, guidance_scale_pow=1.0, temperature=2.0)
    ramp = rar.guidance_ramp()
    assert ramp[0] == 1.0 and abs(ramp[8] - 2.5) < 1e-6 and ramp[-1] < 4.0  # (w−1)(1−cos(π/2))/2 + 1 at n = L/2
    c, u = torch.randn(1, 16, 32), torch.randn(1, 16, 32)
    torch.testing.assert_close(rar.guided_logits(c, u), (u + (c - u) * ramp[None, :, None]) / 2.0)


def test_top_k_top_p_mask() -> None:
    logits = torch.tensor([[[4.0, 3.0, 2.0, 1.0, 0.0]]])
    assert top_k_top_p_mask(logits, top_k=2).tolist() == [[[True, True, False, False, False]]]
    p = logits.softmax(-1)[0, 0]
    keep = top_k_top_p_mask(logits, top_p=float(p[0] + p[1] * 0.5))
    assert keep.tolist() == [[[True, True, False, False, False]]]
    assert top_k_top_p_mask(logits, top_p=0.01).sum() == 1


def test_alg3_schedule_is_the_official_one() -> None:
    """Algorithm 3's figures as sprintml/DataProvenanceIAR (commit b087f51) sets them: ``configs/var.yaml``
    (optim_iter 200, optim_lr 0.1, tau 2.0 -> 0.5, optim_stop_scale 4, token_optim true), ``dataprov/models/var.py``
    ``_optimized_quant`` (one call with the default fix_scale=10, then ``range(9, optim_stop_scale, -1)``: 6 rounds,
    1200 steps) and ``third_party/var/var_arch/quant.py`` ``refine_soft_assign`` (logits zeros + 0.5 on the init
    index, re-made every call; tau geometric over iters-1; no keep-best)."""
    cfg = OmegaConf.load(Path(__file__).parents[2] / "conf/method/prada.yaml").stage1
    alg3 = cfg.alg3
    assert cfg.optimized_quant is True and alg3.keep_best is False
    assert (alg3.iters, alg3.lr, list(alg3.tau)) == (200, 0.1, [2.0, 0.5])
    assert (alg3.init_logit, alg3.rounds_stop_scale) == (0.5, 4)
    rounds = alg3_rounds(10, alg3.rounds_stop_scale)  # VAR's 10 scales
    assert rounds == [10, 9, 8, 7, 6, 5] and len(rounds) * alg3.iters == 1200
    assert alg3_rounds(4, 1) == [4, 3, 2] and alg3_rounds(4, 4) == [4]
    assert tau_at(0, 200, (2.0, 0.5)) == 2.0 and tau_at(199, 200, (2.0, 0.5)) == pytest.approx(0.5)
    assert tau_at(0, 1, (2.0, 0.5)) == 0.5  # a one-step round runs at tau_end
    tokens = torch.tensor([[3, 1, 0, 2, 2]])
    first, second = round_logits(tokens, [slice(0, 1), slice(1, 5)], 4, 0.5)
    assert first.tolist() == [[[0.0, 0.0, 0.0, 0.5]]]
    assert second[0, 0].tolist() == [0.0, 0.5, 0.0, 0.0] and second.sum() == 2.0
    with pytest.raises(ValueError, match="rounds_stop_scale=-1"):
        alg3_rounds(10, -1)


def test_alg3_rounds_restart_from_the_previous_snap_and_freeze_the_fine_scales(monkeypatch) -> None:
    tok = tiny_var_tok().requires_grad_(False)
    tokens = tiny_var(tok).sample(torch.arange(4), torch.Generator().manual_seed(3))
    f = tok.tokens_to_latent(tokens)
    starts = []
    real = oq.round_logits

    def spy(toks, *args):
        starts.append(toks.clone())
        return real(toks, *args)

    monkeypatch.setattr(oq, "round_logits", spy)
    out = optimized_quantize(tok, f, rounds_stop_scale=0, iters=15)
    assert len(starts) == 3 and torch.equal(starts[0], tok.quantize(f))  # rounds fix_scale 3, 2, 1: from greedy
    fine = [sl.start for sl in tok.scale_slices()]  # scale si starts at token fine[si]
    # round 2 (fix_scale 2) keeps scale 2 at round 1's snap; round 3 (fix_scale 1) keeps scales 1-2 at round 2's
    assert torch.equal(starts[2][:, fine[2] :], starts[1][:, fine[2] :])
    assert torch.equal(out[:, fine[1] :], starts[2][:, fine[1] :])
    assert not torch.equal(starts[1], starts[0])  # the optimisation moved tokens between rounds


def test_alg3_recovers_sampled_tokens_that_greedy_misses() -> None:
    """From the exact latent of sampled tokens, greedy residual quantisation recovers 1 in 8 tokens on this tiny
    tokenizer; the official Algorithm 3 (no keep-best) recovers 39-48 % (measured: 50 steps × 3 rounds, 200 × 3). Zero
    iterations, or steps up the loss, stay at greedy's figure or below."""
    tok = tiny_var_tok().requires_grad_(False)
    tokens = tiny_var(tok).sample(torch.arange(8) % 5, torch.Generator().manual_seed(3))
    f = tok.tokens_to_latent(tokens)
    greedy = tok.quantize(f)
    g_rec = (greedy == tokens).float().mean()
    assert g_rec < 0.2 and (quant_loss(tok, f, greedy) > 0).all()
    opt = optimized_quantize(tok, f, rounds_stop_scale=0, iters=50)
    assert opt.shape == greedy.shape and opt.max() < 64
    assert (opt == tokens).float().mean() >= g_rec + 0.2


def test_prada_real_config_composes_and_builds_released_sizes(compose_cfg) -> None:
    from genattr.models.autoregressive.family import build_model

    cfg = compose_cfg(["model=prada_real"])
    assert sorted(cfg.model.var.variants) == ["var16", "var20", "var24", "var30"]
    assert sorted(cfg.model.rar.variants) == ["rarb", "rarl", "rarxl", "rarxxl"]
    with torch.device("meta"):
        _check(_shapes(build_model(cfg.model.var.tokenizer)), VAR_VAE_KEYS, VAR_VAE_ABSENT)
        _check(_shapes(build_model(cfg.model.rar.tokenizer)), MASKGIT_KEYS, MASKGIT_ABSENT)
        _check(_shapes(build_model(cfg.model.var.variants.var16.generator)), VAR_D16_KEYS)
        _check(_shapes(build_model(cfg.model.rar.variants.rarb.generator)), RAR_B_KEYS)
        xxl = build_model(cfg.model.rar.variants.rarxxl.generator)
    assert abs(sum(p.numel() for p in xxl.parameters()) - 1.5e9) <= 0.02 * 1.5e9
    assert cfg.model.var.tokenizer_checkpoint == "vae_ch160v4096z32.pth"
