"""LoRAX: LoRA eXpandable networks (Sullivan-Pao et al., 2025) on a frozen timm ConViT.

One fresh peft LoRA adapter per task (never copied from the previous one), the
backbone run once per adapter, features concatenated in task order. Old adapters run
under ``no_grad``: the original also back-propagated through them (its ``forward``
re-activates each adapter) without ever updating them, which ``reference_grad=true``
reproduces for benchmarking; the maths is identical.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import peft
import torch
from safetensors.torch import load_file
from torch import nn

from genattr.methods.continual.base import ContinualMethod
from genattr.methods.continual.network import ContinualNet
from genattr.models.adapters import EXPECTED_LORA_PARAMS_R64, convit_lora_targets, lora_parameter_count
from genattr.models.backbones import feature_dim

log = logging.getLogger(__name__)


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
    ) -> None:
        super().__init__(feature_dim(backbone))
        self.target_modules = convit_lora_targets(backbone, targets)
        cfg = {k: v for k, v in lora.items() if k != "_target_"}
        self.lora_config = peft.LoraConfig(**cfg, target_modules=self.target_modules)
        self.reference_grad = reference_grad
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

    @property
    def n_branches(self) -> int:
        return len(self.adapters)

    def add_branch(self, task: int) -> None:
        name = f"task{task}"
        if self.peft is None:
            self.peft = peft.get_peft_model(self._backbone, self.lora_config, adapter_name=name)
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
        feats = []
        grad_old = self.reference_grad and torch.is_grad_enabled()
        for name in self.adapters[:-1]:
            self.peft.set_adapter(name)
            with torch.set_grad_enabled(grad_old):
                feats.append(self.peft(x))
        # the newest adapter last: set_adapter leaves exactly it trainable
        self.peft.set_adapter(self.adapters[-1])
        feats.append(self.peft(x))
        return feats

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
        self, *, lora: Mapping[str, Any], targets: str = "gpsa_qk_v", reference_grad: bool = False, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.lora = dict(lora)
        self.targets = targets
        self.reference_grad = reference_grad

    def build_net(self, backbone: nn.Module) -> LoRAXNet:
        net = LoRAXNet(
            backbone,
            self.lora,
            self.targets,
            self.reference_grad,
            self.model_cfg.get("name"),
            self.model_cfg.get("kwargs"),
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
