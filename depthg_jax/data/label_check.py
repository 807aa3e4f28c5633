"""What the label scan before any training or evaluation work found (`datasets.check_labels`
reads every label file of a split once, naming ids the dataset cannot hold), said in one line,
and the rule that a split whose label files are all ignore is an error, not "unlabelled".
"""

from __future__ import annotations

from depthg_jax.data import datasets


def scan_split(source, n_classes: int) -> dict:
    """`datasets.check_labels` of a split, read the way the run will use it: prepared records
    store an unlabelled example as all-ignore, so there such examples count as unlabelled."""
    scan = datasets.check_labels(source, n_classes)
    if getattr(source, "records", None) is None:
        scan = {**scan, "labelled": scan["usable"], "all_ignore": 0, "all_ignore_files": []}
    return scan


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
