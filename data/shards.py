"""Safe reading of WebDataset tar shards: stream members, group them into samples, decode images.

This is the only decode path of the project (training, evaluation and `check_shards` all use it).
It never unpickles anything: only image members (through PIL) and `.cls` (as an int) are decoded,
every other member (`.pyd`, `.pickle`, `.json`, ...) is ignored as raw bytes. webdataset's default
`decode()` is deliberately not used, because it runs `pickle.loads` on `.pyd`/`.pickle` members.
"""
import io
import logging
import re
import tarfile
from collections import Counter
from collections.abc import Callable, Iterator

from PIL import Image

log = logging.getLogger("data")

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
LABEL_EXT = "cls"
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS  # PIL's own decompression-bomb limit (~89 Mpx)

# Why a sample or shard was skipped. Shard-level reasons count shards, the others count samples.
REASONS = {
    "unreadable_shard": "the shard could not be opened or is not a tar file",
    "truncated_tar": "the tar stream ended inside a member; the sample being read is lost",
    "no_image": "no .jpg/.jpeg/.png/.webp member in the sample",
    "empty_member": "the image or .cls member has zero bytes",
    "not_image": "the image member's bytes are not an image format PIL recognises",
    "bad_image": "the image is recognised but fails to decode (truncated or corrupt data)",
    "too_large": "the image exceeds the decompression-bomb pixel limit",
    "bad_label": "the .cls member is not an integer",
    "no_label": "no .cls member, but the loader trains a classifier (num_classes is set)",
    "label_out_of_range": "the .cls class id is outside [0, num_classes) (without num_classes: outside int64)",
}
_INT64 = 1 << 63  # labels are batched as int64: a larger class id could not even be collated

# Same rule as webdataset's base_plus_ext: the key is the path up to the first dot of the basename,
# so shards from wds.ShardWriter and from GNU tar of key.jpg/key.cls files group identically. As in
# webdataset, a key's members must be adjacent: make GNU tar shards with `tar --sort=name -cf`.
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)[.]([^/]*)$")


class WarningLimiter:
    """Log the 1st-10th, 100th, 1000th, ... warning per reason, so a bad data set cannot flood logs."""

    def __init__(self, logger: logging.Logger = log):
        self.logger = logger
        self.seen: Counter = Counter()

    def __call__(self, reason: str, detail: str) -> None:
        """Record one event and log it if its count is 1-10 or a power of ten."""
        self.seen[reason] += 1
        n = self.seen[reason]
        if n <= 10 or (n >= 100 and str(n).rstrip("0") == "1"):
            self.logger.warning("skipped (%s, #%d for this reason in this process): %s", reason, n, detail)


def open_shard(url: str):
    """Open a shard for streaming: a local path, `file:` path, or any scheme webdataset's gopen knows."""
    if url.startswith("file:"):
        url = url[5:]
    if ":" not in url.split("/")[0]:
        return open(url, "rb", buffering=1 << 20)
    from webdataset.gopen import gopen  # pipe:, http(s):, ... with exit-status checks on close
    return gopen(url, "rb")


def iter_tar_samples(stream, on_error: Callable[[str, str], None], name: str = "") -> Iterator[tuple[str, dict]]:
    """Yield (key, {ext: bytes}) for each sample of a tar stream, grouping consecutive members by key.

    A stream that cannot be opened or ends early reports `unreadable_shard` / `truncated_tar` through
    `on_error` and stops; the sample being read at that point is dropped, the ones before are kept.
    """
    try:
        tf = tarfile.open(fileobj=stream, mode="r|*")
    except (tarfile.TarError, OSError, EOFError) as e:
        on_error("unreadable_shard", f"{name}: {e}")
        _close(stream)
        return
    key, sample = None, {}
    try:
        for info in tf:
            if not info.isfile():
                continue
            m = _KEY_EXT.match(info.name)
            if m is None:
                continue
            k, ext = m.group(1), m.group(2).lower()
            if k != key:
                # A new key completes the previous sample; yield it before a read error can lose it.
                if key is not None:
                    yield key, sample
                key, sample = k, {}
            f = tf.extractfile(info)
            data = f.read() if f is not None else b""
            if len(data) != info.size:
                raise EOFError(f"member {info.name} has {len(data)} of {info.size} bytes")
            sample[ext] = data
    except (tarfile.TarError, OSError, EOFError) as e:
        on_error("truncated_tar", f"{name}: {e}")
        key = None
    finally:
        _close(stream)
    if key is not None:
        yield key, sample


def _close(stream) -> None:
    try:
        stream.close()
    except Exception:  # noqa: BLE001 -- a pipe's non-zero exit is reported by the read error already
        pass


def decode_sample(sample: dict, max_pixels: int = DEFAULT_MAX_PIXELS,
                  num_classes: int | None = None) -> tuple[Image.Image | None, int, str]:
    """Decode one sample's image (RGB) and label; returns (image, label, "") or (None, -1, reason).

    The label is -1 when the sample has no `.cls` member (pretraining needs none). With `num_classes`
    a classifier is being trained: a missing `.cls` is `no_label` and a class id outside
    [0, num_classes) is `label_out_of_range` (cross-entropy on CUDA dies of a device-side assert on
    it, and indexing with a negative id silently wraps). Without `num_classes` only ids that do not
    fit int64 are refused. Labels are checked before the image is opened: a bad one costs no decode.
    """
    ext = next((e for e in IMAGE_EXTS if e in sample), None)
    if ext is None:
        return None, -1, "no_image"
    data = sample[ext]
    if not data:
        return None, -1, "empty_member"
    label = -1
    if LABEL_EXT in sample:
        raw = sample[LABEL_EXT]
        if not raw:
            return None, -1, "empty_member"
        try:
            label = int(raw.decode("ascii").strip())
        except (UnicodeDecodeError, ValueError):
            return None, -1, "bad_label"
        lo, hi = (0, num_classes) if num_classes is not None else (-_INT64, _INT64)
        if not lo <= label < hi:
            return None, -1, "label_out_of_range"
    elif num_classes is not None:
        return None, -1, "no_label"
    try:
        img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        return None, -1, "too_large"
    except (Image.UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None, -1, "not_image"
    # The header gives the size before any pixel is decoded: refuse bombs before allocating them.
    if img.width * img.height > max_pixels:
        return None, -1, "too_large"
    try:
        # convert() on an RGB image would decode and then copy; load() decodes in place.
        img.load()
        if img.mode != "RGB":
            img = img.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        return None, -1, "too_large" if isinstance(e, Image.DecompressionBombError) else "bad_image"
    return img, label, ""
