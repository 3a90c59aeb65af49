"""Self-critical sequence training: the baseline, the log-probabilities the policy gradient
uses, the loss's gradient, and ``fastcap-train --scst --init RUN`` end to end on both engines."""

from __future__ import annotations

import json

import pytest
import torch

from fastcap.generate import Generated, sample
from fastcap.model import Captioner, ModelConfig
from fastcap.train.scst import SelfCritical, leave_one_out, sequence_log_probs
from tests.test_train import run_train, run_two_ranks

SCST_ARGS = [
    "--batch-size",
    "16",
    "eval_samples=8",
    "data.eval_splits=test",
    "log_every=1",
    "num_samples=1",
    "scst.samples=4",
]


def tiny_model(seed: int = 0) -> Captioner:
    torch.manual_seed(seed)
    mc = ModelConfig(
        image_size=32,
        width=32,
        heads=2,
        encoder_layers=1,
        unimodal_layers=1,
        multimodal_layers=1,
        embed_dim=16,
        max_len=12,
        vocab_size=40,
    )
    return Captioner(mc).eval()


def test_leave_one_out_baseline():
    r = torch.tensor([1.0, 2.0, 3.0, 10.0, 0.0, 2.0])  # two images, three samples each
    want = torch.tensor([2.5, 2.0, 1.5, 1.0, 6.0, 5.0])
    assert torch.allclose(leave_one_out(r, 3), want)


def test_sequence_log_probs_are_the_sampler_s():
    """The teacher-forced log p of each sampled caption (the policy gradient's term) sums to
    the score the sampler reports (its own summed log-probs at temperature 1), row by row:
    an off-by-one between positions and tokens, or a wrong mask, breaks this."""
    model = tiny_model()
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        img_tokens, _ = model.encode_image(images)
    gen = sample(model, images, num_return_sequences=4, top_p=1.0, seed=7)
    with torch.no_grad():
        logp, _ = sequence_log_probs(model, img_tokens, gen.tokens, gen.lens, 4)
    assert logp.shape == gen.tokens.shape
    assert (logp[torch.arange(logp.shape[1])[None, :] >= gen.lens[:, None]] == 0).all()
    assert torch.allclose(logp.sum(1), gen.scores, atol=1e-4), (logp.sum(1), gen.scores)


