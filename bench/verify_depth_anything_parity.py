"""Full-size parity of the flax Depth Anything V2 with transformers (random weights).

    python bench/verify_depth_anything_parity.py [--sizes 518x686 518x518 392x518]

Builds transformers' DepthAnythingForDepthEstimation with Depth Anything V2 Small's published
shape (DINOv2-S/14, layers 3/6/9/12, neck 48/96/192/384, fusion 64), perturbs every tensor
(so biases, LayerNorm affine, LayerScale and the unused paths matter) and lifts the last bias
above the final ReLU, converts it twice (its Hugging Face names, and the official
DepthAnything/Depth-Anything-V2 names spelt out by tests/depth_anything_test.official_state),
and compares the predicted depth at each input size (518x686 is a 640x480 COCO image after
the processor; 518x518 keeps the stored 37x37 position grid). Errors are relative to the
prediction's largest magnitude. Also prints the bfloat16-compute error against float32.
"""

import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for _path in (REPO, os.path.join(REPO, "tests")):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from depth_anything_test import official_state, small_config  # noqa: E402

from depthg_jax.models import convert_depth_anything as convert_da  # noqa: E402
from depthg_jax.models import depth_anything as da  # noqa: E402

TOLERANCE = 1e-4


def small_model(seed: int = 0):
    config = small_config()
    torch.manual_seed(seed)
    model = transformers.DepthAnythingForDepthEstimation(config).eval()
    captured = []
    hook = model.head.conv3.register_forward_hook(lambda m, i, o: captured.append(o))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
        model(torch.randn(1, 3, 518, 686))
        model.head.conv3.bias.add_(
            -captured[0].min() + 0.5 * (captured[0].max() - captured[0].min())
        )
    hook.remove()
    return model, config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", nargs="+", default=["518x686", "518x518", "392x518"])
    args = parser.parse_args()
    model, config = small_model()
    hf = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}
    spec = convert_da.spec_from_hf_config(config.to_dict())
    official = official_state(hf)
    layouts = {
        "hf": convert_da.convert_state_dict(hf, spec),
        "official": convert_da.convert_state_dict(official, convert_da.infer_spec(official)),
    }
    assert convert_da.infer_spec(official) == spec
    print(f"jax {jax.__version__}, torch {torch.__version__}, transformers "
          f"{transformers.__version__}; {spec}")  # fmt: skip
    worst = 0.0
    for size in args.sizes:
        h, w = map(int, size.split("x"))
        x = np.random.default_rng(h * w).standard_normal((2, h, w, 3)).astype(np.float32)
        with torch.no_grad():
            want = model(torch.from_numpy(x).permute(0, 3, 1, 2)).predicted_depth.numpy()
        scale = np.abs(want).max()
        for name, params in layouts.items():
            t0 = time.perf_counter()
            got = np.asarray(jax.jit(da.DepthAnything(spec).apply)({"params": params}, x))
            err = float(np.abs(got - want).max() / scale)
            worst = max(worst, err)
            print(f"{h}x{w} {name:8s} float32: max |ours - transformers| / max |depth| = "
                  f"{err:.2e} ({time.perf_counter() - t0:.1f} s)")  # fmt: skip
        bf16 = np.asarray(
            jax.jit(da.DepthAnything(spec, jnp.bfloat16).apply)({"params": layouts["hf"]}, x)
        )
        diff = np.abs(bf16 - want) / scale
        print(f"{h}x{w} hf       bfloat16 compute: max error / max |depth| = "
              f"{diff.max():.2e}, mean {diff.mean():.2e}")  # fmt: skip
    print(f"worst float32 relative error {worst:.2e} (bound {TOLERANCE:.0e}): "
          f"{'PASS' if worst <= TOLERANCE else 'FAIL'}")  # fmt: skip


if __name__ == "__main__":
    main()
