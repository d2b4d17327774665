"""peft helpers: which Linear layers of a timm ConViT get LoRA, and how many parameters.

The LoRAX config regex only ever matched ``attn.qk`` and ``attn.v`` of the GPSA blocks
(see specs/lorax_cddb.md 1.1); that set produced the published numbers and is the
default. We list modules explicitly instead of passing a regex, so nothing can be
silently unmatched again.
"""

from __future__ import annotations

from torch import nn

#: LoRA parameters per adapter for the default targets at r = 64 (d = 192 / 432 / 768).
EXPECTED_LORA_PARAMS_R64 = {"convit_tiny": 614_400, "convit_small": 1_382_400, "convit_base": 2_457_600}

TARGET_PRESETS = ("gpsa_qk_v", "intended")


def convit_lora_targets(model: nn.Module, preset: str) -> list[str]:
    """Full module names of the Linear layers that get LoRA under ``preset``.

    ``gpsa_qk_v``: ``blocks.i.attn.qk`` and ``blocks.i.attn.v`` for every GPSA block.
    ``intended``: what the original regex meant: qk, v, proj, pos_proj in GPSA blocks and
    qkv, proj in MHSA blocks (never ``patch_embed.proj``, a Conv2d).
    """
    if preset not in TARGET_PRESETS:
        from genattr.utils.errors import ConfigError

        raise ConfigError(f"method.targets={preset} is unknown; choose one of {list(TARGET_PRESETS)}.")
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        raise TypeError(f"{type(model).__name__} has no .blocks; LoRA target presets are for timm ConViT")
    wanted = ("qk", "v") if preset == "gpsa_qk_v" else ("qk", "v", "proj", "pos_proj", "qkv")
    names = []
    for i, block in enumerate(blocks):
        is_gpsa = hasattr(block.attn, "qk")
        if preset == "gpsa_qk_v" and not is_gpsa:
            continue
        for leaf in wanted:
            if isinstance(getattr(block.attn, leaf, None), nn.Linear):
                names.append(f"blocks.{i}.attn.{leaf}")
    if not names:
        raise ValueError(f"no LoRA targets found for preset {preset}")
    return names


def lora_parameter_count(model: nn.Module, targets: list[str], r: int) -> int:
    """r * (in + out) summed over the targeted Linear layers (A and B of each adapter)."""
    modules = dict(model.named_modules())
    return sum(r * (modules[n].in_features + modules[n].out_features) for n in targets)
