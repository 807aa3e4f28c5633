"""Rewrites the README's demo and sweep figures, and the pictures in docs/figures/, from a run.

    python docs/make_figures.py [--workdir=/tmp/depthg_figures] [--only=demo,sweep]

Runs the README's commands in fresh processes, as a user would:
  1. the demo, `python -m depthg_jax.main --config=configs/demo.py`: its wall time, peak
     memory (the process's maximum resident set) and printed scores;
  2. `evaluate` on the demo's export (its confusion picture) and `segment` on three validation
     images with the matched cluster assignment (an overlay);
  3. the demo sweep, `--config=configs/demo_sweep.py`: its wall time and printed table.
Then it replaces the README's text between `<!-- figures:demo -->` and `<!-- /figures:demo -->`
(and `figures:sweep`) with the measured figures and today's date, and writes small PNGs to
docs/figures/: one training picture grid, one confusion picture and one overlay. The machine's
load average is written beside each time, since other work on the cores slows a run down:
run it on a quiet machine. A few minutes per run on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from PIL import Image

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
FIGURES = REPO / "docs" / "figures"
MAX_PICTURE_WIDTH = 640  # pixels: the docs' PNGs stay small


def run_command(args: list[str], log: Path) -> dict:
    """Runs `python -m <args>` from the repository; returns its output, wall time, peak memory
    and the load average when it started. Raises with the log's tail if it fails."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    load = os.getloadavg()[0]
    start = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", *args], cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT
        )
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    text = log.read_text()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} exited {proc.returncode}:\n{text[-3000:]}")
    return {"output": text, "wall_s": wall, "peak_bytes": usage.ru_maxrss * 1024, "load": load}


def minutes(seconds: float) -> str:
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s} s" if m else f"{s} s"


def printed_lines(output: str, first: str, last_prefix: str) -> list[str]:
    """The lines of `output` from the one starting with `first` through the last one starting
    with `last_prefix` (progress bars dropped)."""
    lines = [line.rstrip() for line in output.replace("\r", "\n").splitlines()]
    start = next(i for i, line in enumerate(lines) if line.startswith(first))
    end = max(i for i, line in enumerate(lines) if line.startswith(last_prefix))
    return lines[start : end + 1]


