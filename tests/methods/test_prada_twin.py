"""The rarvar twin has the properties spec §9.3 asks for: task layout, exact PNG round trip of generated
images, greedy not already exact and the twin profile's Algorithm 3 beating it, own-variant likelihood advantage,
PRADA's score functions separating each model's own images from the outliers, determinism."""

from __future__ import annotations

import csv
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file

from genattr.data.rarvar import load_png
from genattr.methods.tracing.likelihood import prada_features, scale_slices
from genattr.methods.tracing.score_function import fit_score_function, score
from genattr.metrics.detection import auroc
from genattr.models.autoregressive.family import load_family
from genattr.models.tokenizers.optimized_quant import optimized_quantize, quant_loss
from genattr.twins.rarvar import LABELS, VARIANTS, build_rarvar_twin, procedural, to_uint8

CONF = Path(__file__).parents[2] / "conf"
#: the method's defaults and the twin profile's overrides of them (conf/method/prada.yaml, conf/data/rarvar.yaml)
METHOD = OmegaConf.load(CONF / "method/prada.yaml")
TWIN_PROFILE = OmegaConf.load(CONF / "data/rarvar.yaml").cpu_profile.method
#: the twin profile's PRADA position groups for single-scale tokens
POSITION_GROUPS = TWIN_PROFILE.prada.position_groups


@pytest.fixture(scope="module")
def twin() -> Path:
    """The default twin (the same cache entry the pipeline tests use), built once."""
    return build_rarvar_twin(os.environ["GENATTR_CACHE"])


@pytest.fixture(scope="module")
def families(twin: Path) -> dict:
    models = json.loads((twin / "checkpoints" / "models.json").read_text())
    return {fam: load_family(entry, twin / "checkpoints") for fam, entry in models.items()}


def _meta(twin: Path) -> list[dict]:
    with open(twin / "hidden" / "metadata.csv") as fh:
        return list(csv.DictReader(fh))


def _path(twin: Path, r: dict) -> Path:
    return (
        twin / r["split"] / r["image_name"]
        if r["split"] == "test"
        else twin / r["split"] / r["label"] / r["image_name"]
    )


