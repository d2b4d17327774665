"""AI-GenBench data: the generator timeline, real-image allotment, validation pairing, the
real-format (save_to_disk) loader with its errors, and the twin."""

from __future__ import annotations

import io
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from genattr.data.aigenbench.dataset import build_aigenbench
from genattr.data.aigenbench.splits import (
    allot_training_rows,
    pair_reals,
    select_validation,
    shuffled_order,
    subset_mask,
)
from genattr.data.aigenbench.timeline import Timeline, chunk_windows, read_generator_table
from genattr.twins.aigenbench import (
    aigenbench_features,
    ensure_aigenbench_twin,
    generator_plan,
    write_aigenbench,
)
from genattr.utils.errors import DataError

SPEC_WINDOWS = [
    ["CycleGAN", "Cascaded Refinement Networks", "ProGAN", "StarGAN"],
    ["SN-PatchGAN", "BigGAN", "IMLE", "StyleGAN1"],
    ["GauGAN", "StyleGAN2", "DDPM", "CIPS"],
    ["VQGAN", "GANformer", "ADM", "StyleGAN3"],
    ["LaMa", "FaceSynthetics", "ProjectedGAN", "Palette"],
    ["VQ-Diffusion", "Denoising Diffusion GAN", "Glide", "Latent Diffusion"],
    ["Midjourney", "MAT", "Diffusion GAN (ProjectedGAN)", "Diffusion GAN (StyleGAN2)"],
    ["Stable Diffusion 1.4", "Stable Diffusion 1.5", "Stable Diffusion 2.1", "DeepFloyd IF"],
    ["Stable Diffusion XL 1.0", "DALL-E 3", "FLUX 1 Dev", "FLUX 1 Schnell"],
]


def test_v1_table_gives_the_nine_published_windows() -> None:
    tl = Timeline.from_table(None, 4)
    assert [list(w) for w in tl.windows] == SPEC_WINDOWS
    assert len(tl.generators) == 36


def test_generator_ids_are_alphabetical_with_real_zero_and_not_time() -> None:
    ids = Timeline.from_table(None, 4).id_to_name
    assert ids[0] == ""
    expected = {
        1: "ADM",
        2: "BigGAN",
        3: "CIPS",
        4: "Cascaded Refinement Networks",
        5: "CycleGAN",
        12: "FLUX 1 Dev",
        13: "FLUX 1 Schnell",
        14: "FaceSynthetics",
        24: "ProGAN",
        27: "Stable Diffusion 1.4",
        30: "Stable Diffusion XL 1.0",
        31: "StarGAN",
        36: "VQGAN",
    }
    assert {i: ids[i] for i in expected} == expected
    assert len(ids) == 37


def test_same_date_ties_join_the_window() -> None:
    import datetime as dt

    d = dt.date
    rows = [
        ("a", d(2020, 1, 1)),
        ("b", d(2020, 1, 2)),
        ("c", d(2020, 1, 3)),
        ("d", d(2020, 1, 3)),
        ("e", d(2021, 1, 1)),
    ]
    assert chunk_windows(rows, 3) == [("a", "b", "c", "d"), ("e",)]
    assert chunk_windows(rows[::-1], 2) == [("a", "b"), ("d", "c"), ("e",)]  # stable within a date


def test_bad_generator_table_is_a_clear_error(tmp_path: Path) -> None:
    bad = tmp_path / "gens.csv"
    bad.write_text("generator,release_date\nX,2020-13-01\n")
    with pytest.raises(DataError, match="row 2.*YYYY-MM-DD"):
        read_generator_table(bad)
    bad.write_text("name,date\nX,2020-01-01\n")
    with pytest.raises(DataError, match="header"):
        read_generator_table(bad)
    with pytest.raises(DataError, match="does not exist"):
        read_generator_table(tmp_path / "missing.csv")


