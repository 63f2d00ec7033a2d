"""A folder of labelled images, laid out as torchvision's ImageFolder and Keras'
image_dataset_from_directory read it: <source>/<class>/<image>, or <source>/train/<class>/...
and <source>/test/<class>/... with a test split of its own. Class names are the folder names,
sorted; images may sit in subfolders of their class. Hidden files and files that are not images
(.DS_Store, README.txt) are skipped; anything else that would make a bad data set is refused in
one line that says what to do."""

import os
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from cnnpipe import PipelineError

# What Pillow opens: JPEG, PNG, WebP, BMP, TIFF, GIF and the rest, by file name suffix.
IMAGE_SUFFIXES = {s for s, f in Image.registered_extensions().items() if f in Image.OPEN}
SPLITS = ("train", "test")
# Held out by hash, a class needs one image each for training, validation and test.
MIN_IMAGES = 3
SHOWN = 5


@dataclass
class Entry:
    """One image file: its path under the source (the manifest's name for it), its class, and
    the split its folder gave it, if any."""

    path: str
    label: int
    split: str | None
    size: int
    mtime_ns: int


def visible(path: Path) -> bool:
    return not path.name.startswith(".")


def is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def listing(problems: list[str], count: int | None = None) -> str:
    """The first few of `problems`, and how many there are in all."""
    count = len(problems) if count is None else count
    more = f" and {count - SHOWN} more" if count > SHOWN else ""
    return ", ".join(problems[:SHOWN]) + more


def subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if visible(p) and p.is_dir() and not p.is_symlink())


def check_inside(root: Path, path: Path) -> None:
    if not path.is_symlink():
        return
    try:
        target = path.resolve()
    except RuntimeError:  # Python's "Symlink loop", however many links the loop has
        raise PipelineError(
            f"{path} is a link that leads back to itself; remove it, or put the file there"
        ) from None
    if not target.is_relative_to(root.resolve()):
        raise PipelineError(
            f"{path} is a link to {target}, outside data.source; copy the file into {root} instead"
        )


def images_under(root: Path, folder: Path) -> list[Path]:
    """The image files under `folder`, recursively, sorted; links must stay inside `root`."""
    found = []
    for here, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in dirs:
            check_inside(root, Path(here) / name)
        for name in files:
            path = Path(here) / name
            if visible(path) and is_image(path):
                check_inside(root, path)
                found.append(path)
    return sorted(found)


def loose_images(root: Path, folder: Path) -> None:
    """Refuse images that sit beside the class folders, where no class names them."""
    loose = sorted(
        str(p.relative_to(root))
        for p in folder.iterdir()
        if p.is_file() and visible(p) and is_image(p)
    )
    if loose:
        raise PipelineError(
            f"{len(loose)} images in {folder} are outside any class folder ({listing(loose)}); "
            f"move each into {folder}/<class>/"
        )


def missing_source(root: Path) -> PipelineError:
    what = "is not a folder" if root.exists() else "does not exist"
    return PipelineError(
        f"data.source {root} {what}; point it at a folder of <class>/<image> files or an "
        "archive of one (docs/own-images.md)"
    )


def scan(root: Path) -> tuple[list[str], list[Entry]]:
    """The class names and every image file of the folder `root`, checked."""
    if not root.is_dir():
        raise missing_source(root)
    top = {p.name for p in subfolders(root)}
    parts = [(root / s, s) for s in SPLITS] if top and top <= {*SPLITS} else [(root, None)]
    if parts[0][1] and not all((root / s).is_dir() for s in SPLITS):
        raise PipelineError(
            f"{root} has {', '.join(sorted(top))}/ but needs both train/ and test/ for a test "
            "split of its own (or put the class folders directly in it)"
        )
    classes = [p.name for p in subfolders(parts[0][0])]
    if not classes:
        raise PipelineError(
            f"{parts[0][0]} has no class folders; put each class's images in "
            f"{parts[0][0]}/<class>/ (docs/own-images.md)"
        )
    if len(classes) == 1:
        raise PipelineError(
            f"{parts[0][0]} has one class folder only ({classes[0]}); a classifier needs at "
            "least two"
        )
    entries = []
    for folder, split in parts:
        loose_images(root, folder)
        extra = sorted({p.name for p in subfolders(folder)} - set(classes))
        if extra:
            raise PipelineError(
                f"{folder} has class folders that train/ lacks ({listing(extra)}); every test "
                "class needs training images"
            )
        for label, name in enumerate(classes):
            for path in images_under(root, folder / name) if (folder / name).is_dir() else []:
                st = path.stat()
                rel = path.relative_to(root).as_posix()
                entries.append(Entry(rel, label, split, st.st_size, st.st_mtime_ns))
    check_counts(root, classes, entries)
    return classes, entries


def labelled(root: Path, classes: list[str]) -> list[Entry]:
    """The images of a folder of extra training images laid out as <class>/<image> (labelled by
    a person), as entries of the data's `classes` with the split "extra"."""
    unknown = [p.name for p in subfolders(root) if p.name not in classes]
    if unknown:
        raise PipelineError(
            f"{root} has images of {listing(unknown)}, which the data's classes lack; move them "
            f"out, or into {root}/<class>/ of one of: {listing(classes)}"
        )
    loose_images(root, root)
    entries = []
    for label, name in enumerate(classes):
        for path in images_under(root, root / name) if (root / name).is_dir() else []:
            st = path.stat()
            rel = path.relative_to(root).as_posix()
            entries.append(Entry(rel, label, "extra", st.st_size, st.st_mtime_ns))
    return entries


def check_counts(root: Path, classes: list[str], entries: list[Entry]) -> None:
    """Refuse classes with too few images to train, validate and test on."""
    given = any(e.split for e in entries)
    need = {"train": 2, "test": 1} if given else {None: MIN_IMAGES}
    for split, least in need.items():
        counts = [0] * len(classes)
        for e in entries:
            if e.split == split:
                counts[e.label] += 1
        few = [f"{c} ({n})" for c, n in zip(classes, counts, strict=True) if n < least]
        if few:
            where = f"{root}/{split}" if split else str(root)
            purpose = (
                "training and validation"
                if split == "train"
                else "test"
                if split
                else "training, validation and test"
            )
            raise PipelineError(
                f"too few images to split in {where}: {listing(few)}; each class needs at least "
                f"{least} for {purpose}: add images or remove the class folder"
            )