def test_policy_gradient_is_advantage_weighted_log_likelihood():
    """The loss's gradient equals that of -sum_i (r_i - b_i) log p(caption_i) / tokens, with
    each caption's log-likelihood from the cross-entropy training forward (lm_targets, the
    fused-CE op: another path than SCST's own), and no contrastive term."""
    model = tiny_model()
    model.cfg.lambda_clip = 0.0  # the CE forward's loss is then its cross-entropy alone
    model.train()
    images = torch.randn(2, 3, 32, 32)
    fixed = torch.tensor([0.9, 0.1, 0.5, 0.3, 0.2, 0.8])  # 2 images x 3 samples

    def reward(ids, gen: Generated, per_image: int):
        return fixed

    seed = 11
    obj = SelfCritical(reward, [0, 1], samples=3, generator=torch.Generator().manual_seed(seed))
    out = model(images, None, None, objective=obj)
    model.zero_grad()
    out["loss"].backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert abs(float(out["scst/reward"]) - float(fixed.mean())) < 1e-6
    # baselines 0.3 0.7 0.5 | 0.5 0.55 0.25: 0.9 and 0.8 beat theirs (0.5 ties)
    assert abs(float(out["scst/above_baseline"]) - 2 / 6) < 1e-6

    # each sampled caption's log-likelihood as -CE * n through the training forward of
    # [bos, caption] with lens n + 1
    s = obj.last
    adv = fixed - leave_one_out(fixed, 3)
    model.zero_grad()
    total = torch.zeros(())
    for i in range(6):
        n = int(s.lens[i])
        seq = torch.cat([torch.tensor([model.cfg.bos_id]), s.tokens[i, :n]])[None]
        ce = model(images[i // 3 : i // 3 + 1], seq, torch.tensor([n + 1]))["loss"]
        total = total + adv[i] * ce * n  # -adv * sum log p = adv * CE * n
    (total / s.lens.sum()).backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert got and set(got) <= set(want)
    for name, g in want.items():
        a = got.get(name, torch.zeros_like(g))
        assert torch.allclose(a, g, atol=1e-5, rtol=1e-4), (name, (a - g).abs().max())


@pytest.mark.slow
@pytest.mark.parametrize("zero_stage", [None, 3])
def test_scst_trains_through_fastcap_train(tiny_run, tmp_path, zero_stage):
    """``fastcap-train --scst --init RUN``: starts from RUN's weights, logs the SCST scalars,
    raises the mean reward, keeps best/ by val CIDEr-D and scores best and last; on the plain
    one-rank engine and under ZeRO-3 (sampling inside the partitioned engine's forward)."""
    out = tmp_path / "scst"
    extra = [] if zero_stage is None else [f"zero_stage={zero_stage}"]
    r = run_train(
        [
            "--scst",
            "--init",
            str(tiny_run),
            "--out",
            str(out),
            "--steps",
            "24",
            "--lr",
            "2e-3",
            "eval_every=12",
            "select_metric=CIDEr-D",  # auto would pick semantic accuracy on shapes
            *SCST_ARGS,
            *extra,
        ]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"ZeRO-{zero_stage or 0}" in r.stdout
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert len(log) == 24
    for k in ("scst/reward", "scst/baseline", "scst/above_baseline", "scst/sample_len"):
        assert all(k in x and x[k] == x[k] for x in log), k
    assert all(x["lr"] == 2e-3 for x in log)  # constant: no warmup, no decay
    first = sum(x["scst/reward"] for x in log[:6]) / 6
    last = sum(x["scst/reward"] for x in log[-6:]) / 6
    assert last > first, (first, last)
    # the mean-of-others baseline has the rewards' mean
    assert all(abs(x["scst/reward"] - x["scst/baseline"]) < 1e-5 for x in log)
    # the tokenizer is the initial run's, byte for byte
    assert (out / "tokenizer.json").read_bytes() == (tiny_run / "tokenizer.json").read_bytes()
    metrics = json.loads((out / "metrics.json").read_text())
    assert {"test", "test_beam3", "last", "selection"} <= set(metrics)
    sel = metrics["selection"]
    assert sel["metric"] == "CIDEr-D" and sel["best_step"] in (12, 24)
    evals = [json.loads(x) for x in (out / "eval_log.jsonl").read_text().splitlines()]
    assert [int(e["step"]) for e in evals] == [12, 24]
    assert sel["best_val"] == max(e["val/CIDEr-D"] for e in evals)
    assert (out / "best" / "model.safetensors").is_file()


def test_scst_weights_come_from_init(tiny_run, tmp_path):
    """Step 0 of an SCST run is the initial run's model: one step at lr 0 leaves model.pt
    equal to the initial weights."""
    out = tmp_path / "s0"
    r = run_train(
        ["--scst", "--init", str(tiny_run), "--out", str(out), "--steps", "1", "--lr", "0"]
        + SCST_ARGS
        + ["select_metric=none"]
    )
    assert r.returncode == 0, r.stderr[-3000:]
    a = torch.load(tiny_run / "model.pt", weights_only=True)["model"]
    b = torch.load(out / "model.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["selection"]["scored"] == "last" and not (out / "best").exists()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--scst"], "--scst and --init RUN_DIR go together"),
        (["--scst", "--init", "/nonexistent/run"], "no config.json"),
        (["scst.baseline=median"], "scst.baseline 'median': use mean or greedy"),
        (["scst.samples=1"], "needs at least 2 samples"),
        (["model.width=128"], "its weights do not fit"),
    ],
)
def test_scst_bad_input_is_one_line_exit_2(tiny_run, tmp_path, args, needle):
    if args[0] != "--scst":
        args = ["--scst", "--init", str(tiny_run), *args]
    r = run_train(["--out", str(tmp_path / "x"), *SCST_ARGS, *args])
    assert r.returncode == 2, r.stderr[-2000:]
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("fastcap-train")]
    assert len(lines) == 1 and needle in lines[0], r.stderr[-2000:]
    assert not (tmp_path / "x").exists()


