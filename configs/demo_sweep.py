"""The demo as a sweep: DepthG (corrected) against STEGO and four depth weights, one run.

Six members train side by side on the generated synthetic scenes, sharing one backbone
forward, one FPS and one batch per step (depthg_jax.training.population): the demo's DepthG, a STEGO
member (no depth term, uniform random sampling), and DepthG at four other depth weights.
A few minutes on a 2-core CPU:

    python -m depthg_jax.main --config=configs/demo_sweep.py --workdir=/tmp/depthg_sweep

prints the table of the members' validation scores and writes sweep.json, sweep.png and the
best member's export (the member picked on the evaluation split's labels, as the release
picks its checkpoint; the table says so).
"""

from depthg_jax import config as base

MEMBERS = "|".join(
    [
        "name=depthg",
        "name=stego,loss.depth_weight=0,loss.sampling=random",
        "name=depth0.05,loss.depth_weight=0.05",
        "name=depth0.1,loss.depth_weight=0.1",
        "name=depth0.4,loss.depth_weight=0.4",
        "name=depth0.8,loss.depth_weight=0.8",
    ]
)


def get_config():
    config = base.sibling_config(__file__, "demo")
    config.sweep.members = MEMBERS
    config.train.report_baselines = False  # The baselines are the single demo's (configs/demo.py).
    config.train.image_every = 0
    return config
