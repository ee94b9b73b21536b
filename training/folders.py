"""The image-folder layout: DIR/train/<class>/<image> and DIR/test/<class>/<image>.

Which files are the images of which class, and how two class lists differ. Plain Python and
PIL only, no PyTorch: `app.client evaluate` lists a test folder with it and starts at once.
"""

from __future__ import annotations

import os
import unicodedata
from collections.abc import Iterator
from pathlib import Path

from PIL import EpsImagePlugin, Image, ImageFile

from training.errors import UserError


def image_extensions() -> set[str]:
    """Every file suffix PIL can decode: 'any image format'. Not the formats Pillow can only
    write (PDF, Palm), nor those it only identifies (its stubs: HDF5, GRIB, BUFR, WMF/EMF
    outside Windows; EPS without Ghostscript): a PDF or an .h5 beside the images is not an
    image of the data set. MPO (camera JPEGs) has no opener of its own: the JPEG plugin's."""
    Image.init()
    readable = {"MPO"}
    for fmt, (factory, _accept) in Image.OPEN.items():
        if isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile):
            continue
        if fmt == "EPS" and not EpsImagePlugin.has_ghostscript():
            continue
        readable.add(fmt)
    return {ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in readable}


def resolve_image_root(data_dir: Path, split: str = "train") -> Path:
    """`data_dir`, or its single subfolder holding `split`/ (an unpacked archive's top folder)."""
    if not data_dir.is_dir():
        raise UserError(f"--data-dir {data_dir} is not a directory")
    if (data_dir / split).is_dir():
        return data_dir
    nested = [d for d in data_dir.iterdir() if d.is_dir() and (d / split).is_dir()]
    if len(nested) == 1:
        return nested[0]
    raise UserError(
        f"--data-dir {data_dir} has no {split}/ folder; expected {data_dir}/train/<class>/<image> "
        f"and {data_dir}/test/<class>/<image>"
    )


def list_image_folder(
    root: Path, classes: list[str] | None = None
) -> tuple[list[Path], list[int], list[str]]:
    """Files and labels of root/<class>/*, classes sorted by folder name (torchvision's rule)."""
    if not root.is_dir():
        raise UserError(f"{root} is missing; expected {root}/<class>/<image> folders")
    found = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not found:
        raise UserError(f"{root} has no class folders; expected {root}/<class>/<image>")
    for name in found:
        try:
            name.encode("utf-8")  # class names go into checkpoints, JSON answers and plots
        except UnicodeEncodeError:
            raise UserError(
                f"class folder {name.encode('utf-8', 'surrogateescape')!r} in {root} is not "
                "valid UTF-8; rename it"
            ) from None
        if not name.strip():  # a model with a blank class name is refused when loaded
            raise UserError(f"class folder {name!r} in {root} has a blank name; rename it")
    if classes is not None and found != classes:
        raise UserError(
            f"{root} has other classes than the training set: "
            + class_difference(found, str(root), classes, "the training set")
        )
    extensions = image_extensions()
    paths: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(found):
        files = sorted(_images_below(root / name, extensions))
        if not files:
            raise UserError(
                f"{root / name} holds no images (files PIL can open: .png, .jpg, .webp, ...)"
            )
        paths += files
        labels += [label] * len(files)
    return paths, labels, found


def _images_below(folder: Path, extensions: set[str]) -> Iterator[Path]:
    """The image files in `folder` and its subfolders, as torchvision's ImageFolder takes them
    (images in subfolders were left out without a word, and a class whose images were all in
    subfolders "held no images"), symlinked subfolders included (they were left out, unlike
    ImageFolder). Hidden files and folders (.DS_Store, macOS's ._ files) are skipped, and so is
    a link to a folder already walked or above this one, where ImageFolder loops forever."""
    top = Path(os.path.realpath(folder))
    walked: set[str] = set()
    for parent, dirs, names in os.walk(folder, followlinks=True):
        real = os.path.realpath(parent)
        if real in walked or (Path(real) in top.parents):
            dirs[:] = []
            continue
        walked.add(real)
        # Sorted: of two ways to one folder, the same one is taken on every machine.
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            path = Path(parent, name)
            if not name.startswith(".") and path.suffix.lower() in extensions and path.is_file():
                yield path


def class_difference(a: list[str], a_name: str, b: list[str], b_name: str) -> str:
    """How two class lists differ, in words: the names only one side has (not both lists in
    full: with a hundred classes the one that differs would be lost), or the order. Names that
    differ only in Unicode normalization (a folder copied from macOS) or letter case look alike
    when printed, so such pairs are pointed out."""
    only_a = [c for c in a if c not in b]
    only_b = [c for c in b if c not in a]
    if not only_a and not only_b:
        return f"the same {len(a)} classes in another order ({a_name}: {a}; {b_name}: {b})"
    parts = [f"only in {name}: {names}" for name, names in ((a_name, only_a), (b_name, only_b))
             if names]  # fmt: skip
    for x in only_a:
        for y in only_b:
            if unicodedata.normalize("NFC", x) == unicodedata.normalize("NFC", y):
                parts.append(
                    f"{x!r} and {y!r} differ only in Unicode normalization ({x!a} vs "
                    f"{y!a}; names copied from macOS are often decomposed): rename one"
                )
            elif x.casefold() == y.casefold():
                parts.append(f"{x!r} and {y!r} differ only in letter case: rename one")
    return "; ".join(parts)
