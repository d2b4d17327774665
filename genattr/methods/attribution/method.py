"""``method=unlearn``: attribution by unlearning (AbU) with its baselines and the leave-K-out evaluation.

This module holds the method's settings (checked when it is built), the checks its inputs must pass before
the first stage (:meth:`AttributionByUnlearning._preflight`) and the similarity baselines; the run itself is a
staged run of the engine (:mod:`genattr.methods.attribution.stages`: prepare, one stage per query, one per
leave-K-out retrain) and the evaluation is :mod:`genattr.methods.attribution.leave_k_out`. Every default is in
``conf/method/unlearn.yaml``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genattr.data.mscoco import AttributionProtocol, read_train_captions
from genattr.methods.attribution import baselines as bl
from genattr.methods.attribution.features import (
    TextTower,
    build_towers,
    image_decoder,
    image_similarity_scores,
    pixel_embed,
    tag_towers,
    text_similarity_scores,
    weights_source,
)
from genattr.methods.attribution.leave_k_out import RETRAIN_MODES
from genattr.methods.attribution.losses import CAPTION_NOISE
from genattr.methods.attribution.stages import AbuStages
from genattr.methods.attribution.sweeps import Sweeps
from genattr.methods.attribution.training import check_coupling, recipe_from_trainer
from genattr.methods.base import Report, RunContext
from genattr.models.diffusion import SAMPLERS, DiffusionModel, build_diffusion, diffusion_kwargs, load_unet_weights
from genattr.utils.errors import ConfigError, DataError

log = logging.getLogger(__name__)
BASELINES = ("random", "pixel", "text", "clip", "dino", "influence")
#: what the text baseline compares: CLIP ViT-B/32 text embeddings of the captions (the paper) or the model's
#: own text-encoder states from the release (no captions needed)
TEXT_BASELINES = ("clip", "encoder")
#: baselines that compare image features of a tower in ``method.features``
FEATURE_BASELINES = ("clip", "dino")


class AttributionByUnlearning:
    """AbU (Wang et al., NeurIPS 2024) on a ``attribution`` protocol; see ``conf/method/unlearn.yaml``."""

    supports = ("attribution",)

    def __init__(
        self,
        *,
        name: str,
        model: Mapping[str, Any],
        trainer: Mapping[str, Any],
        weights: str,
        unlearn: Mapping[str, Any],
        fisher: Mapping[str, Any],
        sweep: Mapping[str, Any],
        baselines: Sequence[str],
        text_baseline: str,
        influence: Mapping[str, Any],
        features: Mapping[str, Any],
        queries: Sequence[int] | None,
        recall_ks: Sequence[int],
        plot_top_k: int,
        evaluation: Mapping[str, Any],
        noise_seed: int,
        cache_dir: str,
    ) -> None:
        self.name = name
        if "unet" not in model:
            raise ConfigError("method=unlearn needs a diffusion model config with model.unet (e.g. model=unet_mscoco)")
        self.model_cfg = diffusion_kwargs(model)
        self.recipe = recipe_from_trainer(trainer)
        self.weights = weights
        self.unlearn_cfg, self.fisher_cfg, self.sweep_cfg = dict(unlearn), dict(fisher), dict(sweep)
        self.caption_noise = str(self.sweep_cfg["caption_noise"])
        if self.caption_noise not in CAPTION_NOISE:
            raise ConfigError(
                f"method.sweep.caption_noise={self.caption_noise} is unknown; choose one of {list(CAPTION_NOISE)}"
            )
        if self.caption_noise != "independent":
            log.warning(
                "method.sweep.caption_noise=%s: one loss-sweep noise draw per (image, t) shared by all captions; "
                "the original draws one per (image, caption, t)",
                self.caption_noise,
            )
        if float(self.unlearn_cfg["damping"]) != 0.0:
            log.warning(
                "method.unlearn.damping=%s: F + damping * mean(F) per tensor (FastGDA); the original AbU update is "
                "undamped (damping=0)",
                self.unlearn_cfg["damping"],
            )
        unknown = sorted(set(baselines) - set(BASELINES))
        if unknown:
            raise ConfigError(f"method.baselines has unknown entries {unknown}; valid: {list(BASELINES)}")
        self.baselines = list(baselines)
        self.influence_cfg = dict(influence)
        self.features_cfg = {k: dict(v) for k, v in dict(features).items()}
        self.text_baseline = str(text_baseline)
        if self.text_baseline not in TEXT_BASELINES:
            raise ConfigError(
                f"method.text_baseline={self.text_baseline} is unknown; choose one of {list(TEXT_BASELINES)}"
            )
        if "text" in self.baselines and self.text_baseline != "clip":
            log.warning(
                "method.text_baseline=%s: the text baseline compares the model's own text-encoder states; the paper's "
                "is the CLIP ViT-B/32 text embedding of the captions (text_baseline=clip)",
                self.text_baseline,
            )
        needed = [b for b in self.baselines if b in FEATURE_BASELINES]
        if evaluation["clip_similarity"]:
            needed.append("clip")
        if "text" in self.baselines and self.text_baseline == "clip":
            needed.append("clip_text")
        missing = sorted(set(needed) - set(self.features_cfg))
        if missing:
            raise ConfigError(f"method.features has no tower for {missing} (name, weights, pretrained, resize, crop)")
        self.queries = None if queries is None else [int(q) for q in queries]
        self.recall_ks = [int(k) for k in recall_ks]
        self.plot_top_k = int(plot_top_k)
        self.eval_cfg = dict(evaluation)
        mode = self.eval_cfg["retrains"]
        if mode not in RETRAIN_MODES:
            raise ConfigError(f"method.evaluation.retrains={mode} is unknown; choose one of {list(RETRAIN_MODES)}")
        self.coupling = check_coupling(str(self.eval_cfg["coupling"]))
        if self.eval_cfg["enabled"] and self.coupling != "independent":
            log.warning(
                "method.evaluation.coupling=%s: leave-K-out retrains share theta0's random stream (removed images "
                "weigh 0) and Delta L is taken against the coupled retrain that removes nothing; the paper retrains "
                "from scratch (coupling=independent)",
                self.coupling,
            )
        scheduler = self.eval_cfg["regen"]["scheduler"]
        if self.eval_cfg["enabled"] and scheduler not in SAMPLERS:
            raise ConfigError(
                f"method.evaluation.regen.scheduler={scheduler} is unknown; choose one of {list(SAMPLERS)}"
            )
        self.noise_seed = int(noise_seed)
        self.cache_dir = Path(cache_dir).expanduser()

    # -- the run ----------------------------------------------------------------------------------
    def run(self, protocol: AttributionProtocol, ctx: RunContext) -> Report:
        queries = list(range(protocol.n_queries)) if self.queries is None else self.queries
        bad = [q for q in queries if not 0 <= q < protocol.n_queries]
        if bad:
            raise ConfigError(f"method.queries has {bad} outside the {protocol.n_queries} queries of the data")
        self._preflight(protocol)
        return AbuStages(self, protocol, ctx, queries).run()

    def theta0(self, protocol: AttributionProtocol, device: torch.device | str) -> DiffusionModel:
        """The model being attributed, on ``device``, in eval mode: it is only scored, never trained (eval and
        train mode compute the same for these UNets: no dropout, GroupNorm only)."""
        model = build_diffusion(**self.model_cfg)
        load_unet_weights(model.unet, protocol.unet_weights)
        model.unet.to(device).eval()
        return model

    def _similarity_baselines(
        self,
        protocol: AttributionProtocol,
        queries: list[int],
        ctx: RunContext,
        device: torch.device | str,
        sweeps: Sweeps | None = None,
    ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, str]], dict[str, str]]:
        """Scores of the random, pixel, text, clip and dino baselines, the towers used and each one's inputs.

        pixel: cosine of flattened [-1, 1] images (the model's training images: FastGDA
        ``abu/coco/prepare_latents_text_embeds.py`` centre-crops to 128 px and normalises to [-1, 1]), decoded by
        ``data.vae`` on real data (``decoded_pixels``), the latents themselves on the twin (``pixels``), the
        release's latents without a VAE (``latents``, warned). text: CLIP ViT-B/32 text embeddings of the
        captions (``clip_text``) or the model's own text-encoder states (``encoder``). Every decoded chunk of
        training rows serves all image baselines at once; with ``sweeps`` each process decodes and embeds its
        share of the training rows.
        """
        scores: dict[str, np.ndarray] = {}
        towers_info: dict[str, dict[str, str]] = {}
        inputs: dict[str, str] = {}
        n = protocol.n_train
        if "random" in self.baselines:
            scores["random"] = np.stack([bl.random_scores(n, self.noise_seed * 7919 + q) for q in queries])
        decoded_pixels = "pixel" in self.baselines and not protocol.pixel_space and protocol.vae is not None
        if "pixel" in self.baselines and not decoded_pixels:
            inputs["pixel"] = "pixels" if protocol.pixel_space else "latents"
            if not protocol.pixel_space:
                log.warning(
                    "pixel baseline on the release's latents, not pixels: set data.vae=<the SD-2 VAE folder> to "
                    "compare decoded images as the paper does (recorded as baseline_inputs.pixel=latents)"
                )
            scores["pixel"] = np.stack(
                [bl.pixel_cosine(protocol.query_latents[q], protocol.train_latents) for q in queries]
            )
        if "text" in self.baselines:
            captions = self._text_captions(protocol)
            if captions is None:
                inputs["text"] = "encoder"
                scores["text"] = np.stack(
                    [bl.text_similarity(protocol.query_text[q], protocol.train_text) for q in queries]
                )
            else:
                inputs["text"] = "clip_text"
                tower = TextTower("clip_text", device=device, **self.features_cfg["clip_text"])
                towers_info.update(tag_towers(ctx.tracker, ctx.accelerator.is_main_process, {"clip_text": tower}))
                assert protocol.query_captions is not None  # _text_captions
                scores["text"] = text_similarity_scores(tower, [protocol.query_captions[q] for q in queries], captions)
        feats = [b for b in self.baselines if b in FEATURE_BASELINES]
        if feats or decoded_pixels:
            decode = image_decoder(protocol.pixel_space, protocol.vae, device)
            assert decode is not None  # _preflight
            towers = build_towers(feats, self.features_cfg, device)
            towers_info.update(tag_towers(ctx.tracker, ctx.accelerator.is_main_process, towers))
            embedders: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {k: t.embed for k, t in towers.items()}
            if decoded_pixels:
                inputs["pixel"] = "decoded_pixels"
                embedders["pixel"] = pixel_embed
            lat = protocol.train_latents
            q_images = decode(torch.from_numpy(np.asarray(protocol.query_latents[queries], dtype=np.float32)))

            def train_images(a: int, b: int) -> torch.Tensor:
                return decode(torch.from_numpy(np.array(lat[a:b], dtype=np.float32)))

            if sweeps is None:
                scores.update(image_similarity_scores(embedders, q_images, train_images, lat.shape[0]))
            else:
                scores.update(sweeps.image_features(embedders, q_images, train_images))
        set_tags = getattr(ctx.tracker, "set_tags", None)
        if inputs and set_tags is not None and ctx.accelerator.is_main_process:
            set_tags({f"baseline_inputs.{k}": v for k, v in inputs.items()})
        log.info("baseline inputs: %s", inputs)
        return scores, towers_info, inputs

    def _text_captions(self, protocol: AttributionProtocol) -> list[str] | None:
        """The training captions of the CLIP-text baseline, or None (the encoder fallback, warned about)."""
        if self.text_baseline != "clip":
            return None
        missing = []
        if protocol.train_captions is None:
            missing.append(
                f"the training captions ({protocol.root / 'annotations/captions_train2017.json'}; "
                "data.files.train_captions=<file>)"
            )
        if not protocol.query_captions or len(protocol.query_captions) < protocol.n_queries:
            missing.append(f"a prompt per query ({protocol.root / 'sample_caption.txt'})")
        if missing:
            log.warning(
                "method.text_baseline=clip needs %s; the text baseline falls back to the model's own text-encoder "
                "embeddings (recorded as baseline_inputs.text=encoder)",
                " and ".join(missing),
            )
            return None
        return read_train_captions(protocol.train_captions, protocol.n_train)

    def _preflight(self, protocol: AttributionProtocol) -> None:
        """Inputs the later stages need, checked before hours of Fisher and sweeps are spent."""
        feats = [b for b in self.baselines if b in FEATURE_BASELINES]
        if feats and not protocol.pixel_space and protocol.vae is None:
            raise ConfigError(
                f"method.baselines has {feats}, which compare images, but the data's latents need a decoder: "
                "set data.vae=<the SD-2 VAE folder> or drop them from method.baselines"
            )
        towers = list(feats)
        if "text" in self.baselines and self.text_baseline == "clip" and protocol.train_captions is not None:
            towers.append("clip_text")
        decodes = protocol.pixel_space or protocol.vae is not None
        if self.eval_cfg["enabled"] and self.eval_cfg["clip_similarity"] and decodes:
            towers.append("clip")
        for k in dict.fromkeys(towers):  # weights file present, or hub weights reachable
            tower = self.features_cfg[k]
            weights_source(k, tower["name"], tower["weights"], bool(tower["pretrained"]))
        regen = self.eval_cfg["regen"]
        if self.eval_cfg["enabled"] and float(regen["guidance_scale"]) > 1:
            if protocol.null_text is None:
                raise DataError(
                    f"{protocol.root / 'null_text_embedding.npy'} does not exist: Delta G regenerates the queries "
                    f"with classifier-free guidance (method.evaluation.regen.guidance_scale={regen['guidance_scale']}) "
                    "against the empty prompt's embedding (1, tokens, dim), e.g. the SD-2 OpenCLIP encoding of "
                    '""; add it or set method.evaluation.regen.guidance_scale=1'
                )
