"""Image checks on the decode pass's pixel statistics: planted answers found, CleanVision's own verdicts reproduced."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFilter

from audit.checks import CheckInputs, CheckRegistry
from audit.checks.pixels import (
    PIXEL_CHECKS,
    DarkCheck,
    ExactDuplicateCheck,
    OddSizeCheck,
    PropertyCheck,
)
from audit.datasets import load_dataset
from audit.errors import OptionError
from audit.scoring import load_pixel_stats, score_dataset

KW = {"batch_size": 8, "workers": 0, "shard_size": 16, "progress": False}

# What each check must flag in the planted set, exactly.
PLANTED = {
    "dark": {"cat/black.png"},
    "light": {"dog/white.png"},
    "blurry": {"cat/blurred.png"},
    "low_information": {"cat/black.png"},
    "odd_aspect_ratio": {"dog/wide.png"},
    "odd_size": {"dog/wide.png"},
    "grayscale": {"cat/black.png", "dog/grey.png"},
    "exact_duplicate": {"cat/cat1.png", "dog/copy_of_cat1.png", "dog/dog2.png", "dog/dog2_again.png"},
}


def _scene(rng: np.random.Generator, w: int = 64, h: int = 48) -> Image.Image:
    """A textured stand-in for a photo: gradients in each channel plus noise (seeded)."""
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * rng.uniform(1, 4) + y * rng.uniform(1, 4) + rng.uniform(0, 255)) % 256 for _ in range(3)], -1)
    return Image.fromarray(np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8))


def _planted(root: Path, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    for c in ("cat", "dog"):
        (root / c).mkdir(parents=True)
        for k in range(8):
            _scene(rng).save(root / c / f"{c}{k}.png")
    Image.new("L", (64, 48)).save(root / "cat" / "black.png")  # a grey file, as CleanVision reads it
    white = rng.integers(250, 256, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(white).save(root / "dog" / "white.png")
    Image.open(root / "cat" / "cat0.png").filter(ImageFilter.GaussianBlur(3)).save(root / "cat" / "blurred.png")
    shutil.copy(root / "cat" / "cat1.png", root / "dog" / "copy_of_cat1.png")  # the same photo, another label
    shutil.copy(root / "dog" / "dog2.png", root / "dog" / "dog2_again.png")  # the same photo, the same label
    _scene(rng, 1000, 20).save(root / "dog" / "wide.png")
    Image.fromarray(np.asarray(_scene(rng))[..., 0]).save(root / "dog" / "grey.png")
    return root


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    d = tmp_path_factory.mktemp("planted")
    ds = load_dataset(_planted(d / "ds"))
    score_dataset(ds, [], d / "arr", **KW)  # decode only: the image checks need no model
    px = load_pixel_stats(ds, d / "arr")
    assert px is not None
    return ds, px, d


def _inputs(ds, px, **kw) -> CheckInputs:
    return CheckInputs(n=len(ds), labels=ds.labels, pixels=px, image_ids=tuple(ds.image_ids), **kw)


def _flagged(ds, result) -> set[str]:
    return {ds.image_ids[i] for i in np.flatnonzero(result.is_issue)}


@pytest.mark.parametrize("cls", PIXEL_CHECKS, ids=lambda c: c.name)
def test_each_check_flags_exactly_its_planted_images(planted, cls):
    ds, px, _ = planted
    r = cls().run(_inputs(ds, px))
    assert r.check == cls.name and cls.needs == {"pixels"}
    assert _flagged(ds, r) == PLANTED[cls.name]
    s = r.score
    assert np.isfinite(s).all() and (s >= 0).all() and (s <= 1).all()
    # low = suspicious: every flagged image scores below every image left alone
    assert s[r.is_issue].max() < s[~r.is_issue].min()
    assert r.summary["issues"] == len(PLANTED[cls.name]) and r.summary["assessed"] == len(ds)


def test_scores_and_flags_are_cleanvisions_own(planted):
    """CleanVision's Imagelab on the same files gives the same scores and flags, and the same duplicate sets."""
    from cleanvision import Imagelab

    ds, px, _ = planted
    lab = Imagelab(filepaths=[str(ds.root / i) for i in ds.image_ids])
    lab.find_issues(n_jobs=1, verbose=False)
    for cls in PIXEL_CHECKS:
        if not issubclass(cls, PropertyCheck):
            continue
        r = cls().run(_inputs(ds, px))
        np.testing.assert_allclose(r.score, lab.issues[f"{cls.name}_score"].to_numpy(), rtol=0, atol=1e-12)
        np.testing.assert_array_equal(r.is_issue, lab.issues[f"is_{cls.name}_issue"].to_numpy(dtype=bool))
    r = ExactDuplicateCheck().run(_inputs(ds, px))
    sets = lab.info["exact_duplicates"]["sets"]
    theirs = {frozenset(Path(p).relative_to(ds.root).as_posix() for p in s) for s in sets}
    ours = {frozenset(ds.image_ids[j] for j in [i, *r.info[i]["partners"]]) for i in np.flatnonzero(r.is_issue)}
    assert ours == theirs


