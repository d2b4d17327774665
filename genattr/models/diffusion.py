"""Text-to-image diffusion models from config: a diffusers UNet, its DDPM schedule, the DDPM loss, sampling.

The MSCOCO model of AbU / JourneyTRAK and the tiny twin UNets differ only in the ``unet`` mapping of
``conf/model/*.yaml``; everything downstream (training, Fisher, unlearning, loss sweeps) sees a
``DiffusionModel``. The per-sample loss is written once here so that training, the loss sweeps and the
per-sample gradients of the Fisher all compute exactly the same quantity.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel

from genattr.utils.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass
class DiffusionModel:
    """A conditional UNet and the DDPM noise schedule it was trained with."""

    unet: UNet2DConditionModel
    scheduler: DDPMScheduler

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self.scheduler.alphas_cumprod

    @property
    def num_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)


def build_unet(unet: Mapping[str, Any]) -> UNet2DConditionModel:
    """A randomly initialised ``UNet2DConditionModel`` from the ``model.unet`` mapping."""
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in dict(unet).items()}
    try:
        return UNet2DConditionModel(**kwargs)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"model.unet does not describe a diffusers UNet2DConditionModel: {err}") from err


def build_diffusion(
    *, unet: Mapping[str, Any], scheduler: Mapping[str, Any], seed: int = 0, **_: Any
) -> DiffusionModel:
    """Build the model of ``conf/model/unet_*.yaml``; ``seed`` fixes the initial weights (retrains share it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        net = build_unet(unet)
    return DiffusionModel(net, DDPMScheduler(**dict(scheduler)))


def diffusion_kwargs(model: Mapping[str, Any]) -> dict[str, Any]:
    """The ``model`` group as :func:`build_diffusion` arguments: what a trained model's identity hashes. Every key
    is read from the group (``conf/model/unet_mscoco.yaml`` holds the defaults), never filled in here."""
    missing = [k for k in ("unet", "scheduler", "init_seed") if k not in model]
    if missing:
        raise ConfigError(f"model has no {', '.join(missing)}: a diffusion model group extends conf/model/unet_mscoco")
    return {"unet": dict(model["unet"]), "scheduler": dict(model["scheduler"]), "seed": int(model["init_seed"])}


def load_unet_weights(net: torch.nn.Module, path: str | Path) -> None:
    """Load a UNet state dict (safetensors, or a torch file read with ``weights_only``) strictly."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path} does not exist; expected the UNet state dict (model.safetensors or model.bin)")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any parse failure is a bad file
        raise DataError(f"{path} is not a readable UNet state dict ({type(err).__name__}: {err})") from err
    own = net.state_dict()
    wrong = [k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        k = wrong[0]
        raise DataError(
            f"{path} does not match model.unet: {len(wrong)} tensors have another shape (e.g. {k} is "
            f"{tuple(state[k].shape)}, the model's {tuple(own[k].shape)}); pick the model config it was trained with"
        )
    missing, unexpected = net.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise DataError(
            f"{path} does not match model.unet: {len(missing)} missing keys (e.g. {missing[:2]}) and "
            f"{len(unexpected)} unexpected keys (e.g. {unexpected[:2]}); pick the model config it was trained with"
        )


def add_noise(alphas_cumprod: torch.Tensor, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps (the DDPM forward process)."""
    a = alphas_cumprod.to(x0.device, x0.dtype)[t].view(-1, *([1] * (x0.ndim - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


def ddpm_loss(
    unet: torch.nn.Module,
    alphas_cumprod: torch.Tensor,
    x0: torch.Tensor,
    cond: torch.Tensor,
    t: torch.Tensor,
    eps: torch.Tensor,
) -> torch.Tensor:
    """Per-sample epsilon-prediction loss ||eps_theta(x_t, c, t) - eps||^2 (mean over pixels), shape (B,)."""
    x_t = add_noise(alphas_cumprod, x0, eps, t)
    pred = unet(x_t, t, encoder_hidden_states=cond).sample
    return (pred.float() - eps.float()).pow(2).flatten(1).mean(1)


@torch.no_grad()
def ddim_sample(
    model: DiffusionModel,
    cond: torch.Tensor,
    noise: torch.Tensor,
    steps: int = 50,
    eta: float = 0.0,
) -> torch.Tensor:
    """Deterministic DDIM (eta 0) from fixed ``noise``: the same noise and prompt give comparable samples."""
    # clip_sample follows the DDPM config (True by default, as the MSCOCO query generation)
    sched = DDIMScheduler.from_config(model.scheduler.config, set_alpha_to_one=True)
    sched.set_timesteps(int(steps))
    unet = model.unet
    was_training = unet.training
    unet.eval()
    x = noise.clone()
    for t in sched.timesteps:
        eps = unet(x, t.expand(x.shape[0]).to(x.device), encoder_hidden_states=cond).sample
        x = sched.step(eps, t, x, eta=eta).prev_sample
    unet.train(was_training)
    return x


#: samplers of :func:`generate`: the original's query pipeline (DDPM) and deterministic DDIM (eta 0)
SAMPLERS = ("ddpm", "ddim")


@torch.no_grad()
def generate(
    model: DiffusionModel,
    cond: torch.Tensor,
    generators: list[torch.Generator],
    *,
    scheduler: str = "ddpm",
    steps: int = 1000,
    guidance_scale: float = 7.5,
    null_cond: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sample one latent per prompt, all of its randomness drawn from that prompt's own CPU generator.

    The original's query pipeline (``mscoco/utils.py`` ``T2IWrapper`` + ``run_t2i_pipeline``): a
    ``DDPMScheduler`` with the training schedule and ``clip_sample`` on, ``steps`` inference steps, and
    classifier-free guidance eps_u + s (eps_c - eps_u) against ``null_cond`` (the empty prompt) when
    ``guidance_scale > 1``; the result is the final latent. The initial noise and every ancestral-step noise
    of prompt i come from ``generators[i]``, so two models given freshly seeded generators see the same noise
    ("seed consistency"), whatever other prompts share the batch.
    """
    if scheduler not in SAMPLERS:
        raise ConfigError(f"method.evaluation.regen.scheduler={scheduler} is unknown; choose one of {list(SAMPLERS)}")
    if len(generators) != cond.shape[0]:
        raise ValueError(f"generate needs one generator per prompt, got {len(generators)} for {cond.shape[0]}")
    unet = model.unet
    device = cond.device
    cfg = float(guidance_scale) > 1.0
    if cfg and null_cond is None:
        raise ConfigError(
            f"classifier-free guidance (guidance_scale={guidance_scale}) needs the empty prompt's embedding "
            "(null_text_embedding.npy in the data folder); or set method.evaluation.regen.guidance_scale=1"
        )
    if scheduler == "ddpm":
        sched = DDPMScheduler.from_config(model.scheduler.config, clip_sample=True, steps_offset=0)
    else:
        sched = DDIMScheduler.from_config(model.scheduler.config, set_alpha_to_one=True)
    sched.set_timesteps(int(steps))
    shape = (unet.config.in_channels, unet.config.sample_size, unet.config.sample_size)
    x = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(device)
    both = torch.cat([null_cond[None].expand_as(cond).to(cond), cond]) if cfg else cond
    was_training = unet.training
    unet.eval()
    for t in sched.timesteps:
        inp = torch.cat([x, x]) if cfg else x
        eps = unet(inp, t.expand(inp.shape[0]).to(device), encoder_hidden_states=both).sample
        if cfg:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + float(guidance_scale) * (eps_c - eps_u)
        if scheduler == "ddpm":  # a list of generators: diffusers draws row i's noise from generators[i]
            x = sched.step(eps, t, x, generator=generators).prev_sample
        else:
            x = sched.step(eps, t, x, eta=0.0).prev_sample
    unet.train(was_training)
    return x


def load_vae(path: str | Path, device: torch.device | str = "cpu") -> AutoencoderKL:
    """A diffusers ``AutoencoderKL`` from a local folder (``data.vae``), in eval mode."""
    try:
        vae = AutoencoderKL.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as err:
        raise DataError(f"data.vae={path} is not a readable diffusers AutoencoderKL folder: {err}") from err
    return vae.eval().to(device)


@torch.no_grad()
def decode_latents(vae: AutoencoderKL, latents: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Images in [-1, 1] from latents stored as ``latent_dist.sample() * scaling_factor`` (the release)."""
    sf = float(getattr(vae.config, "scaling_factor", 0.18215))
    dev = next(vae.parameters()).device
    out = [
        vae.decode(latents[s : s + batch_size].to(dev, torch.float32) / sf).sample.clamp(-1, 1).cpu()
        for s in range(0, latents.shape[0], batch_size)
    ]
    return torch.cat(out)


def count_parameters(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
