"""Tests of audit.datasets: layouts, label files, label spaces, ReaL attachment and --limit."""

from __future__ import annotations

import functools
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from audit.datasets import (
    LabelSpace,
    imagenet_label_space,
    load_dataset,
    load_real_labels,
    real_index_of,
)
from audit.errors import DatasetError, LabelFileError, UserError

TENCH, GOLDFISH = "n01440764", "n01443537"
BRAMBLING = "n01530575"


def val_name(i: int) -> str:
    """File name of the i-th (1-based) ILSVRC-2012 validation image."""
    return f"ILSVRC2012_val_{i:08d}.JPEG"


def write_csv(path: Path, rows: list[tuple[str, str]], header: str = "path,label") -> Path:
    path.write_text(header + "\n" + "".join(f"{p},{lab}\n" for p, lab in rows), encoding="utf-8")
    return path


# --------------------------------------------------------------------------- ImageFolder of wnids


def test_wnid_subset_gets_standard_imagenet_indices(tmp_path, make_image):
    for k, name in enumerate(["a.png", "b.png"]):
        make_image(tmp_path / GOLDFISH / name, seed=k)
    make_image(tmp_path / BRAMBLING / "c.png", seed=3)

    ds = load_dataset(tmp_path)

    keys = imagenet_label_space().keys
    assert ds.layout == "imagefolder-wnid"
    assert ds.label_space is imagenet_label_space() and len(ds.label_space) == 1000
    assert ds.image_ids == (f"{GOLDFISH}/a.png", f"{GOLDFISH}/b.png", f"{BRAMBLING}/c.png")
    assert ds.labels.dtype == np.int64
    assert ds.labels.tolist() == [keys.index(GOLDFISH)] * 2 + [keys.index(BRAMBLING)]
    assert ds.labels.tolist() == [1, 1, 10]  # not the folder positions 0, 0, 1: the wnid-subset pitfall
    assert ds.real is None  # file names are not ILSVRC2012_val_*


def test_lone_val_child_is_descended_ids_are_sorted_posix_and_junk_ignored(tmp_path, make_image):
    top = tmp_path / "imagenet"
    val = top / "val"
    make_image(val / BRAMBLING / "z.png")
    make_image(val / GOLDFISH / "b.jpg")
    make_image(val / GOLDFISH / "a.png")
    make_image(val / GOLDFISH / "deeper" / "c.png")  # images in subfolders of a class count
    make_image(val / GOLDFISH / ".hidden.png")  # hidden file
    make_image(val / GOLDFISH / ".ipynb_checkpoints" / "d.png")  # hidden folder inside a class
    make_image(val / ".cache" / "e.png")  # hidden folder among the classes
    (val / GOLDFISH / "notes.txt").write_text("not an image")
    (val / GOLDFISH / "Thumbs.db").write_bytes(b"\0" * 8)
    (top / "README.txt").write_text("a non-image beside val/ does not stop the descent")
    (top / ".DS_Store").write_bytes(b"\0")
    link = tmp_path / "link"
    link.symlink_to(top)

    ds = load_dataset(link)

    assert ds.root == val.resolve()
    assert ds.image_ids == (
        f"{GOLDFISH}/a.png",
        f"{GOLDFISH}/b.jpg",
        f"{GOLDFISH}/deeper/c.png",
        f"{BRAMBLING}/z.png",
    )
    assert list(ds.image_ids) == sorted(ds.image_ids)
    assert all("\\" not in i and not i.startswith("/") for i in ds.image_ids)
    assert all(ds.path(i).is_file() for i in range(len(ds)))
    keys = imagenet_label_space().keys
    assert ds.labels.tolist() == [keys.index(GOLDFISH)] * 3 + [keys.index(BRAMBLING)]


def test_unknown_wnid_folder_is_refused(tmp_path, make_image):
    make_image(tmp_path / GOLDFISH / "a.png")
    make_image(tmp_path / "n99999999" / "b.png")
    with pytest.raises(DatasetError, match=r"'n99999999' looks like a wnid but is not an ImageNet-1k class"):
        load_dataset(tmp_path)


# --------------------------------------------------------------------------- custom ImageFolder


