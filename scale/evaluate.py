"""Evaluate a pretrained encoder on frozen features: weighted k-NN or a linear probe.

Usage::

    python -m scale.evaluate {knn,linear} PATH [--data SHARDS] [--random-init]

PATH is a run's output dir, its `checkpoints/` folder, one `step_*` folder, or a `scale.export`
file (`--format ours`) of any pretraining method (SimMIM, MoBY, EsViT, SiT) or a fine-tuned
classifier. The backbone is rebuilt from the checkpoint's `model_args` and takes the weights under
its `feature_prefix` (the student's `encoder.` by default; a method whose paper evaluates the
teacher records the teacher's). Features are the backbone's pooled output of timm's eval
transform (resize, centre crop to the run's img_size). Train split -> memory bank / probe
training set, val split -> the reported accuracy. Prints one JSON object with `top1` and `top5`
(percent). `--random-init` evaluates the same architecture untrained: the baseline to beat.

- knn: cosine similarity to every train feature, the k=20 nearest vote with weight exp(s / 0.07)
  (Wu et al. 2018, as DINO and EsViT evaluate).
- linear: features of the unaugmented train images are computed once, standardised, and a linear
  layer is trained on them with SGD (momentum 0.9, cosine LR); cheaper than the papers' probe with
  augmentation and a frozen backbone in the loop, and the same ranking of encoders on small data.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import json
import math
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scale.config import ConfigError
from scale.launch import exit_process

PROTOCOLS = ("knn", "linear")


def read_weights(path: Path) -> dict[str, Any]:
    """{"model", "model_args", "step"} of an export file or of the newest complete checkpoint under `path`."""
    if path.is_file():
        try:
            exported = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - any unreadable file gets the same one-line answer
            raise ConfigError(f"cannot read {path} as a scale.export file ({type(e).__name__}): pass a run's "
                              f"output dir or a file written by python -m scale.export") from None
        if not isinstance(exported, dict) or not {"model", "model_args"} <= set(exported):
            raise ConfigError(f"{path} has no model/model_args: export it with python -m scale.export RUN OUT.pt "
                              f"(--format ours)")
        return exported
    from scale.export import consolidate

    with contextlib.redirect_stdout(sys.stderr):  # DeepSpeed's consolidation reports on stdout; ours is the JSON
        return consolidate(path)


def build_feature_model(model_args: dict[str, Any]) -> nn.Module:
    """The checkpoint's backbone, headless (pooled features out), at its init."""
    import models
    from models.backbones import TIMM_ARGS, build_backbone, is_timm_backbone

    name = model_args["name"]
    if is_timm_backbone(name):
        accepted = set(TIMM_ARGS)
    else:
        # SimMIM's norm_target_patch_size, a classifier's num_classes ... do not shape the backbone
        accepted = set(inspect.signature(models.SwinTransformerV2).parameters) - {"num_classes"}
    args = {k: v for k, v in model_args.items() if k in accepted}
    try:
        return build_backbone(name, **args)
    except (ValueError, KeyError) as e:
        raise ConfigError(f"cannot rebuild the backbone from model_args ({str(e).splitlines()[0]})") from None


def load_features_weights(model: nn.Module, state: dict[str, torch.Tensor], prefix: str) -> int:
    """Load the weights under `prefix` into the backbone; returns how many tensors were taken."""
    own = model.state_dict()
    taken = {k.removeprefix(prefix): v for k, v in state.items()
             if k.startswith(prefix) and k.removeprefix(prefix) in own}
    missing = sorted(set(own) - set(taken))
    if missing:
        raise ConfigError(f"the checkpoint has no {prefix}{missing[0]} (and {len(missing) - 1} more backbone "
                          f"tensors): its model_args do not describe its weights")
    model.load_state_dict(taken)
    return len(taken)


