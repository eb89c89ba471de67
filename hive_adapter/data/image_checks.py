"""Every image of a training set opened and checked before step 1, not when a batch first needs it hours in.

`check_images` opens each distinct file once, in parallel threads (the work is file reads and header parsing):
PIL identifies the format from the header, reads the size, and `verify()` checks the file's structure without
decoding it. A missing, empty, truncated or unidentifiable file, or one of zero width or height, is bad; the
entries that use a bad file are named with it. hive-train stops with all of them named, or, with
`--skip_bad_images`, leaves those entries out and counts them.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from .datasets import BadImageError

logger = logging.getLogger(__name__)

NAMED = 10  # bad entries named in a message; the rest are counted


def image_problem(path: Path) -> str | None:
    """Why the image at `path` cannot be trained on, or None when it opens, identifies and verifies."""
    try:
        with Image.open(path) as image:
            width, height = image.size
            image.verify()
    except FileNotFoundError:
        return "no such file"
    except Exception as error:  # PIL raises many kinds (UnidentifiedImageError, SyntaxError, OSError, struct.error)
        return f"{type(error).__name__}: {error}"
    if width < 1 or height < 1:
        return f"size {width}x{height}"
    return None


def check_images(dataset, *, skip_bad_images: bool, workers: int | None = None):
    """`dataset` (a `ConversationDataset`) with every image file checked: unchanged when all are good; without
    the entries that use a bad one when `skip_bad_images` (counted in `.skipped`, named in a warning); else a
    `BadImageError` naming every bad entry and its file."""
    files = sorted({name for record in dataset.records for name in record.images})
    if not files:
        return dataset
    workers = workers or min(32, 4 * (os.cpu_count() or 1))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        problems = dict(
            zip(files, pool.map(lambda name: image_problem(dataset.image_folder / name), files), strict=True)
        )
    bad = {name: problem for name, problem in problems.items() if problem is not None}
    if not bad:
        logger.info("%d images checked, all readable", len(files))
        return dataset
    entries = [
        f"entry {record.id}: {name} ({bad[name]})"
        for record in dataset.records
        for name in record.images
        if name in bad
    ]
    named = "; ".join(entries[:NAMED]) + (f"; and {len(entries) - NAMED} more" if len(entries) > NAMED else "")
    users = [record for record in dataset.records if any(name in bad for name in record.images)]
    if not skip_bad_images:
        raise BadImageError(
            f"{len(users)} of {len(dataset.records)} entries use an image that cannot be read ({len(bad)} files, "
            f"under {dataset.image_folder}): {named}. Fix or remove them, or pass --skip_bad_images to train without "
            "these entries"
        )
    kept = [record for record in dataset.records if not any(name in bad for name in record.images)]
    if not kept:
        raise BadImageError(f"every entry uses an image that cannot be read: {named}")
    logger.warning(
        "--skip_bad_images: %d of %d entries left out, their images cannot be read: %s",
        len(users),
        len(dataset.records),
        named,
    )
    checked = dataset.keeping(kept, dropped=[record.id for record in users])
    checked.skipped = dataset.skipped + len(users)
    return checked
