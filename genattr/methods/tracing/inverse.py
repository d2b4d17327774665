"""Inverse-decoder fine-tuning (Stage 1): train only the tokenizer's encoder modules so that D⁻¹(x_Z) ≈ f_Z.

Training pairs are (generated image x_Z, exact quantised latent f_Z). They come either from hidden metadata
(the twin stores the sampled tokens and f_Z of every generated train image) or are regenerated with the
family's generators: sample tokens, decode them in fp32, save-path truncation to uint8. Everything except
``encoder_modules()`` (decoder, post_quant_conv, codebook, φ) stays frozen. Optimiser: Adam + StepLR(2, 0.9),
per-family epochs / lr / batch size from the config. The optional augmentation schedule (RAR/Taming in the
official code) perturbs the INPUT only; the target stays clean.
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image
from torch import nn
from torchvision.transforms.v2 import functional as TF

from genattr.engine.progress import track
from genattr.engine.training import optimizer_step, per_process, prepared, shard
from genattr.methods.tracing.parallel import global_batch_mean
from genattr.methods.tracing.signals import mse_per_sample, to_unit, truncate_uint8
from genattr.models.autoregressive.base import TracedGenerator
from genattr.models.tokenizers.base import TracingTokenizer

log = logging.getLogger(__name__)

#: Strength levels of the progressive augmentation schedule (official ``dataprov/augmentations.py`` ranges).
LEVELS: dict[str, dict[str, tuple[float, float]]] = {
    "weak": {"jpeg": (95, 85), "kernel": (3, 3), "noise": (0.005, 0.01), "resize": (0.95, 0.9), "color": (0.9, 1.1)},
    "medium": {"jpeg": (85, 70), "kernel": (3, 5), "noise": (0.01, 0.03), "resize": (0.9, 0.7), "color": (0.8, 1.2)},
    "strong": {"jpeg": (60, 50), "kernel": (5, 9), "noise": (0.03, 0.05), "resize": (0.7, 0.5), "color": (0.6, 1.4)},
}


@dataclass
class Pairs:
    """(x_Z uint8 [N, 3, H, W], f_Z [N, C, h, w], tokens [N, L], class labels [N], variant names [N])."""

    images: torch.Tensor
    latents: torch.Tensor
    tokens: torch.Tensor
    classes: torch.Tensor
    variants: list[str]

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, idx: torch.Tensor) -> Pairs:
        return Pairs(
            self.images[idx],
            self.latents[idx],
            self.tokens[idx],
            self.classes[idx],
            [self.variants[int(i)] for i in idx],
        )

    @staticmethod
    def cat(parts: Sequence[Pairs]) -> Pairs:
        return Pairs(
            torch.cat([p.images for p in parts]),
            torch.cat([p.latents for p in parts]),
            torch.cat([p.tokens for p in parts]),
            torch.cat([p.classes for p in parts]),
            [v for p in parts for v in p.variants],
        )


def chunk_generator(seed: int, variant: int, chunk: int, device: torch.device) -> torch.Generator:
    """The random stream of one chunk of samples: its own seed from (seed, variant index, chunk index), so a chunk
    draws the same classes and tokens on whichever process makes it."""
    state = np.random.SeedSequence([int(seed), int(variant), int(chunk)]).generate_state(1)[0]
    return torch.Generator(device=device).manual_seed(int(state))


@torch.no_grad()
def generate_pairs(
    tok: TracingTokenizer,
    generators: Mapping[str, TracedGenerator],
    *,
    per_variant: int,
    seed: int,
    batch_size: int,
    device: torch.device,
    acc: Accelerator | None = None,
) -> tuple[Pairs, int]:
    """Sample ``per_variant`` images from each generator (uniform classes), decoded in fp32, truncated.

    The samples come in chunks of ``batch_size`` per generator, each with its own random stream
    (:func:`chunk_generator`); with ``acc`` the chunks are shared among the processes and gathered in order, so
    the pairs are those one process makes. Returns the pairs and how many this process sampled.
    """
    chunks = [(vi, c) for vi in range(len(generators)) for c in range(-(-per_variant // batch_size))]
    share = range(len(chunks)) if acc is None else shard(acc, len(chunks))
    gens = list(generators.items())
    parts = []
    main = acc is None or acc.is_main_process
    for i in track(share, desc=f"sampling {'/'.join(generators)}", unit="chunk", main_process=main):
        vi, c = chunks[i]
        name, gen = gens[vi]
        g = chunk_generator(seed, vi, c, device)
        n = min(batch_size, per_variant - c * batch_size)
        labels = torch.randint(0, gen.num_classes, (n,), generator=g, device=device)
        tokens = gen.sample(labels, g)
        fz = tok.tokens_to_latent(tokens)
        x = truncate_uint8(tok.decode_latent(fz).float())
        parts.append(Pairs(x.cpu(), fz.float().cpu(), tokens.cpu(), labels.cpu(), [name] * n))
    made = sum(len(p) for p in parts)
    if acc is not None:
        parts = [p for ps in per_process(acc, parts) for p in ps]
    return Pairs.cat(parts), made


def _jpeg(x: torch.Tensor, quality: int) -> torch.Tensor:
    out = []
    for img in truncate_uint8(x):
        buf = io.BytesIO()
        Image.fromarray(img.permute(1, 2, 0).cpu().numpy()).save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        arr = np.asarray(Image.open(buf).convert("RGB"), dtype=np.uint8)
        out.append(torch.from_numpy(arr.copy()).permute(2, 0, 1))
    return torch.stack(out).to(x.device, torch.float32) / 255.0


def augment(x: torch.Tensor, level: str, rng: np.random.Generator) -> torch.Tensor:
    """One random transform of the level's family (JPEG, blur, noise, colour, resize down-up) on a batch."""
    if level == "none":
        return x
    lv = LEVELS[level]
    kind = rng.choice(["jpeg", "blur", "noise", "brightness", "contrast", "saturation", "resize"])
    if kind == "jpeg":
        return _jpeg(x, int(rng.uniform(*sorted(lv["jpeg"]))))
    if kind == "blur":
        k = int(rng.integers(lv["kernel"][0] // 2, lv["kernel"][1] // 2 + 1)) * 2 + 1
        return TF.gaussian_blur(x, [k, k], [float(rng.uniform(0.1, 2.0))] * 2)
    if kind == "noise":
        return (x + torch.randn_like(x) * float(rng.uniform(*lv["noise"]))).clamp(0, 1)
    if kind in ("brightness", "contrast", "saturation"):
        fn = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast, "saturation": TF.adjust_saturation}
        return fn[kind](x, float(rng.uniform(*lv["color"]))).clamp(0, 1)
    ratio = float(rng.uniform(*sorted(lv["resize"])))
    h, w = x.shape[-2:]
    small = TF.resize(x, [max(1, round(h * ratio)), max(1, round(w * ratio))], antialias=True)
    return TF.resize(small, [h, w], antialias=True).clamp(0, 1)


def level_at(epoch: int, schedule: Sequence[Sequence[Any]] | None) -> str:
    """Level of ``epoch`` under a progressive schedule ``[[level, n_epochs], ...]`` (last level repeats)."""
    if not schedule:
        return "none"
    end = 0
    for level, n in schedule:
        end += int(n)
        if epoch < end:
            return str(level)
    return str(schedule[-1][0])


def _set_trainable(tok: TracingTokenizer) -> list[nn.Parameter]:
    modules = tok.encoder_modules()
    if isinstance(tok, nn.Module):
        tok.requires_grad_(False)
        tok.eval()
    params: list[nn.Parameter] = []
    for m in modules:
        m.requires_grad_(True)
        m.train()
        params += [p for p in m.parameters() if p.requires_grad]
    return params


@torch.no_grad()
def inverse_loss(tok: TracingTokenizer, pairs: Pairs, *, batch_size: int, device: torch.device) -> float:
    """Mean L_inv = MSE(D⁻¹(x_Z), f_Z) over ``pairs``."""
    total, n = 0.0, 0
    for s in range(0, len(pairs), batch_size):
        f = tok.encode_feature(to_unit(pairs.images[s : s + batch_size], device))
        total += float(mse_per_sample(f, pairs.latents[s : s + batch_size].to(device)).sum())
        n += len(f)
    return total / max(n, 1)


class InverseDecoder(nn.Module):
    """D⁻¹ as one module whose ``forward`` is ``tok.encode_feature``, so that Accelerate can prepare it: DDP
    synchronises gradients only through ``forward``, and only the fine-tuned modules are its parameters."""

    def __init__(self, tok: TracingTokenizer) -> None:
        super().__init__()
        self.trained = nn.ModuleList(tok.encoder_modules())
        self._tok = [tok]  # not a submodule: the frozen decoder / codebook stay out of DDP

    def forward(self, images01: torch.Tensor) -> torch.Tensor:
        return self._tok[0].encode_feature(images01)


def finetune_inverse_decoder(
    tok: TracingTokenizer,
    pairs: Pairs,
    *,
    acc: Accelerator,
    epochs: int,
    lr: float,
    batch_size: int,
    step_size: int,
    gamma: float,
    augment_schedule: Sequence[Sequence[Any]] | None,
    augment_p: float,
    seed: int,
    log_fn: Any = None,
) -> tuple[list[float], int]:
    """Fine-tune ``tok.encoder_modules()`` on ``pairs``; returns the mean training loss per epoch and the number
    of pair rows this process trained on.

    ``batch_size`` is the global batch: every process draws the same order (and augmentation choices), takes its
    share of each batch, and DDP averages the gradients of :func:`global_batch_mean` losses.
    """
    params = _set_trainable(tok)
    opt = torch.optim.Adam(params, lr=lr)
    # StepLR steps once per epoch on the raw optimiser (a prepared scheduler would step once per process)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=step_size, gamma=gamma)
    g = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    history, seen, world, device = [], 0, acc.num_processes, acc.device
    with prepared(acc, InverseDecoder(tok), opt) as p:
        for epoch in track(range(int(epochs)), desc="inverse decoder", unit="epoch", main_process=acc.is_main_process):
            order = torch.randperm(len(pairs), generator=g)
            level = level_at(epoch, augment_schedule)
            total = 0.0  # this process's part of the epoch's summed loss
            for s in range(0, len(order), batch_size):
                idx = order[s : s + batch_size]
                share = shard(acc, len(idx))
                mine = idx[share.start : share.stop]
                x = to_unit(pairs.images[mine], device)
                if level != "none" and rng.random() < augment_p:
                    x = augment(x, level, rng)
                target = pairs.latents[mine].to(device)
                loss = optimizer_step(
                    acc,
                    p,
                    lambda model, x=x, t=target, n=len(idx): global_batch_mean(mse_per_sample(model(x), t), n, world),
                )
                total += float(loss) * len(idx) / world  # the batch's mean loss is the processes' average
                seen += len(mine)
                if p.capped:  # trainer.max_steps
                    break
            sched.step()
            if world > 1:
                total = float(acc.reduce(torch.tensor(total, dtype=torch.float64, device=device), "sum"))
            history.append(total / len(pairs))
            if log_fn is not None:
                log_fn(epoch, history[-1])
            if not math.isfinite(history[-1]):
                raise FloatingPointError(f"inverse-decoder loss became {history[-1]} at epoch {epoch}; lower the lr")
            if p.capped:
                break
    if isinstance(tok, nn.Module):
        tok.requires_grad_(False)
        tok.eval()
    return history, seen


def encoder_state(tok: TracingTokenizer) -> dict[str, torch.Tensor]:
    """Weights of the fine-tuned modules, keyed ``<module index>.<param name>`` (safetensors-ready)."""
    return {
        f"{i}.{k}": v.detach().cpu().contiguous()
        for i, m in enumerate(tok.encoder_modules())
        for k, v in m.state_dict().items()
    }


def load_encoder_state(tok: TracingTokenizer, state: Mapping[str, torch.Tensor]) -> None:
    """Inverse of :func:`encoder_state`."""
    for i, m in enumerate(tok.encoder_modules()):
        prefix = f"{i}."
        m.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
