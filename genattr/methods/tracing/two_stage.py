"""``pipeline=two_stage``: Zhao et al.'s provenance signals pick the family, the generators' likelihood the variant.

0. ``models``: fine-tuned inverse decoders, the class classifier (:mod:`models_stage`);
1. ``family``: Stage 1 signals (QuantLoss with Algorithm 3 for VAR, calibrated EncLoss, Combined) of every image
   under both families, per-family z-scores fitted on own-family train images, tie-break by z, outlier
   thresholds;
2. ``variant``: teacher-forced likelihood of the Stage 1 tokens under each variant's guided sampling
   distribution, calibrated (z-scores or logistic regression) on the family's train images.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
from safetensors.torch import load_file

from genattr.data.rarvar import FAMILIES, FAMILY_OF, OUTLIER, VARIANTS
from genattr.methods.tracing.calibration import VariantCalibrator, fit_calibrator
from genattr.methods.tracing.candidates import split_candidates
from genattr.methods.tracing.decision import ZScorer, assign_family, fit_thresholds, safe_log
from genattr.methods.tracing.likelihood import SUMMARY_FEATURES, summary_features
from genattr.methods.tracing.parallel import sweep
from genattr.methods.tracing.pipeline import SPLITS, TracerPipeline
from genattr.methods.tracing.signals import QUANT_REDUCE, QuantizerSpec, compute_signals
from genattr.metrics.detection import auroc


def gate_score(feats: np.ndarray, train_feats: np.ndarray) -> np.ndarray:
    """max over variants of the guided log-likelihood z-scored by the family's train images (higher = generated)."""
    g, ref = feats[:, :, 2], train_feats[:, :, 2]
    return np.max((g - ref.mean(0)) / np.maximum(ref.std(0, ddof=1), 1e-12), axis=1)


