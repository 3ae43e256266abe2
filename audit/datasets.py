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

An image's id is its POSIX path relative to the dataset root. Which files may be
read is one rule, :func:`image_path`, shared with the dashboard: an id is a
relative path without ``..`` whose real path (every symlink followed) lies inside
the real dataset root. Each file is counted once: paths that reach a file
already listed (a symlink or a hard link) are dropped with one warning, or
refused when they would give the file a second, different label.
"""

from __future__ import annotations

import csv
import functools
import importlib.util
import io
import json
import logging
import os
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np

from audit.errors import DatasetError, LabelFileError

__all__ = [
    "LABEL_SPACES",
    "AuditDataset",
    "LabelSpace",
    "dataset_folder",
    "decode_image",
    "file_stamps",
    "image_extensions",
    "image_path",
    "imagenet_label_space",
    "load_classes",
    "load_dataset",
    "load_real_labels",
    "real_index_of",
    "typical_short_side",
]

_log = logging.getLogger(__name__)
_ILSVRC_VAL = re.compile(r"^ILSVRC2012_val_(\d{8})\.[A-Za-z]+$")
_WNID = re.compile(r"^n\d{8}$")
_N_IMAGENET_VAL = 50_000
# Folders that hold the actual class folders in common ImageNet layouts.
_SPLIT_DIRS = ("val", "validation", "test")
# --label-space: "auto" decides from the labels (see _choose_space), the others are the user's word.
LABEL_SPACES = ("auto", "imagenet", "custom")


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
    stamps : ndarray of int64, shape (N, 2), optional
        ``(size, mtime_ns)`` of each file when it was listed, ``(-1, -1)`` where
        it cannot be stat'ed; a changed stamp means a changed image. Taken by
        :func:`file_stamps` on first use when not given.
    notes : tuple of str
        Decisions made while loading that a run reports (e.g. ``auto`` chose a custom space).
    """

    root: Path
    image_ids: tuple[str, ...]
    labels: np.ndarray
    label_space: LabelSpace
    layout: str
    real: list[list[int]] | None = None
    real_source: str | None = None
    stamps: np.ndarray | None = field(default=None, repr=False, compare=False)
    notes: tuple[str, ...] = ()  # what loading decided that the user should hear (see load_dataset's label_space)
    truth: np.ndarray | None = field(default=None, repr=False, compare=False)  # (N,) int64 trusted labels
    truth_source: str | None = None

    def __len__(self) -> int:
        return len(self.image_ids)

    def path(self, i: int) -> Path:
        return self.root / self.image_ids[i]

    def file_stamps(self) -> np.ndarray:
        """``(N, 2)`` int64 ``(size, mtime_ns)`` per image (see ``stamps``)."""
        if self.stamps is None:
            object.__setattr__(self, "stamps", file_stamps(self.root, self.image_ids))
        return self.stamps  # type: ignore[return-value]


_NO_STAMP = (-1, -1)


def _stamp(st: os.stat_result | None) -> tuple[int, int]:
    return _NO_STAMP if st is None else (int(st.st_size), int(st.st_mtime_ns))


def file_stamps(root: str | Path, image_ids: Sequence[str]) -> np.ndarray:
    """``(size, mtime_ns)`` of each image file (symlinks followed), ``(-1, -1)`` where it cannot be stat'ed.

    What tells a cached score from a stale one: an image repaired, replaced or
    broken in place changes its size or its modification time (nanoseconds).

    Returns
    -------
    ndarray of int64, shape (N, 2)
    """
    out = np.empty((len(image_ids), 2), dtype=np.int64)
    for k, i in enumerate(image_ids):
        try:
            st = os.stat(os.path.join(root, i))
        except (OSError, ValueError):  # missing, a broken link, a loop, a NUL byte
            st = None
        out[k] = _stamp(st)
    return out


def _inside(real: str, base: str) -> bool:
    """``real`` lies strictly inside the folder ``base`` (both real, normalised paths)."""
    return real != base and real.startswith(base if base.endswith("/") else base + "/")