def test_custom_imagefolder_numbers_classes_in_sorted_order(tmp_path, make_image):
    make_image(tmp_path / "dog" / "1.png")
    make_image(tmp_path / "cat" / "2.png")
    make_image(tmp_path / "cat" / "1.png")

    ds = load_dataset(tmp_path)

    assert ds.layout == "imagefolder-custom"
    assert ds.label_space.imagenet is False
    assert ds.label_space.keys == ("cat", "dog")
    assert ds.image_ids == ("cat/1.png", "cat/2.png", "dog/1.png")
    assert ds.labels.tolist() == [0, 0, 1]
    assert ds.real is None and ds.real_source is None


def test_custom_folders_named_by_number_keep_their_own_class(tmp_path, make_image):
    # Folders 0..11 sort as 0, 1, 10, 11, 2, ...: folder "10" is class 2, not class 10.
    for k in range(12):
        make_image(tmp_path / str(k) / "x.png", seed=k)

    ds = load_dataset(tmp_path)

    assert ds.layout == "imagefolder-custom"
    for image_id, label in zip(ds.image_ids, ds.labels.tolist(), strict=True):
        assert ds.label_space.keys[label] == image_id.split("/")[0]


def test_ids_are_sorted_as_strings_across_class_folders(tmp_path, make_image):
    # "a b/..." sorts before "a/..." (space < slash) although folder "a" sorts before "a b".
    make_image(tmp_path / "a" / "x.png")
    make_image(tmp_path / "a b" / "y.png")

    ds = load_dataset(tmp_path)

    assert ds.image_ids == ("a b/y.png", "a/x.png")
    assert [ds.label_space.keys[i] for i in ds.labels] == ["a b", "a"]


def test_mixed_wnid_and_other_folders_are_refused(tmp_path, make_image):
    make_image(tmp_path / GOLDFISH / "a.png")
    make_image(tmp_path / "cats" / "b.png")
    with pytest.raises(DatasetError, match="'cats' is neither an ImageNet wnid"):
        load_dataset(tmp_path)


def test_empty_missing_and_flat_folders_are_refused(tmp_path, make_image):
    with pytest.raises(DatasetError, match="no images found"):
        load_dataset(tmp_path)
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(tmp_path / "nope")
    f = make_image(tmp_path / "flat" / "a.png")
    with pytest.raises(DatasetError, match="does not exist"):
        load_dataset(f)  # a file, not a folder
    with pytest.raises(DatasetError, match="--labels"):
        load_dataset(tmp_path / "flat")  # images but no class folders and no label file
    assert issubclass(DatasetError, UserError)


# --------------------------------------------------------------------------- CSV label files


@pytest.fixture
def flat(tmp_path, make_image) -> Path:
    root = tmp_path / "flat"
    for k in range(6):
        make_image(root / f"img{k}.png", seed=k)
    make_image(root / "sub" / "img6.png", seed=6)
    return root


def test_label_file_accepts_wnids_indices_and_names(tmp_path, flat):
    space = imagenet_label_space()
    rows = [
        ("sub/img6.png", "goldfish"),
        ("img5.png", "Tinca tinca"),  # a WordNet synonym
        ("img0.png", TENCH),  # wnid
        ("img1.png", "1"),  # class index
        ("img2.png", " tench "),  # name, padded
        ("img3.png", "TENCH"),  # name, any case
        ("./img4.png", BRAMBLING.upper()),  # wnid, any case; ./ is normalised away
    ]
    labels = write_csv(tmp_path / "labels.csv", rows)

    ds = load_dataset(flat, label_file=labels)

    assert ds.layout == "label-file"
    assert ds.label_space is space
    assert ds.image_ids == tuple(sorted(ds.image_ids))  # sorted, whatever the row order
    got = dict(zip(ds.image_ids, ds.labels.tolist(), strict=True))
    assert got == {
        "img0.png": 0,
        "img1.png": 1,
        "img2.png": 0,
        "img3.png": 0,
        "img4.png": space.keys.index(BRAMBLING),
        "img5.png": 0,
        "sub/img6.png": 1,
    }


