"""Datasets: which images there are, their given labels, and their ReaL sets.

Three layouts are understood:

* ImageFolder whose folder names are ImageNet wnids. Each folder maps to the
  *standard* ImageNet-1k index of its wnid, whatever subset of the 1,000
  classes is present (numbering the present folders 0..K-1 would get every
  label wrong on a subset).
* A flat folder plus a CSV label file with columns ``path,label``; a label is a
  wnid, an ImageNet class index or an unambiguous ImageNet class name.
* ImageFolder with arbitrary class names: a custom label space, numbered in
  sorted folder order. Evaluations that need ImageNet classes are skipped.

An image's id is its POSIX path relative to the dataset root.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import io
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from audit.errors import DatasetError, LabelFileError

__all__ = [
    "AuditDataset",
    "LabelSpace",
    "decode_image",
    "image_extensions",
    "imagenet_label_space",
    "load_dataset",
    "load_real_labels",
    "real_index_of",
]

_ILSVRC_VAL = re.compile(r"^ILSVRC2012_val_(\d{8})\.[A-Za-z]+$")
_WNID = re.compile(r"^n\d{8}$")
_N_IMAGENET_VAL = 50_000
# Folders that hold the actual class folders in common ImageNet layouts.
_SPLIT_DIRS = ("val", "validation", "test")


@dataclass(frozen=True)
class LabelSpace:
    """An ordered set of classes.

    Attributes
    ----------
    keys : tuple of str, shape (C,)
        Stable identifiers: wnids for ImageNet, folder or label strings otherwise.
    names : tuple of str, shape (C,)
        Human-readable names, index-aligned with ``keys``.
    imagenet : bool
        True when index ``i`` is ImageNet-1k class ``i`` (so ImageNet heads and
        ReaL labels apply).
    aliases : tuple of tuple of str, shape (C,), optional
        Further names each class answers to (WordNet synonyms for ImageNet).
    """

    keys: tuple[str, ...]
    names: tuple[str, ...]
    imagenet: bool
    aliases: tuple[tuple[str, ...], ...] = ()
    _lookup: dict[str, int] = field(default=None, repr=False, compare=False)  # type: ignore[assignment]
    _keys: dict[str, int] = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if len(self.keys) != len(self.names):
            raise ValueError(f"keys and names differ in length: {len(self.keys)} vs {len(self.names)}")
        lookup: dict[str, int] = {}
        ambiguous: set[str] = set()
        for i, name in enumerate(self.names):
            extra = self.aliases[i] if self.aliases else ()
            for low in {n.lower() for n in (name, *extra)}:
                if low in lookup and lookup[low] != i:
                    ambiguous.add(low)
                lookup[low] = i
        for a in ambiguous:
            lookup[a] = -1  # an ImageNet name such as "crane" names two classes
        for i, key in enumerate(self.keys):
            lookup[key.lower()] = i
        object.__setattr__(self, "_lookup", lookup)
        object.__setattr__(self, "_keys", {key: i for i, key in enumerate(self.keys)})

    def __len__(self) -> int:
        return len(self.keys)

    def resolve(self, token: str) -> int:
        """Return the class index of a key, an index string, or a class name.

        Raises
        ------
        KeyError
            With a message saying why ``token`` names no single class.
        """
        # An exact key wins: a custom folder named "10" is that folder's class, not index 10.
        for t in (token, token.strip()):
            if t in self._keys:
                return self._keys[t]
        tok = token.strip()
        if tok.isascii() and tok.isdigit():
            i = int(tok)
            if 0 <= i < len(self.keys):
                return i
            raise KeyError(f"class index {i} is outside 0..{len(self.keys) - 1}")
        i = self._lookup.get(tok.lower())
        if i is None:
            raise KeyError(f"{tok!r} is not a known class (wnid, index or name)")
        if i < 0:
            raise KeyError(f"{tok!r} names several classes; give the wnid instead")
        return i


def _timm_info(name: str) -> Path:
    """A metadata file of timm's ``data/_info`` folder, found without importing timm.

    ``import timm`` costs seconds (it loads every model definition); the class
    list and the ReaL labels are plain files inside the wheel.
    """
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        raise DatasetError("the timm package is not installed; run: pip install timm")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "_info" / name


@functools.cache
def imagenet_label_space() -> LabelSpace:
    """The ImageNet-1k label space in standard index order, from timm's metadata files."""
    wnids = tuple(_timm_info("imagenet_synsets.txt").read_text().split())
    lemma = dict(
        line.split("\t", 1) for line in _timm_info("imagenet_synset_to_lemma.txt").read_text().splitlines() if line
    )
    desc = [lemma[w].strip() for w in wnids]
    # "tench, Tinca tinca": the first synonym is the familiar short name.
    syn = [tuple(x.strip() for x in d.split(",")) for d in desc]
    names = tuple(s[0] for s in syn)
    aliases = tuple((d, *s[1:]) for d, s in zip(desc, syn, strict=True))
    return LabelSpace(keys=wnids, names=names, imagenet=True, aliases=aliases)