def _row_id(raw: str, n: int, where: str, seen: dict[str, int]) -> str:
    """The image id of label-file row ``n`` (checked by :func:`_check_id`), refused when listed twice."""
    try:
        rel = _check_id(raw)
    except DatasetError as e:
        raise LabelFileError(f"{where}: {e}") from e
    if rel in seen:
        raise LabelFileError(f"{where}: {rel!r} is listed twice (first on line {seen[rel]}); keep one row per image")
    seen[rel] = n
    return rel


def _check_id(image_id: object) -> str:
    """The lexical half of the rule: a non-empty relative POSIX path without ``..``, taken as written."""
    if not isinstance(image_id, str) or not image_id or "\x00" in image_id:
        raise DatasetError(f"image path {image_id!r} is not a relative file path; name a file under the dataset root")
    rel = PurePosixPath(image_id)
    if rel.is_absolute() or ".." in rel.parts or not rel.parts:
        raise DatasetError(f"path {image_id!r} must be relative to the dataset root and stay inside it (no '..')")
    return rel.as_posix()  # "./a.jpg" and "a//b.jpg" name a.jpg and a/b.jpg; spaces are kept


def _check_inside(image_id: str, real: str, base: str) -> None:
    """The other half: where the path leads once every symlink is followed."""
    if not _inside(real, base):
        raise DatasetError(
            f"image {image_id!r} leads outside the dataset root {base} (to {real}) through a symlink; audit reads "
            "only files inside the root: copy the file in (cp -L) or pass a root that holds it"
        )


def image_path(root: str | Path, image_id: str, *, must_exist: bool = True) -> Path:
    """The real path of the file ``image_id`` names under ``root``: the one rule for which files audit reads.

    Scanning a folder, reading a label file and showing a thumbnail all apply
    it. An id is a relative POSIX path, taken exactly as written (spaces,
    backslashes and any other character are part of the name), without a
    ``..`` component; and the file it names, once every symlink is followed,
    must lie inside the real dataset root. A symlink that leads outside the
    root is refused like ``..`` is.

    Parameters
    ----------
    must_exist : bool
        Also require the root and the file to exist and the file to be a
        regular file (not a folder or a pipe). False accepts a missing file or
        a broken link, whose target must still lie inside the root.

    Raises
    ------
    DatasetError
        Naming why the id is refused.
    """
    if not root:
        raise DatasetError("no dataset root is recorded; run 'audit run DATASET' again")
    rel = _check_id(image_id)
    try:
        base = os.path.realpath(root, strict=must_exist)
        real = os.path.realpath(os.path.join(base, rel), strict=must_exist)
    except OSError as e:
        raise DatasetError(f"image {image_id!r} does not exist under {root} ({e.strerror}); check the path") from e
    _check_inside(image_id, real, base)
    if must_exist and not os.path.isfile(real):
        raise DatasetError(f"{image_id!r} under {root} is not a regular file; name an image file")
    return Path(real)


def _is_image(p: Path) -> bool:
    return _is_image_name(p.name)


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in image_extensions() and not name.startswith(".")


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


@dataclass
class _Entry:
    """One image reached while listing: its id, label token, file identity and stamp."""

    id: str
    tok: str
    ident: tuple[Any, ...]  # (st_dev, st_ino), or the real path of a file that cannot be stat'ed
    canonical: bool  # reached without passing through a symlink
    stamp: tuple[int, int]


def _entry(rel: str, tok: str, st: os.stat_result | None, canonical: bool, real: str) -> _Entry:
    ident: tuple[Any, ...] = (st.st_dev, st.st_ino) if st is not None else ("unreadable", real)
    return _Entry(rel, tok, ident, canonical, _stamp(st))


def _stat(e: os.DirEntry[str]) -> os.stat_result | None:
    try:
        return e.stat()  # symlinks followed
    except OSError:  # a broken link or a loop of links
        return None