def test_label_file_with_bom_and_extra_columns(tmp_path, flat):
    labels = tmp_path / "labels.csv"
    labels.write_bytes("\ufeffid,Label,PATH\n7,tench,img0.png\n8,goldfish,img1.png\n".encode())
    ds = load_dataset(flat, label_file=labels)
    assert ds.image_ids == ("img0.png", "img1.png")
    assert ds.labels.tolist() == [0, 1]


@pytest.mark.parametrize(
    ("rows", "header", "message"),
    [
        ([("nope.png", TENCH)], "path,label", r"line 2: image 'nope.png' does not exist"),
        ([("img0.png", TENCH), ("img1.png", TENCH), ("img0.png", "1")], "path,label", r"line 4: .*listed twice"),
        ([("img0.png", TENCH), ("img1.png", "not-a-class")], "path,label", r"'not-a-class'"),
        ([("img0.png", "0"), ("img1.png", "1000")], "path,label", r"outside 0\.\.999"),
        ([("img0.png", TENCH)], "file,class", r"expected columns 'path' and 'label'"),
        ([], "path,label", r"header but no rows"),
        ([("/etc/passwd", TENCH)], "path,label", r"must be relative to the dataset root"),
        ([("../flat/img0.png", TENCH)], "path,label", r"must be relative to the dataset root"),
        ([("sub/../img0.png", TENCH)], "path,label", r"must be relative to the dataset root"),
    ],
)
def test_bad_label_files_are_refused(tmp_path, flat, rows, header, message):
    labels = write_csv(tmp_path / "labels.csv", rows, header=header)
    with pytest.raises(LabelFileError, match=message) as info:
        load_dataset(flat, label_file=labels)
    assert isinstance(info.value, UserError)
    assert str(labels) in str(info.value)


def test_ambiguous_class_name_is_refused_with_wnid_hint(tmp_path, flat):
    labels = write_csv(tmp_path / "labels.csv", [("img0.png", "tench"), ("img1.png", "crane")])
    with pytest.raises(LabelFileError, match=r"'crane' names several classes; give the wnid"):
        load_dataset(flat, label_file=labels)


def test_unreadable_label_files_are_refused(tmp_path, flat):
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("path,label\nimg0.png,caf\xe9\n".encode("latin-1"))
    with pytest.raises(LabelFileError, match="not UTF-8"):
        load_dataset(flat, label_file=latin1)
    with pytest.raises(LabelFileError, match="cannot read label file"):
        load_dataset(flat, label_file=tmp_path / "missing.csv")
    empty = tmp_path / "empty.csv"
    empty.write_text("\n\n")
    with pytest.raises(LabelFileError, match="is empty"):
        load_dataset(flat, label_file=empty)


def test_label_file_of_other_classes_gives_a_custom_space(tmp_path, flat):
    rows = [("img0.png", "dog"), ("img1.png", "cat"), ("img2.png", "dog"), ("img3.png", "cat")]
    ds = load_dataset(flat, label_file=write_csv(tmp_path / "labels.csv", rows))
    assert ds.layout == "label-file"
    assert ds.label_space.imagenet is False
    assert ds.label_space.keys == ("cat", "dog")
    assert ds.labels.tolist() == [1, 0, 1, 0]
    assert ds.real is None


def test_label_file_of_numbered_other_classes_keeps_their_numbers(tmp_path, flat):
    # No label is an ImageNet index, so these are a custom space's keys, not indices into it.
    rows = [("img0.png", "1000"), ("img1.png", "1002"), ("img2.png", "1001"), ("img3.png", "1000")]
    ds = load_dataset(flat, label_file=write_csv(tmp_path / "labels.csv", rows))
    assert ds.label_space.imagenet is False
    assert [ds.label_space.keys[i] for i in ds.labels] == ["1000", "1002", "1001", "1000"]


# --------------------------------------------------------------------------- ReaL labels


@pytest.fixture(scope="module")
def timm_real() -> list[list[int]]:
    real, source = load_real_labels()
    assert source.startswith("timm:")
    return real


def test_timm_real_labels_have_50000_sets(timm_real):
    assert len(timm_real) == 50_000
    assert all(isinstance(s, list) and all(0 <= c < 1000 for c in s) for s in timm_real)
    assert sum(not s for s in timm_real) > 0  # some images fit no class


