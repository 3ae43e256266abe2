"""Fetch a small public sample of real ILSVRC-2012 validation images.

Imagenette (fast.ai) keeps ten ImageNet classes; its ``val`` split is made of
ILSVRC-2012 validation images under wnid folders, so ReaL labels apply to it.
"""

from __future__ import annotations

import shutil
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

from audit.errors import DatasetError

__all__ = ["IMAGENETTE_URL", "fetch_imagenette"]

IMAGENETTE_URL = "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-320.tgz"


def fetch_imagenette(data_dir: Path, *, url: str = IMAGENETTE_URL) -> Path:
    """Download and unpack Imagenette's val split into ``data_dir``; return its folder."""
    target = data_dir / "imagenette2-320" / "val"
    if target.is_dir():
        return target
    print(f"audit: no dataset given; fetching the Imagenette val sample into {data_dir} from {url}", file=sys.stderr)
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(dir=data_dir) as tmp:
            archive = Path(tmp) / "imagenette.tgz"
            with urllib.request.urlopen(url, timeout=30) as r, archive.open("wb") as f:
                shutil.copyfileobj(r, f)
            with tarfile.open(archive) as t:
                members = [m for m in t.getmembers() if m.name.startswith("imagenette2-320/val/")]
                t.extractall(tmp, members=members, filter="data")
            (data_dir / "imagenette2-320").mkdir(exist_ok=True)
            shutil.move(str(Path(tmp) / "imagenette2-320" / "val"), target)
    except OSError as e:
        raise DatasetError(
            f"no dataset given, ../shared/datasets/imagenet-val-1300 is absent and the Imagenette sample "
            f"cannot be downloaded ({type(e).__name__}); pass a dataset folder: audit run PATH"
        ) from e
    return target
