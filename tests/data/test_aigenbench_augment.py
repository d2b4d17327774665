"""AI-GenBench image pipelines: step probabilities and parameter ranges (statistically, fixed
seeds), the two documented choices, JPEG 101, fixed training variants, crop strategies."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from genattr.data.aigenbench.augment import (
    baseline_train_pipeline,
    crop_if_large,
    encode_jpeg,
    gauss_noise,
    mandatory_eval_pipeline,
)
from genattr.data.aigenbench.crops import CLIP_MEAN, CLIP_STD, eval_crops, to_model_input, train_crop
from genattr.data.aigenbench.dataset import build_aigenbench
from genattr.data.aigenbench.views import FixedAugmentedTrainSet
from genattr.twins.aigenbench import ensure_aigenbench_twin
from genattr.utils.errors import ConfigError

N = 1500


def _image(w: int = 48, h: int = 40, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def eval_traces() -> list[list[tuple[str, dict]]]:
    pipe = mandatory_eval_pipeline()
    rng = np.random.default_rng(123)
    img = _image()
    traces = []
    for _ in range(N):
        trace: list[tuple[str, dict]] = []
        pipe(img, rng, trace)
        traces.append(trace)
    return traces


def _within(count: int, p: float, n: int = N) -> bool:
    return abs(count - p * n) <= 4 * (n * p * (1 - p)) ** 0.5


def test_mandatory_steps_run_in_order_with_their_probabilities(eval_traces: list) -> None:
    order = ["crop_if_large", "grayscale", "jpeg", "gauss_noise", "jpeg2", "random_resized_crop", "jpeg3"]
    assert [s.name for s in mandatory_eval_pipeline().steps] == order
    counts = Counter(name for t in eval_traces for name, _ in t)
    for name, p in zip(order, [1.0, 0.1, 0.5, 0.3, 0.2, 0.25, 0.1], strict=True):
        assert _within(counts[name], p), (name, counts[name], p)
    for t in eval_traces:
        names = [n for n, _ in t]
        assert names == sorted(names, key=order.index)


def test_mandatory_parameter_ranges(eval_traces: list) -> None:
    jpegs = [p for t in eval_traces for n, p in t if n.startswith("jpeg")]
    assert {p["quality"] for p in jpegs} == {50, 101}  # the original's random.choice([50, 101])
    backends = Counter(p["backend"] for p in jpegs)
    assert set(backends) == {"cv2", "pil"} and _within(backends["cv2"], 0.5, len(jpegs))
    rrc = [p for t in eval_traces for n, p in t if n == "random_resized_crop"]
    sides = [p["side"] for p in rrc]
    assert min(sides) >= 256 and max(sides) <= 512 and min(sides) < 280 and max(sides) > 490
    assert {p["interpolation"] for p in rrc} == {"bilinear", "bicubic", "lanczos"}
    for p in rrc:
        top, left, h, w = p["box"]
        area = h * w / (48 * 40)
        assert 0.45 <= area <= 1.0 and 0.85 <= w / h <= 1 / 0.85


def test_uniform_quality_flag() -> None:
    pipe = mandatory_eval_pipeline(jpeg_quality="uniform")
    rng = np.random.default_rng(0)
    qualities = []
    for _ in range(400):
        trace: list = []
        pipe(_image(16, 16), rng, trace)
        qualities += [p["quality"] for n, p in trace if n.startswith("jpeg")]
    assert min(qualities) >= 50 and max(qualities) <= 100 and len(set(qualities)) > 30
    with pytest.raises(ConfigError, match="jpeg_quality"):
        mandatory_eval_pipeline(jpeg_quality="95")


def test_gauss_noise_std_is_a_fraction_of_255() -> None:
    grey = Image.fromarray(np.full((64, 64, 3), 128, np.uint8))
    op = gauss_noise((0.015, 0.075))
    rng = np.random.default_rng(0)
    stds = [np.asarray(op(grey, rng)[0], float).std() / 255 for _ in range(60)]
    assert 0.012 < min(stds) < 0.03 and 0.06 < max(stds) < 0.08


def test_large_images_are_cropped_to_1080_randomly_or_centrally() -> None:
    big = Image.new("RGB", (1300, 1100))
    rng = np.random.default_rng(0)
    boxes = {crop_if_large(1080)(big, rng)[1]["box"] for _ in range(20)}
    assert len(boxes) > 5 and all(b[2:] == (1080, 1080) for b in boxes)
    central = crop_if_large(1080, central=True)(big, rng)[1]["box"]
    assert central == (110, 10, 1080, 1080)
    small = Image.new("RGB", (500, 1200))
    out, params = crop_if_large(1080)(small, rng)
    assert out.size == (500, 1080)
    with pytest.raises(ConfigError, match="large_crop"):
        mandatory_eval_pipeline(large_crop="top-left")


@pytest.mark.parametrize("backend", ["cv2", "pil"])
def test_jpeg_quality_101_acts_as_100(backend: str) -> None:
    img = _image(32, 32)
    a = np.asarray(encode_jpeg(img, 101, backend))
    b = np.asarray(encode_jpeg(img, 100, backend))
    c = np.asarray(encode_jpeg(img, 50, backend))
    assert (a == b).all() and not (a == c).all()


def test_eval_augmentation_is_a_function_of_the_seed() -> None:
    pipe = mandatory_eval_pipeline()
    img = _image(64, 64)
    a = [np.asarray(pipe(img, np.random.default_rng(4321 + i))) for i in range(30)]
    b = [np.asarray(pipe(img, np.random.default_rng(4321 + i))) for i in range(30)]
    assert all(x.shape == y.shape and (x == y).all() for x, y in zip(a, b, strict=True))


def test_baseline_training_probabilities() -> None:
    pipe = baseline_train_pipeline()
    rng = np.random.default_rng(7)
    counts: Counter = Counter()
    n = 600
    for _ in range(n):
        trace: list = []
        pipe(_image(32, 32), rng, trace)
        counts.update(name for name, _ in trace)
    expected = {"random_resized_crop": 0.2, "color_jitter": 0.8, "grayscale": 0.2, "coarse_dropout": 0.2}
    expected |= {"gauss_noise": 0.2, "blur": 0.5, "jpeg": 0.5}
    for name, p in expected.items():
        assert _within(counts[name], p, n), (name, counts[name])


def test_fixed_variants_per_copy_and_element(tmp_path: Path) -> None:
    twin = ensure_aigenbench_twin(tmp_path, n_windows=1, generators_per_window=2, image_size=24, n_train=4, n_val=2)
    p = build_aigenbench(root=str(twin), generators=str(twin / "generators.csv"), generators_per_window=2)
    kw = {"augmentation_factor": 4, "pipeline": baseline_train_pipeline(), "crop": "resize", "size": 24}
    a = FixedAugmentedTrainSet(p.train, p.training_positions(0), **kw)
    b = FixedAugmentedTrainSet(p.train, p.training_positions(0), **kw, stream=(5, 0))
    assert len(a) == 4 * len(p.training_positions(0))
    for i in range(12):
        assert np.asarray(a.fixed_view(i)).tobytes() == np.asarray(b.fixed_view(i)).tobytes()
    copies = [np.asarray(a.fixed_view(i)) for i in range(4)]  # element 0, copies 0..3
    assert len({c.tobytes() for c in copies}) == 4
    x, y, gen, ident = a[0]
    assert x.shape == (3, 24, 24) and y in (0.0, 1.0)


def test_crop_strategies() -> None:
    img = _image(300, 250)
    rng = np.random.default_rng(0)
    assert train_crop(img, "resize", 224, rng).size == (224, 224)  # squashed, aspect not kept
    assert train_crop(_image(100, 80), "random_crop", 224, rng).size == (224, 224)  # padded
    assert train_crop(img, "center_crop", 224, rng).size == (224, 224)
    assert train_crop(img, "as_is", 224, rng).size == (300, 250)
    assert len(eval_crops(img, "multicrop", 224)) == 5
    assert len(eval_crops(_image(300, 224), "multicrop", 224)) == 1  # a side <= 224: one centre crop
    assert [c.size for c in eval_crops(img, "crop", 224)] == [(224, 224)]
    with pytest.raises(ConfigError, match="eval_crop"):
        eval_crops(img, "tencrop", 224)


def test_clip_normalisation_for_every_backbone() -> None:
    white = Image.fromarray(np.full((4, 4, 3), 255, np.uint8))
    x = to_model_input(white)
    expected = [(1 - m) / s for m, s in zip(CLIP_MEAN, CLIP_STD, strict=True)]
    assert np.allclose(x[:, 0, 0].numpy(), expected, atol=1e-6)
