"""How `auto` splits the training images for its choices: folds or one 80/20 split, and the
stratified, seeded subsets its stages run on. The validation split is never among them."""

from __future__ import annotations

import dataclasses

import numpy as np

from headstart.data.layout import DataSplit, stratified_split


def inner_split(split: DataSplit, seed: int) -> DataSplit:
    """80/20 of the training images, stratified and seeded: what every choice is scored on."""
    train, val = stratified_split(split.train, 0.2, seed)
    return DataSplit(split.classes, train, val, "auto inner split of the training images", [], split.root)


def fold_count(split: DataSplit) -> int:
    """3 folds for small sets (one 20 % hold-out under 500 images is too noisy to rank on), else 1."""
    return 3 if len(split.train) * 0.2 < 500 else 1


def folds(split: DataSplit, seed: int, k: int) -> list[DataSplit]:
    """k stratified train/held-out partitions of the training images (k = 1: one 80/20 split)."""
    if k == 1:
        return [inner_split(split, seed)]
    by_class: dict[int, list] = {}
    for item in split.train:
        by_class.setdefault(item[1], []).append(item)
    parts: list[list] = [[] for _ in range(k)]
    for y in sorted(by_class):
        items = sorted(by_class[y])
        order = np.random.default_rng(seed + y).permutation(len(items))
        for j, i in enumerate(order):
            parts[j % k].append(items[i])
    return [
        DataSplit(
            split.classes,
            sorted(x for p in parts[:f] + parts[f + 1 :] for x in p),
            sorted(parts[f]),
            f"auto fold {f + 1}/{k} of the training images",
            [],
            split.root,
        )
        for f in range(k)
    ]


def subset(inner: DataSplit, n: int, m: int, seed: int) -> DataSplit:
    """A stratified subset of n inner-training and m inner-validation images."""
    return dataclasses.replace(inner, train=sample(inner.train, n, seed), val=sample(inner.val, m, seed))


def sample(items: list[tuple[str, int]], n: int, seed: int) -> list[tuple[str, int]]:
    """n of the items, stratified by label and seeded (all of them when n is not smaller)."""
    if n >= len(items):
        return list(items)
    return sorted(stratified_split(items, n / len(items), seed)[1])  # its held-out part has n items


def stage_subsets(parts: list[DataSplit], n: int, seed: int) -> list[DataSplit]:
    """n training images of each part, and half as many of its held-out ones (200 to 2,000)."""
    return [subset(p, n, max(200, min(len(p.val), n // 2, 2000)), seed) for p in parts]