@functools.cache
def image_extensions() -> frozenset[str]:
    """Lower-case file extensions that Pillow can open."""
    from PIL import Image

    return frozenset(ext.lower() for ext in Image.registered_extensions())


@dataclass(frozen=True)
class AuditDataset:
    """A validation set ready to score.

    Attributes
    ----------
    root : Path
        Resolved folder the image ids are relative to.
    image_ids : tuple of str, shape (N,)
        POSIX paths relative to ``root``, sorted.
    labels : ndarray of int64, shape (N,)
        Given label of each image as an index into ``label_space``.
    label_space : LabelSpace
    layout : str
        ``"imagefolder-wnid"``, ``"imagefolder-custom"`` or ``"label-file"``.
    real : list of list of int, or None
        ReaL label set per image (may be empty), aligned with ``image_ids``;
        None when ReaL does not apply to these images.
    real_source : str or None
        Where the ReaL sets came from.
    """

    root: Path
    image_ids: tuple[str, ...]
    labels: np.ndarray
    label_space: LabelSpace
    layout: str
    real: list[list[int]] | None = None
    real_source: str | None = None

    def __len__(self) -> int:
        return len(self.image_ids)

    def path(self, i: int) -> Path:
        return self.root / self.image_ids[i]


def _is_image(p: Path) -> bool:
    return p.suffix.lower() in image_extensions() and not p.name.startswith(".")


def _find_root(root: Path) -> Path:
    # Users naturally point at the dataset folder; valprep.sh puts the classes
    # one level down in val/.
    entries = [p for p in root.iterdir() if not p.name.startswith(".")]
    subdirs = [p for p in entries if p.is_dir()]
    if (
        len(subdirs) == 1
        and subdirs[0].name.lower() in _SPLIT_DIRS
        and not any(_is_image(p) for p in entries if p.is_file())
    ):
        return subdirs[0]
    return root


def _imagefolder(root: Path) -> tuple[list[str], list[str], str, LabelSpace]:
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    ids: list[str] = []
    folder_of: list[str] = []
    for c in classes:
        for p in sorted((root / c).rglob("*")):
            hidden = any(part.startswith(".") for part in p.relative_to(root).parts)  # .ipynb_checkpoints/
            if not hidden and _is_image(p) and (p.is_file() or p.is_symlink()):
                ids.append(p.relative_to(root).as_posix())
                folder_of.append(c)
    wnid = [c for c in classes if _WNID.match(c)]
    if wnid and len(wnid) == len(classes):
        space = imagenet_label_space()
        unknown = [c for c in classes if c not in space.keys]
        if unknown:
            raise DatasetError(
                f"folder {unknown[0]!r} looks like a wnid but is not an ImageNet-1k class; rename or remove it"
            )
        return ids, folder_of, "imagefolder-wnid", space
    if wnid:
        other = next(c for c in classes if not _WNID.match(c))
        raise DatasetError(
            f"{root}: folder {other!r} is neither an ImageNet wnid nor like its siblings "
            f"(e.g. {wnid[0]!r}); rename it to its wnid or move it out of the dataset"
        )
    space = LabelSpace(keys=tuple(classes), names=tuple(classes), imagenet=False)
    return ids, folder_of, "imagefolder-custom", space


