"""LoRAX: LoRA eXpandable networks (Sullivan-Pao et al., 2025) on a frozen timm ConViT.

One fresh peft LoRA adapter per task (never copied from the previous one), the
backbone run once per adapter, features concatenated in task order. Old adapters run
under ``no_grad``: the original also back-propagated through them (its ``forward``
re-activates each adapter) without ever updating them, which ``reference_grad=true``
reproduces for benchmarking; the maths is identical.

The adapters that need no gradient (the old ones in training, all of them in evaluation
and herding) run as *experts*: with ``experts=batched`` one pass over T copies of the batch
through the shared frozen weights, each copy adding its own adapter's low-rank update
(:class:`_Experts`), instead of T passes (``experts=sequential``). Both give the same
features: the LoRA dropout masks are drawn in the sequential order, so training is the same
too (to float rounding, from ``bmm`` against ``linear``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import peft
import torch
from peft.tuners.lora import Linear as LoraLinear
from peft.tuners.lora import LoraLayer
from safetensors.torch import load_file
from torch import nn

from genattr.methods.continual.base import ContinualMethod
from genattr.methods.continual.network import ContinualNet
from genattr.models.adapters import EXPECTED_LORA_PARAMS_R64, convit_lora_targets, lora_parameter_count
from genattr.models.backbones import feature_dim
from genattr.utils.errors import ConfigError

log = logging.getLogger(__name__)

EXPERTS = ("batched", "sequential")


def _stochastic_modules(model: nn.Module) -> list[str]:
    """Dropout / drop-path modules of ``model`` that draw random numbers in training mode."""
    return [
        name
        for name, m in model.named_modules()
        if (isinstance(m, nn.Dropout) and m.p > 0) or float(getattr(m, "drop_prob", 0.0) or 0.0) > 0
    ]


class _Experts:
    """Several adapters' forward in one pass over stacked copies of the batch.

    The T copies go through the frozen backbone as one batch of T x B with peft's adapters
    switched off; a forward hook on every LoRA layer adds copy t's update
    ``B_t A_t dropout(x_t) * scaling_t`` with two batched matrix products. The dropout masks are
    drawn before the pass, adapter after adapter and layer after layer, through the adapters'
    own dropout modules: the random stream is consumed exactly as T sequential passes consume it.
    """

    def __init__(
        self, layers: list[LoraLayer], names: list[str], masks: list[tuple[int, torch.Tensor, float]] | None
    ) -> None:
        self.layers = layers
        self.names = names
        self.masks = iter(masks) if masks is not None else None

    def hook(self, layer: nn.Module, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        n = len(self.names)
        a = torch.stack([layer.lora_A[name].weight for name in self.names])  # T x r x in
        b = torch.stack([layer.lora_B[name].weight for name in self.names])  # T x out x r
        x = args[0]
        x = (x if x.dtype == a.dtype else x.to(a.dtype)).reshape(n, -1, x.shape[-1])
        if self.masks is not None:
            index, keep, scale = next(self.masks)
            if self.layers[index] is not layer:
                raise RuntimeError("the LoRA layers ran in another order than in the recorded sequential pass")
            x = x * keep * scale
        delta = torch.bmm(torch.bmm(x, a.transpose(1, 2)), b.transpose(1, 2))
        scalings = [layer.scaling[name] for name in self.names]
        if len(set(scalings)) == 1:
            delta = delta * scalings[0]
        else:
            delta = delta * torch.tensor(scalings, dtype=delta.dtype, device=delta.device).view(n, 1, 1)
        return (output + delta.reshape(output.shape)).to(output.dtype)


class LoRAXNet(ContinualNet):
    """A frozen backbone with one named peft adapter (``task{i}``) per task."""

    def __init__(
        self,
        backbone: nn.Module,
        lora: Mapping[str, Any],
        targets: str,
        reference_grad: bool,
        model_name: str | None = None,
        model_kwargs: Mapping[str, Any] | None = None,
        *,
        experts: str,
    ) -> None:
        super().__init__(feature_dim(backbone))
        self.target_modules = convit_lora_targets(backbone, targets)
        cfg = {k: v for k, v in lora.items() if k != "_target_"}
        self.lora_config = peft.LoraConfig(**cfg, target_modules=self.target_modules)
        self.reference_grad = reference_grad
        if experts not in EXPERTS:
            raise ConfigError(f"method.experts={experts!r} is not one of {', '.join(EXPERTS)}.")
        if experts == "batched":
            self._check_batchable(backbone)
        self.experts = experts
        self.adapter_params = lora_parameter_count(backbone, self.target_modules, self.lora_config.r)
        # the paper's per-adapter counts hold for the released architectures only
        resized = set(model_kwargs or {}) & {"depth", "embed_dim", "num_heads", "local_up_to_layer"}
        expected = None if resized else EXPECTED_LORA_PARAMS_R64.get(model_name or "")
        if expected and targets == "gpsa_qk_v" and self.lora_config.r == 64 and self.adapter_params != expected:
            raise RuntimeError(
                f"{model_name} LoRA adapter has {self.adapter_params} parameters, the paper's {expected}; "
                "timm's ConViT layout changed"
            )
        for p in backbone.parameters():
            p.requires_grad_(False)
        self._backbone = backbone
        self.peft: nn.Module | None = None
        self.adapters: list[str] = []
        self._lora_layers: list[LoraLayer] = []
        # input shape -> (LoRA layer index, input shape) of every LoRA layer call of one pass, in call order
        self._plans: dict[tuple[Any, ...], list[tuple[int, torch.Size]]] = {}

    def _check_batchable(self, backbone: nn.Module) -> None:
        """Batched experts are exact for plain LoRA on a backbone that draws no random numbers."""
        if self.lora_config.use_dora or self.lora_config.lora_bias:
            raise ConfigError(
                "method.experts=batched supports plain LoRA only (no use_dora or lora_bias in method.lora)."
            )
        stochastic = _stochastic_modules(backbone)
        if stochastic:
            raise ConfigError(
                f"method.experts=batched needs a backbone without dropout or drop-path (found {stochastic[:3]}, "
                "set in model.kwargs): its masks would differ from sequential passes; use method.experts=sequential."
            )

    @property
    def n_branches(self) -> int:
        return len(self.adapters)

    def add_branch(self, task: int) -> None:
        name = f"task{task}"
        if self.peft is None:
            self.peft = peft.get_peft_model(self._backbone, self.lora_config, adapter_name=name)
            self._lora_layers = [m for m in self.peft.modules() if isinstance(m, LoraLayer)]
            if self.experts == "batched" and not all(type(m) is LoraLinear for m in self._lora_layers):
                raise ConfigError("method.experts=batched supports LoRA on nn.Linear targets only (method.targets).")
        else:
            self.peft.add_adapter(name, self.lora_config)
        self.adapters.append(name)
        self.peft.set_adapter(name)  # trainable: this adapter only
        counted = sum(p.numel() for n, p in self.peft.named_parameters() if f".{name}." in n)
        if counted != self.adapter_params:
            raise RuntimeError(f"adapter {name} has {counted} parameters, expected {self.adapter_params}")

    def new_aux_head(self, out_features: int) -> nn.Linear:
        """The div head keeps ``nn.Linear``'s own init (``reset_div_head`` in ``LoRAX/models/convit_lorax.py``),
        unlike the expanding head, which is kaiming-uniform with a zero bias."""
        return nn.Linear(self.feature_dim, out_features)

    def branch_features(self, x: torch.Tensor) -> list[torch.Tensor]:
        assert self.peft is not None
        grad = torch.is_grad_enabled()
        if self.reference_grad and grad:  # the original: every adapter's pass recorded for the backward
            return self._sequential(x, self.adapters, grad=True)
        # the newest adapter trains: it runs alone (last, as in the original) when a gradient is wanted
        experts = self.adapters[:-1] if grad else self.adapters
        feats: list[torch.Tensor] = []
        if experts:
            with torch.no_grad():
                if self.experts == "batched" and len(experts) > 1 and self._plan(x) is not None:
                    feats = self._batched(x, experts)
                else:
                    feats = self._sequential(x, experts, grad=False)
        if grad:
            self.peft.set_adapter(self.adapters[-1])  # leaves exactly the newest adapter trainable
            feats.append(self.peft(x))
        return feats

    def _sequential(self, x: torch.Tensor, names: list[str], grad: bool) -> list[torch.Tensor]:
        """One backbone pass per adapter; the first records the LoRA layer calls for batched passes."""
        feats = []
        with torch.set_grad_enabled(grad):
            for j, name in enumerate(names):
                self.peft.set_adapter(name)
                with self._recording(x) if j == 0 else contextlib.nullcontext():
                    feats.append(self.peft(x))
        self.peft.set_adapter(self.adapters[-1])
        return feats

    def _plan_key(self, x: torch.Tensor) -> tuple[Any, ...]:
        return (tuple(x.shape), x.dtype, x.device)

    def _dropout_active(self) -> bool:
        drops = (layer.lora_dropout[n] for layer in self._lora_layers for n in self.adapters)
        return any(isinstance(d, nn.Dropout) and d.training and d.p > 0 for d in drops)

    def _plan(self, x: torch.Tensor) -> list[tuple[int, torch.Size]] | None:
        """The LoRA layer calls of one pass over ``x`` (only needed, and only known after one
        sequential pass over an input of this shape, when LoRA dropout draws masks)."""
        if not self._dropout_active():
            return []
        return self._plans.get(self._plan_key(x))

    @contextlib.contextmanager
    def _recording(self, x: torch.Tensor) -> Iterator[None]:
        """Record which LoRA layer sees which input shape, in call order, during one pass over ``x``."""
        key = self._plan_key(x)
        if self.experts != "batched" or key in self._plans:
            yield
            return
        index = {id(layer): i for i, layer in enumerate(self._lora_layers)}
        calls: list[tuple[int, torch.Size]] = []

        def record(layer: nn.Module, args: tuple[Any, ...]) -> None:
            calls.append((index[id(layer)], args[0].shape))

        handles = [layer.register_forward_pre_hook(record) for layer in self._lora_layers]
        try:
            yield
        finally:
            for h in handles:
                h.remove()
        self._plans[key] = calls

    def _masks(self, x: torch.Tensor, names: list[str]) -> list[tuple[int, torch.Tensor, float]] | None:
        """Every LoRA dropout mask of the passes over ``names`` (keep flags and scale per layer call),
        drawn by the adapters' own dropout modules in the sequential order: adapter, then layer."""
        plan = self._plan(x)
        if not plan:
            return None
        drawn: list[list[tuple[torch.Tensor, float]]] = []
        for name in names:
            row = []
            for i, shape in plan:
                layer = self._lora_layers[i]
                drop = layer.lora_dropout[name]
                p = drop.p if isinstance(drop, nn.Dropout) and drop.training else 0.0
                ones = torch.ones(shape, dtype=layer.lora_A[name].weight.dtype, device=x.device)
                row.append((drop(ones) != 0, 1.0 / (1.0 - p)))
            drawn.append(row)
        masks = []
        for k, (i, shape) in enumerate(plan):
            scales = {row[k][1] for row in drawn}
            if len(scales) != 1:
                raise RuntimeError("batched experts need one LoRA dropout rate for all adapters")
            keep = torch.stack([row[k][0] for row in drawn]).reshape(len(names), -1, shape[-1])
            masks.append((i, keep, scales.pop()))
        return masks

    def _batched(self, x: torch.Tensor, names: list[str]) -> list[torch.Tensor]:
        """The features of every adapter in ``names`` from one pass over ``len(names)`` copies of ``x``."""
        experts = _Experts(self._lora_layers, names, self._masks(x, names))
        handles = [layer.register_forward_hook(experts.hook) for layer in self._lora_layers]
        for layer in self._lora_layers:
            layer.enable_adapters(False)
        try:
            out = self.peft(x.repeat(len(names), *[1] * (x.dim() - 1)))
        finally:
            for h in handles:
                h.remove()
            for layer in self._lora_layers:
                layer.enable_adapters(True)  # re-activates (and makes trainable) the active adapter only
        return list(out.chunk(len(names)))

    def branch_parameters(self) -> list[nn.Parameter]:
        name = self.adapters[-1]
        return [p for n, p in self.peft.named_parameters() if f".{name}." in n]

    def save_branches(self, folder: Path) -> None:
        self.peft.save_pretrained(str(folder / "adapters"), selected_adapters=list(self.adapters))

    def load_branches(self, folder: Path) -> None:
        for name in self.adapters:
            sub = folder / "adapters" / name if name != "default" else folder / "adapters"
            state = load_file(str(sub / "adapter_model.safetensors"))
            result = peft.set_peft_model_state_dict(self.peft, state, adapter_name=name)
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise RuntimeError(f"adapter {sub} has unexpected keys {unexpected[:3]}")
        self.peft.set_adapter(self.adapters[-1])


class LoRAX(ContinualMethod):
    """LoRAX hyper-parameters (``conf/method/lorax.yaml``) + the shared continual loop."""

    def __init__(
        self,
        *,
        lora: Mapping[str, Any],
        targets: str = "gpsa_qk_v",
        reference_grad: bool = False,
        experts: str,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.lora = dict(lora)
        self.targets = targets
        self.reference_grad = reference_grad
        self.experts = experts

    def build_net(self, backbone: nn.Module) -> LoRAXNet:
        net = LoRAXNet(
            backbone,
            self.lora,
            self.targets,
            self.reference_grad,
            self.model_cfg.get("name"),
            self.model_cfg.get("kwargs"),
            experts=self.experts,
        )
        log.info(
            "LoRAX targets (%d layers): %s; %d LoRA parameters per adapter",
            len(net.target_modules),
            net.target_modules,
            net.adapter_params,
        )
        self._adapter_params = net.adapter_params
        return net

    def params(self) -> dict[str, Any]:
        return {"lora_params_per_adapter": getattr(self, "_adapter_params", None)}
