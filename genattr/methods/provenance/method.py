"""``method=prada``: label every test image with the RAR / VAR variant that made it, or ``outlier``.

``pipeline=two_stage`` (Zhao et al. provenance, then generator likelihood):

0. ``models``: fine-tune each family's inverse decoder on (generated image, exact latent) pairs; train the
   class classifier (``class_source=topk``);
1. ``family``: Stage 1 signals (QuantLoss with Algorithm 3 for VAR, calibrated EncLoss, Combined) of every image
   under both families, per-family z-scores fitted on own-family train images, tie-break by z, outlier
   thresholds;
2. ``variant``: teacher-forced likelihood of the Stage 1 tokens under each variant's guided sampling
   distribution, calibrated (z-scores or logistic regression) on the family's train images.

``pipeline=one_step`` (PRADA): 0 ``models`` (classifier), 1 ``features`` (per-token ℓ_c, ℓ_u of the greedy
tokens under all 8 models), 2 ``score_functions`` (one-vs-rest score function per model; argmax, ``outlier``
when every score is below the floor).

Each stage ends in a checkpoint holding everything computed so far (arrays as ``.npz`` without pickle, weights
as safetensors, calibrators as JSON); ``resume=auto`` skips finished stages.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from genattr.data.rarvar import FAMILIES, FAMILY_OF, LABELS, OUTLIER, VARIANTS, ImageSplit, TracingProtocol
from genattr.methods.base import Report, RunContext
from genattr.methods.provenance import classes as cls_mod
from genattr.methods.provenance.calibration import VariantCalibrator, fit_calibrator
from genattr.methods.provenance.decision import ZScorer, argmax_or_outlier, assign_family, fit_thresholds, safe_log
from genattr.methods.provenance.inverse import (
    Pairs,
    encoder_state,
    finetune_inverse_decoder,
    generate_pairs,
    inverse_loss,
    load_encoder_state,
)
from genattr.methods.provenance.likelihood import prada_features, scale_slices, summary_features
from genattr.methods.provenance.outputs import plot_confusion, plot_histograms, write_submission
from genattr.methods.provenance.score_function import fit_score_function, prada_negatives, score
from genattr.methods.provenance.signals import QUANT_REDUCE, QuantizerSpec, compute_signals, greedy_tokens
from genattr.metrics.detection import auroc
from genattr.metrics.provenance import confusion, tracing_metrics
from genattr.models.tokenizers.checkpoint import load_generator_checkpoint, load_tokenizer_checkpoint
from genattr.utils.errors import ConfigError, DataError
from genattr.utils.instantiate import build

log = logging.getLogger(__name__)
PIPELINES = ("two_stage", "one_step")
SPLITS = ("train", "val", "test")
SIGNALS = ("quant", "enc", "comb")
STAGES = {"two_stage": ("models", "family", "variant"), "one_step": ("models", "features", "score_functions")}


def score_training_rows(train_labels: np.ndarray, variant: str, negatives: list[str]) -> np.ndarray:
    """Mask of the train images a variant's score function sees: its own, plus the negative sources asked for."""
    fam = np.asarray([FAMILY_OF[lab] for lab in train_labels])
    own_family = fam == FAMILY_OF[variant]
    return (
        (train_labels == variant)
        | (own_family & ("same_family" in negatives))
        | (~own_family & ("other_family" in negatives))
    )