def test_exact_duplicates_come_as_groups_and_different_labels_are_their_own_finding(planted):
    ds, px, _ = planted
    r = ExactDuplicateCheck().run(_inputs(ds, px))
    ix = {name: ds.image_ids.index(name) for name in PLANTED["exact_duplicate"]}
    a, b = ix["cat/cat1.png"], ix["dog/copy_of_cat1.png"]
    c, d = ix["dog/dog2.png"], ix["dog/dog2_again.png"]
    assert r.suggestion[a] == b and r.suggestion[b] == a and r.suggestion[c] == d
    assert r.score[a] == 0.5 and np.isnan(r.score).sum() == 0
    assert r.info[a]["group"] == r.info[b]["group"] != r.info[c]["group"]
    assert r.info[a]["partners"] == [b] and r.info[a]["n_partners"] == 1
    assert r.info[a]["labels_differ"] and not r.info[c]["labels_differ"]
    assert (r.suggestion[~r.is_issue] == -1).all() and all(r.info[i] is None for i in np.flatnonzero(~r.is_issue))
    assert r.summary["groups"] == 2 and r.summary["images"] == 4
    assert r.summary["different_labels"] == {"groups": 1, "images": 2}
    assert "reference" not in r.summary


def test_val_images_identical_to_reference_images_are_leakage_without_scoring_the_reference(planted, tmp_path):
    ds, px, _ = planted
    train = tmp_path / "train"
    for c in ("cat", "dog"):
        (train / c).mkdir(parents=True)
    shutil.copy(ds.root / "cat" / "cat3.png", train / "dog" / "t0.png")  # leaked, with another label
    shutil.copy(ds.root / "dog" / "dog5.png", train / "dog" / "t1.png")  # leaked, the same label
    _scene(np.random.default_rng(7)).save(train / "cat" / "t2.png")
    ref_ds = load_dataset(train)
    score_dataset(ref_ds, [], tmp_path / "ref_arr", **KW)
    ref = {"pixels": load_pixel_stats(ref_ds, tmp_path / "ref_arr"), "image_ids": ref_ds.image_ids}
    ref["labels"] = ref_ds.labels  # cat/dog in both: the same label space
    r = ExactDuplicateCheck().run(_inputs(ds, px, reference=ref))
    i, j = ds.image_ids.index("cat/cat3.png"), ds.image_ids.index("dog/dog5.png")
    assert r.is_issue[i] and r.is_issue[j] and r.score[i] == 0.5
    assert r.info[i]["reference"] == ["dog/t0.png"] and r.info[i]["reference_labels_differ"] is True
    assert r.info[j]["reference"] == ["dog/t1.png"] and r.info[j]["reference_labels_differ"] is False
    dog = ref_ds.label_space.keys.index("dog")
    assert r.info[i]["reference_labels"] == [dog] == r.info[j]["reference_labels"]  # the training labels, named
    assert r.suggestion[i] == -1, "suggestions name images of the set; reference partners are in info"
    assert len(r.score) == len(ds), "the reference set is not scored"
    assert r.summary["reference"] == {"images": 2, "reference_images": 2, "different_labels": 1}
    assert _flagged(ds, r) == PLANTED["exact_duplicate"] | {"cat/cat3.png", "dog/dog5.png"}
    # A reference without pixel statistics: said, not guessed.
    r = ExactDuplicateCheck().run(_inputs(ds, px, reference={"image_ids": ref_ds.image_ids}))
    assert "no pixel statistics" in r.summary["reference"]["note"]
    assert _flagged(ds, r) == PLANTED["exact_duplicate"]


def test_images_without_stats_or_invalid_are_not_assessed(planted):
    ds, px, _ = planted
    black = ds.image_ids.index("cat/black.png")
    px2 = {k: v.copy() for k, v in px.items()}
    px2["ok"][black] = False
    valid = np.ones(len(ds), dtype=bool)
    valid[ds.image_ids.index("dog/copy_of_cat1.png")] = False
    for cls in PIXEL_CHECKS:
        r = cls().run(_inputs(ds, px2, valid=valid))
        assert np.isnan(r.score[black]) and not r.is_issue[black]
        assert r.summary["assessed"] == len(ds) - 2
    r = ExactDuplicateCheck().run(_inputs(ds, px2, valid=valid))
    assert _flagged(ds, r) == {"dog/dog2.png", "dog/dog2_again.png"}
    nothing = {k: v.copy() for k, v in px.items()}
    nothing["ok"][:] = False
    for cls in PIXEL_CHECKS:
        r = cls().run(_inputs(ds, nothing))
        assert np.isnan(r.score).all() and not r.is_issue.any()


def test_options_are_cleanvisions_and_a_wrong_one_is_one_clear_error(planted):
    ds, px, _ = planted
    r = DarkCheck(threshold=1).run(_inputs(ds, px))  # an int is a threshold too
    assert r.params["threshold"] == 1.0 and r.is_issue.sum() == len(ds) - 1  # all but the white image
    # Every image here but one has one size (no spread): CleanVision then flags any other size, whatever
    # iqr_factor says, unless a threshold is given.
    assert OddSizeCheck(iqr_factor=1000).run(_inputs(ds, px)).is_issue.sum() == 1
    assert OddSizeCheck(threshold=0).run(_inputs(ds, px)).is_issue.sum() == 0
    with pytest.raises(OptionError, match="no option 'treshold'; it takes threshold"):
        DarkCheck(treshold=0.1)
    with pytest.raises(OptionError, match="must be a finite number"):
        DarkCheck(threshold="low")
    with pytest.raises(OptionError, match="must be a finite number"):
        DarkCheck(threshold=float("nan"))
    with pytest.raises(OptionError, match="takes no options"):
        ExactDuplicateCheck(hash="sha1")


def test_every_pixel_check_registers_under_cleanvisions_name():
    from cleanvision.utils.constants import IMAGE_PROPERTY_ISSUE_TYPES_LIST

    reg = CheckRegistry()
    for cls in PIXEL_CHECKS:
        reg.register(cls)
    assert set(reg.names()) == {*IMAGE_PROPERTY_ISSUE_TYPES_LIST, "exact_duplicate"}
    assert all(cls.default and cls.description for cls in PIXEL_CHECKS)
