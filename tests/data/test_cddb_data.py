"""CDDB loader and its synthetic twin: layout, labels, errors, and a learnable signal."""

from __future__ import annotations

import hashlib
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from genattr.data import images
from genattr.data.cddb import CDDB_TASKS, SUBCATEGORIES, build_cddb
from genattr.data.images import ImageListDataset, Sample
from genattr.data.transforms import test_transform, train_transform
from genattr.run import build_protocol
from genattr.twins import cddb as twin_cddb
from genattr.twins.cddb import cddb_twin, ensure_cddb_twin
from genattr.twins.content import domain_style
from genattr.twins.pretrain import DEGRADATION_CLASSES, N_CONTENT_CLASSES, content_styles, pretrain_set
from genattr.utils.errors import ConfigError, DataError

HARD = ["gaugan", "biggan", "wild", "whichfaceisreal", "san"]
CROP = 32


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One default-size twin shared by the module (generation takes a few seconds)."""
    path = tmp_path_factory.mktemp("cache")
    ensure_cddb_twin(path)
    return path


@pytest.fixture(scope="module")
def long(cache: Path):
    return build_cddb(
        name="cddb_long",
        tasks=list(CDDB_TASKS),
        root=str(ensure_cddb_twin(cache)),
        crop=CROP,
    )


def _png(path: Path, width: int = 40, height: int = 40, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def mini_root(tmp_path: Path) -> Path:
    """A flat two-task real-format CDDB root with 3 images per class and split."""
    root = tmp_path / "cddb"
    for task in ("gaugan", "biggan"):
        for split in ("train", "val"):
            for cls in ("0_real", "1_fake"):
                for k in range(3):
                    _png(root / task / split / cls / f"{k}.png", seed=k)
    return root


def _build(root: Path, **kw):
    args = {"name": "t", "tasks": ["gaugan", "biggan"], "root": str(root), "crop": CROP}
    return build_cddb(**(args | kw))


def _tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


# --------------------------------------------------------------------------- twin


def test_twin_layout(cache: Path) -> None:
    (root,) = (cache / "cddb_twin").iterdir()
    assert (root / "twin.json").is_file()
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == sorted(CDDB_TASKS)
    for task in CDDB_TASKS:
        for split, n in (("train", 96), ("val", 48)):
            split_dir = root / task / split
            subs = SUBCATEGORIES.get(task)
            if subs is None:
                assert sorted(p.name for p in split_dir.iterdir()) == [
                    "0_real",
                    "1_fake",
                ]
                groups = [split_dir]
            else:
                assert sorted(p.name for p in split_dir.iterdir()) == sorted(subs)
                groups = [split_dir / s for s in subs]
            for cls in ("0_real", "1_fake"):
                files = [f for g in groups for f in (g / cls).iterdir()]
                assert len(files) == n
                assert all(f.suffix == ".png" for f in files)
    with Image.open(next((root / "san" / "val" / "1_fake").iterdir())) as im:
        assert im.size == (40, 40) and im.mode == "RGB"


def test_twin_is_deterministic_and_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kw = {"image_size": 36, "n_train": 7, "n_val": 6, "seed": 5}
    a = ensure_cddb_twin(tmp_path / "a", **kw)
    b = ensure_cddb_twin(tmp_path / "b", **kw)
    assert a.name == b.name
    assert _tree_hashes(a) == _tree_hashes(b)
    other = ensure_cddb_twin(tmp_path / "a", **(kw | {"seed": 6}))
    assert other != a
    assert _tree_hashes(other) != _tree_hashes(a)

    def boom(*args, **kwargs):
        raise AssertionError("cache miss: the twin was regenerated")

    monkeypatch.setattr(twin_cddb, "_generate", boom)
    assert ensure_cddb_twin(tmp_path / "a", **kw) == a
    assert not [p for p in a.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_hard_scenario_on_twin(cache: Path, caplog: pytest.LogCaptureFixture, compose_cfg) -> None:
    ov = ["data=cddb_hard", f"data.twin.cache_dir={cache}", f"data.crop={CROP}", "data.twin.strength=1.0"]
    proto = build_protocol(compose_cfg(ov))
    assert "SYNTHETIC" in caplog.text
    assert proto.source == "twin" and proto.n_classes == 10
    assert proto.task_names == HARD
    for i, task in enumerate(proto.tasks):
        assert task.index == i and task.classes == (2 * i, 2 * i + 1)
        for ds, n in ((task.train, 96), (task.test, 48)):
            assert np.array_equal(np.bincount(ds.labels, minlength=10)[2 * i : 2 * i + 2], [n, n])
            assert set(ds.labels) == {2 * i, 2 * i + 1}
            assert all(s.task == i for s in ds.samples)
        assert proto.info["counts"][task.name]["val"] == {"real": 48, "fake": 48}
    x, y = proto.tasks[4].train[len(proto.tasks[4].train) - 1]
    assert x.shape == (3, CROP, CROP) and x.dtype == torch.float32 and y == 9
    xt, _ = proto.tasks[0].test[0]
    assert -1.0 <= float(xt.min()) < -0.3 and 0.3 < float(xt.max()) <= 1.0
    assert torch.equal(xt, proto.tasks[0].test[0][0])  # centre crop is deterministic


def test_subcategories_merge(cache: Path) -> None:
    proto = build_cddb(
        name="mix",
        tasks=["gaugan", "cyclegan"],
        root=str(ensure_cddb_twin(cache)),
        crop=CROP,
    )
    cyc = proto.tasks[1]
    assert cyc.classes == (2, 3) and proto.info["subcategories"] == {
        "gaugan": 0,
        "cyclegan": 6,
    }
    for label, cls in ((2, "0_real"), (3, "1_fake")):
        paths = [Path(s.path) for s in cyc.train.samples if s.label == label]
        assert len(paths) == 96
        assert {p.parent.name for p in paths} == {cls}
        assert {p.parent.parent.name for p in paths} == set(SUBCATEGORIES["cyclegan"])


def test_twin_crop_larger_than_image_is_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="image_size"):
        cddb_twin(data={"crop": 224}, model={}, params={"image_size": 40}, cache_dir=tmp_path)


# --------------------------------------------------------------------------- real loader


def test_real_root_loads_sorted(mini_root: Path) -> None:
    proto = _build(mini_root)
    assert proto.source == "real" and proto.root == mini_root
    paths = [s.path for s in proto.tasks[1].test.samples]
    assert paths[:3] == sorted(paths[:3]) and proto.tasks[1].test.labels.tolist() == [2] * 3 + [3] * 3
    assert proto.info["bad_images"]["total"] == 0


def test_too_small_image(mini_root: Path) -> None:
    bad = _png(mini_root / "biggan" / "train" / "1_fake" / "small.png", width=30, height=20)
    with pytest.raises(DataError, match="smaller than the 32 crop") as err:
        _build(mini_root)
    assert str(bad) in str(err.value) and "30x20" in str(err.value)
    assert "data.on_bad_image=skip" in str(err.value)


def test_unreadable_image_and_skip_policy(mini_root: Path) -> None:
    garbage = mini_root / "gaugan" / "val" / "0_real" / "garbage.jpg"
    garbage.write_bytes(b"definitely not a jpeg" * 10)
    with pytest.raises(DataError, match="could not be read as an image") as err:
        _build(mini_root)
    assert str(garbage) in str(err.value)
    small = _png(mini_root / "gaugan" / "train" / "0_real" / "small.png", width=31)

    proto = _build(mini_root, on_bad_image="skip")
    bad = proto.info["bad_images"]
    assert bad["total"] == 2 and bad["counts"] == {"too_small": 1, "unreadable": 1}
    assert bad["examples"]["unreadable"] == [str(garbage)]
    kept = {s.path for t in proto.tasks for ds in (t.train, t.test) for s in ds.samples}
    assert str(garbage) not in kept and str(small) not in kept
    assert proto.info["counts"]["gaugan"]["val"] == {"real": 3, "fake": 3}


def test_truncated_image_is_found_by_the_scan(mini_root: Path) -> None:
    path = mini_root / "biggan" / "train" / "0_real" / "0.png"
    path.write_bytes(path.read_bytes()[:200])  # header intact, pixel data and IEND cut
    with pytest.raises(DataError, match="is truncated: it does not end with the PNG IEND chunk") as err:
        _build(mini_root)  # a later task's file fails the build, before any training
    assert str(path) in str(err.value)
    proto = _build(mini_root, on_bad_image="skip")
    assert proto.info["bad_images"]["counts"] == {"truncated": 1}


def test_corrupt_body_fails_or_is_skipped_on_read(mini_root: Path) -> None:
    path = mini_root / "gaugan" / "train" / "0_real" / "0.png"
    data = bytearray(path.read_bytes())
    data[200:260] = bytes(60)  # header and IEND intact: only decoding can see this
    path.write_bytes(bytes(data))
    ds = _build(mini_root).tasks[0].train
    idx = next(i for i, s in enumerate(ds.samples) if s.path == str(path))
    with pytest.raises(DataError, match="could not be decoded") as err:
        ds[idx]
    assert str(path) in str(err.value)
    proto = _build(mini_root, on_bad_image="skip")
    raw = proto.tasks[0].train.with_transform(None)
    x, y = raw[idx]  # the next decodable image of the same class stands in
    assert y == 0 and torch.equal(x, raw[idx + 1][0])
    assert proto.bad_images.as_dict()["counts"] == {"undecodable": 1}
    raw[idx]  # the same file again: still one count
    assert proto.bad_images.total == 1


def test_missing_split_and_class_folders(mini_root: Path) -> None:
    for f in (mini_root / "biggan" / "val" / "1_fake").iterdir():
        f.unlink()
    (mini_root / "biggan" / "val" / "1_fake").rmdir()
    with pytest.raises(DataError, match="expected the fake images") as err:
        _build(mini_root)
    assert str(mini_root / "biggan" / "val" / "1_fake") in str(err.value)

    for f in (mini_root / "biggan" / "val").rglob("*.png"):
        f.unlink()
    for d in (mini_root / "biggan" / "val" / "0_real", mini_root / "biggan" / "val"):
        d.rmdir()
    with pytest.raises(DataError, match="split folder") as err:
        _build(mini_root)
    assert f"{mini_root / 'biggan' / 'val'} does not exist" in str(err.value)


def test_incomplete_subcategory_and_empty_class(mini_root: Path) -> None:
    sub = mini_root / "biggan" / "train" / "horse"
    _png(sub / "0_real" / "a.png")
    for cls in ("0_real", "1_fake"):  # turn train into a sub-category split
        shutil.rmtree(mini_root / "biggan" / "train" / cls)
    with pytest.raises(DataError, match="1_fake does not exist"):
        _build(mini_root)
    (sub / "1_fake").mkdir()
    with pytest.raises(DataError, match="holds no image files") as err:
        _build(mini_root)
    assert str(sub / "1_fake") in str(err.value)


def test_root_task_and_policy_errors(tmp_path: Path, mini_root: Path) -> None:
    with pytest.raises(DataError, match=r"data.root=.*nope does not exist.*data.root=null"):
        _build(tmp_path / "nope")
    with pytest.raises(ConfigError, match="valid: gaugan, biggan, cyclegan"):
        _build(mini_root, tasks=["gaugan", "progan"])
    with pytest.raises(ConfigError, match="error|skip"):
        _build(mini_root, on_bad_image="ignore")
    with pytest.raises(DataError, match="imle does not exist"):
        _build(mini_root, tasks=["imle"])


def test_dataset_api(mini_root: Path) -> None:
    ds = _build(mini_root).tasks[0].train
    clone = pickle.loads(pickle.dumps(ds))
    assert clone.samples == ds.samples and clone[0][0].shape == (3, CROP, CROP)
    sub = ds.subset([5, 0])
    assert sub.labels.tolist() == [1, 0] and sub.transform is ds.transform
    raw = ds.with_transform(None)
    assert raw.samples == ds.samples and raw[0][0].shape == (3, 40, 40)
    assert ImageListDataset([Sample("x.png", 3, 1)]).labels.dtype == np.int64


def test_transforms_crop_without_resizing() -> None:
    arr = np.zeros((40, 44, 3), np.uint8)
    arr[4:36, 6:38] = 255  # exactly the centre 32x32 patch
    out = test_transform(32)(Image.fromarray(arr))
    assert out.shape == (3, 32, 32) and torch.all(out == 1.0)
    assert train_transform(32)(Image.fromarray(arr)).shape == (3, 32, 32)
    with pytest.raises(ValueError):
        train_transform(32)(Image.fromarray(arr[:30]))


def test_bad_policy_in_scan(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="error|skip"):
        images.scan_image_folder(tmp_path, min_size=1, on_bad_image="warn", stats=images.BadImageStats())


# --------------------------------------------------------------------------- learnable signal


def _features(ds: ImageListDataset) -> np.ndarray:
    """Generic features: high-pass energy per channel + residual spectrum."""
    x = torch.stack([ds[i][0] for i in range(len(ds))]).numpy().astype(np.float64)
    nb = sum(np.roll(x, s, a) for s in (1, -1) for a in (2, 3)) / 4
    res = x - nb
    energy = np.log(np.abs(res).mean((2, 3)) + 1e-4)
    colour = np.concatenate([x.mean((2, 3)), x.std((2, 3))], 1)
    spec = np.log(np.abs(np.fft.rfft2(res)).mean(1) + 1e-3).reshape(len(x), -1)
    return np.concatenate([energy, colour, spec], 1)


def _ridge(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, lam: float = 100.0) -> np.ndarray:
    """One-vs-rest regularised least squares; returns predicted labels for ``xte``."""
    classes = np.unique(ytr)
    mu, sd = xtr.mean(0), xtr.std(0) + 1e-6

    def design(x: np.ndarray) -> np.ndarray:
        return np.c_[(x - mu) / sd, np.ones(len(x))]

    z = design(xtr)
    targets = 2.0 * (ytr[:, None] == classes[None]) - 1
    w = np.linalg.solve(z.T @ z + lam * np.eye(z.shape[1]), z.T @ targets)
    return classes[np.argmax(design(xte) @ w, 1)]


def _binary_accuracy(task) -> float:
    pred = _ridge(_features(task.train), task.train.labels, _features(task.test))
    return float(np.mean(pred == task.test.labels))


def test_twin_fingerprints_are_learnable_but_not_trivial(long, cache: Path) -> None:
    """Real/fake per task and fake-vs-fake across generators are learnable from generic
    features on random training crops; a single pixel, or a twin without fingerprints
    (strength 0), carries no signal - so the separation comes from the fingerprints."""
    torch.manual_seed(0)  # random training crops
    feats = {t.name: (_features(t.train), _features(t.test)) for t in long.tasks}
    binary = {
        t.name: float(np.mean(_ridge(feats[t.name][0], t.train.labels, feats[t.name][1]) == t.test.labels))
        for t in long.tasks
    }
    pixel = {}
    for t in long.tasks:
        tr, te = (ds.with_transform(test_transform(CROP)) for ds in (t.train, t.test))
        px_tr, px_te = (np.stack([ds[i][0][:, 16, 16].numpy() for i in range(len(ds))]) for ds in (tr, te))
        pixel[t.name] = float(np.mean(_ridge(px_tr, tr.labels, px_te, 1.0) == te.labels))
    fake_tr = np.concatenate([feats[t.name][0][t.train.labels % 2 == 1] for t in long.tasks])
    fake_te = np.concatenate([feats[t.name][1][t.test.labels % 2 == 1] for t in long.tasks])
    gen_te = np.repeat(np.arange(12), 48)
    pred = _ridge(fake_tr, np.repeat(np.arange(12), 96), fake_te)
    per_gen = [float(np.mean(pred[gen_te == g] == g)) for g in range(12)]
    blank = build_cddb(
        name="control",
        tasks=HARD[:3],
        root=str(ensure_cddb_twin(cache, tasks=HARD[:3], strength=0.0)),
        crop=CROP,
    )
    control = [_binary_accuracy(t) for t in blank.tasks]
    print(f"real/fake {binary}\ncentre pixel {pixel}\nfake-id {np.mean(pred == gen_te)} {per_gen}")
    print(f"strength-0 control {control}")

    assert np.mean(list(binary.values())) > 0.85
    assert sum(a > 0.75 for a in binary.values()) >= 10
    assert np.mean(pred == gen_te) > 0.6  # chance is 1/12
    assert sum(a > 0.5 for a in per_gen) >= 8
    assert np.mean(list(pixel.values())) < 0.62
    assert np.mean(control) < 0.65


def test_pretrain_set() -> None:
    kw = {"image_size": 24, "seed": 3, "strength": 1.0}
    for pretext, n_classes in (("content", N_CONTENT_CLASSES), ("degradations", len(DEGRADATION_CLASSES))):
        x, y, k = pretrain_set(64, pretext=pretext, **kw)
        assert x.shape == (64, 24, 24, 3) and x.dtype == np.uint8
        assert y.dtype == np.int64 and k == n_classes and set(y.tolist()) == set(range(k))
        x2, y2, _ = pretrain_set(64, pretext=pretext, **kw)
        assert np.array_equal(x, x2) and np.array_equal(y, y2)
        assert not np.array_equal(x, pretrain_set(64, pretext=pretext, **(kw | {"seed": 4}))[0])
    # strength scales the degradations only: at 0 every image is its clean content
    x, y, _ = pretrain_set(64, pretext="degradations", **kw)
    x0, y0, _ = pretrain_set(64, pretext="degradations", **(kw | {"strength": 0.0}))
    assert np.array_equal(y0, y) and np.array_equal(x0[y == 0], x[y == 0])
    assert not np.array_equal(x0[y > 0], x[y > 0])
    # the content pretext adds nothing, so strength does not touch it
    assert np.array_equal(
        pretrain_set(64, pretext="content", **kw)[0], pretrain_set(64, pretext="content", **(kw | {"strength": 0.0}))[0]
    )
    with pytest.raises(ConfigError, match="pretext='imagenet' is not a pretext; valid: content, degradations"):
        pretrain_set(8, pretext="imagenet", **kw)


def test_the_pretext_is_separate_from_the_twin_fingerprints() -> None:
    """The twin-pretrained backbone stands in for ImageNet weights: it must not learn a CDDB twin trace."""
    import ast

    import genattr.twins.pretrain as pretext

    tree = ast.parse(Path(pretext.__file__).read_text())
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    names = {a.name for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names}
    assert "genattr.twins.fingerprints" not in modules and "domain_style" not in names
    # the content classes are styles of their own: none is a twin domain's (a task's, or a sub-category's)
    domains = [domain_style(t) for t in CDDB_TASKS] + [
        domain_style(t, s) for t, ss in SUBCATEGORIES.items() for s in ss
    ]
    for style in content_styles(0):
        assert not any(np.allclose(style.palette, d.palette) for d in domains)