def _read_label_csv(path: Path) -> list[tuple[str, str]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise LabelFileError(f"cannot read label file {path}: {e.strerror}; check the path") from e
    except UnicodeDecodeError as e:
        raise LabelFileError(f"label file {path} is not UTF-8 (byte {e.start}); re-save it as UTF-8") from e
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as e:
        raise LabelFileError(f"label file {path} is not valid CSV ({e}); save it as plain 'path,label' CSV") from e
    rows = [r for r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise LabelFileError(f"label file {path} is empty; expected a header 'path,label' and rows")
    header = [h.strip().lower() for h in rows[0]]
    # 'image' is accepted for 'path' so that an exported labels.csv loads back as it is.
    col = "path" if "path" in header else "image"
    if col not in header or "label" not in header:
        raise LabelFileError(f"label file {path} has header {rows[0]!r}; expected columns 'path' and 'label'")
    ip, il = header.index(col), header.index("label")
    out: list[tuple[str, str]] = []
    for n, r in enumerate(rows[1:], start=2):
        if len(r) <= max(ip, il):
            raise LabelFileError(f"label file {path} line {n}: expected 'path,label', got {r!r}")
        if not r[il].strip():
            raise LabelFileError(f"label file {path} line {n}: empty label for {r[ip]!r}; give a class or drop the row")
        out.append((r[ip].strip(), r[il].strip()))
    if not out:
        raise LabelFileError(f"label file {path} has a header but no rows")
    return out


def _safe_relpath(root: Path, rel: str, where: str) -> str:
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or not rel:
        raise LabelFileError(f"{where}: path {rel!r} must be relative to the dataset root and stay inside it")
    return p.as_posix()


def _label_file(root: Path, label_file: Path) -> tuple[list[str], list[str], LabelSpace]:
    rows = _read_label_csv(label_file)
    seen: dict[str, int] = {}
    ids: list[str] = []
    toks: list[str] = []
    for n, (rel, tok) in enumerate(rows, start=2):
        rel = _safe_relpath(root, rel, f"{label_file} line {n}")
        if rel in seen:
            raise LabelFileError(
                f"{label_file} line {n}: {rel!r} is listed twice (first on line {seen[rel]}); keep one row per image"
            )
        seen[rel] = n
        if not (root / rel).exists() and not (root / rel).is_symlink():
            raise LabelFileError(
                f"{label_file} line {n}: image {rel!r} does not exist under {root}; fix the path or drop the row"
            )
        ids.append(rel)
        toks.append(tok)
    space = imagenet_label_space()
    bad = []
    for t in toks:
        try:
            space.resolve(t)
        except KeyError as e:
            bad.append((t, e.args[0]))
    if bad and len(bad) < len(toks):
        t, why = bad[0]
        raise LabelFileError(
            f"{label_file}: {len(bad)} labels are not ImageNet classes, first {t!r} ({why}); "
            "use wnids, class indices or exact ImageNet names"
        )
    if bad:
        names = sorted(set(toks))
        space = LabelSpace(keys=tuple(names), names=tuple(names), imagenet=False)
    return ids, toks, space


def _spread(n: int, limit: int | None) -> np.ndarray:
    if limit is None or limit >= n:
        return np.arange(n)
    if limit <= 0:
        raise DatasetError(f"--limit must be a positive number of images, got {limit}")
    # Evenly spaced over the sorted ids, so a small limit still covers many classes.
    return np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))


def real_index_of(image_id: str) -> int | None:
    """0-based ILSVRC-2012 validation index of an image id, or None."""
    m = _ILSVRC_VAL.match(Path(image_id).name)
    if not m or not 1 <= int(m.group(1)) <= _N_IMAGENET_VAL:
        return None  # val_00000000 or val_00050001 is no ILSVRC-2012 validation image
    return int(m.group(1)) - 1


def _timm_real_json() -> tuple[bytes, str]:
    return _timm_info("imagenet_real_labels.json").read_bytes(), "timm:timm/data/_info/imagenet_real_labels.json"