def test_real_sets_attach_by_validation_file_number(tmp_path, make_image, timm_real):
    make_image(tmp_path / GOLDFISH / val_name(1))
    make_image(tmp_path / TENCH / val_name(2))
    make_image(tmp_path / TENCH / val_name(50_000))

    ds = load_dataset(tmp_path)

    assert ds.real_source is not None and ds.real_source.startswith("timm:")
    by_id = dict(zip(ds.image_ids, ds.real, strict=True))
    assert by_id[f"{GOLDFISH}/{val_name(1)}"] == timm_real[0]
    assert by_id[f"{TENCH}/{val_name(2)}"] == timm_real[1]
    assert by_id[f"{TENCH}/{val_name(50_000)}"] == timm_real[49_999]
    assert load_dataset(tmp_path, real=False).real is None


def test_real_is_left_off_when_any_file_is_not_a_validation_image(tmp_path, make_image):
    make_image(tmp_path / TENCH / val_name(2))
    make_image(tmp_path / TENCH / "holiday.png")
    ds = load_dataset(tmp_path)
    assert ds.real is None and ds.real_source is None


@pytest.mark.parametrize("number", [0, 50_001, 99_999_999])
def test_out_of_range_validation_numbers_are_not_validation_images(tmp_path, make_image, number):
    assert real_index_of(f"{TENCH}/{val_name(number)}") is None
    make_image(tmp_path / TENCH / val_name(number))
    make_image(tmp_path / TENCH / val_name(3))
    assert load_dataset(tmp_path).real is None


def test_real_index_of():
    assert real_index_of(f"{TENCH}/{val_name(1)}") == 0
    assert real_index_of(val_name(50_000)) == 49_999
    assert real_index_of("ILSVRC2012_val_00000001.png") == 0
    assert real_index_of("ILSVRC2012_val_0000001.JPEG") is None
    assert real_index_of("xILSVRC2012_val_00000001.JPEG") is None


def test_custom_real_file(tmp_path, make_image):
    make_image(tmp_path / TENCH / val_name(7))
    own = tmp_path / "real.json"
    own.write_text(json.dumps([[i % 1000, 3] for i in range(50_000)]))
    ds = load_dataset(tmp_path, real=own)
    assert ds.real == [[6, 3]]
    assert ds.real_source == str(own)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ([[1]] * 10, r"expected a list of 50000 label lists, got a list of length 10"),
        ({"0": [1]}, r"expected a list of 50000 label lists, got a dict"),
        ([[1]] * 3 + [1] + [[1]] * 49_996, r"entry 3 should be a list of class indices"),
        ([[1]] * 5 + [[1000]] + [[1]] * 49_994, r"entry 5 should be a list of class indices"),
        # JSON true/false load as bool, an int subclass: they are not class indices 1 and 0.
        ([[True]] + [[1]] * 49_999, r"entry 0 should be a list of class indices 0\.\.999, got \[True\]"),
        ([[1]] * 7 + [[2, False]] + [[1]] * 49_992, r"entry 7 should be"),
        ([True] * 50_000, r"entry 0 should be"),
        ([[1]] * 2 + [[1.0]] + [[1]] * 49_997, r"entry 2 should be"),
        ([[1]] * 2 + [["1"]] + [[1]] * 49_997, r"entry 2 should be"),
        ([[1]] * 2 + [None] + [[1]] * 49_997, r"entry 2 should be"),
    ],
)
def test_malformed_real_files_are_refused(tmp_path, make_image, content, message):
    make_image(tmp_path / TENCH / val_name(1))
    bad = tmp_path / "real.json"
    bad.write_text(json.dumps(content))
    with pytest.raises(LabelFileError, match=message):
        load_dataset(tmp_path, real=bad)


def test_unreadable_real_files_are_refused(tmp_path, make_image):
    make_image(tmp_path / TENCH / val_name(1))
    notjson = tmp_path / "real.json"
    notjson.write_text("[[1], [2")
    with pytest.raises(LabelFileError, match="not valid JSON"):
        load_dataset(tmp_path, real=notjson)
    with pytest.raises(LabelFileError, match="cannot read ReaL file"):
        load_dataset(tmp_path, real=tmp_path / "missing.json")


