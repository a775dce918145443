"""Read every sample of some shards through the training decode path and report what would be skipped.

    python -m data.check_shards PATH [--split train] [--workers W] [--num-classes N]

PATH is anything `ShardLoader` accepts (folder, brace pattern, list file, `pipe:` command). Prints one
JSON object: {"shards": n, "samples": n, "skipped": n, "errors": {reason: n}}, where "samples" counts
the samples that decode, "skipped" the ones that would be skipped in training (plus one per truncated
or unreadable shard, whose lost samples cannot be counted). With --num-classes the labels are checked
as `ShardLoader(num_classes=N)` does for fine-tuning: a sample without `.cls` is `no_label`, a class id
outside [0, N) is `label_out_of_range`. Exit status 1 when anything was skipped.
"""
import argparse
import json
import logging
import os
import sys
from collections import Counter
from functools import partial
from multiprocessing import Pool

from .index import _is_local, expand_urls
from .shards import DEFAULT_MAX_PIXELS, decode_sample, iter_tar_samples, open_shard


def check_shard(url: str, max_pixels: int = DEFAULT_MAX_PIXELS,
                num_classes: int | None = None) -> tuple[int, dict[str, int]]:
    """(decodable samples, skipped per reason) for one shard; `num_classes` as in `decode_sample`."""
    errors: Counter = Counter()
    good = 0
    for _, sample in iter_tar_samples(open_shard(url), lambda reason, detail: errors.update([reason]), url):
        img, _, reason = decode_sample(sample, max_pixels, num_classes)
        if img is None:
            errors[reason] += 1
        else:
            good += 1
    return good, dict(errors)


def check_shards(path, split: str = "train", workers: int = 1, num_classes: int | None = None) -> dict:
    """Check all shards of `path` (labels too when `num_classes` is given); returns the JSON-ready summary."""
    urls = expand_urls(path, split)
    errors: Counter = Counter()
    good = 0
    with Pool(workers) if workers > 1 else _Serial() as pool:
        for n, errs in pool.imap(partial(check_shard, num_classes=num_classes), urls):
            good += n
            errors.update(errs)
    return {"shards": len(urls), "samples": good, "skipped": sum(errors.values()), "errors": dict(errors)}


class _Serial:
    """In-process stand-in for multiprocessing.Pool (no fork for --workers 1)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    @staticmethod
    def imap(fn, items):
        return map(fn, items)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("path", help="shard folder, brace pattern, list file or pipe: command")
    ap.add_argument("--split", default="train", help="split to read when PATH is a folder")
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--num-classes", type=int, default=None,
                    help="classes of the classifier to fine-tune: count missing and out-of-range labels")
    a = ap.parse_args(argv)
    if a.num_classes is not None and a.num_classes < 1:
        ap.error(f"--num-classes {a.num_classes} must be >= 1")
    if a.workers < 1:
        ap.error(f"--workers {a.workers} must be >= 1")
    if _is_local(a.path) and "{" not in a.path and not os.path.exists(a.path.removeprefix("file:")):
        ap.error(f"{a.path} does not exist: pass a shard folder, brace pattern, list file or pipe: command")
    try:
        expand_urls(a.path, a.split)  # a missing or empty PATH is a usage error, not a report
    except (OSError, ValueError) as e:
        ap.error(f"{e}: pass a shard folder, brace pattern, list file or pipe: command")
    logging.basicConfig(level=logging.ERROR)
    report = check_shards(a.path, a.split, a.workers, a.num_classes)
    print(json.dumps(report))
    return 1 if report["skipped"] else 0


if __name__ == "__main__":
    sys.exit(main())