def test_real_allotment_is_disjoint_seeded_and_matches_fakes() -> None:
    rng = np.random.default_rng(0)
    gen = np.concatenate([np.repeat([1, 2, 3, 4], 10), np.zeros(60, int)])
    rng.shuffle(gen)
    windows = allot_training_rows(gen, [[1, 2], [3], [4]])
    reals = [w[gen[w] == 0] for w in windows]
    assert [len(r) for r in reals] == [20, 10, 10]
    assert [int((gen[w] != 0).sum()) for w in windows] == [20, 10, 10]
    assert len(set(np.concatenate(reals).tolist())) == 40  # disjoint across windows
    # AI-GenBench datamodule.make_sliding_windows: random.seed(1337 + k); random.sample(sorted(unused reals), n),
    # the draw order kept, then the window's fakes in row order
    pool = sorted(np.flatnonzero(gen == 0).tolist())
    assert windows[0][:20].tolist() == random.Random(1337).sample(pool, 20)
    assert windows[0][20:].tolist() == np.flatnonzero(np.isin(gen, [1, 2])).tolist()
    with pytest.raises(DataError, match="window 1 needs 40 real images but only 20"):
        allot_training_rows(gen, [[1, 2, 3, 4]] * 2)


def test_shuffle_matches_datasets_shuffle() -> None:
    from datasets import Dataset

    ds = Dataset.from_dict({"i": list(range(50))}).shuffle(seed=1340)
    assert shuffled_order(50, 1340).tolist() == ds["i"][:]


def test_pairing_gives_each_generator_as_many_reals_as_fakes() -> None:
    gen = np.array([0, 3, 0, 1, 2, 0, 0, 1, 0, 3, 0, 2])
    pairing = pair_reals(gen)
    assert (pairing[gen != 0] == -1).all()
    for g in (1, 2, 3):
        assert int((pairing == g).sum()) == int((gen == g).sum())
        mask = subset_mask(gen, pairing, [g])
        assert int(mask.sum()) == 2 * int((gen == g).sum())


def test_balancing_keeps_reals_first_and_subsamples_the_larger_side_as_the_original() -> None:
    from sklearn.model_selection import train_test_split

    # AI-GenBench datamodule.setup_val: more reals -> random.seed(1338); random.sample(real_indices, n_fake)
    gen = np.array([1, 2, 0, 0, 1, 0, 0, 2, 0, 0, 0, 1, 0, 0, 2, 0])
    keep = select_validation(gen)
    reals, fakes = np.flatnonzero(gen == 0).tolist(), np.flatnonzero(gen != 0).tolist()
    assert keep.tolist() == random.Random(1338).sample(reals, 6) + fakes
    # more fakes -> train_test_split(fake_indices, train_size=n_real, stratify=generators, random_state=1338)
    gen2 = np.array([1, 1, 0, 1, 2, 0, 1, 2, 0, 1, 2, 2, 1, 0, 2, 1])
    keep2 = select_validation(gen2)
    fakes2 = np.flatnonzero(gen2 != 0).tolist()
    sub, _ = train_test_split(fakes2, train_size=4, stratify=gen2[fakes2].tolist(), random_state=1338)
    assert keep2.tolist() == np.flatnonzero(gen2 == 0).tolist() + list(sub)
    assert sorted(gen2[keep2[4:]].tolist()) == [1, 1, 2, 2]  # stratified
    # balanced (v1.0.0, the case the HEAD original left empty; fixed by 367b44c's else branch): all reals, then fakes
    same = np.array([1, 0, 2, 0])
    assert select_validation(same).tolist() == [1, 3, 0, 2]


# -- the real on-disk format --------------------------------------------------------------------
def _png(seed: int, size: int = 12) -> bytes:
    arr = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _rows(
    gens: list[str], n_fake: int, split: str, extra: int = 0, start: int = 0, n_real: int | None = None
) -> dict[str, list]:
    cols: dict[str, list] = {k: [] for k in aigenbench_features()}
    items = [(g, i) for g in gens for i in range(n_fake)]
    items += [("Not In Benchmark", i) for i in range(extra)]
    items += [("", i) for i in range(n_fake * len(gens) if n_real is None else n_real)]
    for j, (g, i) in enumerate(items):
        cols["image"].append({"bytes": _png(start + j), "path": None})
        cols["height"].append(12)
        cols["width"].append(12)
        cols["label"].append(0 if g == "" else 1)
        cols["generator"].append(g)
        cols["file_id"].append(f"{split}/{g or 'real'}/{i}")
        for k in ("description", "positive_prompt", "negative_prompt", "conditioning", "origin_dataset"):
            cols[k].append("")
        cols["paired_real_images"].append([])
    return cols


