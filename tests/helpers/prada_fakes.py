"""Tiny stand-ins for the tracing contract (tokenizer + generator) and a task folder written with them.

They let the pipeline tests run in seconds and independently of the real twin: each fake generator is a
per-position categorical table (its own seed), so own-variant likelihood and the CFG log-ratio carry a real,
learnable signal, and each fake tokenizer is a linear patch autoencoder with a nearest-code quantiser.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

IMG = 8  # image side
PATCH = 4  # -> 2x2 latent = 4 tokens


class FakeTokenizer(nn.Module):
    def __init__(self, family_kind: str = "rar", vocab_size: int = 16, channels: int = 6, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.family_kind = f"fake-{family_kind}"  # never triggers Algorithm 3
        self.vocab_size, self.num_tokens = vocab_size, (IMG // PATCH) ** 2
        self.encoder = nn.Conv2d(3, channels, PATCH, stride=PATCH)
        self.decoder = nn.ConvTranspose2d(channels, 3, PATCH, stride=PATCH)
        self.codebook = nn.Parameter(torch.randn(vocab_size, channels, generator=g) * 2.0)
        with torch.no_grad():
            self.encoder.weight.copy_(torch.randn(self.encoder.weight.shape, generator=g) * 0.3)
            self.decoder.weight.copy_(torch.randn(self.decoder.weight.shape, generator=g) * 0.3)

    def encode_feature(self, images01: torch.Tensor) -> torch.Tensor:
        return self.encoder(images01 * 2 - 1)

    def quantize(self, feature: torch.Tensor) -> torch.Tensor:
        b, c, h, w = feature.shape
        flat = feature.permute(0, 2, 3, 1).reshape(b, h * w, c)
        return torch.cdist(flat, self.codebook.unsqueeze(0).expand(b, -1, -1)).argmin(-1)

    def tokens_to_latent(self, tokens: torch.Tensor) -> torch.Tensor:
        b, n = tokens.shape
        s = int(n**0.5)
        return self.codebook[tokens].reshape(b, s, s, -1).permute(0, 3, 1, 2)

    def decode_latent(self, latent: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.decoder(latent))

    def encoder_modules(self) -> list[nn.Module]:
        return [self.encoder]


class FakeGenerator(nn.Module):
    def __init__(
        self, vocab_size: int = 16, num_tokens: int = 4, num_classes: int = 4, cfg: float = 2.0, seed: int = 0
    ):
        super().__init__()
        g = torch.Generator().manual_seed(1000 + seed)
        self.num_classes, self.null_class, self.num_tokens, self.cfg = num_classes, num_classes, num_tokens, cfg
        self.table = nn.Parameter(torch.randn(num_classes + 1, num_tokens, vocab_size, generator=g) * 1.5)

    def token_logits(self, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.table[labels]

    def guided_logits(self, cond: torch.Tensor, uncond: torch.Tensor) -> torch.Tensor:
        return (1 + self.cfg) * cond - self.cfg * uncond

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        lg = self.guided_logits(self.table[labels], self.table[torch.full_like(labels, self.null_class)])
        probs = lg.softmax(-1).reshape(-1, lg.shape[-1])
        return torch.multinomial(probs, 1, generator=generator).reshape(lg.shape[:2])


FAMILY_VARIANTS = {"var": ("var16", "var20", "var24", "var30"), "rar": ("rarb", "rarl", "rarxl", "rarxxl")}


def _save_png(img: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img.permute(1, 2, 0).numpy()).save(path)


def write_fake_task(root: Path, *, n_train: int = 12, n_val: int = 6, n_test: int = 40, seed: int = 0) -> Path:
    """A complete task folder (images, hidden labels + metadata, checkpoints/models.json) from the fakes."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    models: dict = {}
    toks, gens = {}, {}
    for fi, (fam, variants) in enumerate(FAMILY_VARIANTS.items()):
        tok = FakeTokenizer(fam, seed=fi + 1)
        toks[fam] = tok
        (root / "checkpoints" / fam).mkdir(parents=True, exist_ok=True)
        save_file(
            {k: v.contiguous() for k, v in tok.state_dict().items()},
            str(root / "checkpoints" / fam / "tokenizer.safetensors"),
        )
        models[fam] = {
            "tokenizer": {"_target_": "helpers.prada_fakes.FakeTokenizer", "family_kind": fam, "seed": fi + 1},
            "tokenizer_checkpoint": f"{fam}/tokenizer.safetensors",
            "variants": {},
        }
        for vi, v in enumerate(variants):
            gen = FakeGenerator(seed=10 * fi + vi)
            gens[v] = gen
            save_file(
                {k: v_.contiguous() for k, v_ in gen.state_dict().items()},
                str(root / "checkpoints" / fam / f"{v}.safetensors"),
            )
            models[fam]["variants"][v] = {
                "generator": {"_target_": "helpers.prada_fakes.FakeGenerator", "seed": 10 * fi + vi},
                "checkpoint": f"{fam}/{v}.safetensors",
            }
    (root / "checkpoints" / "models.json").write_text(json.dumps(models, indent=1))
    meta_rows = []
    hidden: dict[str, dict[str, list]] = {}
    test_key = []

    def generated(v: str, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        fam = "var" if v.startswith("var") else "rar"
        labels = torch.randint(0, 4, (n,), generator=g)
        tokens = gens[v].sample(labels, g)
        fz = toks[fam].tokens_to_latent(tokens).detach()
        x = toks[fam].decode_latent(fz).detach().clamp(0, 1).mul(255).to(torch.uint8)
        return x, tokens, fz, labels

    def add(split: str, name: str, label: str, folder: Path, x: torch.Tensor, tok=None, fz=None, cls=None) -> None:
        _save_png(x, folder / name)
        fam = "" if label == "outlier" else ("var" if label.startswith("var") else "rar")
        row = -1
        if fam:
            store = hidden.setdefault(f"{split}_{fam}", {"tokens": [], "latent": [], "labels": []})
            row = len(store["tokens"])
            store["tokens"].append(tok)
            store["latent"].append(fz)
            store["labels"].append(cls)
        meta_rows.append(
            [split, name, label, fam, int(cls) if cls is not None else "", "procedural" if not fam else "", row]
        )

    for split, n in (("train", n_train), ("val", n_val), ("test", n_test // 9 + 1)):
        labels = [v for vs in FAMILY_VARIANTS.values() for v in vs] + ([] if split == "train" else ["outlier"])
        for lab in labels:
            if lab == "outlier":
                xs = [torch.randint(0, 256, (3, IMG, IMG), generator=g, dtype=torch.uint8) for _ in range(n)]
                items = [(x, None, None, None) for x in xs]
            else:
                x, t, fz, c = generated(lab, n)
                items = list(zip(x, t, fz, c, strict=True))
            for i, (x, t, fz, c) in enumerate(items):
                name = f"{split}_{lab}_{i:03d}.png"
                folder = root / "test" if split == "test" else root / split / lab
                add(split, name, lab, folder, x, t, fz, c)
                if split == "test":
                    test_key.append((name, lab))
    (root / "hidden").mkdir(exist_ok=True)
    for key, store in hidden.items():
        save_file(
            {
                "tokens": torch.stack(store["tokens"]).long(),
                "latent": torch.stack(store["latent"]).float().contiguous(),
                "labels": torch.stack(store["labels"]).long(),
            },
            str(root / "hidden" / f"{key}.safetensors"),
        )
    with open(root / "hidden" / "metadata.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["split", "image_name", "label", "family", "class_id", "outlier_kind", "row"])
        w.writerows(meta_rows)
    with open(root / "test_labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_name", "label"])
        w.writerows(test_key)
    (root / "twin.json").write_text(json.dumps({"fake": True, "image_size": IMG}))
    np.random.seed(seed)
    return root
