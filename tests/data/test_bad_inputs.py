"""The bad-input corpus (tests/helpers/bad_inputs.py) against every loader that reads each kind.

Every case ends in a one-line ``DataError`` / ``ConfigError`` that names the file, row or key, in a
counted skip under ``data.on_bad_image=skip``, or (unusual but valid images) in RGB pixels equal to
what the originals' ``Image.open(..).convert("RGB")`` gives: never a raw traceback. Scan-time kinds
must fail while the dataset is built, i.e. before any training step. The README's bad-input table
is this matrix.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from datasets import Dataset, DatasetDict, Value
from helpers.bad_inputs import (
    ALL_KINDS,
    ARRAY_KINDS,
    IMAGE_KINDS,
    OTHER_KINDS,
    WRONG_TYPE_VALUE,
    ImageKind,
    expected_rgb,
    png,
)
from omegaconf import OmegaConf
from PIL import Image, ImageOps
from safetensors.torch import save_file
from torch import nn
from torch.utils.data import DataLoader

from genattr.data import mscoco
from genattr.data.aigenbench.dataset import build_aigenbench
from genattr.data.cddb import build_cddb
from genattr.data.faces import build_casia100
from genattr.data.imagenet100 import FOLDER_NAMES_FILE, build_imagenet100
from genattr.data.mscoco import load_mscoco
from genattr.data.rarvar import LABELS, load_rarvar
from genattr.models.backbones import create_backbone
from genattr.models.diffusion import load_unet_weights
from genattr.models.tokenizers.checkpoint import load_tokenizer_checkpoint
from genattr.twins.aigenbench import aigenbench_features, write_aigenbench
from genattr.utils.errors import ConfigError, DataError, GenattrError
from genattr.utils.instantiate import build

SCENARIO = {
    "order_seed": 1337,
    "num_tasks": 1,
    "first_classes": 2,
    "per_task": 1,
    "data_ratio": 1.0,
    "subset_per_task": True,
    "ratio_over_split": True,
    "few_shot": None,
    "missing": 0,
    "subset_seed": 1337,
}


def _one_line(err: BaseException, *needles: str) -> str:
    """The error is one of ours, one line (a sentence, not a traceback), and names what it must name."""
    assert isinstance(err, GenattrError), repr(err)
    msg = str(err)
    assert "\n" not in msg and "Traceback" not in msg, msg
    for needle in needles:
        assert needle in msg, (needle, msg)
    return msg


def _hwc(x: torch.Tensor) -> np.ndarray:
    """A CHW tensor (uint8, or float in [0, 1]) as HWC uint8."""
    if x.dtype != torch.uint8:
        x = (x * 255).round().to(torch.uint8)
    return x.permute(1, 2, 0).numpy()


# --------------------------------------------------------------------------- one small tree per loader
@dataclass
class Loader:
    """A minimal valid dataset of one loader, where a bad file can be put, read back and looked for."""

    name: str
    root: Path
    size: int  #: side of the images the tree holds
    size_message: str | None = None  #: the sentence a too-small image gives, None: the loader resizes or pads
    bad: Any = None  #: where the bad image went (a path, or a row)
    ident: str = ""  #: what the error must name
    extra: dict[str, Any] = field(default_factory=dict)

    def put(self, data: bytes, suffix: str) -> None:
        raise NotImplementedError

    def build(self, policy: str) -> Any:
        raise NotImplementedError

    def read(self, proto: Any) -> np.ndarray:
        """The bad image as the loader hands it to a method, HWC uint8."""
        raise NotImplementedError

    def contains(self, proto: Any) -> bool:
        raise NotImplementedError


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


class CDDB(Loader):
    def __init__(self, tmp: Path) -> None:
        super().__init__("cddb", tmp / "cddb", 40, r"smaller than the 32 crop")
        for t, task in enumerate(("gaugan", "biggan")):
            for split in ("train", "val"):
                for c, cls in enumerate(("0_real", "1_fake")):
                    for k in range(2):
                        _write(self.root / task / split / cls / f"{k}.png", png(40, 100 * t + 10 * c + k))

    def put(self, data: bytes, suffix: str) -> None:  # task 1: a later task's file
        self.bad = _write(self.root / "biggan" / "train" / "1_fake" / f"bad{suffix}", data)
        self.ident = str(self.bad)

    def build(self, policy: str) -> Any:
        return build_cddb(name="t", tasks=["gaugan", "biggan"], root=str(self.root), crop=32, on_bad_image=policy)

    def _index(self, proto: Any) -> tuple[Any, int]:
        ds = proto.tasks[1].train.with_transform(None)
        return ds, next(i for i, s in enumerate(ds.samples) if s.path == str(self.bad))

    def read(self, proto: Any) -> np.ndarray:
        ds, i = self._index(proto)
        return _hwc(ds[i][0])

    def contains(self, proto: Any) -> bool:
        return any(s.path == str(self.bad) for t in proto.tasks for d in (t.train, t.test) for s in d.samples)


class Faces(Loader):
    """CASIA-100 and ImageNet100: ``{train,test}/<class>/*`` folders (the ImageNet100 one with its wnid list)."""

    def __init__(self, tmp: Path, name: str) -> None:
        super().__init__(name, tmp / name, 16)
        self.classes = [f"n0000000{i}" for i in range(3)]
        for split in ("train", "test"):
            for c, cls in enumerate(self.classes):
                for k in range(2):
                    _write(self.root / split / cls / f"{k}.png", png(16, 10 * c + k))
        if name == "imagenet100":
            (self.root / FOLDER_NAMES_FILE).write_text("\n".join(["n09999999", *self.classes]) + "\n")

    def put(self, data: bytes, suffix: str) -> None:
        self.bad = _write(self.root / "train" / self.classes[1] / f"bad{suffix}", data)
        self.ident = str(self.bad)

    def build(self, policy: str) -> Any:
        if self.name == "casia100":
            return build_casia100(
                name="casia100", root=str(self.root), image_size=16, scenario=SCENARIO, on_bad_image=policy
            )
        return build_imagenet100(
            name="imagenet100", root=str(self.root), resize=16, crop=16, scenario=SCENARIO, on_bad_image=policy
        )

    def read(self, proto: Any) -> np.ndarray:
        i = next(i for i, s in enumerate(proto.train.samples) if s.path == str(self.bad))
        return _hwc(proto.train[i][0])

    def contains(self, proto: Any) -> bool:
        return any(s.path == str(self.bad) for d in (proto.train, proto.test) for s in d.samples)


def _rarvar_models(root: Path) -> None:
    ckpt = root / "checkpoints"
    spec: dict[str, Any] = {}
    for family, variants in (("var", LABELS[0:4]), ("rar", LABELS[4:8])):
        _write(ckpt / family / "tokenizer.safetensors", b"x")
        spec[family] = {
            "tokenizer": {"_target_": "x"},
            "tokenizer_checkpoint": f"{family}/tokenizer.safetensors",
            "variants": {
                v: {"generator": {"_target_": "x"}, "checkpoint": f"{family}/{v}.safetensors"} for v in variants
            },
        }
        for v in variants:
            _write(ckpt / family / f"{v}.safetensors", b"x")
    (ckpt / "models.json").write_text(json.dumps(spec))


class RarVar(Loader):
    def __init__(self, tmp: Path) -> None:
        super().__init__("rarvar", tmp / "rarvar", 16, r"is 8x8 but the task images are 16x16")
        for i, label in enumerate(LABELS[:8]):
            for k in range(2):
                _write(self.root / "train" / label / f"{k}.png", png(16, 10 * i + k))
        for i, label in enumerate(LABELS):
            _write(self.root / "val" / label / "0.png", png(16, 200 + i))
        rows = []
        for k in range(3):
            _write(self.root / "test" / f"t{k}.png", png(16, 300 + k))
            rows.append({"image_name": f"t{k}.png", "label": LABELS[k]})
        with open(self.root / "test_labels.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, ["image_name", "label"])
            writer.writeheader()
            writer.writerows(rows)
        _rarvar_models(self.root)

    def put(self, data: bytes, suffix: str) -> None:  # the val split, read after train
        self.bad = _write(self.root / "val" / "var20" / f"bad{suffix}", data)
        self.ident = str(self.bad)

    def build(self, policy: str) -> Any:
        return load_rarvar(self.root, image_size=16, on_bad_image=policy)

    def read(self, proto: Any) -> np.ndarray:
        i = proto.val.paths.index(self.bad)
        return _hwc(proto.val.load([i])[0])

    def contains(self, proto: Any) -> bool:
        return any(self.bad in proto.split(s).paths for s in ("train", "val", "test"))


GENERATORS = ("GenA", "GenB")


def _aigenbench_rows(split: str, n_fake: int = 2, n_real: int = 4, size: int = 16) -> dict[str, list]:
    cols: dict[str, list] = {k: [] for k in aigenbench_features()}
    items = [(g, i) for g in GENERATORS for i in range(n_fake)] + [("", i) for i in range(n_real)]
    for j, (g, i) in enumerate(items):
        cols["image"].append({"bytes": png(size, 500 + j), "path": None})
        cols["height"].append(size)
        cols["width"].append(size)
        cols["label"].append(0 if g == "" else 1)
        cols["generator"].append(g)
        cols["file_id"].append(f"{split}/{g or 'real'}/{i}")
        for k in ("description", "positive_prompt", "negative_prompt", "conditioning", "origin_dataset"):
            cols[k].append("")
        cols["paired_real_images"].append([])
    return cols


class AIGenBench(Loader):
    """A ``save_to_disk`` DatasetDict with two generators (one per window) and its timeline CSV."""

    def __init__(self, tmp: Path) -> None:
        super().__init__("aigenbench", tmp / "aigenbench", 16)
        self.splits = {"train": _aigenbench_rows("train"), "validation": _aigenbench_rows("validation")}
        self.csv = tmp / "generators.csv"
        self.csv.write_text("generator,release_date\nGenA,2020-01-01\nGenB,2021-01-01\n")

    def put(self, data: bytes | None, suffix: str, path: str | None = None) -> None:
        self.bad = 0  # validation row 0: GenA's first fake
        self.splits["validation"]["image"][0] = {"bytes": data, "path": path}
        self.ident = "validation row 0 (file_id 'validation/GenA/0')"

    def build(self, policy: str) -> Any:
        if not (self.root / "train").is_dir():
            write_aigenbench(self.root, self.splits)
        return build_aigenbench(
            root=str(self.root), generators=str(self.csv), generators_per_window=1, on_bad_image=policy
        )

    def read(self, proto: Any) -> np.ndarray:
        return np.asarray(proto.validation.images(self.bad))

    def contains(self, proto: Any) -> bool:
        return self.bad in proto.validation.rows.tolist()


LOADERS: dict[str, Callable[[Path], Loader]] = {
    "cddb": CDDB,
    "casia100": lambda tmp: Faces(tmp, "casia100"),
    "imagenet100": lambda tmp: Faces(tmp, "imagenet100"),
    "rarvar": RarVar,
    "aigenbench": AIGenBench,
}


# --------------------------------------------------------------------------- image kinds x image loaders
def _outcome(kind: ImageKind, loader: Loader) -> str:
    if kind.outcome == "size":
        return "scan" if loader.size_message else "valid"
    return kind.outcome


@pytest.mark.parametrize("kind", IMAGE_KINDS, ids=[k.name for k in IMAGE_KINDS])
@pytest.mark.parametrize("loader_name", list(LOADERS))
def test_image_kind(loader_name: str, kind: ImageKind, tmp_path: Path) -> None:
    loader = LOADERS[loader_name](tmp_path)
    data = kind.make(loader.size)
    loader.put(data, kind.suffix)
    outcome = _outcome(kind, loader)
    message = loader.size_message if kind.outcome == "size" else kind.message
    reason = ("wrong_size" if loader_name == "rarvar" else "too_small") if kind.outcome == "size" else kind.reason

    if outcome == "scan":  # found while the dataset is built, before any training step
        with pytest.raises(DataError, match=message) as err:
            loader.build("error")
        _one_line(err.value, loader.ident, "data.on_bad_image=skip")
        proto = loader.build("skip")
        assert not loader.contains(proto)
        assert proto.bad_images.as_dict()["counts"] == {reason: 1}
        assert proto.info["bad_images"]["total"] == 1
    elif outcome == "decode":  # header and end intact: the scan passes it, decoding does not
        proto = loader.build("error")
        with pytest.raises(DataError, match=message) as err:
            loader.read(proto)
        _one_line(err.value, loader.ident)
        proto = loader.build("skip")
        assert proto.bad_images.total == 0
        first = loader.read(proto)  # a decodable image of the same class stands in
        assert first.shape[2] == 3 and first.dtype == np.uint8
        loader.read(proto)  # the same file again: still one count
        assert proto.bad_images.as_dict()["counts"] == {reason: 1}
        assert proto.bad_images.as_dict()["examples"][reason] == [loader.ident] or loader_name == "aigenbench"
    else:  # a valid image in an unusual mode: RGB, as the originals load it
        proto = loader.build("error")
        got = loader.read(proto)
        assert proto.bad_images.total == 0
        if kind.outcome == "size":  # resized (faces, ImageNet100) or padded later (AI-GenBench)
            assert got.shape[2] == 3 and got.dtype == np.uint8
        else:
            assert np.array_equal(got, expected_rgb(data)), kind.name
        if kind.name == "exif_rotated_jpeg":  # parity: the originals do not apply the EXIF orientation
            with Image.open(io.BytesIO(data)) as im:
                rotated = np.asarray(ImageOps.exif_transpose(im).convert("RGB"))
            assert not np.array_equal(got, rotated)


def test_decode_time_skips_in_loader_workers_reach_the_count(tmp_path: Path) -> None:
    """DataLoader workers are other processes: their skips reach the main process's count through the ledger."""
    loader = CDDB(tmp_path)
    loader.put(next(k for k in IMAGE_KINDS if k.name == "corrupt_body").make(40), ".png")
    proto = loader.build("skip")
    ds = proto.tasks[1].train
    batches = list(DataLoader(ds, batch_size=2, num_workers=2, shuffle=False))
    assert sum(len(y) for _, y in batches) == len(ds)
    counted = proto.bad_images.as_dict()
    assert counted["total"] == 1 and counted["examples"]["undecodable"] == [str(loader.bad)]


def test_all_bad_images_of_a_class_is_an_error_even_under_skip(tmp_path: Path) -> None:
    loader = CDDB(tmp_path)
    folder = loader.root / "biggan" / "val" / "0_real"
    for f in folder.iterdir():
        f.write_bytes(b"")
    with pytest.raises(DataError, match="were skipped") as err:
        loader.build("skip")
    _one_line(err.value, str(folder))


# --------------------------------------------------------------------------- layouts and manifests
def _rename(path: Path, new: str) -> Path:
    return path.rename(path.with_name(new))


WRONG_SPLITS: dict[str, tuple[Callable[[Loader], None], Callable[[Loader], str]]] = {
    "cddb": (lambda lo: [_rename(lo.root / t / "val", "valid") for t in ("gaugan", "biggan")], lambda lo: "gaugan/val"),
    "casia100": (lambda lo: _rename(lo.root / "test", "testing"), lambda lo: str(lo.root / "test")),
    "imagenet100": (lambda lo: _rename(lo.root / "train", "training"), lambda lo: str(lo.root / "train")),
    "rarvar": (lambda lo: _rename(lo.root / "val", "validation"), lambda lo: str(lo.root / "val")),
    "aigenbench": (lambda lo: _rename(lo.root / "validation", "valid"), lambda lo: str(lo.root / "validation")),
}


@pytest.mark.parametrize("loader_name", list(WRONG_SPLITS))
def test_wrong_split_names(loader_name: str, tmp_path: Path) -> None:
    loader = LOADERS[loader_name](tmp_path)
    if loader_name == "aigenbench":
        write_aigenbench(loader.root, loader.splits)
    rename, named = WRONG_SPLITS[loader_name]
    rename(loader)
    for policy in ("error", "skip"):  # a layout is never skipped
        with pytest.raises(DataError, match="does not exist") as err:
            loader.build(policy)
        _one_line(err.value, named(loader))


EMPTY_CLASS: dict[str, Callable[[Loader], Path]] = {
    "cddb": lambda lo: lo.root / "biggan" / "val" / "1_fake",
    "casia100": lambda lo: lo.root / "test" / "n00000002",
    "imagenet100": lambda lo: lo.root / "train" / "n00000001",
    "rarvar": lambda lo: lo.root / "val" / "outlier",
}


@pytest.mark.parametrize("loader_name", list(EMPTY_CLASS))
def test_empty_class_folder(loader_name: str, tmp_path: Path) -> None:
    loader = LOADERS[loader_name](tmp_path)
    folder = EMPTY_CLASS[loader_name](loader)
    for f in folder.iterdir():
        f.unlink()
    for policy in ("error", "skip"):
        with pytest.raises(DataError, match="holds no") as err:
            loader.build(policy)
        _one_line(err.value, str(folder))


def test_missing_file_listed_in_the_tracer_answer_key_and_manifest(tmp_path: Path) -> None:
    loader = RarVar(tmp_path)
    with open(loader.root / "test_labels.csv", "a") as fh:
        fh.write("ghost.png,var16\n")
    with pytest.raises(DataError, match="which does not exist") as err:
        loader.build("error")
    _one_line(err.value, str(loader.root / "test_labels.csv"), str(loader.root / "test" / "ghost.png"))
    loader = RarVar(tmp_path / "again")
    (loader.root / "checkpoints" / "rar" / "rarl.safetensors").unlink()
    with pytest.raises(ConfigError, match="does not exist") as err:
        loader.build("error")
    _one_line(err.value, "rar.variants.rarl.checkpoint", "rarl.safetensors")


def test_missing_file_listed_in_an_aigenbench_image_cell(tmp_path: Path) -> None:
    loader = AIGenBench(tmp_path)
    ghost = tmp_path / "images" / "ghost.png"
    loader.put(None, ".png", path=str(ghost))
    # datasets' Image feature would embed the file on save_to_disk; a plain struct keeps the cell a path
    features = aigenbench_features()
    features["image"] = {"bytes": Value("binary"), "path": Value("string")}
    DatasetDict({k: Dataset.from_dict(v, features=features) for k, v in loader.splits.items()}).save_to_disk(
        str(loader.root)
    )
    with pytest.raises(DataError, match="which does not exist") as err:
        loader.build("error")
    _one_line(err.value, loader.ident, str(ghost))
    proto = loader.build("skip")
    assert not loader.contains(proto) and proto.bad_images.as_dict()["counts"] == {"missing": 1}
    _write(ghost, png(16, 9))  # a cell stored as a path loads like one stored as bytes
    proto = loader.build("error")
    assert np.array_equal(loader.read(proto), expected_rgb(png(16, 9)))


def test_missing_file_listed_for_mscoco(tmp_path: Path) -> None:
    root = _mscoco(tmp_path)
    with pytest.raises(DataError, match="does not exist") as err:
        load_mscoco(root, {"query_latents": "renamed_sample_latents.npy"})
    _one_line(err.value, str(root / "renamed_sample_latents.npy"))


# --------------------------------------------------------------------------- MSCOCO release arrays
def _mscoco(tmp: Path, n: int = 4, s: int = 2) -> Path:
    root = tmp / "mscoco"
    root.mkdir()
    rng = np.random.default_rng(0)
    np.save(root / "coco17_train_latents.npy", rng.standard_normal((2 * n, 4, 4, 4)).astype(np.float32))
    np.save(root / "coco17_train_text_embeddings.npy", rng.standard_normal((n, 1, 6, 8)).astype(np.float32))
    np.save(root / "coco17_sample_latents.npy", rng.standard_normal((s, 4, 4, 4)).astype(np.float32))
    np.save(root / "coco17_sample_text_embeddings.npy", rng.standard_normal((s, 1, 6, 8)).astype(np.float32))
    (root / "model.safetensors").write_bytes(b"x")
    return root


@pytest.mark.parametrize("sampled", [False, True], ids=["full_check", "sampled_rows"])
@pytest.mark.parametrize("file", ["coco17_train_latents.npy", "coco17_sample_text_embeddings.npy"])
@pytest.mark.parametrize("kind", list(ARRAY_KINDS))
def test_mscoco_array_kind(kind: str, file: str, sampled: bool, tmp_path: Path, monkeypatch) -> None:
    root = _mscoco(tmp_path)
    assert load_mscoco(root).n_train == 4
    if sampled:  # arrays too large to check in full are checked on evenly spaced rows (first and last included)
        monkeypatch.setattr(mscoco, "_FULL_CHECK_BYTES", 0)
    path = root / file
    message = ARRAY_KINDS[kind](path, np.load(path))
    with pytest.raises(DataError, match=message) as err:
        load_mscoco(root)
    _one_line(err.value, str(path))


# --------------------------------------------------------------------------- weight files of another model
def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in module.state_dict().items()}


def test_checkpoint_of_another_model_as_model_weights(tmp_path: Path) -> None:
    kw = {"patch_size": 8, "embed_dim": 24, "depth": 2, "local_up_to_layer": 1}
    other = tmp_path / "resnet.safetensors"
    save_file(_state(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))), str(other))
    with pytest.raises(ConfigError, match="does not hold convit_tiny weights") as err:
        create_backbone(name="convit_tiny", weights=str(other), img_size=32, kwargs=kw)
    _one_line(err.value, f"model.weights={other}")
    wider = tmp_path / "wider.safetensors"
    save_file(_state(create_backbone(name="convit_tiny", img_size=32, kwargs=kw | {"embed_dim": 48})), str(wider))
    with pytest.raises(ConfigError, match="size mismatch") as err:
        create_backbone(name="convit_tiny", weights=str(wider), img_size=32, kwargs=kw)
    _one_line(err.value, f"model.weights={wider}")
    text = tmp_path / "notes.safetensors"
    text.write_text("not weights")
    with pytest.raises(ConfigError, match="not a readable") as err:
        create_backbone(name="convit_tiny", weights=str(text), img_size=32, kwargs=kw)
    _one_line(err.value, f"model.weights={text}")
    own = tmp_path / "own.safetensors"
    save_file(_state(create_backbone(name="convit_tiny", img_size=32, kwargs=kw)), str(own))
    create_backbone(name="convit_tiny", weights=str(own), img_size=32, kwargs=kw)  # its own file loads


@pytest.mark.parametrize("loader", ["unet", "tracer_tokenizer"])
def test_checkpoint_of_another_model_for_release_files(loader: str, tmp_path: Path) -> None:
    net = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    for name, other in (
        ("renamed", nn.Sequential(nn.Conv2d(3, 4, 1))),
        ("reshaped", nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))),
    ):
        path = tmp_path / f"{name}.safetensors"
        save_file(_state(other), str(path))
        with pytest.raises(GenattrError, match="does not match") as err:
            if loader == "unet":
                load_unet_weights(net, path)
            else:
                load_tokenizer_checkpoint(net, path)
        _one_line(err.value, str(path))


# --------------------------------------------------------------------------- config values of the wrong type
WRONG_TYPE: dict[str, tuple[dict[str, Any], str]] = {
    "cddb": (
        {"_target_": "genattr.data.cddb.build_cddb", "name": "t", "tasks": ["gaugan"], "root": "x", "crop": 0},
        "crop",
    ),
    "casia100": (
        {"_target_": "genattr.data.faces.build_casia100", "name": "c", "root": "x", "image_size": 0, "scenario": {}},
        "image_size",
    ),
    "imagenet100": (
        {
            "_target_": "genattr.data.imagenet100.build_imagenet100",
            "name": "i",
            "root": "x",
            "resize": 0,
            "crop": 0,
            "scenario": {},
        },
        "resize",
    ),
    "rarvar": (
        {
            "_target_": "genattr.data.rarvar.build_rarvar",
            "name": "r",
            "root": "x",
            "image_size": 0,
            "models": None,
            "checkpoint_dir": None,
            "test_labels": None,
            "on_bad_image": "error",
        },
        "image_size",
    ),
    "aigenbench": (
        {"_target_": "genattr.data.aigenbench.dataset.build_aigenbench", "root": "x", "generators_per_window": 0},
        "generators_per_window",
    ),
    "mscoco": ({"_target_": "genattr.data.mscoco.build_mscoco", "name": "m", "root": "x", "vae": None}, "name"),
}


@pytest.mark.parametrize("loader_name", list(WRONG_TYPE))
def test_config_value_of_wrong_type(loader_name: str) -> None:
    node, key = WRONG_TYPE[loader_name]
    value = 5 if key == "name" else WRONG_TYPE_VALUE  # a number where a name is due, a word where a number is
    cfg = OmegaConf.create({"data": {**node, key: value}})
    with pytest.raises(ConfigError, match=rf"data\.{key}={value!r} is a") as err:
        build(cfg.data)
    _one_line(err.value, f"data.{key}=")


# --------------------------------------------------------------------------- the corpus is covered
COVERED: dict[str, list[str]] = {
    **{k.name: list(LOADERS) for k in IMAGE_KINDS},
    **{k: ["mscoco"] for k in ARRAY_KINDS},
    "wrong_split_names": list(WRONG_SPLITS),
    "empty_class_folder": list(EMPTY_CLASS),
    "missing_listed_file": ["rarvar", "aigenbench", "mscoco"],
    "checkpoint_of_another_model": ["model.weights (timm backbones)", "unet", "tracer_tokenizer"],
    "config_value_of_wrong_type": list(WRONG_TYPE),
}


def test_every_kind_of_the_corpus_runs_against_its_loaders() -> None:
    assert len(ALL_KINDS) >= 15 and set(COVERED) == set(ALL_KINDS)
    assert set(OTHER_KINDS) <= set(COVERED)
    image_readers = {"cddb", "casia100", "imagenet100", "rarvar", "aigenbench"}
    assert all(set(COVERED[k.name]) == image_readers for k in IMAGE_KINDS)