@pytest.fixture(scope="module")
def real_format_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A DatasetDict in the released schema with the 36 v1.0.0 generator names."""
    root = tmp_path_factory.mktemp("aigenbench") / "ai_gen_bench_v1.0.0"
    gens = list(Timeline.from_table(None, 4).generators)
    write_aigenbench(root, {"train": _rows(gens, 2, "train", extra=3), "validation": _rows(gens, 1, "validation")})
    return root


def test_real_format_loader_builds_the_protocol(real_format_root: Path) -> None:
    p = build_aigenbench(root=str(real_format_root))
    assert p.source == "real" and p.n_windows == 9
    assert [list(w) for w in p.timeline.windows] == SPEC_WINDOWS
    # 72 fakes + 72 reals kept; the 3 rows of an unknown generator are dropped but keep their row ids
    assert len(p.train) == 144
    assert p.train.rows[72] == 75  # first real: IDs are row indices before filtering
    assert [len(r) for r in p.window_rows] == [16] * 9
    assert len(p.training_positions(8)) == 144 and len(p.training_positions(0)) == 16
    assert len(p.validation) == 72
    s = p.subsets(0)
    assert int(s["next"].sum()) == 8 and int(s["growing"].sum()) == 8 and int(s["whole"].sum()) == 16
    assert int(p.subsets(8)["next"].sum()) == 8  # the last window falls back to itself
    img = p.validation.images(int(p.validation.rows[0]))
    assert img.mode == "RGB" and img.size == (12, 12)
    assert len(p.info["train_real_file_id_sha256"]) == 16


def test_real_format_errors_name_the_problem(tmp_path: Path, real_format_root: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        build_aigenbench(root=str(tmp_path / "nowhere"))
    only_train = tmp_path / "only_train"
    gens = list(Timeline.from_table(None, 4).generators)
    write_aigenbench(only_train, {"train": _rows(gens, 1, "train")})
    with pytest.raises(DataError, match=r"validation does not exist"):
        build_aigenbench(root=str(only_train))
    missing_gen = tmp_path / "missing_gen"
    write_aigenbench(missing_gen, {"train": _rows(gens[:-1], 1, "t"), "validation": _rows(gens, 1, "v")})
    with pytest.raises(DataError, match="FLUX 1 Schnell"):
        build_aigenbench(root=str(missing_gen))


def test_mislabelled_and_undecodable_rows_are_reported(tmp_path: Path) -> None:
    gens = list(Timeline.from_table(None, 4).generators)
    train = _rows(gens, 1, "train")
    train["label"][0] = 0  # a fake labelled real
    bad = tmp_path / "mislabelled"
    write_aigenbench(bad, {"train": train, "validation": _rows(gens, 1, "validation")})
    with pytest.raises(DataError, match=r"train/CycleGAN/0|file_id 'train/"):
        build_aigenbench(root=str(bad))
    val = _rows(gens, 2, "validation")
    val["image"][0] = {"bytes": b"\x89PNG\r\n\x1a\n broken", "path": None}
    corrupt = tmp_path / "corrupt"
    write_aigenbench(corrupt, {"train": _rows(gens, 1, "train"), "validation": val})
    # found by the scan, before any window trains
    with pytest.raises(DataError, match=r"row 0 \(file_id 'validation/CycleGAN/0'\) is truncated"):
        build_aigenbench(root=str(corrupt))
    p = build_aigenbench(root=str(corrupt), on_bad_image="skip")
    assert p.info["bad_images"]["counts"] == {"truncated": 1} and 0 not in p.validation.rows.tolist()


# -- parity with the original's orders ------------------------------------------------------------
# Re-derived step by step from MI-BioLab/AI-GenBench (read at 2332e50 and the later datamodule with the
# balanced-split fix of 367b44c): training_and_evaluation/lightning_data_modules/deepfake_detection_datamodule.py
# (setup_val, make_sliding_windows), lightning_data_modules/datasets/ai_genbench_dataset.py (the ID column is
# the row index before the generator filter) and dataset_loading/fixed_augmentations/{preaugmented_dataset,
# deterministic_augmentations_dataset}.py (copy c, element j -> seed (4321 + c * 2**27) % 2**31 + j).
# The original uses the global `random` module; so do these re-derivations (its state is restored).
def _original_splits(root: Path) -> tuple[Any, Any, dict[str, int]]:
    from datasets import load_from_disk

    benchmark = set(Timeline.from_table(None, 4).generators)
    loaded = load_from_disk(str(root))
    out = {}
    for split in ("train", "validation"):
        ds = loaded[split]
        ds = ds.add_column("ID", list(range(len(ds))))
        gens = ds["generator"][:]
        out[split] = ds.select([i for i, g in enumerate(gens) if g in benchmark or g == ""])
    name_to_id = {name: i for i, name in enumerate(sorted(set(out["train"]["generator"][:])))}
    return out["train"], out["validation"], name_to_id


def _original_validation(val: Any, name_to_id: dict[str, int]) -> tuple[list[int], dict[int, int]]:
    """``setup_val``: evaluation order (IDs) and the real ID -> paired generator id map."""
    from sklearn.model_selection import train_test_split

    state = random.getstate()
    try:
        labels = val["generator"][:]
        real = [i for i, g in enumerate(labels) if g == ""]
        fake = [i for i, g in enumerate(labels) if g != ""]
        if len(real) > len(fake):
            random.seed(1337 + 1)
            real = random.sample(real, len(fake))
        elif len(fake) > len(real):
            fake, _ = train_test_split(
                fake, train_size=len(real), stratify=[labels[i] for i in fake], random_state=1337 + 1
            )
        val = val.select(real + fake).shuffle(seed=1337 + 3, keep_in_memory=True)
        labels, ids = val["generator"][:], val["ID"][:]
        real = [i for i, g in enumerate(labels) if g == ""]
        fake = [i for i, g in enumerate(labels) if g != ""]
        random.seed(1337 + 4)
        random.shuffle(real)
        pairing = {ids[r]: name_to_id[labels[f]] for f, r in zip(fake, real, strict=False)}
    finally:
        random.setstate(state)
    return ids, pairing


def _original_windows(train: Any, windows: list[list[str]]) -> list[list[int]]:
    """``make_sliding_windows`` with ``benchmark_type: cumulative``: row indices per window."""
    state = random.getstate()
    try:
        labels = train["generator"][:]
        available = {i for i, g in enumerate(labels) if g == ""}
        timeline: list[list[int]] = []
        for k, names in enumerate(windows):
            fakes = [i for i, g in enumerate(labels) if g in set(names)]
            random.seed(1337 + k)
            reals = random.sample(sorted(available), len(fakes))
            timeline.append(reals + fakes)
            available -= set(reals)
        for k in range(1, len(timeline)):
            timeline[k] += timeline[k - 1]
    finally:
        random.setstate(state)
    return timeline


@pytest.fixture(scope="module", params=["balanced", "more_reals", "more_fakes"])
def parity_root(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The released schema with rows outside the benchmark, fakes before reals as on disk."""
    gens = list(Timeline.from_table(None, 4).generators)
    n_fake, n_real = {"balanced": (1, 36), "more_reals": (1, 50), "more_fakes": (3, 72)}[request.param]
    root = tmp_path_factory.mktemp(f"parity_{request.param}") / "ai_gen_bench_v1.0.0"
    val = _rows(gens, n_fake, "validation", extra=2, start=1000, n_real=n_real)
    write_aigenbench(root, {"train": _rows(gens, 2, "train", extra=3), "validation": val})
    return root


