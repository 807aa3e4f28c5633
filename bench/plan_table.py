"""The planner's table: which backbones fit which slice, at what mesh, how fast (predicted).

  python bench/plan_table.py [--compile] [--out=FILE]

For each backbone (S/8, B/8, v2-g/14, v3-H+/16, v3-7B/16 with configs/coco.py's settings) and
slice (v5e-8, v5e-64, v5e-256, v4-32, H100-8) it runs
`python -m depthg_jax.plan --config=configs/coco.py:VARIANT --chips=SLICE --auto_mesh --json`
(one process each: the planner simulates the slice's devices) and prints a Markdown table:
the smallest mesh.model that fits, the per-device memory (from shapes; with --compile also
XLA:CPU's compiled total), and with --compile the predicted step time at 40% of peak and the
input rate per host. train.batch_size is 32 (the paper's) unless the slice cannot split 32
over its 'data' rows, then the smallest multiple of 32 that it can.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BACKBONES = ["S/8", "B/8", "v2-g/14", "v3-H+/16", "v3-7B/16"]
SLICES = ["v5e-8", "v5e-64", "v5e-256", "v4-32", "H100-8"]


def run_planner(variant: str, chips: str, batch: int, dtype: str, compile_: bool) -> dict:
    args = [
        sys.executable, "-m", "depthg_jax.plan", f"--config=configs/coco.py:{variant}",
        f"--chips={chips}", "--auto_mesh", "--json", f"--compile={str(compile_).lower()}",
        f"--config.train.batch_size={batch}", f"--config.model.backbone_param_dtype={dtype}",
    ]  # fmt: skip
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def batch_for(chips: str) -> int:
    from depthg_jax.training import planning

    name, count = planning.parse_chips(chips)
    host = planning.CHIPS[name].chips_per_host(count)
    batch = 32
    while all(planning.mesh_problem(batch, count, m, host) for m in range(1, host + 1)):
        batch += 32
    return batch


def cell(p: dict) -> str:
    if "error" in p:
        return "does not fit"
    gib = 2**30
    text = f"M={p['model']}, {p['estimate']['total_bytes'] / gib:.1f} GiB"
    if "compiled" in p:
        text += (
            f" ({p['compiled_total_bytes'] / gib:.1f} compiled), "
            f"{p['step_seconds'] * 1e3:.0f} ms/step, {p['host_pairs_per_second']:.0f} pairs/s/host"
        )
    return text


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default="")
    parser.add_argument("--backbones", default=",".join(BACKBONES))
    parser.add_argument("--slices", default=",".join(SLICES))
    args = parser.parse_args()
    backbones, slices = args.backbones.split(","), args.slices.split(",")
    batches = {s: batch_for(s) for s in slices}
    header = "| backbone | " + " | ".join(f"{s} (batch {batches[s]})" for s in slices) + " |"
    lines = [header, "|---" * (len(slices) + 1) + "|"]
    raw = {}
    for variant in backbones:
        row = []
        for chips in slices:
            p = run_planner(variant, chips, batches[chips], args.dtype, args.compile)
            raw[f"{variant} {chips}"] = p
            row.append(cell(p))
            print(f"{variant} {chips}: {row[-1]}", file=sys.stderr, flush=True)
        lines.append(f"| {variant} | " + " | ".join(row) + " |")
    table = "\n".join(lines)
    print(table)
    if args.out:
        Path(args.out).write_text(json.dumps(raw, indent=1) + "\n")


if __name__ == "__main__":
    main()
