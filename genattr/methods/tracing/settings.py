"""The model tracer's settings (``conf/method/prada.yaml``), validated once before any stage runs.

Every key comes from the YAML (the one place for defaults) and is read with ``cfg["key"]``: a missing key is a
bug in the config tree, not something to paper over here. A wrong value fails with a sentence naming the key
before the first stage, so a typo never costs a finished inverse-decoder fine-tuning.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from genattr.data.rarvar import FAMILIES
from genattr.methods.tracing.classes import CLASS_SOURCES
from genattr.methods.tracing.score_function import prada_negatives
from genattr.methods.tracing.signals import QUANT_REDUCE
from genattr.utils.errors import ConfigError

PIPELINES = ("two_stage", "one_step")
SIGNALS = ("quant", "enc", "comb")
AGGREGATES = ("max", "logmeanexp")
PAIR_SOURCES = ("auto", "metadata", "generate")
PRADA_TOKENS = ("greedy_original", "stage1")


def integer_at_least(value: Any, key: str, minimum: int, hint: str = "") -> int:
    """``value`` as an int >= ``minimum`` (bools and floats refused), else a ConfigError naming ``key``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}={value!r}; use an integer >= {minimum}{hint}")
    return int(value)


def per_family(value: Any, key: str, check: Callable[[Any, str], Any], expected: str) -> dict[str, Any]:
    """A setting that may differ per family: one value for both, or {family: value} naming every family.
    ``check(value, key)`` validates one value and raises naming the full key (``key.<family>``)."""
    if isinstance(value, Mapping):
        unknown, missing = set(value) - set(FAMILIES), set(FAMILIES) - set(value)
        if unknown:
            raise ConfigError(f"{key} has unknown families {sorted(unknown)}; use {list(FAMILIES)}")
        if missing:
            raise ConfigError(f"{key} has no value for {sorted(missing)}; give one for both or one per family")
        return {f: check(value[f], f"{key}.{f}") for f in FAMILIES}
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return {f: check(value, key) for f in FAMILIES}
    raise ConfigError(f"{key}={value!r}; use {expected}, or a mapping per family")


def _one_of(value: Any, key: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}; use one of {'|'.join(allowed)}")
    return str(value)


@dataclass(frozen=True)
class TracerSettings:
    """``method.*`` of ``method=prada``, checked; the sub-sections stay plain mappings read with ``[key]``."""

    name: str
    pipeline: str
    batch_size: int
    class_source: str
    class_aggregate: str
    topk: int
    classifier: Mapping[str, Any]
    pairs: Mapping[str, Any]
    inverse: Mapping[str, Any]
    stage1: Mapping[str, Any]
    stage2: Mapping[str, Any]
    prada: Mapping[str, Any]
    seed: int
    #: ``stage1.quant_reduce`` and ``pairs.per_variant`` as {family: value}
    quant_reduce: Mapping[str, str]
    pairs_per_variant: Mapping[str, int]
    #: ``prada.negatives`` in canonical order, and the two PRADA counts, validated
    negatives: list[str]
    generated_per_variant: int
    position_groups: int

    @classmethod
    def from_config(
        cls,
        *,
        name: str,
        pipeline: str,
        batch_size: int,
        class_source: str,
        class_aggregate: str,
        topk: int,
        classifier: Mapping[str, Any],
        pairs: Mapping[str, Any],
        inverse: Mapping[str, Any],
        stage1: Mapping[str, Any],
        stage2: Mapping[str, Any],
        prada: Mapping[str, Any],
        seed: int,
    ) -> TracerSettings:
        _one_of(pipeline, "method.pipeline", PIPELINES)
        _one_of(class_source, "method.class_source", CLASS_SOURCES)
        _one_of(class_aggregate, "method.class_aggregate", AGGREGATES)
        _one_of(stage1["signal"], "method.stage1.signal", SIGNALS)
        _one_of(pairs["source"], "method.pairs.source", PAIR_SOURCES)
        _one_of(prada["tokens"], "method.prada.tokens", PRADA_TOKENS)
        n_gen = prada["generated_per_variant"]
        return cls(
            name=name,
            pipeline=pipeline,
            batch_size=integer_at_least(batch_size, "method.batch_size", 1),
            class_source=class_source,
            class_aggregate=class_aggregate,
            topk=integer_at_least(topk, "method.topk", 1),
            classifier=dict(classifier),
            pairs=dict(pairs),
            inverse=dict(inverse),
            stage1=dict(stage1),
            stage2=dict(stage2),
            prada=dict(prada),
            seed=int(seed),
            quant_reduce=per_family(
                stage1["quant_reduce"],
                "method.stage1.quant_reduce",
                lambda r, key: _one_of(r, key, QUANT_REDUCE),
                "mean | median",
            ),
            pairs_per_variant=per_family(
                pairs["per_variant"],
                "method.pairs.per_variant",
                lambda n, key: integer_at_least(n, key, 1),
                "an integer",
            ),
            negatives=prada_negatives(prada["negatives"]),
            generated_per_variant=integer_at_least(
                0 if n_gen is None else n_gen, "method.prada.generated_per_variant", 0, " (0 = none)"
            ),
            position_groups=integer_at_least(
                prada["position_groups"], "method.prada.position_groups", 1, " (1 = PRADA)"
            ),
        )

    @property
    def finetune_inverse(self) -> bool:
        """The inverse decoders are fine-tuned when some stage reads their tokens: Stage 1, or PRADA on them."""
        return bool(self.inverse["enabled"]) and (self.pipeline == "two_stage" or self.prada["tokens"] == "stage1")

    @property
    def needs_pairs(self) -> bool:
        """(generated image, latent, class) pairs train the inverse decoders and the top-k class classifier."""
        return self.finetune_inverse or self.class_source == "topk"

    def flags(self) -> dict[str, Any]:
        """Every setting where the sources disagree or are silent, as plain JSON (logged at the start)."""
        s1, s2, pr = self.stage1, self.stage2, self.prada
        return {
            "pipeline": self.pipeline,
            "class_source": self.class_source,
            "class_aggregate": self.class_aggregate,
            "pairs.source": self.pairs["source"],
            "pairs.per_variant": dict(self.pairs_per_variant),
            "stage1.signal": s1["signal"],
            "stage1.optimized_quant": s1["optimized_quant"],
            "stage1.alg3": dict(s1["alg3"]),
            "stage1.quantized_reconstruction": s1["quantized_reconstruction"],
            "stage1.quant_reduce": dict(self.quant_reduce),
            "stage1.threshold": dict(s1["threshold"]),
            "stage2.calibration": s2["calibration"],
            "stage2.outlier_gate": dict(s2["outlier_gate"]),
            "prada.tokens": pr["tokens"],
            "prada.negatives": list(self.negatives),
            "prada.generated_per_variant": self.generated_per_variant,
            "prada.position_groups": self.position_groups,
            "prada.threshold": pr["threshold"],
            "prada.balance": pr["balance"],
        }