def test_validation_order_pairing_and_eval_seeds_match_the_original(parity_root: Path) -> None:
    from genattr.data.aigenbench.augment import mandatory_eval_pipeline
    from genattr.data.aigenbench.crops import eval_crops, to_model_input
    from genattr.data.aigenbench.views import EVAL_SEED, EvalSet

    _, val, name_to_id = _original_splits(parity_root)
    ids, pairing = _original_validation(val, name_to_id)
    p = build_aigenbench(root=str(parity_root))
    assert p.validation.rows.tolist() == ids  # evaluation order, element by element
    reals = np.flatnonzero(p.validation.labels == 0)
    assert {int(p.validation.rows[i]): int(p.pairing[i]) for i in reals} == pairing
    assert (p.pairing[p.validation.labels == 1] == -1).all()
    # per-image eval seed: PreAugmentedDataset(am=1, base_seed=4321) -> 4321 + position in that order
    assert EVAL_SEED == 4321
    pipe = mandatory_eval_pipeline()
    evalset = EvalSet(p.validation, pipeline=pipe, crop="resize", size=12)
    for pos in (0, 7, len(ids) - 1):
        row = ids[pos]
        expected = pipe(p.validation.images(row), np.random.default_rng(4321 + pos))
        want = torch.stack([to_model_input(c) for c in eval_crops(expected, "resize", 12)])
        assert torch.equal(evalset.crops(pos), want)