def test_explicit_real_on_a_custom_label_space_is_refused(tmp_path, make_image):
    make_image(tmp_path / "cat" / val_name(1))
    make_image(tmp_path / "dog" / val_name(2))
    own = tmp_path / "real.json"
    own.write_text(json.dumps([[0]] * 50_000))
    assert load_dataset(tmp_path).real is None  # by default ReaL quietly does not apply
    with pytest.raises(LabelFileError, match="--real was given"):
        load_dataset(tmp_path, real=own)


# --------------------------------------------------------------------------- --limit


@pytest.fixture(scope="module")
def thirty(tmp_path_factory) -> Path:
    from PIL import Image

    root = tmp_path_factory.mktemp("thirty")
    for k in range(30):
        d = root / ("cat" if k % 3 else "dog")
        d.mkdir(exist_ok=True)
        Image.new("RGB", (4, 4), (k, k, k)).save(d / f"{k:02d}.png")
    return root


def test_limit_keeps_evenly_spaced_images(thirty):
    full = load_dataset(thirty)
    ds = load_dataset(thirty, limit=4)
    pos = [full.image_ids.index(i) for i in ds.image_ids]
    assert pos == [0, 10, 19, 29]
    assert ds.labels.tolist() == [full.labels[p] for p in pos]
    assert load_dataset(thirty, limit=1000).image_ids == full.image_ids


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(limit=st.integers(1, 40))
def test_limit_property(thirty, limit):
    full = load_dataset(thirty)
    ds = load_dataset(thirty, limit=limit)
    assert len(ds) == min(limit, len(full))
    pos = [full.image_ids.index(i) for i in ds.image_ids]
    assert pos == sorted(set(pos)) and pos[0] == 0
    if limit >= 2:
        assert pos[-1] == len(full) - 1
    assert ds.labels.tolist() == [full.labels[p] for p in pos]
    if 2 <= limit <= len(full):
        assert max(np.diff(pos)) - min(np.diff(pos)) <= 1  # evenly spaced


@pytest.mark.parametrize("limit", [0, -3])
def test_limit_must_be_positive(thirty, limit):
    with pytest.raises(DatasetError, match="positive"):
        load_dataset(thirty, limit=limit)


# --------------------------------------------------------------------------- label spaces


@functools.cache
def _owners() -> Counter[str]:
    """How many ImageNet classes answer to each lower-cased name or synonym, from timm's metadata."""
    from timm.data import ImageNetInfo

    info = ImageNetInfo("imagenet-1k")
    out: Counter[str] = Counter()
    for i in range(1000):
        d = info.index_to_description(i)
        out.update({d.lower()} | {s.strip().lower() for s in d.split(",")})
    return out


def test_imagenet_space_names_resolve_unless_ambiguous():
    space = imagenet_label_space()
    ambiguous = 0
    for i, name in enumerate(space.names):
        if _owners()[name.lower()] == 1:
            assert space.resolve(name) == i, name
        else:
            ambiguous += 1
            with pytest.raises(KeyError, match="give the wnid"):
                space.resolve(name)
    assert 0 < ambiguous < 20  # crane, maillot, cardigan, ...
    assert space.resolve("tench") == 0
    assert space.resolve("goldfish") == 1


@settings(max_examples=300, deadline=None)
@given(i=st.integers(0, 999), pad=st.sampled_from(["", " ", "\t", "  "]), upper=st.booleans())
def test_imagenet_space_round_trips_keys_indices_and_names(i, pad, upper):
    space = imagenet_label_space()
    key = space.keys[i].upper() if upper else space.keys[i]
    assert space.resolve(pad + key + pad) == i
    assert space.resolve(pad + str(i) + pad) == i
    name = space.names[i].upper() if upper else space.names[i]
    if _owners()[name.lower()] == 1:
        assert space.resolve(pad + name + pad) == i


@settings(max_examples=200, deadline=None)
@given(keys=st.lists(st.text(min_size=1, max_size=6), min_size=1, max_size=12, unique=True))
def test_custom_space_resolves_every_key_to_its_own_index(keys):
    # Folder names may be digits ("10"), differ only in case ("Cat", "cat") or in spaces.
    space = LabelSpace(keys=tuple(keys), names=tuple(keys), imagenet=False)
    for i, k in enumerate(keys):
        assert space.resolve(k) == i


