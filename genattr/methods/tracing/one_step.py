"""``pipeline=one_step``: PRADA (Damm et al.), one score function per candidate model, argmax or ``outlier``.

0. ``models``: the class classifier (and the inverse decoders when ``prada.tokens=stage1``);
1. ``features``: per-token ℓ_c, ℓ_u of every image's tokens under all 8 models (plus ``prada.generated_per_variant``
   fresh samples of every model, PRADA's own images);
2. ``score_functions``: one-vs-rest score function per model; the label is the argmax, ``outlier`` when every
   score is below ``prada.threshold``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from genattr.data.rarvar import FAMILIES, FAMILY_OF, LABELS, OUTLIER, VARIANTS
from genattr.engine.progress import track
from genattr.engine.training import per_process, shard
from genattr.methods.tracing.candidates import class_candidates, split_candidates, trained_classifier
from genattr.methods.tracing.decision import argmax_or_outlier
from genattr.methods.tracing.inverse import generate_pairs
from genattr.methods.tracing.likelihood import prada_features, scale_slices
from genattr.methods.tracing.parallel import sweep
from genattr.methods.tracing.pipeline import SPLITS, TracerPipeline
from genattr.methods.tracing.score_function import fit_score_function, score
from genattr.methods.tracing.signals import greedy_tokens
from genattr.metrics.detection import auroc
from genattr.utils.errors import ConfigError

MODELS = LABELS[:8]


def score_training_rows(train_labels: np.ndarray, variant: str, negatives: list[str]) -> np.ndarray:
    """Mask of the train images a variant's score function sees: its own, plus the negative sources asked for."""
    fam = np.asarray([FAMILY_OF[lab] for lab in train_labels])
    own_family = fam == FAMILY_OF[variant]
    return (
        (train_labels == variant)
        | (own_family & ("same_family" in negatives))
        | (~own_family & ("other_family" in negatives))
    )


