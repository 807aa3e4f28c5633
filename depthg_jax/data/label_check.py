"""The label scan run before any training or evaluation work: every label file of a split read
once, so ids the dataset cannot hold and label sets with nothing to score are named up front
instead of minutes later (or never: `datasets.map_labels` turns bad ids into ignore).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np

from depthg_jax.data import datasets


def _raw_label(source, index: int) -> tuple[str, np.ndarray | None]:
    """(where, raw label values) of an example; raw None when it has no label file.

    Loose files: the label file's raw values. Prepared records store labels already mapped
    (unknown values as ignore), so only their all-ignore examples can be found: their labels
    come back as mapped ids and `where` names the record."""
    records = getattr(source, "records", None)
    if records is None:
        return f"{source.name}[{index}] (id {source.ids[index]!r})", source[index]["label"]
    record = records[index]
    if record.label is None:
        return record.image, None
    raw = np.asarray(source.read_label_fn(record.label))
    return record.label, raw[..., 0] if raw.ndim == 3 else raw


def check_labels(source, n_classes: int | None = None, *, threads: int = 8, shown: int = 3):
    """Reads every label of a split; raises ValueError naming up to `shown` files (with id,
    bad pixel count and values) that hold values the dataset's mapping does not know or ids
    >= n_classes (default: the source's). Returns ``total`` (examples), ``labelled`` (with a
    label), ``all_ignore`` (labels without a single pixel of a class) and ``all_ignore_files``
    (the first `shown`), ``usable`` (labelled minus all_ignore) and ``class_pixels``.
    """
    n = int(n_classes or source.n_classes)
    lut = getattr(source, "label_lut", None)
    mapped_already = getattr(source, "records", None) is None
    ids = source.ids

    def scan(index: int):
        where, raw = _raw_label(source, index)
        if raw is None:
            return None
        if mapped_already:
            labels, bad = np.asarray(raw), np.zeros(np.shape(raw), bool)
        else:
            labels, _ = datasets.map_labels(raw, lut, n)
            ignored = (raw >= 0) & (raw <= 255)
            ignored &= lut[np.clip(raw, 0, 255).astype(np.intp)] == datasets.IGNORE
            bad = (labels < 0) & ~ignored
        values = np.unique(raw[bad])[:5].tolist() if bad.any() else []
        kept = labels[(labels >= 0) & (labels < n)]
        return where, int(bad.sum()), values, np.bincount(kept.ravel(), minlength=n)[:n]

    counts = np.zeros(n, np.int64)
    labelled, all_ignore, bad_files = 0, [], []
    with ThreadPoolExecutor(max(1, threads)) as pool:
        for index, found in enumerate(pool.map(scan, range(len(source)))):
            if found is None:
                continue
            where, n_bad, values, pixels = found
            labelled += 1
            counts += pixels
            if n_bad:
                bad_files.append(f"{where} (id {ids[index]!r}): {n_bad} pixels of {values}")
            elif not pixels.any():
                all_ignore.append(where)
    if bad_files:
        raise ValueError(
            f"{len(bad_files)} of {labelled} label files of {source.name} hold values outside "
            f"the {n} classes (data.n_classes={n}; 255 = ignore): "
            f"{'; '.join(bad_files[:shown])}{'; ...' if len(bad_files) > shown else ''}. Fix "
            "those files, or set data.n_classes to at least the largest id + 1"
        )
    return {
        "total": len(source),
        "labelled": labelled,
        "all_ignore": len(all_ignore),
        "all_ignore_files": all_ignore[:shown],
        "usable": labelled - len(all_ignore),
        "class_pixels": counts.tolist(),
    }


def describe(scan: dict, split: str) -> str:
    """One line: how many images of a split carry labels that can be scored."""
    total, usable = scan["total"], scan["usable"]
    if usable == total:
        return f"all {total} images of {split!r} are labelled"
    unlabelled = total - scan["labelled"]
    parts = [f"{unlabelled} without a label file"] if unlabelled else []
    if scan["all_ignore"]:
        parts.append(f"{scan['all_ignore']} labelled only with ignore (255)")
    return f"{usable} of {total} images of {split!r} are labelled ({', '.join(parts)})"


def require_usable(scan: dict, what: str, remedy: str) -> None:
    """Raises ValueError when a split (`what`, named in the message) has label files but not
    one labelled pixel."""
    if scan["labelled"] and not scan["usable"]:
        raise ValueError(
            f"the labels of {what} hold no class at all: every one of its "
            f"{scan['labelled']} label files is ignore (255) everywhere, e.g. "
            f"{', '.join(scan['all_ignore_files'])}. {remedy}"
        )
