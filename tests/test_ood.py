"""The in-distribution check's pixel layout (ood.py) on real X-rays and on made foreign images."""

import numpy as np
import pytest

from bench.ood import foreign_images
from pneumoray import ood
from pneumoray.data import images

MEAN, STD = (0.4815, 0.4578, 0.4082), (0.2686, 0.2613, 0.2758)  # CLIP's, as the tiny model uses


def _pixels(encoded):
    return np.stack([images.preprocess(images.decode(b), 64, MEAN, STD) for b in encoded])


@pytest.fixture(scope="module")
def xrays(kermany_sample):
    paths = sorted(kermany_sample.glob("train/*/*.jpeg"))
    paths = [paths[i] for i in np.random.default_rng(0).permutation(len(paths))[:900]]
    return _pixels([p.read_bytes() for p in paths])


def _embeddings(n, seed):
    """Embeddings all drawn from one distribution: the embedding check alone passes them all."""
    return np.random.default_rng(seed).normal(size=(n, 16))


def test_layout_flags_grey_scenes_pages_and_shapes_that_the_embedding_lets_through(xrays):
    train, val, held_out = xrays[:500], xrays[500:700], xrays[700:]
    lay = lambda px: ood.layout(px, MEAN, STD)  # noqa: E731
    check = ood.fit(_embeddings(len(train), 0), _embeddings(len(val), 1), ood.colourfulness(val, MEAN, STD),
                    lay(train), lay(val))
    assert {"layout", "joint_threshold"} <= set(check)
    # validation is flagged at the check's quantile: the pair of distances shares one threshold
    val_score, _ = ood.judge(check, _embeddings(len(val), 1), ood.colourfulness(val, MEAN, STD), lay(val))
    assert (val_score > 1).mean() <= 1 - ood.QUANTILE + 1 / len(val)
    _, inside = ood.judge(check, _embeddings(len(held_out), 2), ood.colourfulness(held_out, MEAN, STD), lay(held_out))
    assert inside.mean() >= 0.9, f"real X-rays never seen: {inside.mean():.2f} passed"
    foreign = foreign_images(20, seed=3)
    for kind in ("scene_grey", "document", "shapes"):
        px = _pixels(foreign[kind])
        score, inside = ood.judge(check, _embeddings(len(px), 4), ood.colourfulness(px, MEAN, STD), lay(px))
        assert (~inside).mean() >= 0.9, f"{kind}: only {(~inside).mean():.2f} flagged (scores {np.round(score, 2)})"
    # The warning names the check that tripped: here the layout, never the embedding (drawn like training's).
    px = _pixels(foreign["document"][:1])
    parts = ood.part_scores(check, _embeddings(1, 4), lay(px))
    warning = ood.warning_for({k: v[0] for k, v in parts.items()}, 0.0, check)
    assert "in pixel layout" in warning and "image features" not in warning
    far = ood.part_scores(check, np.full((1, 16), 10.0), lay(xrays[700:701]))  # a real film, far in the features
    warning = ood.warning_for({k: v[0] for k, v in far.items()}, 0.0, check)
    assert "in the model's image features" in warning and "pixel layout" not in warning


def test_too_few_training_images_for_the_layout_leave_the_check_to_the_embedding(xrays):
    few = xrays[:100]  # under LAYOUT_MIN_PER_FEATURE images per pixel statistic
    check = ood.fit(_embeddings(80, 0), _embeddings(20, 1), np.zeros(20),
                    ood.layout(few[:80], MEAN, STD), ood.layout(few[80:], MEAN, STD))
    assert "layout" not in check


def test_a_check_fitted_before_the_layout_still_judges_by_its_embedding_alone():
    train, val = _embeddings(200, 0), _embeddings(100, 1)
    check = ood.fit(train, val, np.zeros(len(val)))
    assert "layout" not in check
    far = np.full((1, 16), 10.0)
    score, inside = ood.judge(check, np.vstack([val[:1], far]), np.zeros(2))  # no layouts needed
    assert inside.tolist() == [True, False] and score[1] > 1 > score[0]


def test_layout_features_have_a_fixed_size_and_see_brightness_and_edges():
    flat = np.zeros((2, 3, 64, 64), np.float32)  # normalised zeros: the mean colour, about 0.45 grey
    feats = ood.layout(flat, MEAN, STD)
    assert feats.shape == (2, ood.THUMBNAIL ** 2 + ood.HISTOGRAM_BINS + 2)
    assert np.allclose(feats[:, -2:], 0)  # a flat image has no edges
    stripes = flat.copy()
    stripes[:, :, :, ::2] = 1.0
    assert (ood.layout(stripes, MEAN, STD)[:, -2] > 0.1).all()
