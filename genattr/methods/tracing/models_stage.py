"""Stage 0 of both pipelines (``models``): fine-tuned inverse decoders and the top-k class classifier.

Both learn from (generated image, exact latent, sampled class) pairs: the twin's hidden metadata when it has
them (``pairs.source=auto|metadata``), else fresh samples of the family's four generators (``generate``).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from genattr.data.rarvar import FAMILIES, FAMILY_OF
from genattr.methods.base import RunContext
from genattr.methods.tracing import classes as cls_mod
from genattr.methods.tracing.assets import TaskAssets
from genattr.methods.tracing.inverse import (
    Pairs,
    encoder_state,
    finetune_inverse_decoder,
    generate_pairs,
    inverse_loss,
)
from genattr.methods.tracing.settings import TracerSettings
from genattr.methods.tracing.state import TracerState
from genattr.utils.errors import DataError

log = logging.getLogger(__name__)


def metadata_pairs(assets: TaskAssets, family: str, path: Path) -> Pairs:
    """The family's generated train images with the tokens, latents and classes the twin stored for them."""
    protocol = assets.protocol
    tensors = load_file(str(path))
    rows = protocol.hidden["train"]
    idx, pos = [], []
    for i, (p, lab) in enumerate(zip(protocol.train.paths, protocol.train.labels, strict=True)):
        r = int(rows.get(p.name, {}).get("row", -1) or -1)
        if FAMILY_OF[lab] == family and r >= 0:
            idx.append(i)
            pos.append(r)
    if not idx:
        raise DataError(f"{path}: no train image of family {family} has a metadata row")
    return Pairs(
        assets.images(protocol.train)[idx],
        tensors["latent"][pos].float(),
        tensors["tokens"][pos],
        tensors["labels"][pos],
        [protocol.train.labels[i] for i in idx],
    )


def family_pairs(settings: TracerSettings, assets: TaskAssets, family: str, ctx: RunContext) -> tuple[Pairs, int]:
    """The pairs of ``family`` and how many of them this process sampled (0 for metadata pairs)."""
    protocol, source = assets.protocol, settings.pairs["source"]
    if source in ("auto", "metadata") and protocol.hidden_dir is not None:
        path = protocol.hidden_dir / f"train_{family}.safetensors"
        if path.is_file():
            return metadata_pairs(assets, family, path), 0
    if source == "metadata":
        raise DataError(
            f"method.pairs.source=metadata but {protocol.root}/hidden/train_{family}.safetensors is missing"
        )
    tok = assets.tokenizer(family)
    with assets.generators(family) as gens:
        return generate_pairs(
            tok,
            gens,
            per_variant=settings.pairs_per_variant[family],
            seed=settings.seed + int(settings.pairs["seed"]),
            batch_size=int(settings.pairs["batch_size"]),
            device=assets.device,
            acc=ctx.accelerator,
        )


def train_models(
    settings: TracerSettings, assets: TaskAssets, state: TracerState, ctx: RunContext, counts: Counter[str]
) -> dict[str, float]:
    """Fine-tune each family's inverse decoder (when a stage reads its tokens) and train the class classifier
    (``class_source=topk``); their weights and curves go into ``state``. ``counts`` gains this process's share
    of the work; returns the stage's metrics."""
    acc, device, inv = ctx.accelerator, assets.device, settings.inverse
    pairs: dict[str, Pairs] = {}
    if settings.needs_pairs:
        for f in FAMILIES:
            pairs[f], made = family_pairs(settings, assets, f, ctx)
            counts["samples"] += made
    report: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    if settings.finetune_inverse:
        for f in FAMILIES:
            tok, fam_cfg, p = assets.tokenizer(f), inv[f], pairs[f]
            n_hold = int(round(len(p) * float(inv["holdout"])))
            perm = torch.randperm(len(p), generator=torch.Generator().manual_seed(settings.seed))
            hold, train = perm[:n_hold], perm[n_hold:]
            held = p.subset(hold) if n_hold else None
            before = inverse_loss(tok, held, batch_size=settings.batch_size, device=device) if held else None
            hist, seen = finetune_inverse_decoder(
                tok,
                p.subset(train),
                acc=acc,
                epochs=int(fam_cfg["epochs"]),
                lr=float(fam_cfg["lr"]),
                batch_size=int(fam_cfg["batch_size"]),
                step_size=int(inv["step_size"]),
                gamma=float(inv["gamma"]),
                augment_schedule=fam_cfg["augment"],
                augment_p=float(inv["augment_p"]),
                seed=settings.seed,
                log_fn=lambda e, v, f=f: ctx.tracker.log_metrics({f"inverse/{f}/loss": v}, step=e),
            )
            counts["inverse_rows"] += seen
            after = inverse_loss(tok, held, batch_size=settings.batch_size, device=device) if held else None
            report[f] = {
                "pairs": len(p),
                "heldout": n_hold,
                "loss": hist,
                "heldout_before": before,
                "heldout_after": after,
            }
            metrics[f"inverse/{f}/final_loss"] = hist[-1] if hist else float("nan")
            log.info("inverse decoder %s: held-out L_inv %s -> %s (%d pairs)", f, before, after, len(p))
            state.put_weights(f"inverse.{f}", encoder_state(tok))
    state.meta["inverse"] = report
    if settings.class_source == "topk":
        metrics |= train_class_classifier(settings, pairs, state, ctx, counts)
    return metrics


def train_class_classifier(
    settings: TracerSettings, pairs: dict[str, Pairs], state: TracerState, ctx: RunContext, counts: Counter[str]
) -> dict[str, float]:
    """The timm classifier whose top-k classes are the candidates (``classifier.train=false``: a pretrained file
    used as is)."""
    cfg = settings.classifier
    model = cls_mod.build_classifier(cfg, int(state.meta["num_classes"]))
    hist: list[float] = []
    if cfg["train"]:
        hist, seen = cls_mod.train_classifier(
            model,
            torch.cat([p.images for p in pairs.values()]),
            torch.cat([p.classes for p in pairs.values()]),
            acc=ctx.accelerator,
            epochs=int(cfg["epochs"]),
            lr=float(cfg["lr"]),
            batch_size=int(cfg["batch_size"]),
            seed=settings.seed,
        )
        counts["classifier_rows"] += seen
    state.put_weights("classifier", model.state_dict())
    state.meta["classifier_loss"] = hist
    return {"classifier/final_loss": hist[-1]} if hist else {}