def load_real_labels(path: str | Path | None = None) -> tuple[list[list[int]], str]:
    """Load the 50,000 ReaL label sets.

    Parameters
    ----------
    path : path-like, optional
        A ReaL-format JSON file (a list of 50,000 lists of class indices).
        Default: the copy that ships inside the ``timm`` wheel.

    Returns
    -------
    real : list of list of int, length 50,000
    source : str
    """
    if path is None:
        raw, source = _timm_real_json()
    else:
        p = Path(path)
        try:
            raw, source = p.read_bytes(), str(p)
        except OSError as e:
            raise LabelFileError(f"cannot read ReaL file {p}: {e.strerror}; check --real") from e
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LabelFileError(f"ReaL file {source} is not valid JSON ({e}); pass a ReaL-format file") from e
    if not isinstance(data, list) or len(data) != _N_IMAGENET_VAL:
        seen = f"{type(data).__name__} of length {len(data)}" if isinstance(data, list) else type(data).__name__
        raise LabelFileError(f"ReaL file {source}: expected a list of {_N_IMAGENET_VAL} label lists, got a {seen}")
    for i, s in enumerate(data):
        if not isinstance(s, list) or not all(isinstance(c, int) and 0 <= c < 1000 for c in s):
            raise LabelFileError(f"ReaL file {source}: entry {i} should be a list of class indices 0..999, got {s!r}")
    return data, source


def load_dataset(
    root: str | Path,
    *,
    label_file: str | Path | None = None,
    real: str | Path | bool | None = None,
    limit: int | None = None,
) -> AuditDataset:
    """Discover the images and labels of a validation set.

    Parameters
    ----------
    root : path-like
        Dataset folder. A lone ``val/`` child is descended into.
    label_file : path-like, optional
        CSV with ``path,label`` columns; makes a flat folder usable.
    real : path-like, bool or None
        ReaL label file. None: attach timm's copy when every image is an
        ILSVRC-2012 validation file; False: never attach.
    limit : int, optional
        Keep this many images, evenly spaced over the sorted ids.

    Raises
    ------
    DatasetError, LabelFileError
        For anything the user must fix, before any scoring starts.
    """
    r = Path(root).expanduser()
    if not r.is_dir():
        raise DatasetError(f"dataset folder {r} does not exist; pass the folder that holds the images")
    # A label file names paths relative to the folder the user gave; only ImageFolder descends into val/.
    r = r.resolve() if label_file is not None else _find_root(r.resolve())
    if label_file is not None:
        ids, toks, space = _label_file(r, Path(label_file))
        layout = "label-file"
    else:
        ids, toks, layout, space = _imagefolder(r)
        if not ids and any(_is_image(p) for p in r.iterdir()):
            raise DatasetError(f"{r} holds images but no class folders; pass --labels FILE.csv with 'path,label' rows")
    if not ids:
        raise DatasetError(f"no images found under {r}; expected class folders of image files")
    order = sorted(range(len(ids)), key=ids.__getitem__)  # ids are sorted as strings, whatever the layout
    ids, toks = [ids[i] for i in order], [toks[i] for i in order]
    keep = _spread(len(ids), limit)
    ids = [ids[i] for i in keep]
    labels = np.array([space.resolve(toks[i]) for i in keep], dtype=np.int64)
    real_sets, real_src = _attach_real(ids, space, real)
    return AuditDataset(
        root=r,
        image_ids=tuple(ids),
        labels=labels,
        label_space=space,
        layout=layout,
        real=real_sets,
        real_source=real_src,
    )


def _attach_real(
    ids: Sequence[str], space: LabelSpace, real: str | Path | bool | None
) -> tuple[list[list[int]] | None, str | None]:
    if real is False:
        return None, None
    idx = [real_index_of(i) for i in ids]
    explicit = real not in (None, True)
    if not space.imagenet or any(i is None for i in idx):
        if explicit:
            raise LabelFileError(
                "--real was given but the images are not ImageNet classes named "
                "ILSVRC2012_val_XXXXXXXX; drop --real or rename the files"
            )
        return None, None
    sets, source = load_real_labels(None if not explicit else real)  # type: ignore[arg-type]
    return [list(sets[i]) for i in idx], source  # type: ignore[index]


def decode_image(path: Path) -> Any:
    """Read an image the way a person sees it: EXIF orientation applied, RGB.

    Raises whatever Pillow raises for unreadable files; the caller records it.
    """
    from PIL import Image, ImageOps

    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode in ("I;16", "I;16B", "I;16L", "I"):
            # 16-bit greyscale: scale 0..65535 down to 0..255; PIL's own convert
            # would clip, turning almost every pixel white.
            arr = np.asarray(im, dtype=np.float32)
            if arr.max() > 255:
                arr /= 257.0
            im = Image.fromarray(arr.clip(0, 255).astype(np.uint8))
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = im.convert("RGBA")
            # Composite on white: transparent pixels are "nothing there", not black.
            bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(bg, im)
        return im.convert("RGB")
