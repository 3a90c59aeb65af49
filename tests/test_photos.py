"""Real photographs: the photos preset, shortened to STEPS steps, trained on the shared
Flickr8k-1k photos, must caption the 125 official test photos with distinct captions and a
CIDEr-D that a model giving every photo one caption cannot reach.

The floors come from measurements on this split (bench/RESULTS.md, "Real photos"):

* ONE_CAPTION_CIDER: the best single caption for all 125 test photos, every one of the 3,809
  distinct training captions tried ("A black and white dog is running through the grass ."),
  scores CIDEr-D 0.175 (fastcap.cider on simple-tokenised text): the collapsed model's ceiling;
* REFERENCE_CIDER: this test's own run on a quiet 2-core CPU (2026-12-02, 178 s) scored beam-3
  CIDEr-D 0.378 with 88.0% distinct captions (greedy 0.313);
* CIDER_FLOOR sits between, 0.075 above the first and 0.128 below the second: 3.3 standard
  errors of that run's mean (0.039, from its 125 per-photo CIDEr-D scores).

The negative control, the same test with a randomly initialised frozen trunk
(``FASTCAP_PHOTOS_TRUNK_WEIGHTS=none``), fails as it must: the model gave all 125 test photos
one caption ("a man in a red shirt is standing on the beach ."; 0.8% distinct, beam-3 CIDEr-D
0.127), and the test failed on the distinct floor (167 s).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

STEPS = 200
"""Optimiser steps of the shortened preset (batch 64, 3.4 caption-epochs; the preset runs 413)."""
ONE_CAPTION_CIDER = 0.175
"""Best CIDEr-D of one caption given to every test photo (see the module docstring)."""
REFERENCE_CIDER = 0.378
"""Beam-3 test CIDEr-D of this test's own run (see the module docstring)."""
CIDER_FLOOR = 0.25
"""The beam-3 test CIDEr-D floor the test asserts."""
DISTINCT_FLOOR = 0.5
"""Share of distinct beam-3 captions among the 125 (88.0% measured; the random trunk's collapsed
model 0.8%)."""


@pytest.mark.slow
def test_photos_preset_captions_real_photos(flickr8k_1k, tmp_path):
    assert ONE_CAPTION_CIDER + 0.04 < CIDER_FLOOR < REFERENCE_CIDER  # well above collapse
    weights = os.environ.get("FASTCAP_PHOTOS_TRUNK_WEIGHTS", "imagenet")
    env = dict(os.environ, WANDB_MODE="disabled")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    run = tmp_path / "photos"
    cmd = [
        sys.executable, "-m", "fastcap.cli.train", "--preset", "photos", "--no-progress",
        "--wandb", "disabled", "--data", f"karpathy:{flickr8k_1k / 'dataset_flickr8k.json'}",
        "--out", str(run), "--steps", str(STEPS), f"eval_every={STEPS}",
        f"model.trunk_weights={weights}",
    ]  # fmt: skip
    t0 = time.time()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    m = json.loads((run / "metrics.json").read_text())
    beam = m["test_beam3"]
    print(
        f"photos preset, {STEPS} steps, trunk weights {weights}: {time.time() - t0:.0f}s; "
        f"test beam-3 CIDEr-D {beam['CIDEr-D']:.3f}, distinct {beam['distinct_captions']:.3f}; "
        f"greedy CIDEr-D {m['test']['CIDEr-D']:.3f}"
    )
    assert beam["images"] == 125
    assert beam["distinct_captions"] >= DISTINCT_FLOOR, beam
    assert beam["CIDEr-D"] >= CIDER_FLOOR, beam