def test_label_space_rejects_misaligned_names():
    with pytest.raises(ValueError, match="differ in length"):
        LabelSpace(keys=("a", "b"), names=("a",), imagenet=False)


def test_resolve_rejects_unknown_tokens():
    space = imagenet_label_space()
    for tok in ["", "n00000000", "not a class", "²", "-1", "1.5"]:
        with pytest.raises(KeyError):
            space.resolve(tok)


# --------------------------------------------------------------------------- the real 1,300-image subset


def test_shared_imagenet_val_1300(shared_dir):
    root = shared_dir / "datasets" / "imagenet-val-1300"
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    ds = load_dataset(root)
    assert len(ds) == 1300
    assert ds.layout == "imagefolder-wnid"
    assert ds.root == (root / "val").resolve()
    assert list(ds.image_ids) == sorted(ds.image_ids)
    keys = imagenet_label_space().keys
    assert all(keys[lab] == i.split("/")[0] for i, lab in zip(ds.image_ids, ds.labels.tolist(), strict=True))
    assert len(set(ds.labels.tolist())) == 725
    assert ds.real is not None
    inside = sum(int(lab) in s for lab, s in zip(ds.labels, ds.real, strict=True))
    outside = sum(bool(s) and int(lab) not in s for lab, s in zip(ds.labels, ds.real, strict=True))
    empty = sum(not s for s in ds.real)
    multi = sum(len(s) > 1 for s in ds.real)
    assert (inside, outside, empty, multi) == (1156, 87, 57, 138)


# --------------------------------------------------------------------------- label-file paths, taken exactly


def test_label_file_paths_are_taken_verbatim(tmp_path, make_image):
    root = tmp_path / "flat"
    make_image(root / " a.jpg", seed=1)  # a name that starts with a space
    make_image(root / "b.jpg", seed=2)
    (root / "c.jpg ").write_bytes(make_image(tmp_path / "c.jpg", seed=3).read_bytes())  # ... and one that ends with one
    labels = tmp_path / "labels.csv"
    # 'b.jpg, goldfish': the padded label cell of a hand-written CSV is stripped; the path cell is the file's name.
    labels.write_text(f'path,label\n a.jpg,{TENCH}\nb.jpg, goldfish\n"c.jpg ",{BRAMBLING}\n')
    ds = load_dataset(root, label_file=labels)
    assert ds.image_ids == (" a.jpg", "b.jpg", "c.jpg ")
    assert ds.labels.tolist() == [0, 1, imagenet_label_space().keys.index(BRAMBLING)]
    assert all(ds.path(i).is_file() for i in range(len(ds)))


def test_a_padded_path_that_names_no_file_says_which_file_it_meant(tmp_path, make_image):
    root = tmp_path / "flat"
    make_image(root / "a.jpg")
    labels = tmp_path / "labels.csv"
    labels.write_text(f"label, path\n{TENCH}, a.jpg\n")
    with pytest.raises(LabelFileError, match=r"image ' a.jpg' does not exist .*a file named 'a.jpg' exists"):
        load_dataset(root, label_file=labels)


# --------------------------------------------------------------------------- symlinks: one rule, each file once


def _folder(tmp_path, make_image, classes=(TENCH, GOLDFISH), per=2) -> Path:
    root = tmp_path / "ds"
    for c, cls in enumerate(classes):
        for k in range(per):
            make_image(root / cls / f"{cls}_{k}.png", seed=10 * c + k)
    return root


@pytest.mark.parametrize("classes", [(TENCH, GOLDFISH), ("cat", "dog")], ids=["wnid", "custom"])
def test_a_class_folder_linked_to_the_root_is_not_followed(tmp_path, make_image, caplog, classes):
    root = _folder(tmp_path, make_image, classes)
    (root / (BRAMBLING if classes[0] == TENCH else "emu")).symlink_to(root)  # every image again, mislabelled
    ds = load_dataset(root)
    assert ds.image_ids == tuple(f"{c}/{c}_{k}.png" for c in sorted(classes) for k in range(2))
    assert [ds.label_space.keys[i] for i in ds.labels] == [i.split("/")[0] for i in ds.image_ids]
    (msg,) = [r.getMessage() for r in caplog.records]
    assert "lead back to a folder that holds them" in msg
    if classes[0] == "cat":
        assert ds.label_space.keys == ("cat", "dog"), "a loop is no class"


