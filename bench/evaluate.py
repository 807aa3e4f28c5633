"""Evaluation wall time with and without the dense CRF, on a throwaway export.

python bench/evaluate.py [--images=16] [--res=320] [--batch=8]
A random "mu/8" model (dim 32, 6 classes) on generated synthetic scenes: the forward pass is
tiny, so the figures show what the CRF adds to evaluation on this host.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)  # `configs` and `depthg_jax` from this checkout

import jax  # noqa: E402

from configs import demo  # noqa: E402
from depthg_jax import evaluate  # noqa: E402
from depthg_jax.data import synthetic  # noqa: E402
from depthg_jax.models import model as model_lib  # noqa: E402
from depthg_jax.runtime import checkpoint  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--res", type=int, default=320)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        config = demo.get_config()
        config.data.root = os.path.join(tmp, "data")
        config.data.synthetic_train, config.data.synthetic_val = 1, args.images
        config.data.synthetic_size = args.res
        config.data.eval_res = args.res
        config.eval.batch_size = args.batch
        synthetic.generate_dataset(
            config.data.root, num_train=1, num_val=args.images, size=args.res, seed=0
        )
        params = model_lib.init_params(model_lib.ModelSpec("mu/8", 32, 6), jax.random.key(0))
        export = os.path.join(tmp, "export")
        checkpoint.save_export(export, config, params)
        for use_crf in (False, True, False):  # the first run also compiles
            override = config.copy_and_resolve_references()
            override.eval.crf = use_crf
            results, _, _ = evaluate.run(export, override, os.path.join(tmp, "out"))
            print(
                f"crf={use_crf}: {results['num_images']} images {args.res}px, "
                f"{results['time_s']:.1f} s total, {results['crf_time_s']:.1f} s in CRF "
                f"({jax.device_count()} {jax.devices()[0].platform} device(s), "
                f"{os.cpu_count()} cores)"
            )


if __name__ == "__main__":
    main()