def test_task_layout(twin: Path) -> None:
    assert sorted(p.name for p in (twin / "train").iterdir()) == sorted(VARIANTS)
    assert sorted(p.name for p in (twin / "val").iterdir()) == sorted(LABELS)
    assert all(p.suffix == ".png" for p in (twin / "test").iterdir())
    with open(twin / "test_labels.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["image_name"] for r in rows} == {p.name for p in (twin / "test").iterdir()}
    share = sum(r["label"] == "outlier" for r in rows) / len(rows)
    assert 0.35 < share < 0.55  # the ≈45% outlier share of the real test set
    meta = _meta(twin)
    kinds = {r["outlier_kind"] for r in meta if r["label"] == "outlier"}
    assert kinds == {"procedural", "unknown_family", "reconstruction"}
    assert not any(r["label"] == "outlier" for r in meta if r["split"] == "train")
    size = json.loads((twin / "twin.json").read_text())["image_size"]
    assert Image.open(_path(twin, meta[0])).size == (size, size)


def test_generated_pngs_are_exact_truncated_decoder_outputs(twin: Path, families: dict) -> None:
    meta = [r for r in _meta(twin) if r["split"] == "test" and r["outlier_kind"] in ("", "reconstruction")]
    for fam in ("var", "rar"):
        rows = [r for r in meta if r["family"] == fam][:6]
        hidden = load_file(str(twin / "hidden" / f"test_{fam}.safetensors"))
        tok = families[fam][0]
        idx = torch.tensor([int(r["row"]) for r in rows])
        with torch.no_grad():
            latent = tok.tokens_to_latent(hidden["tokens"][idx])
            again = to_uint8(tok.decode_latent(latent))
        torch.testing.assert_close(latent, hidden["latent"][idx], rtol=0, atol=0)
        for r, image in zip(rows, again, strict=True):
            png = np.asarray(Image.open(_path(twin, r)).convert("RGB"))
            assert png.dtype == np.uint8 and np.array_equal(png, image), r["image_name"]


def test_optimized_quantization_on_the_twin(twin: Path, families: dict) -> None:
    """Greedy is not exact on the twin (VAR's key difficulty); the twin profile's Algorithm 3 (rizvisaira's init
    logit 10 + keep-best) beats it on part of the images; the official settings (init 0.5, no keep-best) snap far
    from the exact latent on this tokenizer, which is why the twin profile departs from them."""
    tok = families["var"][0]
    hidden = load_file(str(twin / "hidden" / "val_var.safetensors"))
    sampled, f_z = hidden["tokens"][:16], hidden["latent"][:16]
    greedy = tok.quantize(f_z)
    # the twin keeps VAR's key difficulty: greedy does not recover sampled tokens even from the exact latent
    assert (greedy != sampled).any(1).float().mean() > 0.5
    g_loss = quant_loss(tok, f_z, greedy)
    assert (g_loss > 0).all()
    profile = OmegaConf.merge(METHOD.stage1.alg3, TWIN_PROFILE.stage1.alg3)
    opts = {**OmegaConf.to_container(profile), "tau": tuple(profile.tau)}
    assert opts["keep_best"] and opts["init_logit"] == 10.0 and opts["iters"] == 200
    o_loss = quant_loss(tok, f_z, optimized_quantize(tok, f_z, **opts))
    better = (o_loss < g_loss).float().mean()
    print("twin profile Alg. 3 beats greedy on", float(better), "of the images")
    # measured 6 of 16 (12 of 32) strictly better; zero steps or steps up the loss leave none
    assert (o_loss <= g_loss).all() and better >= 0.2
    official = {**opts, "init_logit": 0.5, "keep_best": False}
    off = optimized_quantize(tok, f_z, **official)
    print("official Alg. 3: QuantLoss", float(quant_loss(tok, f_z, off).mean()), "greedy", float(g_loss.mean()))
    assert quant_loss(tok, f_z, off).mean() > 3 * g_loss.mean()  # measured 10x; recovery 10 % vs greedy's 52 %


def test_own_variant_likelihood_advantage(twin: Path, families: dict) -> None:
    meta = [r for r in _meta(twin) if r["split"] in ("val", "test") and r["outlier_kind"] == ""]
    for fam, (_, gens) in families.items():
        names = list(gens)
        adv = torch.zeros(len(names), len(names))
        for split in ("val", "test"):
            hidden = load_file(str(twin / "hidden" / f"{split}_{fam}.safetensors"))
            rows = [r for r in meta if r["family"] == fam and r["split"] == split]
            idx = torch.tensor([int(r["row"]) for r in rows])
            tokens, labels = hidden["tokens"][idx], hidden["labels"][idx]
            own = torch.tensor([names.index(r["label"]) for r in rows])
            ll = []
            with torch.no_grad():
                for name in names:
                    g = gens[name]
                    guided = g.guided_logits(
                        g.token_logits(tokens, labels), g.token_logits(tokens, torch.full_like(labels, g.null_class))
                    )  # noqa: E501
                    ll.append(guided.log_softmax(-1).gather(-1, tokens[..., None])[..., 0].mean(1))
            ll = torch.stack(ll, 1)  # [N, variants]
            for m in range(len(names)):
                adv[m] += (ll[own == m, m : m + 1] - ll[own == m]).sum(0)
        off = ~torch.eye(len(names), dtype=torch.bool)
        assert (adv[off] > 0).all(), f"{fam}: own-variant advantage matrix\n{adv}"


def _prada(gen: torch.nn.Module, tokens: np.ndarray, classes: np.ndarray) -> np.ndarray:
    return prada_features(gen, tokens, classes, batch_size=64, device=torch.device("cpu"))


def test_prada_score_functions_separate_own_images_from_outliers(twin: Path, families: dict) -> None:
    """Spec §9.3.6 in PRADA's own protocol (spec §7: 250 own-model images vs 250 real images, class known): each
    model's score function is fit on 250 of its own fresh samples against 250 procedural "real" images through
    the family's tokenizer, then must rank its val + test images above the val + test outliers (spec: AUROC
    > 0.9). Sampled tokens isolate the twin's CFG shift of ℓ_c − ℓ_u from token recovery, which the e2e test
    covers. RAR tokens get the twin profile's position groups (``method.prada.position_groups``): the power-cosine
    ramp puts the shift in the late tokens."""
    meta = _meta(twin)
    outliers = [r for r in meta if r["label"] == "outlier" and r["split"] in ("val", "test")]
    out_images = torch.stack([load_png(_path(twin, r)) for r in outliers]).float() / 255
    out_cls = np.asarray([[int(r["class_id"])] for r in outliers])
    real, real_cls = procedural(250, out_images.shape[-1], 10, 0, "prada-real")
    own_cls = torch.arange(250) % 10
    reached = {}
    acc = Accelerator(cpu=True)
    for fam, (tok, gens) in families.items():
        hidden = {s: load_file(str(twin / "hidden" / f"{s}_{fam}.safetensors")) for s in ("val", "test")}
        with torch.no_grad():
            out_tok, real_tok = tok.encode_tokens(out_images).numpy(), tok.encode_tokens(real).numpy()
        scales = scale_slices(list(getattr(tok, "patch_nums", [])) or None, out_tok.shape[1], POSITION_GROUPS)
        for name, g in gens.items():
            own = _prada(g, g.sample(own_cls, torch.Generator().manual_seed(123)).numpy(), own_cls[:, None].numpy())
            neg = _prada(g, real_tok, real_cls.numpy()[:, None])
            x, y = np.concatenate([own, neg]), np.r_[np.ones(len(own)), np.zeros(len(neg))]
            sf, _ = fit_score_function(x, y, scales, acc=acc, epochs=200, lr=1e-2)
            held = []
            for s in ("val", "test"):
                rows = [int(r["row"]) for r in meta if r["split"] == s and r["label"] == name]
                held.append(_prada(g, hidden[s]["tokens"][rows].numpy(), hidden[s]["labels"][rows, None].numpy()))
            h, o = score(sf, np.concatenate(held)), score(sf, _prada(g, out_tok, out_cls))
            reached[name] = 100 * auroc(np.r_[np.ones(len(h)), np.zeros(len(o))], np.r_[h, o])
    print("PRADA own-vs-outlier AUROC per model (sampled tokens):", reached)
    # measured on the version-6 twin with 4 position groups: var 100 each; rar 100 / 94 / 93 / 95. With one group
    # (PRADA's RAR S = 1): rar 98 / 89 / 91 / 92; on the version-5 twin (half the RAR guidance) 92 / 76 / 82 / 85.
    # With PRADA's noise on each stage's combined input (issue 16), on a second machine's v6 build: var 100 / 99.7 /
    # 100 / 100, rar 94.4 / 98.0 / 91.2 / 95.1 (noise on ℓ_c and ℓ_u separately, as before: rar 93.7 / 98.0 / 88.8
    # / 93.0; one group with w fixed to 1: rar 92.4 / 97.8 / 91.6 / 91.2)
    assert all(v > 90.0 for v in reached.values()), reached


def test_twin_is_deterministic(tmp_path: Path) -> None:
    micro = dict(n_train=1, n_val=1, n_test=12, n_proc=20, tok_steps=3, gen_steps=2)

    def digest(root: Path) -> str:
        h = hashlib.sha256()
        for p in sorted(root.rglob("*")):
            if p.is_file() and p.name != "twin.json":
                h.update(p.relative_to(root).as_posix().encode())
                h.update(p.read_bytes())
        return h.hexdigest()

    a = build_rarvar_twin(tmp_path / "a", **micro)
    b = build_rarvar_twin(tmp_path / "b", **micro)
    assert digest(a) == digest(b)
    assert len(list((a / "test").iterdir())) == 12