def test_symlink_loops_inside_a_class_end(tmp_path, make_image, caplog):
    root = _folder(tmp_path, make_image)
    (root / TENCH / "again").symlink_to(root / TENCH)
    (root / TENCH / "up").symlink_to(root)
    (root / GOLDFISH / "x.png").symlink_to(root / GOLDFISH / "y.png")  # a loop of file links: a bad image
    (root / GOLDFISH / "y.png").symlink_to(root / GOLDFISH / "x.png")
    ds = load_dataset(root)
    assert len(ds) == 6 and ds.file_stamps()[ds.image_ids.index(f"{GOLDFISH}/x.png")].tolist() == [-1, -1]
    assert any("lead back" in r.getMessage() for r in caplog.records)


def test_one_file_reached_twice_with_one_label_is_counted_once(tmp_path, make_image, caplog):
    import os

    root = _folder(tmp_path, make_image)
    (root / TENCH / "link.png").symlink_to(root / TENCH / f"{TENCH}_0.png")
    os.link(root / GOLDFISH / f"{GOLDFISH}_0.png", root / GOLDFISH / "hard.png")
    (root / TENCH / "sub").mkdir()
    (root / TENCH / "sub" / "dir-link").symlink_to(root / TENCH, target_is_directory=True)  # a loop too
    ds = load_dataset(root)
    assert ds.image_ids == (
        f"{TENCH}/{TENCH}_0.png",  # its own path is kept, not the link's
        f"{TENCH}/{TENCH}_1.png",
        f"{GOLDFISH}/hard.png",  # two names of one file, neither a link: the first in sorted order
        f"{GOLDFISH}/{GOLDFISH}_1.png",
    )
    msgs = [r.getMessage() for r in caplog.records]
    (dup,) = [m for m in msgs if "counted once" in m]
    assert "2 path(s) reach a file already listed" in dup


def test_one_file_reached_twice_with_two_labels_is_refused(tmp_path, make_image):
    root = _folder(tmp_path, make_image)
    (root / GOLDFISH / "also-a-tench.png").symlink_to(root / TENCH / f"{TENCH}_1.png")
    with pytest.raises(DatasetError, match=r"one file reached twice .* different labels"):
        load_dataset(root)
    other = _folder(tmp_path / "b", make_image)
    (other / BRAMBLING).symlink_to(other / TENCH)  # a class folder that is another class's
    with pytest.raises(DatasetError, match=r"different labels"):
        load_dataset(other)


def test_label_file_rows_naming_one_file(tmp_path, make_image, caplog):
    root = tmp_path / "flat"
    make_image(root / "a.png")
    (root / "alias.png").symlink_to(root / "a.png")
    same = write_csv(tmp_path / "same.csv", [("a.png", TENCH), ("alias.png", "tench")])
    ds = load_dataset(root, label_file=same)
    assert ds.image_ids == ("a.png",)
    assert any("counted once" in r.getMessage() for r in caplog.records)
    other = write_csv(tmp_path / "other.csv", [("a.png", TENCH), ("alias.png", GOLDFISH)])
    with pytest.raises(LabelFileError, match=r"other.csv: 'a.png' .* 'alias.png' .* different labels"):
        load_dataset(root, label_file=other)


def _escaping(tmp_path, make_image) -> tuple[Path, Path]:
    root = _folder(tmp_path, make_image)
    pool = tmp_path / "pool"
    make_image(pool / "outside.png", seed=99)
    make_image(pool / "sub" / "deeper.png", seed=98)
    return root, pool


