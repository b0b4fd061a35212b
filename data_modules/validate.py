"""`kedit validate --data FILE --images DIR`: check a data file and every image it names.

A file whose records name no image is read as text-only records (zsRE / CounterFact layouts,
data_modules/text_records.py) and needs no `--images`.

Prints each problem as `FILE: record N: field 'F': message`, then a summary line; exits 1 when
there is any problem, 0 when the file is clean. Unlike loading for training (which skips them
with a warning), a record with an empty `alt` counts as a problem here: it is an edit with no
target.
"""

from __future__ import annotations

import argparse

from data_modules.ads_records import scan_any
from data_modules.records import DEFAULT_MAX_IMAGE_PIXELS, Problem, check_image_refs
from data_modules.text_records import file_is_text, scan_text_records
from data_modules.visual import DEFAULT_MAX_FRAMES, frame_count_problems


def add_image_arguments(parser: argparse.ArgumentParser) -> None:
    """`--extra-image-root`, `--max-image-pixels` and `--max-frames`: which image paths, sizes and frame
    counts are accepted."""
    parser.add_argument(
        "--extra-image-root",
        action="append",
        default=[],
        metavar="DIR",
        help="another folder image paths may resolve into (repeatable; e.g. ADS-Edit's ../nuscenes)",
    )
    parser.add_argument(
        "--max-image-pixels",
        type=int,
        default=DEFAULT_MAX_IMAGE_PIXELS,
        metavar="N",
        help=f"refuse images with more pixels than this, read from the header (default {DEFAULT_MAX_IMAGE_PIXELS}); "
        "every frame and view counts on its own",
    )
    parser.add_argument(
        "--max-frames",
        type=int,
        default=DEFAULT_MAX_FRAMES,
        metavar="N",
        help=f"refuse videos with more frames, multi-view inputs with more views (default {DEFAULT_MAX_FRAMES})",
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        required=True,
        metavar="FILE",
        help="a JSON data file (E-VQA / E-IC / VLKEB or ADS-Edit layout, or text-only: zsRE / CounterFact layout)",
    )
    parser.add_argument(
        "--images",
        default=None,
        metavar="DIR",
        help="the image root the record image paths are relative to (not needed for text-only records)",
    )
    add_image_arguments(parser)


def run(args: argparse.Namespace) -> int:
    text = file_is_text(args.data)
    scan = scan_text_records(args.data) if text else scan_any(args.data)
    if not text and scan.total and args.images is None:
        raise ValueError(f"--images: required, {args.data} holds image edit records (E-VQA / E-IC / VLKEB layout)")
    problems = list(scan.problems)
    problems += [
        Problem(scan.file, r.origin.index, "alt", "empty target (training skips this record)") for r in scan.empty_alt
    ]
    if not text and scan.total:
        problems += frame_count_problems(scan.records, args.max_frames)
        problems += check_image_refs(scan.image_refs, args.images, True, args.extra_image_root, args.max_image_pixels)
    problems.sort(key=lambda p: (p.index is not None, p.index or 0))
    for problem in problems:
        print(problem)
    images = len({ref[3] for ref in scan.image_refs})
    summary = (
        f"{scan.file}: {scan.total} text-only record(s)"
        if text
        else f"{scan.file}: {scan.total} record(s), {images} distinct image(s) checked"
    )
    if problems:
        print(f"{summary}: {len(problems)} problem(s)")
        return 1
    print(f"{summary}: OK")
    return 0