def _scandir(path: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise DatasetError(f"cannot list folder {path}: {e.strerror}; check its permissions") from e


class _Walk:
    """Recursive listing of one ImageFolder root: symlinks followed, loops cut, nothing outside the root read.

    Real paths are derived, not looked up: below a folder whose real path is
    known, an entry that is not a symlink has that path plus its name; only
    links cost a ``realpath``. One ``stat`` per entry.
    """

    def __init__(self, base: str):
        self.base = base
        self.loops: list[str] = []
        self.outside: list[tuple[str, str]] = []

    def files(
        self, rel: str, real_dir: str, linked: bool, ancestors: frozenset[tuple[int, int]], tok: str
    ) -> Iterator[_Entry]:
        """Yield an :class:`_Entry` per image under ``rel`` (its real path ``real_dir``; ``linked``: via a link)."""
        for e in _scandir(os.path.join(self.base, rel)):
            if e.name.startswith("."):  # .ipynb_checkpoints/, .DS_Store
                continue
            child = f"{rel}/{e.name}"
            link = e.is_symlink()
            real = os.path.realpath(e.path) if link else f"{real_dir}/{e.name}"
            st = _stat(e)
            if st is not None and stat.S_ISDIR(st.st_mode):
                ident = (st.st_dev, st.st_ino)
                if ident in ancestors:
                    self.loops.append(child)  # a link to a folder that holds it: following it never ends
                elif not _inside(real, self.base):
                    self.outside.append((child, real))  # never walked: it may be the whole disk
                else:
                    yield from self.files(child, real, linked or link, ancestors | {ident}, tok)
            elif _is_image_name(e.name) and (stat.S_ISREG(st.st_mode) if st is not None else link):
                # Regular files, and links to nothing (recorded as bad images); never pipes, whose reading blocks.
                if _inside(real, self.base):
                    yield _entry(child, tok, st, not (linked or link), real)
                else:
                    self.outside.append((child, real))


def _refuse_outside(base: str, outside: list[tuple[str, str]], where: str) -> None:
    if outside:
        rel, real = outside[0]
        raise DatasetError(
            f"{where}: {len(outside)} path(s) lead outside the dataset root {base} through symlinks, e.g. {rel!r} "
            f"-> {real}; audit reads only files inside the root (so does the dashboard): copy them in (cp -rL) "
            "or pass a root that holds them"
        )


def _imagefolder(root: Path) -> tuple[list[_Entry], str, list[str]]:
    base = str(root)
    walk = _Walk(base)
    st = os.stat(base)
    top = frozenset({(st.st_dev, st.st_ino)})
    classes: list[str] = []
    entries: list[_Entry] = []
    for e in _scandir(base):
        st_e = _stat(e)
        if e.name.startswith(".") or st_e is None or not stat.S_ISDIR(st_e.st_mode):
            continue
        ident = (st_e.st_dev, st_e.st_ino)
        link = e.is_symlink()
        real = os.path.realpath(e.path) if link else f"{base}/{e.name}"
        if ident in top:
            walk.loops.append(e.name)  # a class folder that is the dataset root: every image again, mislabelled
            continue
        if not _inside(real, base):
            walk.outside.append((e.name, real))
            continue
        classes.append(e.name)
        entries += walk.files(e.name, real, link, top | {ident}, e.name)
    _refuse_outside(base, walk.outside, str(root))
    if walk.loops:
        _log.warning(
            "%s: %d folder link(s) lead back to a folder that holds them, e.g. %r; not followed (each image "
            "is listed once, under its own folder)",
            root, len(walk.loops), walk.loops[0],
        )  # fmt: skip
    wnid = [c for c in classes if _WNID.match(c)]
    if wnid and len(wnid) == len(classes):
        space = imagenet_label_space()
        unknown = [c for c in classes if c not in space.keys]
        if unknown:
            raise DatasetError(
                f"folder {unknown[0]!r} looks like a wnid but is not an ImageNet-1k class; rename or remove it"
            )
        return entries, "imagefolder-wnid", classes
    if wnid:
        other = next(c for c in classes if not _WNID.match(c))
        raise DatasetError(
            f"{root}: folder {other!r} is neither an ImageNet wnid nor like its siblings "
            f"(e.g. {wnid[0]!r}); rename it to its wnid or move it out of the dataset"
        )
    return entries, "imagefolder-custom", classes


def load_classes(path: str | Path) -> tuple[str, ...]:
    """The classes of a ``--classes`` file: one class per line, in the order of the label space.

    Surrounding spaces of a line are dropped (as in a label file's label cell) and
    empty lines at the end of the file are ignored; an empty line between classes,
    a class listed twice or fewer than 2 classes is refused.

    Raises
    ------
    LabelFileError
    """
    p = Path(path)
    try:
        text = p.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise LabelFileError(f"cannot read classes file {p}: {e.strerror}; check --classes") from e
    except UnicodeDecodeError as e:
        raise LabelFileError(f"classes file {p} is not UTF-8 (byte {e.start}); re-save it as UTF-8") from e
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    seen: dict[str, int] = {}
    for n, name in enumerate(lines, start=1):
        if not name:
            raise LabelFileError(f"classes file {p} line {n} is empty; write one class per line, without blank lines")
        if name in seen:
            raise LabelFileError(
                f"classes file {p} line {n}: {name!r} is listed twice (first on line {seen[name]}); "
                "list each class once"
            )
        seen[name] = n
    if len(lines) < 2:
        raise LabelFileError(f"classes file {p} lists {len(lines)} class(es); a label space needs at least 2")
    return tuple(lines)


def _custom_space(keys: Sequence[str]) -> LabelSpace:
    space = imagenet_label_space()
    # Wnid keys (an ImageNet folder audited as its own space) keep their readable ImageNet names.
    names = tuple(space.names[space.keys.index(k)] if _WNID.match(k) and k in space.keys else k for k in keys)
    return LabelSpace(keys=tuple(keys), names=names, imagenet=False)


def _choose_space(
    toks: Sequence[str], where: str, label_space: str, classes: tuple[str, ...] | None, classes_file: str | None
) -> tuple[LabelSpace, str | None]:
    """The label space of a dataset whose given labels are ``toks``, and a note when ``auto`` chose custom.

    * ``--classes``: a custom space in the file's order; every label must be one of its lines, exactly.
    * ``imagenet``: every label must name an ImageNet class (wnid, index or name).
    * ``custom``: the distinct labels, sorted; ImageNet names are just names ("daisy" is a flower).
    * ``auto``: ImageNet when every label names an ImageNet class, else custom with a note, except
      when the labels are written as ImageNet ids (any label shaped like a wnid, ``n`` and 8 digits,
      or every failing label an index or an ImageNet name of several classes) while others are
      ImageNet's: those were meant as ImageNet classes, and are refused. When no label names an
      ImageNet class the space is custom without a note.
    """
    if label_space not in LABEL_SPACES:
        raise DatasetError(f"--label-space is {label_space!r}; pass one of {', '.join(LABEL_SPACES)}")
    if classes is not None:
        if label_space == "imagenet":
            raise DatasetError(
                "--classes defines a custom label space, --label-space imagenet the ImageNet one; drop one of them"
            )
        known = set(classes)
        missing = sorted({t for t in toks if t not in known})
        if missing:
            raise LabelFileError(
                f"{where}: {len(missing)} label(s) are not in classes file {classes_file}, first {missing[0]!r}; "
                "add them to the classes file or fix the labels"
            )
        return _custom_space(classes), None
    distinct = sorted(set(toks))
    if label_space == "custom":
        return _custom_space(distinct), None
    space = imagenet_label_space()
    bad = []
    for t in distinct:
        try:
            space.resolve(t)
        except KeyError as e:
            bad.append((t, e.args[0]))
    if not bad:
        return space, None
    t, why = bad[0]
    # In auto, labels written as ImageNet ids (a wnid anywhere; or only indices and ImageNet names that
    # name several classes failing) were meant as ImageNet classes: the failing one is a mistake to fix,
    # not a sign of a custom space.
    meant = any(_WNID.match(x) for x in distinct) or all(
        (b.isascii() and b.isdigit()) or space._lookup.get(b.lower()) == -1 for b, _ in bad
    )
    if label_space == "imagenet" or (meant and len(bad) < len(distinct)):
        raise LabelFileError(
            f"{where}: {len(bad)} label(s) are not ImageNet classes, first {t!r} ({why}); use wnids, class "
            "indices or exact ImageNet names, or pass --label-space custom"
        )
    note = None
    if len(bad) < len(distinct):
        note = (
            f"{where}: {len(bad)} of {len(distinct)} labels are not ImageNet classes (e.g. {t!r}), so the labels "
            "form a custom label space; pass --label-space imagenet to refuse such labels instead"
        )
    return _custom_space(distinct), note


def _read_label_csv(path: Path, what: str = "label file") -> list[tuple[int, str, str]]:
    """``(line, path, label)`` rows; the path cell is taken verbatim, the label cell is stripped."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as e:
        raise LabelFileError(f"cannot read {what} {path}: {e.strerror}; check the path") from e
    except UnicodeDecodeError as e:
        raise LabelFileError(f"{what} {path} is not UTF-8 (byte {e.start}); re-save it as UTF-8") from e
    try:
        rows = list(enumerate(csv.reader(io.StringIO(text, newline="")), start=1))
    except csv.Error as e:
        raise LabelFileError(f"{what} {path} is not valid CSV ({e}); save it as plain 'path,label' CSV") from e
    rows = [(n, r) for n, r in rows if any(cell.strip() for cell in r)]
    if not rows:
        raise LabelFileError(f"{what} {path} is empty; expected a header 'path,label' and rows")
    first = rows[0][1]
    header = [h.strip().lower() for h in first]
    # 'image' is accepted for 'path' so that an exported labels.csv loads back as it is.
    col = "path" if "path" in header else "image"
    if col not in header or "label" not in header:
        raise LabelFileError(f"{what} {path} has header {first!r}; expected columns 'path' and 'label'")
    ip, il = header.index(col), header.index("label")
    out: list[tuple[int, str, str]] = []
    for n, r in rows[1:]:
        if len(r) <= max(ip, il):
            raise LabelFileError(f"{what} {path} line {n}: expected 'path,label', got {r!r}")
        if not r[il].strip():
            raise LabelFileError(f"{what} {path} line {n}: empty label for {r[ip]!r}; give a class or drop the row")
        # The path exactly as written: ' a.jpg' is a file whose name starts with a space.
        out.append((n, r[ip], r[il].strip()))
    if not out:
        raise LabelFileError(f"{what} {path} has a header but no rows")
    return out


def _label_file(root: Path, label_file: Path) -> list[_Entry]:
    rows = _read_label_csv(label_file)
    base = str(root)
    seen: dict[str, int] = {}
    entries: list[_Entry] = []
    real_dirs: dict[str, str] = {}  # folder -> its real path: one realpath per folder, not per row
    for n, raw, tok in rows:
        where = f"{label_file} line {n}"
        rel = _row_id(raw, n, where, seen)
        folder, name = os.path.split(rel)
        if folder not in real_dirs:
            real_dirs[folder] = os.path.realpath(os.path.join(base, folder)) if folder else base
        path = os.path.join(base, rel)
        try:
            lst = os.lstat(path)
        except OSError:
            near = raw.strip()
            hint = (
                f" (a file named {near!r} exists: paths are taken exactly, remove the spaces around it)"
                if near != raw and near and os.path.lexists(os.path.join(base, near))
                else ""
            )
            raise LabelFileError(
                f"{where}: image {rel!r} does not exist under {root}{hint}; fix the path or drop the row"
            ) from None
        link = stat.S_ISLNK(lst.st_mode)
        real = os.path.realpath(path) if link else f"{real_dirs[folder]}/{name}"
        try:
            _check_inside(rel, real, base)  # the rule image_path applies, with the folders' real paths cached
        except DatasetError as e:
            raise LabelFileError(f"{where}: {e}") from e
        try:
            st: os.stat_result | None = os.stat(path) if link else lst
        except OSError:  # a broken link: listed, recorded as a bad image
            st = None
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise LabelFileError(f"{where}: {rel!r} is not a regular file (a folder or a pipe); name an image file")
        canonical = not link and real_dirs[folder] == os.path.normpath(os.path.join(base, folder))
        entries.append(_entry(rel, tok, st, canonical, real))
    return entries


def _count_once(entries: list[_Entry], space: LabelSpace, where: str, error: type[DatasetError]) -> list[_Entry]:
    """Each file once: paths reaching a file already listed are dropped (same label) or refused (another label)."""
    groups: dict[tuple[Any, ...], list[_Entry]] = {}
    for e in entries:
        groups.setdefault(e.ident, []).append(e)
    dropped: list[tuple[str, str]] = []
    keep: set[str] = set()
    for group in groups.values():
        if len(group) == 1:
            keep.add(group[0].id)
            continue
        group = sorted(group, key=lambda e: (not e.canonical, e.id))  # its own path first
        first = group[0]
        for other in group[1:]:
            if space.resolve(other.tok) != space.resolve(first.tok):
                raise error(
                    f"{where}: {first.id!r} (label {first.tok!r}) and {other.id!r} (label {other.tok!r}) are one "
                    "file reached twice (a symlink or a hard link) with different labels; a file has one given "
                    "label: remove the link or the duplicate"
                )
            dropped.append((other.id, first.id))
        keep.add(first.id)
    if dropped:
        _log.warning(
            "%s: %d path(s) reach a file already listed (a symlink or a hard link), e.g. %r is %r; "
            "each file is counted once, under its own path",
            where, len(dropped), dropped[0][0], dropped[0][1],
        )  # fmt: skip
    return [e for e in entries if e.id in keep]


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
        # type() is int, not isinstance: JSON true/false load as bool, an int subclass, and would pass as 1/0.
        if type(s) is not list or not all(type(c) is int and 0 <= c < 1000 for c in s):
            raise LabelFileError(f"ReaL file {source}: entry {i} should be a list of class indices 0..999, got {s!r}")
    return data, source


def dataset_folder(root: str | os.PathLike[str]) -> Path:
    """``root`` with ``~`` expanded, when it is a folder; otherwise :class:`DatasetError` saying so.

    The one check of a dataset path, made by :func:`load_dataset` and, before anything heavy is imported,
    by ``audit run`` (a typo is answered in well under a second, not after torch has loaded).
    """
    r = Path(root).expanduser()
    if not r.is_dir():
        raise DatasetError(f"dataset folder {r} does not exist; pass the folder that holds the images")
    return r


def load_dataset(
    root: str | Path,
    *,
    label_file: str | Path | None = None,
    real: str | Path | bool | None = None,
    limit: int | None = None,
    label_space: str = "auto",
    classes: str | Path | None = None,
    truth: str | Path | None = None,
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
    label_space : {"auto", "imagenet", "custom"}
        ``imagenet``: every label (or class folder) must name an ImageNet class.
        ``custom``: the labels are classes of their own, whatever their names
        (a flowers set's "daisy" is not ImageNet's daisy); sorted unless
        ``classes`` orders them. ``auto``: an ImageFolder is ImageNet when its
        folders are wnids; a label file is ImageNet when every label names an
        ImageNet class, else custom with a note in ``notes`` (labels written
        as wnids or indices are refused instead: one of them is a typo).
    classes : path-like, optional
        A text file, one class per line (see :func:`load_classes`): a custom
        space in that order, which may hold classes no image has. Every given
        label must be one of its lines, exactly.

    Raises
    ------
    DatasetError, LabelFileError
        For anything the user must fix, before any scoring starts.
    """
    class_list = load_classes(classes) if classes is not None else None
    r = dataset_folder(root)
    # A label file names paths relative to the folder the user gave; only ImageFolder descends into val/.
    # Real paths: the rule compares them (a linked val/ is followed here, once).
    r = r.resolve() if label_file is not None else _find_root(r.resolve()).resolve()
    if label_file is not None:
        entries = _label_file(r, Path(label_file))
        space, note = _choose_space(
            [e.tok for e in entries], str(label_file), label_space, class_list, str(classes)
        )
        entries = _count_once(entries, space, str(label_file), LabelFileError)
        layout = "label-file"
    else:
        entries, layout, folders = _imagefolder(r)
        if not entries and any(_is_image(p) for p in r.iterdir()):
            raise DatasetError(f"{r} holds images but no class folders; pass --labels FILE.csv with 'path,label' rows")
        if label_space == "auto" and class_list is None:
            # Folders decide: wnids are ImageNet's classes, any other names a custom space (as always).
            space, note = (imagenet_label_space(), None) if layout == "imagefolder-wnid" else (
                _custom_space(sorted(folders)), None
            )
        else:
            space, note = _choose_space(folders, f"{r} (class folders)", label_space, class_list, str(classes))
        entries = _count_once(entries, space, str(r), DatasetError)
    if not entries:
        raise DatasetError(f"no images found under {r}; expected class folders of image files")
    entries.sort(key=lambda e: e.id)  # ids are sorted as strings, whatever the layout
    # Checked against every listed image, so that --limit does not turn the truth file's rows into unknowns.
    trusted = _truth([e.id for e in entries], space, Path(truth)) if truth is not None else None
    keep = _spread(len(entries), limit)
    entries = [entries[i] for i in keep]
    ids = [e.id for e in entries]
    labels = np.array([space.resolve(e.tok) for e in entries], dtype=np.int64)
    real_sets, real_src = _attach_real(ids, space, real)
    return AuditDataset(
        root=r,
        image_ids=tuple(ids),
        labels=labels,
        label_space=space,
        layout=layout,
        real=real_sets,
        real_source=real_src,
        stamps=np.array([e.stamp for e in entries], dtype=np.int64).reshape(len(entries), 2),
        notes=(note,) if note else (),
        truth=trusted[keep] if trusted is not None else None,
        truth_source=str(truth) if truth is not None else None,
    )


def _truth(ids: Sequence[str], space: LabelSpace, path: Path) -> np.ndarray:
    """The trusted label of each of ``ids`` from truth file ``path``; every fault one :class:`LabelFileError`."""
    rows = _read_label_csv(path, "truth file")
    index = {i: k for k, i in enumerate(ids)}
    out = np.full(len(ids), -1, dtype=np.int64)
    seen: dict[str, int] = {}
    unknown: list[tuple[int, str]] = []
    for n, raw, tok in rows:
        where = f"truth file {path} line {n}"
        rel = _row_id(raw, n, where, seen)
        if rel not in index:
            unknown.append((n, rel))
            continue
        try:
            out[index[rel]] = space.resolve(tok)
        except KeyError as e:
            raise LabelFileError(
                f"{where}: label {tok!r} is not a class of the dataset's label space ({e.args[0]}); use the given "
                "labels' classes, or list it in --classes"
            ) from None
    if unknown:
        n, rel = unknown[0]
        raise LabelFileError(
            f"truth file {path}: {len(unknown)} row(s) name images that are not in the dataset, first {rel!r} "
            f"(line {n}); drop those rows or fix their paths"
        )
    missing = [ids[k] for k in np.flatnonzero(out < 0)]
    if missing:
        raise LabelFileError(
            f"truth file {path}: {len(missing)} image(s) have no row, first {missing[0]!r}; give every image of "
            "the dataset a trusted label"
        )
    return out


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


def typical_short_side(ds: AuditDataset, *, sample: int = 64) -> int | None:
    """Median short side, in pixels, of up to ``sample`` images spread over the set; None if none reads.

    Reads only the image headers (PIL opens lazily), so it costs milliseconds; it decides
    ``--crop auto`` (:func:`audit.zoo.apply_crop`).
    """
    from PIL import Image

    sides = []
    for i in _spread(len(ds), sample):
        try:
            with Image.open(ds.path(int(i))) as im:
                sides.append(min(im.size))
        except Exception:  # an unreadable image is scoring's to report, not this probe's
            continue
    return int(np.median(sides)) if sides else None


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
