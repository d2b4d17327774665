"""Read a Face Transformer checkpoint, in genattr's or the original layout, as a ``FaceViT`` state dict.

GS-LoRA's released backbone (``Backbone_VIT_Epoch_1185_Batch_45020_..._checkpoint.pth``) is
``torch.save(ViT_face.state_dict())`` from ``vit_pytorch_face/vit_face.py`` (bjzhb666/GS-LoRA,
the Face-Transformer model): nested ``Residual(PreNorm(...))`` modules, a ``Linear`` patch
embedding over ``(p1 p2 c)``-flattened patches, a fused ``to_qkv`` and the CosFace head as
``loss.weight``. Scripts run under ``nn.DataParallel`` save the same names behind ``module.``.
This module only renames and reshapes tensors; nothing of the original is imported.

loralib keys (``lora_A`` / ``lora_B``) appear in files written by the forgetting scripts. The
original writes every state dict right after ``.eval()``, and loralib (``merge_weights=True``)
folds ``(lora_alpha / r) * B @ A`` into ``weight`` on ``.eval()``, so those weights already
hold the adapter: ``lora: drop`` (the default) keeps ``weight`` as written, which is what the
original's own readers compute (``test_own.py --lora_rank 0``; the next-task reload followed
by ``B = 0``). ``lora: merge`` adds the product once more -- for a file saved unmerged, or to
mirror a ``strict=False`` load into a LoRA model followed by ``.eval()``.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

import torch

from genattr.utils.errors import ConfigError

log = logging.getLogger(__name__)

LORA_MODES = ("drop", "merge")
DATA_PARALLEL_PREFIX = "module."

#: original top-level names -> FaceViT names
ORIGINAL_TOP = {
    "pos_embedding": "pos_embed",
    "cls_token": "cls_token",
    "patch_to_embedding.weight": "patch_embed.proj.weight",
    "patch_to_embedding.bias": "patch_embed.proj.bias",
    "mlp_head.0.weight": "norm.weight",
    "mlp_head.0.bias": "norm.bias",
    "loss.weight": "head.weight",
}
#: original ``transformer.layers.{i}.<suffix>`` -> FaceViT ``blocks.{i}.<suffix>``
ORIGINAL_BLOCK = {
    "0.fn.norm.weight": "norm1.weight",
    "0.fn.norm.bias": "norm1.bias",
    "0.fn.fn.to_qkv.weight": "attn.qkv.weight",  # q, k, v stacked in that order, heads as (h d): timm's order
    "0.fn.fn.to_out.0.weight": "attn.proj.weight",
    "0.fn.fn.to_out.0.bias": "attn.proj.bias",
    "1.fn.norm.weight": "norm2.weight",
    "1.fn.norm.bias": "norm2.bias",
    "1.fn.fn.net.0.weight": "mlp.fc1.weight",
    "1.fn.fn.net.0.bias": "mlp.fc1.bias",
    "1.fn.fn.net.3.weight": "mlp.fc2.weight",
    "1.fn.fn.net.3.bias": "mlp.fc2.bias",
}
_BLOCK_KEY = re.compile(r"^transformer\.layers\.(\d+)\.(.+)$")
_LORA_KEY = re.compile(r"^(transformer\.layers\.\d+\.[\w.]+)\.lora_([AB])$")


def original_names(depth: int) -> list[str]:
    """The non-LoRA keys ``ViT_face(depth=depth).state_dict()`` has (CosFace head)."""
    blocks = [f"transformer.layers.{i}.{s}" for i in range(depth) for s in ORIGINAL_BLOCK]
    return list(ORIGINAL_TOP) + blocks


def _strip_data_parallel(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if state and all(k.startswith(DATA_PARALLEL_PREFIX) for k in state):
        log.info("checkpoint saved from nn.DataParallel: stripping the 'module.' prefix")
        return {k[len(DATA_PARALLEL_PREFIX) :]: v for k, v in state.items()}
    return dict(state)


def _lora_delta(a: torch.Tensor, b: torch.Tensor, out_features: int, alpha: float, where: str) -> torch.Tensor:
    """``(alpha / r) * B @ A`` for loralib ``Linear`` and ``MergedLinear`` (one ``B_g @ A_g`` per group).

    ``r`` is ``B``'s column count in both; a ``MergedLinear`` stacks one ``A`` block per enabled
    output group (``to_qkv`` enables q, k and v), so ``A`` has ``groups * r`` rows.
    """
    r = b.shape[1]
    if a.ndim != 2 or b.ndim != 2 or r == 0 or a.shape[0] % r or b.shape[0] != out_features:
        raise ConfigError(
            f"{where}: lora_A {tuple(a.shape)} / lora_B {tuple(b.shape)} do not form a loralib update "
            f"of a {out_features}-row weight"
        )
    groups = a.shape[0] // r
    rows = torch.cat([bg @ ag for bg, ag in zip(b.chunk(groups), a.chunk(groups), strict=True)])
    return rows * (alpha / r)


def _from_original(
    state: dict[str, torch.Tensor], *, lora: str, lora_alpha: float, source: str
) -> dict[str, torch.Tensor]:
    lora_parts: dict[str, dict[str, torch.Tensor]] = {}
    plain: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        m = _LORA_KEY.match(k)
        if m:
            lora_parts.setdefault(m.group(1), {})[m.group(2)] = v
        else:
            plain[k] = v
    if lora_parts and lora == "merge":
        for base, ab in lora_parts.items():
            if set(ab) != {"A", "B"} or f"{base}.weight" not in plain:
                raise ConfigError(f"{source} has an incomplete loralib pair at {base} (needs weight, lora_A, lora_B)")
            w = plain[f"{base}.weight"]
            plain[f"{base}.weight"] = w + _lora_delta(ab["A"], ab["B"], w.shape[0], lora_alpha, f"{source} {base}")
        log.warning("merged %d loralib adapters into their weights (scaling lora_alpha/r)", len(lora_parts))
    elif lora_parts:
        log.info(
            "dropped the loralib keys of %d layers: the original saves after .eval(), so weight already "
            "holds (alpha/r)*B@A (model.checkpoint.lora=merge adds it again)",
            len(lora_parts),
        )
    out: dict[str, torch.Tensor] = {}
    for k, v in plain.items():
        m = _BLOCK_KEY.match(k)
        if k in ORIGINAL_TOP:
            out[ORIGINAL_TOP[k]] = v
        elif m and m.group(2) in ORIGINAL_BLOCK:
            out[f"blocks.{m.group(1)}.{ORIGINAL_BLOCK[m.group(2)]}"] = v
        else:
            out[k] = v  # reported as unexpected by the caller
    w = out.get("patch_embed.proj.weight")
    if w is not None and w.ndim == 2:
        out["patch_embed.proj.weight"] = _patch_linear_to_conv(w, source)
    return out


def _patch_linear_to_conv(w: torch.Tensor, source: str, in_chans: int = 3) -> torch.Tensor:
    """``Linear`` over ``(p1 p2 c)``-flattened patches -> ``Conv2d`` weight ``(out, c, p1, p2)``.

    The original flattens a patch as ``b c (h p1) (w p2) -> b (h w) (p1 p2 c)``: input feature
    ``(i * p + j) * c + ch`` is pixel ``(i, j)`` of channel ``ch``; tokens run over ``(h w)``
    row-major, as timm's flattened conv output does.
    """
    out_dim, n = w.shape
    p = round((n / in_chans) ** 0.5)
    if p * p * in_chans != n:
        raise ConfigError(f"{source}: patch_to_embedding.weight {tuple(w.shape)} is not a Linear over {in_chans}xPxP")
    return w.reshape(out_dim, p, p, in_chans).permute(0, 3, 1, 2).contiguous()


def _describe_missing(missing: list[str]) -> str:
    more = f" and {len(missing) - 4} more" if len(missing) > 4 else ""
    return ", ".join(missing[:4]) + more


def convert_face_checkpoint(
    state: Mapping[str, torch.Tensor],
    reference: Mapping[str, torch.Tensor],
    *,
    source: str,
    lora: str,
    lora_alpha: float,
) -> dict[str, torch.Tensor]:
    """``state`` (genattr, original ``vit_face``, either with ``module.``) in ``reference``'s names and shapes.

    ``reference`` is the target ``FaceViT.state_dict()``; ``source`` names the file in errors;
    ``lora`` / ``lora_alpha`` are ``model.checkpoint.*`` (how loralib keys are read, see above).
    Raises :class:`ConfigError` with one sentence when the file fits neither layout, when the
    depth or a shape differs, or when the CosFace head has another class count than the data.
    """
    if lora not in LORA_MODES:
        raise ConfigError(f"model.checkpoint.lora={lora} is unknown; choose one of {list(LORA_MODES)}")
    state = _strip_data_parallel(state)
    depth = len({k.split(".")[1] for k in reference if k.startswith("blocks.")})
    keys = set(state)
    miss_genattr = [k for k in reference if k not in keys]
    miss_original = [k for k in original_names(depth) if k not in keys]
    if not miss_genattr:
        converted, layout = state, "genattr FaceViT"
    elif not miss_original:
        converted, layout = _from_original(state, lora=lora, lora_alpha=lora_alpha, source=source), "vit_face"
    else:
        closest = miss_original if len(miss_original) < len(miss_genattr) else miss_genattr
        raise ConfigError(
            f"{source} is neither a FaceViT nor an original vit_face (Face Transformer / GS-LoRA) state dict "
            f"for depth {depth}: it lacks {_describe_missing(closest)}"
        )
    unexpected = sorted(set(converted) - set(reference))
    if unexpected:
        n_blocks = len({m.group(1) for k in state if (m := re.match(r"^(?:transformer\.layers|blocks)\.(\d+)\.", k))})
        hint = f" (the file has {n_blocks} blocks, model.depth={depth})" if n_blocks != depth else ""
        raise ConfigError(
            f"{source} ({layout} layout) has keys this model lacks{hint}: {_describe_missing(unexpected)}"
        )
    head = converted["head.weight"]
    if head.shape != reference["head.weight"].shape and head.shape[1:] == reference["head.weight"].shape[1:]:
        raise ConfigError(
            f"{source} has a {head.shape[0]}-way CosFace head but the data has {reference['head.weight'].shape[0]} "
            "classes; like the original (which builds the head for its data and cannot load another size), "
            "use a backbone trained on these classes"
        )
    for k, v in reference.items():
        if converted[k].shape != v.shape:
            raise ConfigError(
                f"{source} ({layout} layout) does not fit the model: {k} is {tuple(converted[k].shape)} in the file "
                f"and {tuple(v.shape)} in the model (check model.img_size, patch_size, embed_dim, mlp_dim)"
            )
    log.info("checkpoint layout: %s (%d tensors)", layout, len(converted))
    return converted