class OneStepPipeline(TracerPipeline):
    def stages(self) -> Sequence[tuple[str, Callable[[], Mapping[str, float]]]]:
        return (*super().stages(), ("features", self.features), ("score_functions", self.score_functions))

    # -- stage 1 ------------------------------------------------------------------------------------
    def fresh_samples(self) -> torch.Tensor | None:
        """``prada.generated_per_variant`` fresh uint8 images of every model (PRADA fits on the model's own
        samples); their labels and candidate classes go to the state (``gen_labels``, ``cand_gen``)."""
        n, settings = self.settings.generated_per_variant, self.settings
        if n == 0:
            return None
        images, classes, labels = [], [], []
        for f in FAMILIES:
            tok = self.assets.tokenizer(f)
            with self.assets.generators(f) as gens:
                pairs, made = generate_pairs(
                    tok,
                    gens,
                    per_variant=n,
                    # a stream apart from the inverse-decoder pairs (seed + pairs.seed): drawn independently
                    seed=settings.seed + int(settings.prada["generated_seed"]) * 7919,
                    batch_size=int(settings.pairs["batch_size"]),
                    device=self.assets.device,
                    acc=self.acc,
                )
            self.counts["samples"] += made
            images.append(pairs.images)
            classes.append(pairs.classes.numpy())
            labels += pairs.variants
        gen_images = torch.cat(images)
        self.state.arrays["gen_labels"] = np.asarray(labels)
        model = trained_classifier(settings, self.state, self.assets.device)
        self.state.arrays["cand_gen"] = class_candidates(
            settings,
            self.state,
            self.ctx,
            model,
            len(gen_images),
            lambda: gen_images,
            np.concatenate(classes),
            what="fresh samples",
            counts=self.counts,
        )
        return gen_images

    def features(self) -> dict[str, float]:
        settings, arrays, meta = self.settings, self.state.arrays, self.state.meta
        cands = split_candidates(settings, self.assets, self.state, self.ctx, self.counts)
        generated = self.fresh_samples()
        images = {s: self.assets.images(s) for s in SPLITS}
        if generated is not None:
            images["gen"], cands = generated, {**cands, "gen": arrays["cand_gen"]}
        for f in FAMILIES:
            if settings.prada["tokens"] == "stage1":
                tok = self.assets.finetuned_tokenizer(f, self.state)
            else:
                tok = self.assets.tokenizer(f)
            meta.setdefault("patch_nums", {})[f] = list(getattr(tok, "patch_nums", []) or [])
            meta.setdefault("num_tokens", {})[f] = int(tok.num_tokens)
            with self.assets.generators(f) as gens:
                for s, x in images.items():
                    arrays.update(self._features(tok, gens, f, s, x, cands[s]))
        return {}

    def _features(
        self, tok: Any, gens: Mapping[str, Any], family: str, split: str, x: torch.Tensor, cand: np.ndarray
    ) -> dict[str, np.ndarray]:
        """``pf_<variant>_<split>``: PRADA's [N, K', L, 2] of the images' greedy tokens under the family's four
        variants, the batches shared among processes."""
        bs, device = self.settings.batch_size, self.acc.device

        def feats(sl: slice) -> dict[str, np.ndarray]:
            tokens = greedy_tokens(tok, x[sl], batch_size=bs, device=device)
            return {
                v: prada_features(gens[v], tokens, cand[sl], batch_size=bs, device=device) for v in VARIANTS[family]
            }

        out, rows = sweep(self.acc, len(x), bs, feats, desc=f"PRADA features {family} {split}")
        self.counts["feature_rows"] += rows
        return {f"pf_{v}_{split}": out[v] for v in VARIANTS[family]}

    # -- stage 2 ------------------------------------------------------------------------------------
    def score_functions(self) -> dict[str, float]:
        settings, arrays, meta = self.settings, self.state.arrays, self.state.meta
        cfg, negatives = settings.prada, settings.negatives
        # the train split's images, then (prada.generated_per_variant > 0) fresh samples of every model
        train_labels = np.asarray(self.protocol.train.labels)
        gen_labels = arrays["gen_labels"] if "gen_labels" in arrays else None
        if gen_labels is not None:
            train_labels = np.concatenate([train_labels, np.asarray(gen_labels)])
        val_out = np.flatnonzero(np.asarray(self.protocol.val.labels) == OUTLIER)
        if "val_outliers" not in negatives:
            val_out = val_out[:0]
        data, n_neg = {}, {}
        for v in MODELS:  # every process checks every model: a bad flag fails on all of them alike
            f = FAMILY_OF[v]
            try:
                scales = scale_slices(meta["patch_nums"][f], int(meta["num_tokens"][f]), settings.position_groups)
            except ValueError as err:  # the features stage is already checkpointed: fix the flag and resume
                raise ConfigError(f"method.prada.position_groups={settings.position_groups} for {f}: {err}") from None
            keep = score_training_rows(train_labels, v, negatives)
            x = arrays[f"pf_{v}_train"]
            if gen_labels is not None:
                x = np.concatenate([x, arrays[f"pf_{v}_gen"]])
            x = x[keep]
            y = (train_labels[keep] == v).astype(np.float32)
            if len(val_out):
                x = np.concatenate([x, arrays[f"pf_{v}_val"][val_out]])
                y = np.concatenate([y, np.zeros(len(val_out), np.float32)])
            n_neg[v] = int((y == 0).sum())
            if not n_neg[v]:
                raise ConfigError(f"method.prada.negatives={negatives} leaves no negative images for {v}")
            data[v] = (x, y, scales)
        # the eight fits are independent: each process fits its share whole (the one-process fit, bit for bit)
        fitted = {}
        mine = [MODELS[i] for i in shard(self.acc, len(MODELS))]
        for v in track(mine, desc="PRADA score functions", unit="model", main_process=self.acc.is_main_process):
            x, y, scales = data[v]
            model, hist = fit_score_function(
                x,
                y,
                scales,
                acc=self.acc,
                epochs=int(cfg["epochs"]),
                lr=float(cfg["lr"]),
                smoothing=float(cfg["smoothing"]),
                weight_penalty=float(cfg["weight_penalty"]),
                noise=float(cfg["noise"]),
                hidden=int(cfg["hidden"]),
                aggregate=settings.class_aggregate,
                balance=bool(cfg["balance"]),
                seed=settings.seed,
            )
            scores = {s: score(model, arrays[f"pf_{v}_{s}"]) for s in SPLITS}
            fitted[v] = (model.state_dict(), hist[-1], scores)
        self.counts["score_functions"] += len(mine)
        metrics = {}
        for part in per_process(self.acc, fitted):
            for v, (weights, final_loss, scores) in part.items():
                self.state.put_weights(f"score.{v}", weights)
                for s in SPLITS:
                    arrays[f"score_{v}_{s}"] = scores[s]
                metrics[f"prada/{v}/final_loss"] = final_loss
        meta["prada"] = {
            "negatives": negatives,
            "n_val_outliers_used": int(len(val_out)),
            "n_negatives": n_neg,
            "n_generated": 0 if gen_labels is None else int(len(gen_labels)),
        }
        return metrics

    # -- outputs --------------------------------------------------------------------------------------
    def _scores(self, split: str, models: Sequence[str] = MODELS) -> np.ndarray:
        return np.stack([self.state.arrays[f"score_{v}_{split}"] for v in models], 1)

    def predict(self) -> dict[str, list[str]]:
        floor = float(self.settings.prada["threshold"])
        return {s: argmax_or_outlier(self._scores(s), MODELS, floor) for s in SPLITS}

    def diagnostics(self) -> dict[str, Any]:
        """Each model's own images vs the outliers (AUROC), and generated vs outlier by the best score."""
        d: dict[str, Any] = {}
        for s in self.labelled_splits():
            true = np.asarray(self.protocol.split(s).labels)
            aucs = []
            for v in MODELS:
                sc = self.state.arrays[f"score_{v}_{s}"]
                keep = (true == v) | (true == OUTLIER)
                if (true == v).any() and (true == OUTLIER).any():
                    aucs.append(100 * auroc((true[keep] == v).astype(int), sc[keep]))
                    d[f"{s}/prada_own_vs_outlier_auroc_{v}"] = aucs[-1]
            if aucs:
                d[f"{s}/prada_own_vs_outlier_auroc_mean"] = float(np.mean(aucs))
                d[f"{s}/prada_own_vs_outlier_auroc_min"] = float(np.min(aucs))
            best = np.max(self._scores(s), 1)
            if (true == OUTLIER).any() and (true != OUTLIER).any():
                d[f"{s}/prada_detection_auroc"] = 100 * auroc((true != OUTLIER).astype(int), best)
        return d

    def histogram(self, split: str, family_index: int) -> tuple[np.ndarray, str]:
        f = FAMILIES[family_index]
        return np.max(self._scores(split, VARIANTS[f]), 1), f"max PRADA score over {f} variants (higher = {f})"