def test_training_lists_and_variant_seeds_match_the_original(parity_root: Path) -> None:
    from genattr.data.aigenbench.augment import baseline_train_pipeline
    from genattr.data.aigenbench.views import FixedAugmentedTrainSet

    train, _, _ = _original_splits(parity_root)
    p = build_aigenbench(root=str(parity_root))
    original = _original_windows(train, [list(w) for w in p.timeline.windows])
    train_ids = train["ID"][:]
    for k in (0, 1, 8):
        # the cumulative list [window k, k-1, ..., 0], each window's reals (draw order) before its fakes
        assert p.train.rows[p.training_positions(k)].tolist() == [train_ids[i] for i in original[k]]
    am, pipe = 2, baseline_train_pipeline()
    data = FixedAugmentedTrainSet(
        p.train, p.training_positions(1), augmentation_factor=am, pipeline=pipe, crop="resize", size=12
    )
    n_new = len(p.window_rows[1])
    for j, copy in ((0, 1), (n_new + 3, 0), (n_new + 3, 1)):  # a window-1 image, then a window-0 image
        seed = (4321 + copy * 2**27) % 2**31 + j
        image = p.train.images(train_ids[original[1][j]])
        assert np.array_equal(
            np.asarray(data.fixed_view(j * am + copy)), np.asarray(pipe(image, np.random.default_rng(seed)))
        )
    # window 0's images sit after window 1's in window 1, so their variants are not window 0's ...
    first = int(p.training_positions(0)[3])
    assert int(np.flatnonzero(p.training_positions(1) == first)[0]) == n_new + 3
    # ... unless the logged flag keeps them (oldest window first)
    assert p.training_positions(1, "oldest_first")[: len(p.window_rows[0])].tolist() == p.training_positions(0).tolist()


# -- twin -----------------------------------------------------------------------------------
def test_twin_plan_reuses_families_over_time_and_ids_are_not_chronological() -> None:
    plan = generator_plan(8, 3)
    fams = [f for _, f, _ in plan]
    assert fams[0] == "upconv" and set(fams) == {"upconv", "spectral", "latent"}
    assert fams.count("upconv") >= 3  # a family recurs in later windows: the future is partly detectable
    names = [n for n, _, _ in plan]
    assert names != sorted(names)


def test_twin_is_deterministic_and_in_the_real_schema(tmp_path: Path) -> None:
    from datasets import load_from_disk

    kw = {"n_windows": 2, "generators_per_window": 2, "image_size": 24, "n_train": 4, "n_val": 2}
    a = ensure_aigenbench_twin(tmp_path / "a", **kw)
    b = ensure_aigenbench_twin(tmp_path / "b", **kw)
    assert a.name == b.name
    da, db = load_from_disk(str(a / "train")), load_from_disk(str(b / "train"))
    assert da.features == aigenbench_features()
    assert da["file_id"][:] == db["file_id"][:]
    assert da[0]["image"].tobytes() == db[0]["image"].tobytes()
    assert da["generator"][:].count("") == 16  # as many reals as fakes
    assert ensure_aigenbench_twin(tmp_path / "a", **kw) == a  # cached