def integer_at_least(value: Any, key: str, minimum: int, hint: str = "") -> int:
    """``value`` as an int >= ``minimum`` (bools and floats refused), else a ConfigError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}={value!r}; use an integer >= {minimum}{hint}")
    return int(value)


def per_family(value: Any, key: str, default: Any, check: Callable[[Any, str], Any], expected: str) -> dict[str, Any]:
    """A setting that may differ per family: one value for both, or {family: value} (absent families take
    ``default``). ``check(value, key)`` validates one value and raises naming the full key (``key.<family>``)."""
    if isinstance(value, Mapping):
        unknown = set(value) - set(FAMILIES)
        if unknown:
            raise ConfigError(f"{key} has unknown families {sorted(unknown)}; use {list(FAMILIES)}")
        return {f: check(value.get(f, default), f"{key}.{f}") for f in FAMILIES}
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return {f: check(value, key) for f in FAMILIES}
    raise ConfigError(f"{key}={value!r}; use {expected}, or a mapping per family")


class ModelTracer:
    """Two-stage provenance + likelihood tracer, or one-step PRADA; see ``conf/method/prada.yaml``."""

    supports = ("tracing",)

    def __init__(
        self,
        *,
        name: str,
        model: Mapping[str, Any] | None = None,
        trainer: Mapping[str, Any] | None = None,
        pipeline: str = "two_stage",
        batch_size: int = 32,
        class_source: str = "topk",
        class_aggregate: str = "max",
        topk: int = 5,
        classifier: Mapping[str, Any] | None = None,
        pairs: Mapping[str, Any] | None = None,
        inverse: Mapping[str, Any] | None = None,
        stage1: Mapping[str, Any] | None = None,
        stage2: Mapping[str, Any] | None = None,
        prada: Mapping[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        if pipeline not in PIPELINES:
            raise ConfigError(f"method.pipeline={pipeline!r}; use one of {'|'.join(PIPELINES)}")
        if class_source not in cls_mod.CLASS_SOURCES:
            raise ConfigError(f"method.class_source={class_source!r}; use one of {'|'.join(cls_mod.CLASS_SOURCES)}")
        if class_aggregate not in ("max", "logmeanexp"):
            raise ConfigError(f"method.class_aggregate={class_aggregate!r}; use max|logmeanexp")
        self.name = name
        self.pipeline = pipeline
        self.batch_size = int(batch_size)
        self.class_source, self.class_aggregate, self.topk = class_source, class_aggregate, int(topk)
        self.classifier_cfg = dict(classifier or {})
        self.pairs_cfg = dict(pairs or {})
        self.inverse_cfg = dict(inverse or {})
        self.s1 = dict(stage1 or {})
        self.s2 = dict(stage2 or {})
        self.prada_cfg = dict(prada or {})
        self.seed = int(seed)
        if self.s1.get("signal", "comb") not in SIGNALS:
            raise ConfigError(f"method.stage1.signal={self.s1.get('signal')!r}; use one of {'|'.join(SIGNALS)}")
        self.quant_reduce = self._quant_reduce(self.s1.get("quant_reduce", "mean"))
        self.pairs_per_variant = self._pairs_per_variant(self.pairs_cfg.get("per_variant", 64))
        if self.pairs_cfg.get("source", "auto") not in ("auto", "metadata", "generate"):
            raise ConfigError("method.pairs.source must be auto|metadata|generate")
        if self.prada_cfg.get("tokens", "greedy_original") not in ("greedy_original", "stage1"):
            raise ConfigError("method.prada.tokens must be greedy_original|stage1")
        self.negatives = prada_negatives(self.prada_cfg)  # validated here, not after the feature stage
        n_gen = self.prada_cfg.get("generated_per_variant", 0)
        self.generated_per_variant = integer_at_least(
            0 if n_gen is None else n_gen, "method.prada.generated_per_variant", 0, " (0 = none)"
        )
        self.position_groups = integer_at_least(
            self.prada_cfg.get("position_groups", 1), "method.prada.position_groups", 1, " (1 = PRADA)"
        )
        self._images: dict[str, torch.Tensor] = {}
        self._resumed: list[str] = []

    # ------------------------------------------------------------------ models and data
    @staticmethod
    def _quant_reduce(value: Any) -> dict[str, str]:
        """``stage1.quant_reduce`` as {family: pooling}: one name for both families, or a mapping per family."""

        def check(r: Any, key: str) -> str:
            if r not in QUANT_REDUCE:
                raise ConfigError(f"{key}={r!r}; use one of {'|'.join(QUANT_REDUCE)}")
            return str(r)

        return per_family(value, "method.stage1.quant_reduce", "mean", check, "mean | median")

    @staticmethod
    def _pairs_per_variant(value: Any) -> dict[str, int]:
        """``pairs.per_variant`` as {family: count}: one count for both families, or a mapping per family."""
        return per_family(
            value, "method.pairs.per_variant", 64, lambda n, key: integer_at_least(n, key, 1), "an integer"
        )

    def _tokenizer(self, protocol: TracingProtocol, family: str, device: torch.device) -> Any:
        spec = protocol.models[family]
        tok = build(OmegaConf.create(spec.tokenizer))
        load_tokenizer_checkpoint(tok, spec.tokenizer_checkpoint)
        tok.to(device).eval().requires_grad_(False)
        return tok

    @contextmanager
    def _generators(self, protocol: TracingProtocol, family: str, device: torch.device) -> Iterator[dict[str, Any]]:
        """The family's four generators, loaded for the block and freed after (real ones are GBs each)."""
        spec = protocol.models[family]
        tok = self._tokenizer(protocol, family, device)  # VAR generators read the codebook / φ for teacher forcing
        gens = {}
        for v in VARIANTS[family]:
            g = build(OmegaConf.create(spec.generators[v]))
            load_generator_checkpoint(g, spec.generator_checkpoints[v])
            if hasattr(g, "attach_tokenizer"):
                g.attach_tokenizer(tok)
            gens[v] = g.to(device).eval().requires_grad_(False)
        try:
            yield gens
        finally:
            del gens
            if device.type == "cuda":
                torch.cuda.empty_cache()

    def _split_images(self, split: ImageSplit) -> torch.Tensor:
        if split.name not in self._images:
            self._images[split.name] = split.load()
        return self._images[split.name]

    def _hidden(self, protocol: TracingProtocol, split: str, key: str) -> list[str] | None:
        if not protocol.hidden or split not in protocol.hidden:
            return None
        rows = protocol.hidden[split]
        return [rows.get(n, {}).get(key, "") for n in protocol.split(split).names]

    def _pairs(self, protocol: TracingProtocol, family: str, device: torch.device) -> Pairs:
        source = self.pairs_cfg.get("source", "auto")
        if source in ("auto", "metadata") and protocol.hidden_dir is not None:
            path = protocol.hidden_dir / f"train_{family}.safetensors"
            if path.is_file():
                return self._metadata_pairs(protocol, family, path)
        if source == "metadata":
            raise DataError(
                f"method.pairs.source=metadata but {protocol.root}/hidden/train_{family}.safetensors is missing"
            )
        tok = self._tokenizer(protocol, family, device)
        with self._generators(protocol, family, device) as gens:
            return generate_pairs(
                tok,
                gens,
                per_variant=self.pairs_per_variant[family],
                seed=self.seed + int(self.pairs_cfg.get("seed", 0)),
                batch_size=int(self.pairs_cfg.get("batch_size", 16)),
                device=device,
            )

    def _metadata_pairs(self, protocol: TracingProtocol, family: str, path: Path) -> Pairs:
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
        images = self._split_images(protocol.train)[idx]
        return Pairs(
            images,
            tensors["latent"][pos].float(),
            tensors["tokens"][pos],
            tensors["labels"][pos],
            [protocol.train.labels[i] for i in idx],
        )

    # ------------------------------------------------------------------ checkpoints
    def _save(self, ctx: RunContext, stage: int, state: dict[str, Any]) -> None:
        arrays, tensors, meta = state["arrays"], state["tensors"], state["meta"]

        def write(folder: Path) -> None:
            np.savez(folder / "arrays.npz", **arrays)
            if tensors:
                save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "weights.safetensors"))
            (folder / "meta.json").write_text(json.dumps(meta, indent=1, default=float))

        info = {
            "task": stage,
            "stage": STAGES[self.pipeline][stage],
            "pipeline": self.pipeline,
            "mlflow_run_id": getattr(ctx.tracker, "run_id", None),
            "config_fingerprint": ctx.config_fingerprint,
        }
        if ctx.accelerator.is_main_process:
            ctx.checkpoints.save(stage, write, info)
        ctx.accelerator.wait_for_everyone()

    @staticmethod
    def _load(folder: Path) -> dict[str, Any]:
        with np.load(folder / "arrays.npz", allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        wfile = folder / "weights.safetensors"
        tensors = load_file(str(wfile)) if wfile.is_file() else {}
        return {"arrays": arrays, "tensors": tensors, "meta": json.loads((folder / "meta.json").read_text())}

    # ------------------------------------------------------------------ shared pieces
    def _train_classifier(self, protocol, pairs_by_family, state, device) -> None:
        if self.class_source != "topk":
            return
        cfg = self.classifier_cfg
        num_classes = int(state["meta"]["num_classes"])
        model = cls_mod.build_classifier(cfg, num_classes)
        hist: list[float] = []
        if cfg.get("train", True):
            images = torch.cat([p.images for p in pairs_by_family.values()])
            labels = torch.cat([p.classes for p in pairs_by_family.values()])
            hist = cls_mod.train_classifier(
                model,
                images,
                labels,
                epochs=int(cfg.get("epochs", 10)),
                lr=float(cfg.get("lr", 1e-3)),
                batch_size=int(cfg.get("batch_size", 64)),
                seed=self.seed,
                device=device,
            )
        state["tensors"].update({f"classifier.{k}": v.detach().cpu() for k, v in model.state_dict().items()})
        state["meta"]["classifier_loss"] = hist

    def _classifier(self, state, device) -> torch.nn.Module:
        model = cls_mod.build_classifier(self.classifier_cfg, int(state["meta"]["num_classes"]))
        pre = "classifier."
        model.load_state_dict({k[len(pre) :]: v for k, v in state["tensors"].items() if k.startswith(pre)})
        return model.to(device).eval()

    def _class_candidates(
        self, state, model, n: int, oracle: np.ndarray | None, images: Callable[[], torch.Tensor], device
    ) -> np.ndarray:
        """[n, K'] candidate classes of ``n`` images for ``class_source``; ``images()`` is only read for topk."""
        meta = state["meta"]
        topk = None
        if model is not None:
            k = min(self.topk, int(meta["num_classes"]))
            topk = cls_mod.topk_classes(model, images(), k, batch_size=self.batch_size, device=device)
        return cls_mod.candidate_classes(
            self.class_source,
            n,
            num_classes=int(meta["num_classes"]),
            null_class=int(meta["null_class"]),
            oracle=oracle,
            topk=topk,
        )

    def _candidates(self, protocol, state, device) -> dict[str, np.ndarray]:
        """Candidate classes per split ([N, K']), computed once and kept in the state."""
        out = {}
        model = self._classifier(state, device) if self.class_source == "topk" else None
        for split in SPLITS:
            key = f"cand_{split}"
            if key not in state["arrays"]:
                sp = protocol.split(split)
                oracle = self._hidden(protocol, split, "class_id")
                state["arrays"][key] = self._class_candidates(
                    state,
                    model,
                    len(sp),
                    None if oracle is None else np.asarray([int(c) if c not in ("", None) else -1 for c in oracle]),
                    lambda sp=sp: self._split_images(sp),
                    device,
                )
            out[split] = state["arrays"][key]
        return out

    def _stage_models(self, protocol, state, ctx, device) -> None:
        """Stage 0: fine-tuned inverse decoders (two_stage) and the class classifier (topk)."""
        finetune = self.inverse_cfg.get("enabled", True) and (
            self.pipeline == "two_stage" or self.prada_cfg.get("tokens", "greedy_original") == "stage1"
        )
        need_pairs = finetune or self.class_source == "topk"
        pairs = {f: self._pairs(protocol, f, device) for f in FAMILIES} if need_pairs else {}
        report: dict[str, Any] = {}
        if finetune:
            for f in FAMILIES:
                tok = self._tokenizer(protocol, f, device)
                fam_cfg = dict(self.inverse_cfg.get(f, {}))
                p = pairs[f]
                n_hold = int(round(len(p) * float(self.inverse_cfg.get("holdout", 0.0))))
                perm = torch.randperm(len(p), generator=torch.Generator().manual_seed(self.seed))
                hold, train = perm[:n_hold], perm[n_hold:]
                held = p.subset(hold) if n_hold else None
                before = inverse_loss(tok, held, batch_size=self.batch_size, device=device) if held else None
                hist = finetune_inverse_decoder(
                    tok,
                    p.subset(train),
                    epochs=int(fam_cfg.get("epochs", 10)),
                    lr=float(fam_cfg.get("lr", 5e-5)),
                    batch_size=int(fam_cfg.get("batch_size", 16)),
                    step_size=int(self.inverse_cfg.get("step_size", 2)),
                    gamma=float(self.inverse_cfg.get("gamma", 0.9)),
                    augment_schedule=fam_cfg.get("augment"),
                    augment_p=float(self.inverse_cfg.get("augment_p", 0.5)),
                    seed=self.seed,
                    device=device,
                    log_fn=lambda e, v, f=f: ctx.tracker.log_metrics({f"inverse/{f}/loss": v}, step=e),
                )
                after = inverse_loss(tok, held, batch_size=self.batch_size, device=device) if held else None
                report[f] = {
                    "pairs": len(p),
                    "heldout": n_hold,
                    "loss": hist,
                    "heldout_before": before,
                    "heldout_after": after,
                }
                log.info("inverse decoder %s: held-out L_inv %s -> %s (%d pairs)", f, before, after, len(p))
                state["tensors"].update({f"inverse.{f}.{k}": v for k, v in encoder_state(tok).items()})
        state["meta"]["inverse"] = report
        self._train_classifier(protocol, pairs, state, device)

    def _finetuned_tokenizer(self, protocol, family, state, device) -> Any:
        tok = self._tokenizer(protocol, family, device)
        pre = f"inverse.{family}."
        own = {k[len(pre) :]: v for k, v in state["tensors"].items() if k.startswith(pre)}
        if own:
            load_encoder_state(tok, own)
            tok.to(device)
        return tok

    # ------------------------------------------------------------------ two-stage
    def _stage_family(self, protocol, state, device) -> None:
        spec = QuantizerSpec(bool(self.s1.get("optimized_quant", True)), self.s1.get("alg3"))
        qrec = bool(self.s1.get("quantized_reconstruction", False))
        for f in FAMILIES:
            tok = self._finetuned_tokenizer(protocol, f, state, device)
            quantize = spec.quantizer(tok)
            for split in SPLITS:
                t0 = time.perf_counter()
                sig = compute_signals(
                    tok,
                    self._split_images(protocol.split(split)),
                    quantize,
                    batch_size=self.batch_size,
                    device=device,
                    quantized_reconstruction=qrec,
                    quant_reduce=self.quant_reduce[f],
                )
                state["meta"].setdefault("timing_signals", {})[f"{f}/{split}"] = time.perf_counter() - t0
                for k, v in sig.items():
                    state["arrays"][f"s1_{f}_{k}_{split}"] = v
        signal = self.s1.get("signal", "comb")
        logs = {s: np.stack([safe_log(state["arrays"][f"s1_{f}_{signal}_{s}"]) for f in FAMILIES], 1) for s in SPLITS}
        train_fam = np.asarray([FAMILIES.index(FAMILY_OF[lab]) for lab in protocol.train.labels])
        zs = ZScorer.fit(logs["train"], train_fam, len(FAMILIES))
        z = {s: zs(v) for s, v in logs.items()}
        th = self.s1.get("threshold", {}) or {}
        taus = fit_thresholds(
            str(th.get("strategy", "quantile")),
            families=FAMILIES,
            train_z=z["train"],
            train_family=train_fam,
            val_z=z["val"],
            val_family=[FAMILY_OF[lab] for lab in protocol.val.labels],
            q=float(th.get("q", 0.95)),
            k=float(th.get("k", 2.0)),
            grid=int(th.get("grid", 64)),
        )
        for s in SPLITS:
            state["arrays"][f"z_{s}"] = z[s]
            state["arrays"][f"family_{s}"] = np.asarray(assign_family(z[s], taus, FAMILIES))
        state["meta"]["stage1"] = {
            "signal": signal,
            "mu": zs.mu.tolist(),
            "sigma": zs.sigma.tolist(),
            "thresholds": taus.tolist(),
            "families": list(FAMILIES),
        }

    def _stage_variant(self, protocol, state, device) -> None:
        cands = self._candidates(protocol, state, device)
        cal_kind = str(self.s2.get("calibration", "logreg"))
        cals = {}
        for f in FAMILIES:
            rows = {}
            for s in SPLITS:
                sp = protocol.split(s)
                fam = state["arrays"][f"family_{s}"]
                true = np.asarray([FAMILY_OF[lab] for lab in sp.labels]) if sp.labels else np.full(len(sp), "")
                rows[s] = np.flatnonzero(true == f) if s == "train" else np.flatnonzero((fam == f) | (true == f))
            with self._generators(protocol, f, device) as gens:
                for s in SPLITS:
                    tokens = state["arrays"][f"s1_{f}_tokens_{s}"][rows[s]]
                    feats = np.stack(
                        [
                            summary_features(
                                gens[v],
                                tokens,
                                cands[s][rows[s]],
                                aggregate=self.class_aggregate,
                                batch_size=self.batch_size,
                                device=device,
                            )
                            for v in VARIANTS[f]
                        ],
                        axis=1,
                    )
                    state["arrays"][f"s2_{f}_rows_{s}"] = rows[s]
                    state["arrays"][f"s2_{f}_feats_{s}"] = feats
            train_var = np.asarray([VARIANTS[f].index(protocol.train.labels[i]) for i in rows["train"]])
            cal = fit_calibrator(
                cal_kind,
                state["arrays"][f"s2_{f}_feats_train"],
                train_var,
                features=tuple(self.s2.get("features", ("logp_cond", "logp_uncond", "logp_guided", "rank"))),
                C=float(self.s2.get("C", 1.0)),
                seed=self.seed,
            )
            cals[f] = cal.to_json()
            gate = dict(self.s2.get("outlier_gate") or {})
            if gate.get("enabled", False):
                g_train = self._gate_score(
                    state["arrays"][f"s2_{f}_feats_train"], state["arrays"][f"s2_{f}_feats_train"]
                )
                cals[f]["gate_threshold"] = float(np.quantile(g_train, float(gate.get("q", 0.02))))
        state["meta"]["calibrators"] = cals

    @staticmethod
    def _gate_score(feats: np.ndarray, train_feats: np.ndarray) -> np.ndarray:
        """max over variants of the guided log-likelihood z-scored by the family's train images (higher = generated)."""
        g, ref = feats[:, :, 2], train_feats[:, :, 2]
        return np.max((g - ref.mean(0)) / np.maximum(ref.std(0, ddof=1), 1e-12), axis=1)

    def _predict_two_stage(self, protocol, state) -> dict[str, list[str]]:
        preds = {}
        for s in SPLITS:
            fam = state["arrays"][f"family_{s}"]
            out = np.asarray([OUTLIER] * len(fam), dtype=object)
            for f in FAMILIES:
                cal = VariantCalibrator.from_json(state["meta"]["calibrators"][f])
                rows = state["arrays"][f"s2_{f}_rows_{s}"]
                var = cal.predict(state["arrays"][f"s2_{f}_feats_{s}"]) if len(rows) else np.zeros(0, int)
                sel = fam[rows] == f
                if "gate_threshold" in state["meta"]["calibrators"][f] and len(rows):
                    g = self._gate_score(state["arrays"][f"s2_{f}_feats_{s}"], state["arrays"][f"s2_{f}_feats_train"])
                    sel &= g >= state["meta"]["calibrators"][f]["gate_threshold"]
                out[rows[sel]] = [VARIANTS[f][i] for i in var[sel]]
            preds[s] = out.tolist()
        return preds

    # ------------------------------------------------------------------ one-step PRADA
    def _generated_for_prada(self, protocol, state, device) -> torch.Tensor | None:
        """``prada.generated_per_variant`` fresh uint8 images of every model (PRADA fits on the model's own samples).

        Their labels and candidate classes go to ``state["arrays"]`` (``gen_labels``, ``cand_gen``).
        """
        n = self.generated_per_variant
        if n == 0:
            return None
        images, classes, labels = [], [], []
        for f in FAMILIES:
            tok = self._tokenizer(protocol, f, device)
            with self._generators(protocol, f, device) as gens:
                pairs = generate_pairs(
                    tok,
                    gens,
                    per_variant=n,
                    # a stream apart from the inverse-decoder pairs (seed + pairs.seed): drawn independently
                    seed=self.seed + int(self.prada_cfg.get("generated_seed", 1)) * 7919,
                    batch_size=int(self.pairs_cfg.get("batch_size", 16)),
                    device=device,
                )
            images.append(pairs.images)
            classes.append(pairs.classes.numpy())
            labels += pairs.variants
        gen_images = torch.cat(images)
        state["arrays"]["gen_labels"] = np.asarray(labels)
        model = self._classifier(state, device) if self.class_source == "topk" else None
        state["arrays"]["cand_gen"] = self._class_candidates(
            state, model, len(gen_images), np.concatenate(classes), lambda: gen_images, device
        )
        return gen_images

    def _stage_features(self, protocol, state, device) -> None:
        cands = self._candidates(protocol, state, device)
        generated = self._generated_for_prada(protocol, state, device)
        for f in FAMILIES:
            if self.prada_cfg.get("tokens", "greedy_original") == "stage1":
                tok = self._finetuned_tokenizer(protocol, f, state, device)
            else:
                tok = self._tokenizer(protocol, f, device)
            state["meta"].setdefault("patch_nums", {})[f] = list(getattr(tok, "patch_nums", []) or [])
            state["meta"].setdefault("num_tokens", {})[f] = int(tok.num_tokens)
            toks = {
                s: greedy_tokens(tok, self._split_images(protocol.split(s)), batch_size=self.batch_size, device=device)
                for s in SPLITS
            }
            if generated is not None:
                toks["gen"] = greedy_tokens(tok, generated, batch_size=self.batch_size, device=device)
            with self._generators(protocol, f, device) as gens:
                for v in VARIANTS[f]:
                    for s in toks:
                        cand = state["arrays"]["cand_gen"] if s == "gen" else cands[s]
                        state["arrays"][f"pf_{v}_{s}"] = prada_features(
                            gens[v], toks[s], cand, batch_size=self.batch_size, device=device
                        )

    def _stage_score_functions(self, protocol, state, ctx) -> None:
        cfg, negatives = self.prada_cfg, self.negatives
        # the train split's images, then (prada.generated_per_variant > 0) fresh samples of every model
        train_labels = np.asarray(protocol.train.labels)
        gen_labels = state["arrays"].get("gen_labels")
        if gen_labels is not None:
            train_labels = np.concatenate([train_labels, np.asarray(gen_labels)])
        val_out = np.flatnonzero(np.asarray(protocol.val.labels) == OUTLIER)
        if "val_outliers" not in negatives:
            val_out = val_out[:0]
        n_neg = {}
        for v in LABELS[:8]:
            f = FAMILY_OF[v]
            try:
                scales = scale_slices(
                    state["meta"]["patch_nums"][f], int(state["meta"]["num_tokens"][f]), self.position_groups
                )
            except ValueError as err:  # the features stage is already checkpointed: fix the flag and resume
                raise ConfigError(f"method.prada.position_groups={self.position_groups} for {f}: {err}") from None
            keep = score_training_rows(train_labels, v, negatives)
            x = state["arrays"][f"pf_{v}_train"]
            if gen_labels is not None:
                x = np.concatenate([x, state["arrays"][f"pf_{v}_gen"]])
            x = x[keep]
            y = (train_labels[keep] == v).astype(np.float32)
            if len(val_out):
                x = np.concatenate([x, state["arrays"][f"pf_{v}_val"][val_out]])
                y = np.concatenate([y, np.zeros(len(val_out), np.float32)])
            n_neg[v] = int((y == 0).sum())
            if not n_neg[v]:
                raise ConfigError(f"method.prada.negatives={negatives} leaves no negative images for {v}")
            model, hist = fit_score_function(
                x,
                y,
                scales,
                epochs=int(cfg.get("epochs", 3000)),
                lr=float(cfg.get("lr", 1e-3)),
                smoothing=float(cfg.get("smoothing", 0.05)),
                weight_penalty=float(cfg.get("weight_penalty", 0.1)),
                noise=float(cfg.get("noise", 0.1)),
                hidden=int(cfg.get("hidden", 16)),
                aggregate=self.class_aggregate,
                balance=bool(cfg.get("balance", True)),
                seed=self.seed,
            )
            ctx.tracker.log_metrics({f"prada/{v}/final_loss": hist[-1]})
            state["tensors"].update({f"score.{v}.{k}": t.detach().cpu() for k, t in model.state_dict().items()})
            for s in SPLITS:
                state["arrays"][f"score_{v}_{s}"] = score(model, state["arrays"][f"pf_{v}_{s}"])
        state["meta"]["prada"] = {
            "negatives": negatives,
            "n_val_outliers_used": int(len(val_out)),
            "n_negatives": n_neg,
            "n_generated": 0 if gen_labels is None else int(len(gen_labels)),
        }

    def _predict_one_step(self, state) -> dict[str, list[str]]:
        floor = float(self.prada_cfg.get("threshold", 0.0))
        return {
            s: argmax_or_outlier(
                np.stack([state["arrays"][f"score_{v}_{s}"] for v in LABELS[:8]], 1), LABELS[:8], floor
            )
            for s in SPLITS
        }

    # ------------------------------------------------------------------ run
    def run(self, protocol: TracingProtocol, ctx: RunContext) -> Report:
        if getattr(protocol, "kind", None) != "tracing":
            raise ConfigError(f"method={self.name} needs a 'tracing' protocol (data=rarvar)")
        device = ctx.accelerator.device
        self._log_flags(ctx)
        found = ctx.checkpoints.latest_for(ctx.config_fingerprint)
        stages = STAGES[self.pipeline]
        if found is not None and found[1].get("pipeline") == self.pipeline:
            state = self._load(found[0])
            done = int(found[1]["task"]) + 1
            log.warning("resume: stages %s already done (%s)", list(stages[:done]), found[0])
            self._resumed = list(stages[:done])
        else:
            state = {"arrays": {}, "tensors": {}, "meta": {"timings": {}}}
            done = 0
            gen_spec = protocol.models["var"].generators["var16"]
            with torch.device("meta"):  # only the class count is read: no weights allocated for a 2B model
                g = build(OmegaConf.create(gen_spec))
            state["meta"]["num_classes"], state["meta"]["null_class"] = int(g.num_classes), int(g.null_class)
            del g
        runners = {
            "models": lambda: self._stage_models(protocol, state, ctx, device),
            "family": lambda: self._stage_family(protocol, state, device),
            "variant": lambda: self._stage_variant(protocol, state, device),
            "features": lambda: self._stage_features(protocol, state, device),
            "score_functions": lambda: self._stage_score_functions(protocol, state, ctx),
        }
        for k in range(done, len(stages)):
            t0 = time.perf_counter()
            runners[stages[k]]()
            state["meta"]["timings"][stages[k]] = time.perf_counter() - t0
            ctx.tracker.log_metrics({f"time/{stages[k]}_s": state["meta"]["timings"][stages[k]]})
            self._save(ctx, k, state)
            log.info("stage %s done in %.1fs", stages[k], state["meta"]["timings"][stages[k]])
            if ctx.stop_after_task is not None and k >= int(ctx.stop_after_task) and k < len(stages) - 1:
                return Report({}, {"stopped_after": stages[k]}, [], f"stopped after stage {stages[k]}", completed=False)
        return self._finish(protocol, state, ctx)

    def _log_flags(self, ctx: RunContext) -> None:
        flags = {
            "pipeline": self.pipeline,
            "class_source": self.class_source,
            "class_aggregate": self.class_aggregate,
            "pairs.source": self.pairs_cfg.get("source", "auto"),
            "pairs.per_variant": self.pairs_per_variant,
            "stage1.signal": self.s1.get("signal", "comb"),
            "stage1.optimized_quant": self.s1.get("optimized_quant", True),
            "stage1.alg3": OmegaConf.to_container(OmegaConf.create(dict(self.s1.get("alg3") or {}))),
            "stage1.quantized_reconstruction": self.s1.get("quantized_reconstruction", False),
            "stage1.quant_reduce": self.quant_reduce,
            "stage1.threshold": dict(self.s1.get("threshold", {}) or {}),
            "stage2.calibration": self.s2.get("calibration", "logreg"),
            "stage2.outlier_gate": dict(self.s2.get("outlier_gate") or {}),
            "prada.tokens": self.prada_cfg.get("tokens", "greedy_original"),
            "prada.negatives": self.negatives,
            "prada.generated_per_variant": self.generated_per_variant,
            "prada.position_groups": self.position_groups,
            "prada.threshold": self.prada_cfg.get("threshold", 0.0),
            "prada.balance": self.prada_cfg.get("balance", True),
        }
        log.warning("model tracer quirk flags: %s", json.dumps(flags, default=str))
        if ctx.accelerator.is_main_process:
            ctx.tracker.log_dict(flags, "config/prada_flags.json")

    # ------------------------------------------------------------------ outputs
    def _finish(self, protocol: TracingProtocol, state: dict[str, Any], ctx: RunContext) -> Report:
        if self.pipeline == "two_stage":
            preds = self._predict_two_stage(protocol, state)
        else:
            preds = self._predict_one_step(state)
        out = ctx.output_dir
        results: dict[str, Any] = {
            "method": self.name,
            "pipeline": self.pipeline,
            "data": protocol.name,
            "data_source": protocol.source,
            "seed": self.seed,
            "class_source": self.class_source,
            "timings_s": state["meta"]["timings"],
            "resumed_stages": self._resumed,
            "counts": {s: len(protocol.split(s)) for s in SPLITS},
        }
        metrics: dict[str, float] = {}
        artifacts: list[Path] = []
        main = ctx.accelerator.is_main_process
        for s in ("val", "test"):
            sp = protocol.split(s)
            if not sp.labels:
                continue
            m = tracing_metrics(sp.labels, preds[s])
            results[s] = m
            results[f"{s}_confusion"] = confusion(sp.labels, preds[s]).tolist()
            metrics.update({f"{s}/{k}": v for k, v in m.items() if not k.startswith("n")})
            if main:
                artifacts.append(
                    plot_confusion(
                        confusion(sp.labels, preds[s]), out / "plots" / f"confusion_{s}.png", f"{self.pipeline} — {s}"
                    )
                )
        extra = self._diagnostics(protocol, state, preds)
        results["diagnostics"] = extra
        results["stage_details"] = {
            k: state["meta"].get(k) for k in ("inverse", "stage1", "prada", "classifier_loss") if k in state["meta"]
        }
        if main:
            artifacts.append(write_submission(out / "submission.csv", protocol.test.names, preds["test"]))
            artifacts += self._histograms(protocol, state, out)
        head = results.get("test") or results.get("val") or {}
        summary = (
            f"{self.name} ({self.pipeline}) on {protocol.name} [{protocol.source}]: "
            f"accuracy {head.get('accuracy', float('nan')):.1f}%, "
            f"family {head.get('family_accuracy', float('nan')):.1f}%, "
            f"variant|family {head.get('variant_accuracy', float('nan')):.1f}%; submission {out / 'submission.csv'}"
        )
        return Report(metrics, results, artifacts, summary)

    def _labelled(self, protocol) -> list[str]:
        return [s for s in ("val", "test") if protocol.split(s).labels]

    def _diagnostics(self, protocol, state, preds) -> dict[str, Any]:
        """Separations the spec's twin properties name: in-family QuantLoss AUC, PRADA own-vs-outlier AUROC."""
        d: dict[str, Any] = {}
        for s in self._labelled(protocol):
            true = np.asarray(protocol.split(s).labels)
            fam = np.asarray([FAMILY_OF[x] for x in true])
            if self.pipeline == "two_stage":
                kind = self._hidden(protocol, s, "outlier_kind")
                for f in FAMILIES:
                    # negatives: the other family + outliers, except reconstructions through f's own autoencoder
                    # (on-manifold by design: only the likelihood stages can reject them, spec §9.3.7)
                    keep = np.ones(len(fam), bool)
                    if kind is not None:
                        keep = ~(
                            (np.asarray(kind) == "reconstruction") & (fam == OUTLIER) & self._recon_of(protocol, s, f)
                        )
                    for sig in ("quant", "comb", *(f"quant_{r}" for r in QUANT_REDUCE)):
                        v = state["arrays"].get(f"s1_{f}_{sig}_{s}")
                        if v is None:  # a stage checkpoint written before both poolings were kept
                            continue
                        d[f"{s}/{sig}_auc_{f}"] = 100 * auroc((fam[keep] == f).astype(int), -v[keep])
                    rec = self._token_recovery(protocol, state, s, f)
                    if rec is not None:
                        d[f"{s}/token_recovery_{f}"] = rec
                # Stage 2 alone: variant accuracy on generated images of the TRUE family
                for f in FAMILIES:
                    cal = VariantCalibrator.from_json(state["meta"]["calibrators"][f])
                    rows = state["arrays"][f"s2_{f}_rows_{s}"]
                    keep = fam[rows] == f
                    if keep.any():
                        pv = cal.predict(state["arrays"][f"s2_{f}_feats_{s}"][keep])
                        tv = np.asarray([VARIANTS[f].index(x) for x in true[rows[keep]]])
                        d[f"{s}/stage2_variant_accuracy_true_family_{f}"] = 100 * float(np.mean(pv == tv))
            else:
                aucs = []
                for v in LABELS[:8]:
                    sc = state["arrays"][f"score_{v}_{s}"]
                    keep = (true == v) | (true == OUTLIER)
                    if (true == v).any() and (true == OUTLIER).any():
                        aucs.append(100 * auroc((true[keep] == v).astype(int), sc[keep]))
                        d[f"{s}/prada_own_vs_outlier_auroc_{v}"] = aucs[-1]
                if aucs:
                    d[f"{s}/prada_own_vs_outlier_auroc_mean"] = float(np.mean(aucs))
                    d[f"{s}/prada_own_vs_outlier_auroc_min"] = float(np.min(aucs))
                best = np.max(np.stack([state["arrays"][f"score_{v}_{s}"] for v in LABELS[:8]], 1), 1)
                if (true == OUTLIER).any() and (true != OUTLIER).any():
                    d[f"{s}/prada_detection_auroc"] = 100 * auroc((true != OUTLIER).astype(int), best)
        return d

    def _recon_of(self, protocol, split: str, family: str) -> np.ndarray:
        """Outliers reconstructed through ``family``'s autoencoder (metadata ``family`` column), as a mask."""
        fams = self._hidden(protocol, split, "family")
        return (
            np.asarray([x == family for x in fams]) if fams is not None else np.zeros(len(protocol.split(split)), bool)
        )

    def _token_recovery(self, protocol, state, split: str, family: str) -> float | None:
        """Share of the sampled tokens recovered by Stage 1 on the family's generated images (twin metadata)."""
        if protocol.hidden_dir is None or not (protocol.hidden_dir / f"{split}_{family}.safetensors").is_file():
            return None
        true_tokens = load_file(str(protocol.hidden_dir / f"{split}_{family}.safetensors"))["tokens"].numpy()
        rows = self._hidden(protocol, split, "row")
        labels = protocol.split(split).labels
        idx = [i for i, lab in enumerate(labels) if FAMILY_OF[lab] == family and int(rows[i] or -1) >= 0]
        if not idx:
            return None
        got = state["arrays"][f"s1_{family}_tokens_{split}"][idx]
        want = true_tokens[[int(rows[i]) for i in idx]]
        return 100 * float(np.mean(got == want))

    def _histograms(self, protocol, state, out: Path) -> list[Path]:
        paths = []
        for s in self._labelled(protocol):
            true = np.asarray([FAMILY_OF[x] for x in protocol.split(s).labels])
            for fi, f in enumerate(FAMILIES):
                if self.pipeline == "two_stage":
                    v = state["arrays"][f"z_{s}"][:, fi]
                    xlabel = f"z of log {state['meta']['stage1']['signal']} under {f} (lower = {f})"
                else:
                    v = np.max(np.stack([state["arrays"][f"score_{m}_{s}"] for m in VARIANTS[f]], 1), 1)
                    xlabel = f"max PRADA score over {f} variants (higher = {f})"
                groups = {g: v[true == g] for g in (*FAMILIES, OUTLIER)}
                paths.append(
                    plot_histograms(groups, list(groups), out / "plots" / f"scores_{f}_{s}.png", f"{f} — {s}", xlabel)
                )
        return paths
