"""Synthetic twin of the model-tracer task (RAR / VAR variants + outliers), written in the task's own layout.

Why: the real task needs 10 released checkpoints (≈6 GB) and a GPU; the twin trains two tiny tokenizer
families (``tinyrar`` single-scale, ``tinyvar`` multi-scale residual) and four depth variants of an
autoregressive generator per family on procedural images, so the whole pipeline runs on a CPU in minutes and
tests can assert real separations (spec §9).

Folder layout (``cached_twin(cache, "rarvar", params, ...)`` → ``<root>``)::

    <root>/
      twin.json                       manifest (params, counts, image_size)
      train/<label>/<name>.png        8 labels: var16 var20 var24 var30 rarb rarl rarxl rarxxl (no outlier)
      val/<label>/<name>.png          9 labels: the 8 above + outlier
      test/<name>.png                 flat, unlabelled
      test_labels.csv                 HIDDEN: image_name,label (the scorer's answer key)
      hidden/metadata.csv             HIDDEN: split,image_name,label,family,class_id,outlier_kind,row
                                      family: var|rar|"" ; outlier_kind: ""|procedural|unknown_family|reconstruction
                                      row: index into hidden/<split>_<family>.safetensors (-1 if none)
      hidden/<split>_<family>.safetensors
                                      tokens [N, L] int64 (sampled, or greedy for reconstructions),
                                      latent [N, C, h, w] float32 (exact f_Z = tokens_to_latent(tokens)),
                                      labels [N] int64 (class id)
      checkpoints/models.json         how to build every model: {"var": {"tokenizer": {_target_ + kwargs},
                                      "tokenizer_checkpoint": "var/tokenizer.safetensors",
                                      "variants": {"var16": {"generator": {_target_ + kwargs},
                                      "checkpoint": "var/var16.safetensors"}, ...}}, "rar": {...}}
                                      (the same structure as ``conf/model/prada_real.yaml``, whose checkpoint
                                      entries name the upstream files, e.g. ``vae_ch160v4096z32.pth``)
      checkpoints/var/tokenizer.safetensors, checkpoints/var/var{16,20,24,30}.safetensors
      checkpoints/rar/tokenizer.safetensors, checkpoints/rar/rar{b,l,xl,xxl}.safetensors

Both twin and real checkpoints load through ``genattr.models.tokenizers.checkpoint.load_tokenizer_checkpoint``
/ ``load_generator_checkpoint`` (safetensors or weights-only torch pickles). The unknown third family that
makes the ``unknown_family`` outliers is NOT in ``checkpoints/`` (the method must not see it).

Twin images are ``image_size`` × ``image_size`` (32 by default, spec §9.1); the real dataset is 256×256. The
size check lives in the task loader (``genattr/data/rarvar.py``), which takes the expected size from config
(the twin profile sets it to the twin's ``image_size``).
"""

from __future__ import annotations

import csv
import json
import logging
from collections.abc import Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from genattr.models.autoregressive.family import build_model
from genattr.models.tokenizers.checkpoint import save_checkpoint
from genattr.twins.cache import cached_twin
from genattr.twins.content import domain_style, name_seed, render
from genattr.twins.rarvar_train import train_generator, train_tokenizer
from genattr.twins.spec import Twin
from genattr.utils.io import cache_dir as default_cache_dir

log = logging.getLogger(__name__)

GENERATOR_VERSION = 6
VARIANTS = ("var16", "var20", "var24", "var30", "rarb", "rarl", "rarxl", "rarxxl")
LABELS = (*VARIANTS, "outlier")
FAMILY_OF = {v: ("var" if v.startswith("var") else "rar") for v in VARIANTS}
OUTLIER_KINDS = ("procedural", "unknown_family", "reconstruction")