class TwoStagePipeline(TracerPipeline):
    def stages(self) -> Sequence[tuple[str, Callable[[], Mapping[str, float]]]]:
        return (*super().stages(), ("family", self.family), ("variant", self.variant))

    # -- stage 1 ------------------------------------------------------------------------------------
    def family(self) -> dict[str, float]:
        s1, arrays = self.settings.stage1, self.state.arrays
        spec = QuantizerSpec(bool(s1["optimized_quant"]), s1["alg3"])
        for f in FAMILIES:
            tok = self.assets.finetuned_tokenizer(f, self.state)
            quantize = spec.quantizer(tok)
            for split in SPLITS:
                t0 = time.perf_counter()
                for k, v in self._signals(tok, quantize, f, split).items():
                    arrays[f"s1_{f}_{k}_{split}"] = v
                self.state.meta.setdefault("timing_signals", {})[f"{f}/{split}"] = time.perf_counter() - t0
        signal = s1["signal"]
        logs = {s: np.stack([safe_log(arrays[f"s1_{f}_{signal}_{s}"]) for f in FAMILIES], 1) for s in SPLITS}
        train_fam = np.asarray([FAMILIES.index(FAMILY_OF[lab]) for lab in self.protocol.train.labels])
        zs = ZScorer.fit(logs["train"], train_fam, len(FAMILIES))
        z = {s: zs(v) for s, v in logs.items()}
        th = s1["threshold"]
        taus = fit_thresholds(
            str(th["strategy"]),
            families=FAMILIES,
            train_z=z["train"],
            train_family=train_fam,
            val_z=z["val"],
            val_family=[FAMILY_OF[lab] for lab in self.protocol.val.labels],
            q=float(th["q"]),
            k=float(th["k"]),
            grid=int(th["grid"]),
        )
        for s in SPLITS:
            arrays[f"z_{s}"] = z[s]
            arrays[f"family_{s}"] = np.asarray(assign_family(z[s], taus, FAMILIES))
        self.state.meta["stage1"] = {
            "signal": signal,
            "mu": zs.mu.tolist(),
            "sigma": zs.sigma.tolist(),
            "thresholds": taus.tolist(),
            "families": list(FAMILIES),
        }
        return {f"stage1/threshold_{f}": float(t) for f, t in zip(FAMILIES, taus, strict=True)}

    # -- stage 2 ------------------------------------------------------------------------------------
    def variant(self) -> dict[str, float]:
        settings, arrays = self.settings, self.state.arrays
        s2 = settings.stage2
        cands = split_candidates(settings, self.assets, self.state, self.ctx, self.counts)
        cals = {}
        for f in FAMILIES:
            rows = {}
            for s in SPLITS:
                sp = self.protocol.split(s)
                fam = arrays[f"family_{s}"]
                true = np.asarray([FAMILY_OF[lab] for lab in sp.labels]) if sp.labels else np.full(len(sp), "")
                rows[s] = np.flatnonzero(true == f) if s == "train" else np.flatnonzero((fam == f) | (true == f))
            with self.assets.generators(f) as gens:
                for s in SPLITS:
                    tokens, cand = arrays[f"s1_{f}_tokens_{s}"][rows[s]], cands[s][rows[s]]
                    arrays[f"s2_{f}_rows_{s}"] = rows[s]
                    arrays[f"s2_{f}_feats_{s}"] = self._likelihoods(gens, f, tokens, cand, s)
            train_var = np.asarray([VARIANTS[f].index(self.protocol.train.labels[i]) for i in rows["train"]])
            cal = fit_calibrator(
                str(s2["calibration"]),
                arrays[f"s2_{f}_feats_train"],
                train_var,
                features=tuple(s2["features"]),
                C=float(s2["C"]),
                seed=settings.seed,
            )
            cals[f] = cal.to_json()
            gate = s2["outlier_gate"]
            if gate["enabled"]:
                g_train = gate_score(arrays[f"s2_{f}_feats_train"], arrays[f"s2_{f}_feats_train"])
                cals[f]["gate_threshold"] = float(np.quantile(g_train, float(gate["q"])))
        self.state.meta["calibrators"] = cals
        return {}

    def _signals(self, tok: Any, quantize: Any, family: str, split: str) -> dict[str, np.ndarray]:
        """Every Stage 1 signal of a split's images under ``family``, the batches shared among processes."""
        s1, bs, images = self.settings.stage1, self.settings.batch_size, self.assets.images(split)
        out, rows = sweep(
            self.acc,
            len(images),
            bs,
            lambda sl: compute_signals(
                tok,
                images[sl],
                quantize,
                batch_size=bs,
                device=self.acc.device,
                quantized_reconstruction=bool(s1["quantized_reconstruction"]),
                quant_reduce=self.settings.quant_reduce[family],
            ),
            desc=f"stage 1 signals {family} {split}",
        )
        self.counts["signal_rows"] += rows
        return out

    def _likelihoods(
        self, gens: Mapping[str, Any], family: str, tokens: np.ndarray, cand: np.ndarray, split: str
    ) -> np.ndarray:
        """[N, 4, F] summary features of ``tokens`` under the family's four variants, batches shared."""
        bs, aggregate = self.settings.batch_size, self.settings.class_aggregate

        def feats(sl: slice) -> dict[str, np.ndarray]:
            per_variant = [
                summary_features(
                    gens[v], tokens[sl], cand[sl], aggregate=aggregate, batch_size=bs, device=self.acc.device
                )
                for v in VARIANTS[family]
            ]
            return {"feats": np.stack(per_variant, axis=1)}

        out, rows = sweep(self.acc, len(tokens), bs, feats, desc=f"stage 2 likelihoods {family} {split}")
        self.counts["likelihood_rows"] += rows
        return out["feats"] if len(tokens) else np.zeros((0, len(VARIANTS[family]), len(SUMMARY_FEATURES)))

    # -- outputs --------------------------------------------------------------------------------------
    def predict(self) -> dict[str, list[str]]:
        arrays, cals = self.state.arrays, self.state.meta["calibrators"]
        preds = {}
        for s in SPLITS:
            fam = arrays[f"family_{s}"]
            out = np.asarray([OUTLIER] * len(fam), dtype=object)
            for f in FAMILIES:
                cal = VariantCalibrator.from_json(cals[f])
                rows = arrays[f"s2_{f}_rows_{s}"]
                var = cal.predict(arrays[f"s2_{f}_feats_{s}"]) if len(rows) else np.zeros(0, int)
                sel = fam[rows] == f
                if "gate_threshold" in cals[f] and len(rows):
                    g = gate_score(arrays[f"s2_{f}_feats_{s}"], arrays[f"s2_{f}_feats_train"])
                    sel &= g >= cals[f]["gate_threshold"]
                out[rows[sel]] = [VARIANTS[f][i] for i in var[sel]]
            preds[s] = out.tolist()
        return preds

    def diagnostics(self) -> dict[str, Any]:
        """In-family QuantLoss / Combined AUCs, token recovery, and Stage 2 alone given the true family."""
        arrays, d = self.state.arrays, {}
        for s in self.labelled_splits():
            true = np.asarray(self.protocol.split(s).labels)
            fam = np.asarray([FAMILY_OF[x] for x in true])
            kind = self.assets.hidden(s, "outlier_kind")
            for f in FAMILIES:
                # negatives: the other family + outliers, except reconstructions through f's own autoencoder
                # (on-manifold by design: only the likelihood stages can reject them, spec §9.3.7)
                keep = np.ones(len(fam), bool)
                if kind is not None:
                    keep = ~((np.asarray(kind) == "reconstruction") & (fam == OUTLIER) & self._recon_of(s, f))
                for sig in ("quant", "comb", *(f"quant_{r}" for r in QUANT_REDUCE)):
                    key = f"s1_{f}_{sig}_{s}"
                    if key in arrays:  # a stage checkpoint written before both poolings were kept has not
                        d[f"{s}/{sig}_auc_{f}"] = 100 * auroc((fam[keep] == f).astype(int), -arrays[key][keep])
                rec = self._token_recovery(s, f)
                if rec is not None:
                    d[f"{s}/token_recovery_{f}"] = rec
            # Stage 2 alone: variant accuracy on generated images of the TRUE family
            for f in FAMILIES:
                cal = VariantCalibrator.from_json(self.state.meta["calibrators"][f])
                rows = arrays[f"s2_{f}_rows_{s}"]
                keep = fam[rows] == f
                if keep.any():
                    pv = cal.predict(arrays[f"s2_{f}_feats_{s}"][keep])
                    tv = np.asarray([VARIANTS[f].index(x) for x in true[rows[keep]]])
                    d[f"{s}/stage2_variant_accuracy_true_family_{f}"] = 100 * float(np.mean(pv == tv))
        return d

    def histogram(self, split: str, family_index: int) -> tuple[np.ndarray, str]:
        f = FAMILIES[family_index]
        xlabel = f"z of log {self.state.meta['stage1']['signal']} under {f} (lower = {f})"
        return self.state.arrays[f"z_{split}"][:, family_index], xlabel

    def _recon_of(self, split: str, family: str) -> np.ndarray:
        """Outliers reconstructed through ``family``'s autoencoder (metadata ``family`` column), as a mask."""
        fams = self.assets.hidden(split, "family")
        if fams is None:
            return np.zeros(len(self.protocol.split(split)), bool)
        return np.asarray([x == family for x in fams])

    def _token_recovery(self, split: str, family: str) -> float | None:
        """Share of the sampled tokens recovered by Stage 1 on the family's generated images (twin metadata)."""
        hidden_dir = self.protocol.hidden_dir
        if hidden_dir is None or not (hidden_dir / f"{split}_{family}.safetensors").is_file():
            return None
        true_tokens = load_file(str(hidden_dir / f"{split}_{family}.safetensors"))["tokens"].numpy()
        rows = self.assets.hidden(split, "row")
        labels = self.protocol.split(split).labels
        idx = [i for i, lab in enumerate(labels) if FAMILY_OF[lab] == family and int(rows[i] or -1) >= 0]
        if not idx:
            return None
        got = self.state.arrays[f"s1_{family}_tokens_{split}"][idx]
        want = true_tokens[[int(rows[i]) for i in idx]]
        return 100 * float(np.mean(got == want))