@torch.no_grad()
def extract(model: nn.Module, shards: str, split: str, img_size: int, batch_size: int, workers: int,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(features (N, C) fp32, labels (N,)) of one split, every sample once, in shard order."""
    import data

    loader = data.ShardLoader(shards, data.build_eval_transform(img_size), batch_size, num_workers=workers,
                              split=split, drop_last=False, shuffle_buffer=1, num_classes=data_classes(shards))
    features, labels = [], []
    for batch in loader:
        features.append(model(batch["image"].to(device)).float().cpu())
        labels.append(batch["label"])
    if not features:
        raise ConfigError(f"the {split} split of {shards} has no readable labelled sample: pass --data with "
                          f"train and val splits")
    return torch.cat(features), torch.cat(labels)


def data_classes(shards: str) -> int:
    import data

    try:
        count = data.read_index(shards).get("num_classes")
    except (OSError, ValueError):
        count = None
    if not count:
        raise ConfigError(f"{shards} has no index.json with class names: write it with python -m data.write_shards "
                          f"from a folder of class subfolders")
    return int(count)


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Top-1 and top-5 accuracy in percent of (N, classes) scores."""
    top = scores.topk(min(5, scores.shape[1]), dim=1).indices
    hits = top == labels[:, None]
    return {"top1": 100.0 * hits[:, 0].float().mean().item(), "top5": 100.0 * hits.any(1).float().mean().item()}


def knn_scores(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, num_classes: int,
               k: int = 20, temperature: float = 0.07, chunk: int = 1024) -> torch.Tensor:
    """(N_test, classes) weighted votes of the k most cosine-similar train features."""
    train = F.normalize(train, dim=1)
    scores = []
    for part in F.normalize(test, dim=1).split(chunk):
        similarity, index = (part @ train.T).topk(min(k, train.shape[0]), dim=1)
        votes = torch.zeros(part.shape[0], num_classes)
        votes.scatter_add_(1, train_labels[index], (similarity / temperature).exp())
        scores.append(votes)
    return torch.cat(scores)


def linear_probe_scores(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, num_classes: int,
                        epochs: int = 100, lr: float = 0.1, batch_size: int = 256, seed: int = 0) -> torch.Tensor:
    """(N_test, classes) logits of a linear layer trained on standardised frozen features."""
    mean, std = train.mean(0), train.std(0).clamp(min=1e-6)
    train, test = (train - mean) / std, (test - mean) / std
    generator = torch.Generator().manual_seed(seed)
    probe = nn.Linear(train.shape[1], num_classes)
    optimizer = torch.optim.SGD(probe.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    steps = epochs * math.ceil(train.shape[0] / batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(epochs):
        for index in torch.randperm(train.shape[0], generator=generator).split(batch_size):
            loss = F.cross_entropy(probe(train[index]), train_labels[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    with torch.no_grad():
        return probe(test)


def evaluate(protocol: str, path: str | Path, shards: str | None = None, random_init: bool = False,
             batch_size: int = 128, workers: int = 2, k: int = 20, temperature: float = 0.07,
             epochs: int = 100, lr: float = 0.1, device: str = "cpu") -> dict[str, Any]:
    """The JSON record `main` prints (see module docstring)."""
    import data

    if protocol not in PROTOCOLS:
        raise ConfigError(f"protocol {protocol!r} is not one of {', '.join(PROTOCOLS)}")
    if not Path(path).exists():
        raise ConfigError(f"{path} does not exist: pass a run's output dir, a step_* folder or a scale.export file")
    shards = shards or data.demo_shards()
    num_classes = data_classes(shards)
    exported = read_weights(Path(path))
    model_args = exported["model_args"]
    torch.manual_seed(0)  # --random-init: the same untrained network on every call
    model = build_feature_model(model_args)
    prefix = model_args.get("feature_prefix", "encoder.")
    if not random_init:
        load_features_weights(model, exported["model"], prefix)
    model.eval().to(device)
    img_size = model_args.get("img_size", 224)
    run = dict(img_size=img_size, batch_size=batch_size, workers=workers, device=torch.device(device))
    train, train_labels = extract(model, shards, "train", **run)
    test, test_labels = extract(model, shards, "val", **run)
    if protocol == "knn":
        scores = knn_scores(train, train_labels, test, num_classes, k, temperature)
        settings = {"k": k, "temperature": temperature}
    else:
        scores = linear_probe_scores(train, train_labels, test, num_classes, epochs, lr)
        settings = {"epochs": epochs, "lr": lr}
    return {"protocol": protocol, "method": model_args.get("kind", "simmim"), "model": model_args["name"],
            "step": exported.get("step"), "random_init": random_init, "weights": None if random_init else prefix,
            **topk_accuracy(scores, test_labels), "train_samples": len(train_labels),
            "val_samples": len(test_labels), "feature_dim": train.shape[1], **settings}


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit code."""
    parser = argparse.ArgumentParser(prog="python -m scale.evaluate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=__doc__.split("\n\n", 2)[2])
    parser.add_argument("protocol", help="knn (weighted k-NN) or linear (linear probe)")
    parser.add_argument("path", help="run output dir, checkpoints/ or step_* folder, or a scale.export file")
    parser.add_argument("--data", help="shard folder with train and val splits and index.json (default: demo)")
    parser.add_argument("--random-init", action="store_true", help="evaluate the architecture untrained")
    parser.add_argument("--batch-size", type=int, default=128, help="feature extraction batch (default 128)")
    parser.add_argument("--workers", type=int, default=2, help="data loader workers (default 2)")
    parser.add_argument("--k", type=int, default=20, help="knn: neighbours (default 20)")
    parser.add_argument("--temperature", type=float, default=0.07, help="knn: vote temperature (default 0.07)")
    parser.add_argument("--epochs", type=int, default=100, help="linear: probe epochs (default 100)")
    parser.add_argument("--lr", type=float, default=0.1, help="linear: probe SGD learning rate (default 0.1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="where features are computed (default: cuda if available)")
    args = parser.parse_args(argv)
    try:
        for key in ("batch_size", "k", "epochs"):
            if getattr(args, key) < 1:
                raise ConfigError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
        if args.temperature <= 0 or args.lr <= 0:
            raise ConfigError("--temperature and --lr must be > 0")
        if args.data and not Path(args.data).exists():
            raise ConfigError(f"--data {args.data} does not exist: pass a shard folder with train and val splits")
        result = evaluate(args.protocol, args.path, args.data, args.random_init, args.batch_size, args.workers,
                          args.k, args.temperature, args.epochs, args.lr, args.device)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FileNotFoundError as e:  # marked complete, yet shards or meta.json are gone
        print(f"error: {e}: this checkpoint is damaged; pass an older step_* folder", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    exit_process(main())
