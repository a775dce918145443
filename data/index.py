"""Shard lists and `index.json`: expand a user's shard spec into URLs and find per-shard sample counts.

`index.json` (written by `data.write_shards` and `data.demo`) looks like::

    {"version": 1, "class_names": ["cat", ...], "num_classes": 2,
     "splits": {"train": {"samples": 900, "shards": [{"name": "train-000000.tar", "samples": 500,
                                                      "bytes": 123456}, ...]},
                "val": {...}},
     "skipped": {"unreadable_image": 3}}

Shard names are relative to the folder holding `index.json`. The loader needs the sample counts up
front so that every rank can be told the same number of batches per epoch before reading a byte.
"""
import glob
import json
import os
import re
from pathlib import Path

import braceexpand

from .shards import iter_tar_samples, open_shard

INDEX_NAME = "index.json"
INDEX_VERSION = 1


def read_index(path: str | os.PathLike) -> dict:
    """Read `index.json` from a shard folder (or the file itself) and return it as a dict."""
    path = Path(path)
    if path.is_dir():
        path = path / INDEX_NAME
    with open(path) as f:
        index = json.load(f)
    if "splits" not in index:
        raise ValueError(f"{path} has no 'splits': not an index.json written by data.write_shards")
    index.setdefault("class_names", [])
    index.setdefault("num_classes", len(index["class_names"]))
    return index


def check_num_classes(path: str | os.PathLike, num_classes: int | None) -> int | None:
    """The class count of the data set at `path` (shard folder or `index.json`), checked against `num_classes`
    (None: not checked, only read).

    Raises a one-line ValueError when `index.json` gives another count, so a head of the wrong size is
    reported before training instead of as skipped `label_out_of_range` samples (too few classes in
    the config) or never-trained outputs (too many). Returns None when the count cannot be known
    before reading: no `index.json` there (brace pattern, list file, `pipe:` or remote shards), or an
    index that records no classes (`num_classes` 0: shards written from unlabelled images).
    """
    url = str(path)
    if not _is_local(url):
        return None
    local = url[5:] if url.startswith("file:") else url
    if os.path.isdir(local):
        local = os.path.join(local, INDEX_NAME)
    if not (local.endswith(".json") and os.path.isfile(local)):
        return None
    found = read_index(local)["num_classes"]
    if not found:
        return None
    if num_classes is not None and found != num_classes:
        raise ValueError(f"data set at {url} has {found} classes ({local}) but the config says {num_classes}: "
                         f"set the config's num_classes to {found}, or use a data set with {num_classes} classes")
    return found


def write_index(folder: str | os.PathLike, index: dict) -> Path:
    """Write `index.json` atomically (temp file + rename) so readers never see half a file."""
    path = Path(folder) / INDEX_NAME
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump({"version": INDEX_VERSION, **index}, f, indent=1)
    os.replace(tmp, path)
    return path


def _is_local(url: str) -> bool:
    return ":" not in url.split("/")[0] or url.startswith("file:")


def expand_urls(urls: str | os.PathLike | list, split: str = "train") -> list[str]:
    """Turn a folder, brace pattern, list file, `pipe:` command or list of those into shard URLs.

    A folder means the shards of `split` listed in its `index.json`, or else its `{split}-*.tar`
    files, or else all its `*.tar` files.
    """
    if isinstance(urls, (list, tuple)):
        return [u for item in urls for u in expand_urls(item, split)]
    urls = str(urls)
    if urls.startswith("pipe:") or not _is_local(urls):
        return list(braceexpand.braceexpand(urls))
    local = urls[5:] if urls.startswith("file:") else urls
    if os.path.isdir(local):
        if os.path.exists(os.path.join(local, INDEX_NAME)):
            index = read_index(local)
            if split not in index["splits"]:
                raise ValueError(f"{local}/{INDEX_NAME} has no split {split!r}: pick one of "
                                 f"{sorted(index['splits'])}")
            return [os.path.join(local, s["name"]) for s in index["splits"][split]["shards"]]
        found = sorted(glob.glob(os.path.join(local, f"{split}-*.tar"))) or \
            sorted(glob.glob(os.path.join(local, "*.tar")))
        if not found:
            raise FileNotFoundError(f"no *.tar shards in {local}")
        return found
    if os.path.isfile(local) and not local.endswith((".tar", ".tgz", ".tar.gz")):
        # A list file: one URL per line, relative paths resolved against the list's folder.
        base = os.path.dirname(os.path.abspath(local))
        out = []
        with open(local) as f:
            for line in f:
                line = line.strip()
                if line and not line.startswith("#"):
                    if _is_local(line) and not os.path.isabs(line):
                        line = os.path.join(base, line)
                    out.extend(braceexpand.braceexpand(line))
        return out
    return list(braceexpand.braceexpand(local))


def count_samples(url: str) -> int:
    """Count the samples of one shard by reading its tar headers (reads a `pipe:` stream in full)."""
    n = 0
    for _ in iter_tar_samples(open_shard(url), on_error=lambda reason, detail: None):
        n += 1
    return n


def shard_counts(urls: list[str], index: str | os.PathLike | None = None) -> list[int]:
    """Sample count per shard, from `index.json` (given, or next to the shards) or by scanning.

    Scanning is a one-off cost per loader construction; pass `index=` (or keep `index.json` next to
    the shards) for object-store URLs, where a scan downloads every shard.
    """
    known: dict[str, int] = {}
    folders = {str(index)} if index is not None else \
        {os.path.dirname(u[5:] if u.startswith("file:") else u) for u in urls if _is_local(u)}
    for folder in folders:
        try:
            idx = read_index(folder)
        except (FileNotFoundError, NotADirectoryError, ValueError, json.JSONDecodeError):
            continue
        for split in idx["splits"].values():
            for s in split["shards"]:
                known[os.path.basename(s["name"])] = int(s["samples"])
    counts = []
    for u in urls:
        counts.append(known.get(shard_name(u)) if shard_name(u) in known else count_samples(u))
    return counts


def shard_name(url: str) -> str:
    """The shard's file name inside a URL or `pipe:` command (`pipe:aws s3 cp s3://b/x-000001.tar -`)."""
    names = re.findall(r"[^\s/]+\.(?:tar\.gz|tgz|tar)\b", url)
    return names[-1] if names else os.path.basename(url)