_VAR = "genattr.models.autoregressive.var.VARGenerator"
#: extra tokenizer terms per family (see rarvar_train): the latent cycle term for the multi-scale family, a weak
#: code cross-entropy for the single-scale one (token recovery from the PNGs ≈28 % → ≈96 %; at weight 1 the data
#: tokens become so predictable that the four variants sample alike)
_TOK_TERMS: dict[str, dict[str, float]] = {"var": {"cycle": 1.0}, "rar": {"code_ce": 0.1}, "unknown": {}}
_RAR = "genattr.models.autoregressive.rar.RARGenerator"


def twin_models(image_size: int, num_classes: int) -> dict[str, dict[str, Any]]:
    """The ``models.json`` mapping of the twin: tiny configs of the real classes, depths 1-4 per family.

    Sampling settings use CFG > 1 everywhere (PRADA needs a shifted ℓ_c − ℓ_u); RAR variants differ in (w, pow,
    T) like the released sizes do, VAR variants share cfg / top-k like VAR's FID settings.
    """
    down = 4  # two stride-2 stages: 32 → 8
    side = image_size // down
    var_tok = {
        "_target_": "genattr.models.tokenizers.multi_scale.MultiScaleVQ",
        "vocab_size": 256, "z_channels": 8, "ch": 8, "ch_mult": [1, 2, 2], "num_res_blocks": 1,
        "share_quant_resi": 2, "patch_nums": [1, 2, side // 2, side], "using_sa": False, "norm_groups": 4,
    }  # fmt: skip
    rar_tok = {
        "_target_": "genattr.models.tokenizers.single_scale.SingleScaleVQ",
        "hidden_channels": 8, "channel_mult": [1, 2, 2], "num_res_blocks": 1, "z_channels": 16,
        "codebook_size": 128, "image_size": image_size, "norm_groups": 4,
    }  # fmt: skip
    n_var = sum(p * p for p in var_tok["patch_nums"])
    out: dict[str, dict[str, Any]] = {
        "var": {"tokenizer": var_tok, "tokenizer_checkpoint": "var/tokenizer.safetensors", "variants": {}},
        "rar": {"tokenizer": rar_tok, "tokenizer_checkpoint": "rar/tokenizer.safetensors", "variants": {}},
    }
    # (w, pow, T): the released sizes' pow and T, w at 0.4-0.6× of their (16, 15.5, 6.9, 8). Version 6 doubled w
    # from (3, 2.75, 2, 2.5): the power-cosine ramp guides mostly late tokens, and at half these scales PRADA's
    # ℓ_c − ℓ_u shift was too small for own-vs-outlier AUROC > 0.9 on rarl / rarxl / rarxxl
    rar_sampling = {
        "rarb": (6.0, 2.75, 1.0),
        "rarl": (5.5, 2.5, 1.02),
        "rarxl": (4.0, 1.5, 1.02),
        "rarxxl": (5.0, 1.2, 1.02),
    }
    for depth, name in enumerate(("var16", "var20", "var24", "var30"), start=1):
        gen = {
            "_target_": _VAR, "depth": depth, "embed_dim": 64, "num_heads": 4, "vocab_size": 256, "Cvae": 8,
            "patch_nums": var_tok["patch_nums"], "num_classes": num_classes, "drop_path_rate": 0.0,
            "cond_drop_rate": 0.1, "cfg": 2.0, "top_k": 128, "top_p": 0.0,
        }  # fmt: skip
        out["var"]["variants"][name] = {"generator": gen, "checkpoint": f"var/{name}.safetensors", "num_tokens": n_var}
    for depth, name in enumerate(("rarb", "rarl", "rarxl", "rarxxl"), start=1):
        w, pw, t = rar_sampling[name]
        gen = {
            "_target_": _RAR, "hidden_size": 64, "depth": depth, "num_heads": 4, "intermediate_size": 256,
            "image_seq_len": side * side, "codebook_size": 128, "num_classes": num_classes, "dropout": 0.0,
            "attn_drop": 0.0, "pos_pad": 2, "timestep_pad": 2, "cond_drop_rate": 0.1,
            "guidance_scale": w, "guidance_scale_pow": pw, "temperature": t,
        }  # fmt: skip
        out["rar"]["variants"][name] = {"generator": gen, "checkpoint": f"rar/{name}.safetensors"}
    return out


def _unknown_tokenizer(image_size: int) -> dict[str, Any]:
    """The third family (never shipped in ``checkpoints/``): another architecture, latent 16×16×8, 64 codes."""
    return {
        "_target_": "genattr.models.tokenizers.single_scale.SingleScaleVQ",
        "hidden_channels": 12, "channel_mult": [1, 2], "num_res_blocks": 1, "z_channels": 8,
        "codebook_size": 64, "image_size": image_size, "norm_groups": 4,
    }  # fmt: skip


@contextmanager
def _deterministic() -> Any:
    """Single thread + deterministic kernels while building, restoring the caller's settings."""
    threads, det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(det)


def procedural(n: int, size: int, num_classes: int, seed: int, tag: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` procedural images [n, 3, size, size] in [0, 1] with class labels (class k = its own style)."""
    labels = np.arange(n) % num_classes
    imgs = np.zeros((n, size, size, 3), np.float32)
    for k in range(num_classes):
        idx = np.flatnonzero(labels == k)
        if len(idx):
            rng = np.random.default_rng([seed, name_seed("rarvar", tag, k)])
            imgs[idx] = render(rng, len(idx), size, domain_style("rarvar", f"class{k}"))
    return torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels).long()


def to_uint8(images01: torch.Tensor) -> np.ndarray:
    """The generators' ``x.mul(255)`` cast: truncation, not rounding. [B, 3, H, W] → [B, H, W, 3] uint8."""
    return images01.clamp(0, 1).mul(255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _write_png(path: Path, image: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, compress_level=1)


def _generate(
    out: Path,
    *,
    image_size: int,
    num_classes: int,
    n_train: int,
    n_val: int,
    n_test: int,
    outlier_frac: float,
    n_proc: int,
    tok_steps: int,
    gen_steps: int,
    seed: int,
) -> dict[str, Any]:
    from safetensors.torch import save_file

    models = twin_models(image_size, num_classes)
    ckpt = out / "checkpoints"
    proc, proc_labels = procedural(n_proc, image_size, num_classes, seed, "train")

    # ---- tokenizers (two known families + the unknown one) --------------------------------------------
    toks: dict[str, torch.nn.Module] = {}
    specs = {
        "var": models["var"]["tokenizer"],
        "rar": models["rar"]["tokenizer"],
        "unknown": _unknown_tokenizer(image_size),
    }
    for fam, spec in specs.items():
        torch.manual_seed(name_seed(seed, "tok", fam))
        tok = build_model(spec)
        steps = tok_steps if fam != "unknown" else max(tok_steps // 2, 1)
        curve = train_tokenizer(
            tok, proc, steps=steps, batch=16, lr=3e-3, seed=name_seed(seed, "tok-data", fam), **_TOK_TERMS[fam]
        )
        log.info("rarvar twin: %s tokenizer loss %.4f → %.4f", fam, curve[0], curve[-1])
        toks[fam] = tok.requires_grad_(False)
        if fam != "unknown":
            save_checkpoint(tok, ckpt / models[fam]["tokenizer_checkpoint"])

    # ---- generators ---------------------------------------------------------------------------------------
    gens: dict[str, torch.nn.Module] = {}
    for fam in ("var", "rar"):
        with torch.no_grad():
            fam_tokens = toks[fam].encode_tokens(proc)
        for name, spec in models[fam]["variants"].items():
            torch.manual_seed(name_seed(seed, "gen", name))
            gen = build_model(spec["generator"])
            if hasattr(gen, "attach_tokenizer"):
                gen.attach_tokenizer(toks[fam])
            curve = train_generator(
                gen, fam_tokens, proc_labels, steps=gen_steps, batch=16, lr=3e-3, seed=name_seed(seed, "gen-data", name)
            )
            log.info("rarvar twin: %s loss %.3f → %.3f", name, curve[0], curve[-1])
            gens[name] = gen.requires_grad_(False)
            save_checkpoint(gen, ckpt / spec["checkpoint"])
    (ckpt / "models.json").write_text(json.dumps(models, indent=1))

    # ---- plan: which image goes where -------------------------------------------------------------------
    n_test_out = round(n_test * outlier_frac)
    per_variant_test = [
        (n_test - n_test_out) // len(VARIANTS) + (i < (n_test - n_test_out) % len(VARIANTS))
        for i in range(len(VARIANTS))
    ]
    rng = np.random.default_rng([seed, 7])
    records: list[dict[str, Any]] = []  # split, label, family, class_id, outlier_kind, image (uint8), tokens, latent
    hidden: dict[tuple[str, str], list[tuple[torch.Tensor, torch.Tensor, int]]] = {}

    def add(
        split: str, label: str, image: np.ndarray, *, family: str, cls: int, kind: str, tokens=None, latent=None
    ) -> None:
        row = -1
        if tokens is not None:
            bucket = hidden.setdefault((split, family), [])
            row = len(bucket)
            bucket.append((tokens, latent, cls))
        records.append(
            dict(split=split, label=label, family=family, class_id=cls, outlier_kind=kind, row=row, image=image)
        )

    # generated images: exact fp32 decoder outputs of sampled tokens, truncated to uint8
    for vi, name in enumerate(VARIANTS):
        fam = FAMILY_OF[name]
        counts = {"train": n_train, "val": n_val, "test": per_variant_test[vi]}
        total = sum(counts.values())
        labels = torch.from_numpy(rng.integers(0, num_classes, total)).long()
        g = torch.Generator().manual_seed(name_seed(seed, "sample", name))
        with torch.no_grad():
            tokens = gens[name].sample(labels, g)
            latent = toks[fam].tokens_to_latent(tokens)
            images = to_uint8(toks[fam].decode_latent(latent))
        i = 0
        for split, n in counts.items():
            for _ in range(n):
                add(split, name, images[i], family=fam, cls=int(labels[i]), kind="", tokens=tokens[i], latent=latent[i])
                i += 1

    # outliers: procedural, unknown family, known-family reconstructions of non-generated images
    n_out = {"val": n_val, "test": n_test_out}
    for split, n in n_out.items():
        kinds = [OUTLIER_KINDS[i % 3] for i in range(n)]
        k_proc = kinds.count("procedural")
        k_unk = kinds.count("unknown_family")
        k_rec = kinds.count("reconstruction")
        imgs, labs = procedural(k_proc + k_unk + k_rec, image_size, num_classes, seed, f"outlier-{split}")
        perm = torch.from_numpy(rng.permutation(len(imgs)))
        imgs, labs = imgs[perm], labs[perm]
        p_imgs, u_imgs, r_imgs = imgs[:k_proc], imgs[k_proc : k_proc + k_unk], imgs[k_proc + k_unk :]
        p_lab, u_lab, r_lab = labs[:k_proc], labs[k_proc : k_proc + k_unk], labs[k_proc + k_unk :]
        for j, im in enumerate(to_uint8(p_imgs)):
            add(split, "outlier", im, family="", cls=int(p_lab[j]), kind="procedural")
        with torch.no_grad():
            unk = toks["unknown"]
            ut = unk.encode_tokens(u_imgs)
            gu = torch.Generator().manual_seed(name_seed(seed, "unknown", split))
            resample = torch.rand(ut.shape, generator=gu) < 0.25  # a different "generator" on another AE
            ut = torch.where(resample, torch.randint(unk.vocab_size, ut.shape, generator=gu), ut)
            for j, im in enumerate(to_uint8(unk.decode_tokens(ut))):
                add(split, "outlier", im, family="", cls=int(u_lab[j]), kind="unknown_family")
            for j in range(len(r_imgs)):
                fam = ("var", "rar")[j % 2]
                rt = toks[fam].encode_tokens(r_imgs[j : j + 1])
                rl = toks[fam].tokens_to_latent(rt)
                im = to_uint8(toks[fam].decode_latent(rl))[0]
                add(
                    split,
                    "outlier",
                    im,
                    family=fam,
                    cls=int(r_lab[j]),
                    kind="reconstruction",
                    tokens=rt[0],
                    latent=rl[0],
                )

    # ---- write the task layout --------------------------------------------------------------------------
    order = rng.permutation(len(records))
    meta_rows, answer = [], []
    for serial, r_i in enumerate(order):
        r = records[r_i]
        name = f"img_{serial:05d}.png"
        r["image_name"] = name
        if r["split"] == "test":
            _write_png(out / "test" / name, r["image"])
            answer.append((name, r["label"]))
        else:
            _write_png(out / r["split"] / r["label"] / name, r["image"])
        meta_rows.append(r)
    for split in ("train", "val"):  # every label folder exists even if empty
        for lab in VARIANTS if split == "train" else LABELS:
            (out / split / lab).mkdir(parents=True, exist_ok=True)
    with open(out / "test_labels.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["image_name", "label"])
        w.writerows(sorted(answer))
    (out / "hidden").mkdir(exist_ok=True)
    with open(out / "hidden" / "metadata.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        cols = ["split", "image_name", "label", "family", "class_id", "outlier_kind", "row"]
        w.writerow(cols)
        for r in sorted(meta_rows, key=lambda r: (r["split"], r["image_name"])):
            w.writerow([r[c] for c in cols])
    for (split, fam), rows in hidden.items():
        save_file(
            {
                "tokens": torch.stack([t for t, _, _ in rows]).contiguous(),
                "latent": torch.stack([lt for _, lt, _ in rows]).contiguous(),
                "labels": torch.tensor([c for _, _, c in rows], dtype=torch.long),
            },
            str(out / "hidden" / f"{split}_{fam}.safetensors"),
        )
    counts = {s: sum(r["split"] == s for r in records) for s in ("train", "val", "test")}
    return {"counts": counts, "image_size": image_size, "labels": list(LABELS), "num_classes": num_classes}


#: Default (pipeline) scale; tests may pass smaller values. Every key is part of the cache key.
DEFAULTS: dict[str, Any] = dict(
    image_size=32,
    num_classes=10,
    n_train=16,
    n_val=8,
    n_test=96,
    outlier_frac=0.45,
    n_proc=256,
    tok_steps=120,
    gen_steps=400,
    seed=0,
)


def build_rarvar_twin(cache_dir: str | Path | None = None, **overrides: Any) -> Path:
    """Generate (once) and return the twin root folder in the task layout described in the module docstring."""
    unknown = set(overrides) - set(DEFAULTS)
    if unknown:
        from genattr.utils.errors import ConfigError

        raise ConfigError(f"unknown rarvar twin setting(s) {sorted(unknown)}; known: {sorted(DEFAULTS)}")
    params = {**DEFAULTS, **overrides}
    cache = default_cache_dir(cache_dir)

    def generate(tmp: Path) -> Mapping[str, Any]:
        with _deterministic():
            return _generate(tmp, **params)

    return cached_twin(cache, "rarvar", {**params, "version": GENERATOR_VERSION}, generate)


def rarvar_twin(
    *, data: Mapping[str, Any], model: Mapping[str, Any], params: Mapping[str, Any], cache_dir: Path
) -> Twin:
    """``conf/data/rarvar.yaml`` ``twin._target_``: the task folder with its own checkpoints and answer key.

    The twin's models are listed in its ``checkpoints/models.json`` (not in the model config) and its images have
    the twin's size, so those data keys come from the twin.
    """
    root = build_rarvar_twin(cache_dir, **params)
    info = json.loads((root / "twin.json").read_text())
    answers = {"models": None, "checkpoint_dir": None, "test_labels": "test_labels.csv"}
    return Twin(root=root, info=info, data=answers | {"image_size": int(params["image_size"])})