def test_symlinks_leaving_the_root_are_refused_like_dotdot(tmp_path, make_image):
    root, pool = _escaping(tmp_path, make_image)
    (root / TENCH / "outside.png").symlink_to(pool / "outside.png")
    with pytest.raises(DatasetError, match=r"1 path\(s\) lead outside the dataset root .*outside.png"):
        load_dataset(root)
    (root / TENCH / "outside.png").unlink()
    (root / TENCH / "pool").symlink_to(pool / "sub")  # a folder link: never walked
    with pytest.raises(DatasetError, match=r"lead outside the dataset root"):
        load_dataset(root)
    (root / TENCH / "pool").unlink()
    (root / "n01530575").symlink_to(pool)  # a class folder elsewhere
    with pytest.raises(DatasetError, match=r"lead outside the dataset root"):
        load_dataset(root)
    (root / "n01530575").unlink()
    assert len(load_dataset(root)) == 4
    flat = tmp_path / "flat"
    make_image(flat / "in.png")
    (flat / "out.png").symlink_to(pool / "outside.png")
    (flat / "d").symlink_to(pool, target_is_directory=True)
    for rel in ("out.png", "d/outside.png"):
        labels = write_csv(tmp_path / "labels.csv", [("in.png", TENCH), (rel, TENCH)])
        with pytest.raises(LabelFileError, match=r"line 3: .*leads outside the dataset root"):
            load_dataset(flat, label_file=labels)


def test_scoring_and_the_dashboard_apply_one_rule(tmp_path, make_image):
    import os

    from audit.dashboard.thumbs import UnsafePath, safe_image_path
    from audit.datasets import image_path

    root, pool = _escaping(tmp_path, make_image)
    (root / TENCH / "inside.png").symlink_to(root / GOLDFISH / f"{GOLDFISH}_0.png")
    (root / TENCH / "outside.png").symlink_to(pool / "outside.png")
    (root / "esc").symlink_to(pool)
    (root / TENCH / "back\\slash.png").write_bytes((root / TENCH / f"{TENCH}_0.png").read_bytes())
    os.mkfifo(root / TENCH / "pipe.png")
    ids = [
        f"{TENCH}/{TENCH}_0.png", f"{TENCH}/inside.png", f"{TENCH}/back\\slash.png",  # accepted
        f"{TENCH}/outside.png", "esc/outside.png", "../pool/outside.png", str(pool / "outside.png"),
        f"{TENCH}/pipe.png", TENCH, f"{TENCH}/missing.png", "", f"{TENCH}/a\x00.png",
    ]  # fmt: skip
    for i in ids:
        try:
            image_path(root, i)
            ours = True
        except DatasetError:
            ours = False
        try:
            safe_image_path(root, i)
            theirs = True
        except UnsafePath:
            theirs = False
        assert ours == theirs == (ids.index(i) < 3), i


def test_pipes_named_like_images_are_not_listed_or_read(tmp_path, make_image):
    import os

    root = _folder(tmp_path, make_image)
    os.mkfifo(root / TENCH / "pipe.png")  # opening it would block the run for ever
    assert len(load_dataset(root)) == 4
    flat = tmp_path / "flat"
    make_image(flat / "a.png")
    os.mkfifo(flat / "b.png")
    labels = write_csv(tmp_path / "labels.csv", [("a.png", TENCH), ("b.png", TENCH)])
    with pytest.raises(LabelFileError, match="not a regular file"):
        load_dataset(flat, label_file=labels)


def test_stamps_are_each_files_size_and_mtime(tmp_path, make_image):
    import os

    root = _folder(tmp_path, make_image)
    ds = load_dataset(root)
    for i, (size, mtime) in zip(ds.image_ids, ds.file_stamps().tolist(), strict=True):
        st = os.stat(root / i)
        assert (size, mtime) == (st.st_size, st.st_mtime_ns)


def test_a_linked_val_folder_is_resolved_before_the_rule_applies(tmp_path, make_image, caplog):
    real = _folder(tmp_path / "store", make_image)
    (real / TENCH / "alias.png").symlink_to(real / TENCH / f"{TENCH}_0.png")  # a link inside: fine
    top = tmp_path / "top"
    top.mkdir()
    (top / "val").symlink_to(real)
    ds = load_dataset(top)
    assert ds.root == real.resolve() and len(ds) == 4
    assert any("counted once" in r.getMessage() for r in caplog.records)