@pytest.mark.slow
def test_scst_resume_draws_the_same_samples(tiny_run, tmp_path):
    """An SCST run stopped at step 3 and resumed reproduces steps 4-6 of an uninterrupted run
    exactly: the samples are seeded by (seed, step, rank, micro-batch), not by a stream."""
    quiet = ["eval_every=100000", "data.eval_splits=", "select_metric=none", "save_every=3"]
    base = ["--scst", "--init", str(tiny_run), *SCST_ARGS, *quiet]
    one, two = tmp_path / "one", tmp_path / "two"
    r = run_train([*base, "--out", str(one), "--steps", "6"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_train([*base, "--out", str(two), "--steps", "3"])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run_train(["--resume", str(two), "max_steps=6"])
    assert r.returncode == 0, r.stderr[-3000:]
    a = {int(x["step"]): x for x in map(json.loads, (one / "train_log.jsonl").open())}
    b = {int(x["step"]): x for x in map(json.loads, (two / "train_log.jsonl").open())}
    for step in (4, 5, 6):
        for k in ("loss/total", "scst/reward", "scst/sample_len"):
            assert a[step][k] == b[step][k], (step, k, a[step][k], b[step][k])


def test_fixed_length_decoding_makes_the_same_calls_whatever_the_captions():
    """Under ZeRO-3 over ranks every decoder call may gather parameters collectively, so each
    rank must call it equally often: fixed_length runs all steps, and gives the same tokens."""
    from fastcap.generate import greedy

    model = tiny_model()
    images = torch.randn(4, 3, 32, 32)
    calls = []
    forward = model.decoder.forward

    def counted(*a, **k):
        calls.append(1)
        return forward(*a, **k)

    model.decoder.forward = counted
    free = greedy(model, images, max_new_tokens=9)
    n_free = len(calls)
    calls.clear()
    fixed = greedy(model, images, max_new_tokens=9, fixed_length=True)
    assert len(calls) == 9 and n_free <= 9
    assert torch.equal(free.tokens, fixed.tokens[:, : free.tokens.shape[1]])
    assert torch.equal(free.lens, fixed.lens) and torch.allclose(free.scores, fixed.scores)
    # an early end: make eos certain after one token, and the free decoder stops at once
    with torch.no_grad():
        model.decoder.embed.weight[model.cfg.eos_id] *= 50
    calls.clear()
    greedy(model, images, max_new_tokens=9)
    early = len(calls)
    calls.clear()
    greedy(model, images, max_new_tokens=9, fixed_length=True)
    assert early < 9 and len(calls) == 9


@pytest.mark.slow
def test_scst_under_zero3_on_two_ranks(tiny_run, tmp_path):
    """Two CPU ranks (gloo), every parameter partitioned: sampling and scoring inside the
    engine's forward on both, the rewards finite, the run to the end."""
    out = tmp_path / "z3"
    r = run_two_ranks(
        ["-m", "fastcap.cli.train"],
        [
            "--scst",
            "--init",
            str(tiny_run),
            "--out",
            str(out),
            "--steps",
            "4",
            *SCST_ARGS,
            "zero_persistence_threshold=0",
            "eval_every=100000",
            "data.eval_splits=",
            "select_metric=none",
        ],
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 rank(s)" in r.stdout and "ZeRO-3" in r.stdout
    log = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
    assert [int(x["step"]) for x in log] == [1, 2, 3, 4]
    assert all(
        x["scst/reward"] == x["scst/reward"] and x["loss/total"] == x["loss/total"] for x in log
    )