def small_png(source: Path, target: Path, max_width: int = MAX_PICTURE_WIDTH) -> None:
    """Copies a picture, scaled down to max_width if wider and stored with a 256-colour palette."""
    with Image.open(source) as im:
        im = im.convert("RGB")
        if im.width > max_width:
            im = im.resize((max_width, round(im.height * max_width / im.width)), Image.LANCZOS)
        im = im.quantize(256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        target.parent.mkdir(parents=True, exist_ok=True)
        im.save(target, optimize=True)


def replace_block(text: str, name: str, body: str) -> str:
    """Replaces what stands between `<!-- figures:name -->` and `<!-- /figures:name -->`."""
    pattern = re.compile(rf"(<!-- figures:{name} -->\n).*?(<!-- /figures:{name} -->)", re.S)
    if not pattern.search(text):
        raise ValueError(f"README.md has no <!-- figures:{name} --> ... <!-- /figures:{name} -->")
    return pattern.sub(lambda m: m.group(1) + body.rstrip("\n") + "\n" + m.group(2), text, 1)


def shorten_paths(lines: list[str], workdir: Path, shown: str) -> list[str]:
    return [line.replace(str(workdir), shown) for line in lines]


def demo_figures(workdir: Path, today: str) -> tuple[str, dict]:
    demo = workdir / "demo"
    run = run_command(
        ["depthg_jax.main", "--config=configs/demo.py", f"--workdir={demo}"], workdir / "demo.log"
    )
    printed = printed_lines(run["output"], "Unsupervised segmentation", "checkpoint ")
    printed = shorten_paths(printed, demo, "workdir/demo")
    results = json.loads((demo / "results.json").read_text())
    # The confusion picture and an overlay, from the commands a user runs next.
    run_command(
        ["depthg_jax.evaluate", f"--checkpoint={demo / 'export'}", f"--out={demo / 'eval'}"],
        workdir / "evaluate.log",
    )
    photos = workdir / "photos"
    shutil.rmtree(photos, ignore_errors=True)
    photos.mkdir()
    val = sorted((demo / "synthetic_data" / "images" / "val").glob("*.png"))[:3]
    for path in val:
        shutil.copy(path, photos / path.name)
    segment_out = workdir / "segmented"
    shutil.rmtree(segment_out, ignore_errors=True)
    run_command(
        ["depthg_jax.segment", f"--checkpoint={demo / 'export'}", f"--images={photos}",
         f"--out={segment_out}", "--res=224", f"--assignment={demo / 'eval' / 'results.json'}"],
        workdir / "segment.log",
    )  # fmt: skip
    grids = sorted((demo / "images").glob("step_*.png"))
    small_png(grids[-1], FIGURES / "demo_grid.png")
    small_png(demo / "eval" / "confusion_cluster.png", FIGURES / "demo_confusion.png")
    small_png(segment_out / "overlay" / val[0].name, FIGURES / "demo_overlay.png")
    measured = (
        f"{minutes(run['wall_s'])} wall, {run['peak_bytes'] / 1e9:.1f} GB peak memory, load "
        f"average {run['load']:.1f} when it started; {today}, written by "
        "`python docs/make_figures.py`"
    )
    code = "\n".join(printed)
    intro = textwrap.fill(
        f"One run of the command above on this project's 2-core CPU ({measured}) printed (the "
        "export paths, absolute in the output, shortened):",
        width=96,
    )
    text = f"""{intro}

```
{code}
```

Its last picture grid (`workdir/demo/images/`; the same grids are in TensorBoard), the
confusion picture `evaluate --checkpoint=workdir/demo/export` writes, and one overlay from
`segment` with `--assignment` (clusters coloured by their matched class):

![demo picture grid](docs/figures/demo_grid.png)

![demo confusion picture](docs/figures/demo_confusion.png)
![demo overlay](docs/figures/demo_overlay.png)
"""
    return text, results


def sweep_figures(workdir: Path, today: str, demo_results: dict | None) -> str:
    sweep = workdir / "sweep"
    run = run_command(
        ["depthg_jax.main", "--config=configs/demo_sweep.py", f"--workdir={sweep}"],
        workdir / "sweep.log",
    )
    printed = (sweep / "sweep_table.txt").read_text().splitlines()
    table = "\n".join(line.rstrip() for line in printed)
    measured = (
        f"{minutes(run['wall_s'])} wall, load average {run['load']:.1f} when it started; "
        f"{today}, written by `python docs/make_figures.py`"
    )
    text = (
        textwrap.fill(f"(this run: {measured})", width=96)
        + f"""

```
{table}
```
"""
    )
    if demo_results is not None:
        summary = json.loads((sweep / "sweep.json").read_text())
        member = next(m for m in summary["members"] if m["member"] == "depthg")
        trained = demo_results["trained"]
        keys = ("val/cluster_accuracy", "val/cluster_miou", "val/linear_accuracy",
                "val/linear_miou")  # fmt: skip
        same = all(abs(member[k] - trained[k]) < 5e-4 for k in keys)
        scores = " / ".join(f"{100 * trained[k]:.1f}" for k in keys)
        sentence = (
            f"The `depthg` member {'reproduces' if same else 'does NOT reproduce'} the single "
            f"demo run's scores (cluster / linear accuracy and mIoU {scores}"
            f"{'' if same else ' in the demo run'}), as member i of a population should."
        )
        text += "\n" + textwrap.fill(sentence, width=96) + "\n"
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workdir", default="/tmp/depthg_figures", help="emptied first")
    p.add_argument("--only", default="demo,sweep", help="which figures: demo, sweep or both")
    args = p.parse_args(argv)
    only = set(args.only.split(","))
    if not only <= {"demo", "sweep"}:
        p.error(f"--only={args.only}: use demo, sweep or demo,sweep")
    workdir = Path(args.workdir).resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    workdir.mkdir(parents=True)
    today = datetime.date.today().isoformat()
    readme = README.read_text()
    demo_results = None
    if "demo" in only:
        text, demo_results = demo_figures(workdir, today)
        readme = replace_block(readme, "demo", text)
        README.write_text(readme)
        print(f"README demo figures and docs/figures/ written ({today})", flush=True)
    if "sweep" in only:
        readme = replace_block(readme, "sweep", sweep_figures(workdir, today, demo_results))
        README.write_text(readme)
        print(f"README sweep figures written ({today})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
