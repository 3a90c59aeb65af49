"""The training loop: data, tokenizer, model, ZeRO-3 engine, scheduled teacher forcing,
logging (W&B + progress bar), periodic evaluation, checkpoints, resume, Ctrl-C.

A run folder holds everything needed to caption images later without DeepSpeed:
``config.json``, ``tokenizer.json``, ``model.pt`` (full fp32 weights), plus the engine's
``checkpoints/`` for exact resume and ``metrics.json`` after the final evaluation.
"""

from __future__ import annotations

import json
import logging
import os
import random
import resource
import shutil
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import torch

from fastcap.data.captionset import Batch, CaptionSet
from fastcap.data.images import normalize
from fastcap.data.sources import check_spec, load_split_records, open_split
from fastcap.data.tokenizer import CaptionTokenizer
from fastcap.model import Captioner, MoE, param_count
from fastcap.train import engine as eng
from fastcap.train.config import ConfigError, TrainConfig, to_dict
from fastcap.train.evaluate import caption_split, coco_results, evaluate_split, score
from fastcap.train.teacher_forcing import tf_prob

log = logging.getLogger("fastcap.train")


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_model(path: Path, state: dict, cfg: TrainConfig) -> None:
    """Full fp32 weights + the model config, written atomically."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"model": state, "model_config": to_dict(cfg)["model"]}, tmp)
    os.replace(tmp, path)


def check_run_dir(path: str | Path) -> Path:
    """A folder written by fastcap-train (config, tokenizer and a checkpoint or weights)."""
    p = Path(path)
    if not (p / "config.json").is_file() or not (p / "tokenizer.json").is_file():
        raise ConfigError(
            f"{p} is not a fastcap run folder (no config.json/tokenizer.json); "
            "give the --out folder of a fastcap-train run"
        )
    return p


class StopRequested(KeyboardInterrupt):
    """Ctrl-C seen and honoured at a step boundary, where the state is consistent."""


class GracefulStop:
    """The first SIGINT asks the loop to stop at the next step boundary (which saves a
    checkpoint); a second one interrupts at once, without saving."""

    def __init__(self):
        self.requested = False
        self._prev = None

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._prev = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(
            "\nCtrl-C: stopping after this step (press again to quit without saving)",
            file=sys.stderr,
        )

    def __exit__(self, *exc):
        if self._prev is not None:
            signal.signal(signal.SIGINT, self._prev)
        return False


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss."""


class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: str | None = None, progress: bool = True):
        self.cfg = cfg
        self.progress = progress
        self.resume = Path(resume) if resume else None
        # everything that can be wrong with the input is checked before any work starts
        if self.resume is not None:
            check_run_dir(self.resume)
            if not (self.resume / "checkpoints" / "latest").is_file():
                raise ConfigError(
                    f"{self.resume} has no checkpoint to resume from (checkpoints/latest missing)"
                )
            cfg.out = str(self.resume)
        check_spec(cfg.data.data, cfg.data.image_root)
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if cfg.batch_size % (world * cfg.grad_accum):
            raise ConfigError(
                f"batch_size {cfg.batch_size} does not divide across {world} ranks x "
                f"{cfg.grad_accum} accumulation steps; use a multiple of {world * cfg.grad_accum}"
            )
        self.out = Path(cfg.out)
        if self.resume is None and (self.out / "checkpoints").exists():
            raise ConfigError(
                f"{self.out} already holds a run; resume it with --resume "
                f"{self.out} or choose another --out"
            )

    # ------------------------------------------------------------------ set-up
    def _setup(self) -> None:
        cfg = self.cfg
        self.rank, self.world, self.device = eng.init_distributed()
        self.is_main = self.rank == 0
        logging.basicConfig(
            level=logging.INFO if self.is_main else logging.WARNING, format="%(message)s"
        )
        seed_everything(cfg.seed + self.rank)
        self.out.mkdir(parents=True, exist_ok=True)
        bar = self.progress and self.is_main
        dc = cfg.data
        train_recs = load_split_records(dc.data, dc.train_split, dc.image_root)
        if not train_recs:
            raise ConfigError(f"{dc.data}: no images in split {dc.train_split!r}")
        tok_path = self.out / "tokenizer.json"
        if self.resume is None:
            if self.is_main:
                tok = CaptionTokenizer.train(
                    [c for r in train_recs for c in r.captions], vocab_size=cfg.data.vocab_size
                )
                tok.save(tok_path)
                atomic_write(self.out / "config.json", json.dumps(to_dict(cfg), indent=2).encode())
            torch.distributed.barrier()
        self.tok = CaptionTokenizer.load(tok_path)
        mc = cfg.model
        mc.vocab_size, mc.pad_id = self.tok.vocab_size, self.tok.pad_id
        mc.bos_id, mc.eos_id = self.tok.bos_id, self.tok.eos_id
        t0 = time.time()
        common = dict(
            image_root=dc.image_root,
            tokenizer=self.tok,
            image_size=mc.image_size,
            max_len=mc.max_len,
            progress=bar,
            max_bad_fraction=dc.max_bad_fraction,
        )
        self.train = open_split(
            dc.data, dc.train_split, in_memory=dc.in_memory, num_workers=dc.num_workers, **common
        )
        has_val = bool(load_split_records(dc.data, dc.val_split, dc.image_root))
        self.val = open_split(dc.data, dc.val_split, in_memory=True, **common) if has_val else None
        if self.is_main:
            print(
                f"data: {len(self.train)} train images ({len(self.train.bad)} skipped), "
                f"{0 if self.val is None else len(self.val)} val, vocab {self.tok.vocab_size}, "
                f"loaded in {time.time() - t0:.1f}s"
            )
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = Captioner(mc)
        self.n_params = param_count(self.model)  # before ZeRO-3 partitions them away
        self.precision = eng.resolve_precision(cfg, self.device)
        self.model.to(self.device)
        self.steps_per_epoch = self.train.steps_per_epoch(cfg.batch_size)
        if self.steps_per_epoch < 1:
            raise ConfigError(f"batch_size {cfg.batch_size} > {len(self.train)} training images")
        self.total_steps = cfg.max_steps or max(1, int(cfg.epochs * self.steps_per_epoch))
        self.engine = eng.build_engine(
            self.model, cfg, self.world, self.precision, self.total_steps
        )
        if cfg.checkpointing:
            from fastcap.train.parallelize import apply_activation_checkpointing

            apply_activation_checkpointing(self.model)
        self.param_share = eng.partition_fraction(self.engine)
        self.tf_gen = torch.Generator().manual_seed(cfg.seed * 7919 + self.rank)
        self.step, self.epoch, self.batch_pos = 0, 0, 0
        self._fault_streak = 0
        if self.resume is not None:
            self._load_checkpoint()
        self.wandb = self._init_wandb() if self.is_main else None
        if self.is_main:
            print(
                f"model: {self.n_params / 1e6:.2f}M parameters | {self.world} rank(s) "
                f"on {self.device.type} | {self.precision} | ZeRO-3 | "
                f"{self.total_steps} steps ({self.steps_per_epoch}/epoch, batch "
                f"{cfg.batch_size}) | kernels: {os.environ.get('FASTCAP_KERNELS', 'auto')}"
            )

    def _init_wandb(self):
        cfg = self.cfg
        if cfg.wandb == "disabled":
            return None
        import wandb

        id_file = self.out / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        return wandb.init(
            project=cfg.wandb_project,
            mode=cfg.wandb,
            dir=str(self.out),
            id=run_id,
            resume="allow",
            name=self.out.name,
            config=to_dict(cfg),
        )

    # ------------------------------------------------------------------ checkpoints
    def _ckpt_dir(self) -> Path:
        return self.out / "checkpoints"

    def save_checkpoint(self) -> None:
        """Engine state (model, optimiser, scheduler, scaler) + position and every RNG, written
        under a temporary tag and renamed, then ``latest`` replaced; the last K are kept."""
        tag = f"step{self.step:08d}"
        root = self._ckpt_dir()
        tmp_tag = tag + ".tmp"
        client = {"step": self.step, "epoch": self.epoch, "batch_pos": self.batch_pos}
        self.engine.save_checkpoint(str(root), tag=tmp_tag, client_state=client, save_latest=False)
        torch.save(rng_state(self.tf_gen), root / tmp_tag / f"rng_rank{self.rank}.pt")
        torch.distributed.barrier()
        if self.is_main:
            if (root / tag).exists():
                shutil.rmtree(root / tag)
            os.replace(root / tmp_tag, root / tag)
            atomic_write(root / "latest", tag.encode())
            tags = sorted(
                p.name
                for p in root.iterdir()
                if p.is_dir() and p.name.startswith("step") and not p.name.endswith(".tmp")
            )
            for old in tags[: -self.cfg.keep_checkpoints]:
                shutil.rmtree(root / old, ignore_errors=True)
            save_model(self.out / "model.pt", self._full_state(), self.cfg)
        else:
            self._full_state()
        torch.distributed.barrier()

    def _full_state(self) -> dict:
        return eng.full_state_dict(self.engine)

    def _load_checkpoint(self) -> None:
        root = self._ckpt_dir()
        tag = (root / "latest").read_text().strip()
        _, client = self.engine.load_checkpoint(str(root), tag=tag)
        self.step, self.epoch = client["step"], client["epoch"]
        self.batch_pos = client["batch_pos"]
        rng_file = root / tag / f"rng_rank{self.rank}.pt"
        set_rng_state(torch.load(rng_file, weights_only=False), self.tf_gen)
        if self.is_main:
            print(
                f"resumed {self.out} at step {self.step} (epoch {self.epoch}, batch "
                f"{self.batch_pos})"
            )

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        self._setup()
        try:
            with GracefulStop() as self._stop:
                self._train()
        except StopRequested:
            if self.is_main:
                print(f"interrupted at step {self.step}: saving a checkpoint", file=sys.stderr)
            self.save_checkpoint()
            raise
        except NonFiniteError:
            self.step += 1  # the failed step consumed its batch: resume after it
            self.batch_pos += 1
            self.save_checkpoint()
            raise
        self.save_checkpoint()
        metrics = self.final_eval()
        if self.is_main:
            print(f"bad records skipped in {self.cfg.data.train_split}: {len(self.train.bad)}")
        if self.wandb is not None:
            self.wandb.summary.update({f"final/{k}": v for k, v in _flat(metrics).items()})
            self.wandb.summary["data/bad_records"] = len(self.train.bad)
            self.wandb.finish()
        return metrics

    def _train(self) -> None:
        cfg = self.cfg
        bar = None
        if self.is_main and self.progress:
            from tqdm import tqdm

            bar = tqdm(
                total=self.total_steps,
                initial=self.step,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                mininterval=1.0,
            )
        t_last, tok_count, img_count = time.time(), 0, 0
        eval_every = cfg.eval_every or self.steps_per_epoch
        save_every = cfg.save_every or self.steps_per_epoch
        while self.step < self.total_steps:
            batches = self.train.batches(
                self.epoch,
                self.batch_pos,
                cfg.batch_size,
                seed=cfg.seed,
                rank=self.rank,
                world=self.world,
            )
            for batch in batches:
                out = self.train_step(batch)
                self.step += 1
                self.batch_pos += 1
                tok_count += int(batch.lens.sum()) * self.world
                img_count += len(batch.ids) * self.world
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    dt = max(time.time() - t_last, 1e-9)
                    rec = self._scalars(out)
                    rec.update(
                        {"perf/tokens_per_s": tok_count / dt, "perf/images_per_s": img_count / dt}
                    )
                    t_last, tok_count, img_count = time.time(), 0, 0
                    if self.wandb is not None:
                        self.wandb.log(rec, step=self.step)
                    if self.is_main:
                        self._log_line({"step": self.step, **rec})
                    if bar is not None:
                        bar.set_postfix(
                            loss=f"{rec['loss/total']:.3f}",
                            ce=f"{rec['loss/ce']:.3f}",
                            img_s=f"{rec['perf/images_per_s']:.0f}",
                            tok_s=f"{rec['perf/tokens_per_s']:.0f}",
                            refresh=False,
                        )
                if bar is not None:
                    bar.update(1)
                if self.step % eval_every == 0 and self.step < self.total_steps:
                    self.periodic_eval()
                if self.step % save_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
                if self._stop_requested():
                    raise StopRequested
                if self.step >= self.total_steps:
                    break
            else:
                self.epoch += 1
                self.batch_pos = 0
        if bar is not None:
            bar.close()

    def _stop_requested(self) -> bool:
        """Did any rank see Ctrl-C? (All ranks must stop at the same step to save together.)"""
        flag = torch.tensor([1.0 if self._stop.requested else 0.0])
        if self.world > 1:
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def _log_line(self, rec: dict) -> None:
        """Append one JSON line to RUN/train_log.jsonl (the same scalars W&B gets)."""
        with open(self.out / "train_log.jsonl", "a") as f:
            f.write(json.dumps({k: float(v) for k, v in rec.items()}) + "\n")

    def train_step(self, batch: Batch) -> dict:
        """One optimiser step over this rank's slice of a global batch (with accumulation)."""
        cfg = self.cfg
        self.engine.train()
        p = tf_prob(cfg.tf, self.step, self.total_steps)
        capture = cfg.diag_every > 0 and (self.step + 1) % cfg.diag_every == 0
        n = len(batch.ids)
        micro = n // cfg.grad_accum
        logs: dict = {}
        skipped = 0
        for a in range(cfg.grad_accum):
            sl = slice(a * micro, (a + 1) * micro)
            lens = batch.lens[sl]
            L = int(lens.max())
            images = normalize(batch.images[sl].to(self.device, non_blocking=True))
            if self.step + 1 in cfg.inject_nan_steps:
                images = images * float("nan")
            tokens = batch.tokens[sl, :L].to(self.device)
            lens = lens.to(self.device)
            out = self.engine(
                images, tokens, lens, tf_p=p, generator=self.tf_gen, capture=capture and a == 0
            )
            # every rank must agree to skip, or the collectives of backward would deadlock
            bad = torch.tensor([0.0 if torch.isfinite(out["loss"]).item() else 1.0])
            if self.world > 1:
                torch.distributed.all_reduce(bad)
            if bad.item() > 0:
                skipped += 1
                terms = {k: float(out[k]) for k in ("ce", "clip", "aux")}
                log.warning(
                    "step %d: non-finite loss %s; micro-batch skipped", self.step + 1, terms
                )
            else:
                self.engine.backward(out["loss"])
                self.engine.step()
            # keep numbers, never the graph: nothing that holds it outlives the step
            for k, v in out.items():
                if k != "loss":
                    logs[k] = logs.get(k, 0.0) + float(v) / cfg.grad_accum
            logs["loss"] = logs.get("loss", 0.0) + float(out["loss"].detach()) / cfg.grad_accum
            del out
        logs["fault/skipped"] = float(skipped)
        self._fault_streak = self._fault_streak + 1 if skipped else 0
        if skipped and self.is_main:
            self._log_line(
                {
                    "step": self.step + 1,
                    "fault/skipped": float(skipped),
                    **{f"fault/{k}": logs[k] for k in ("ce", "clip", "aux")},
                }
            )
        if self._fault_streak >= cfg.max_bad_steps:
            raise NonFiniteError(
                f"{self._fault_streak} consecutive steps had a non-finite loss (last at step "
                f"{self.step + 1}); stopped with a checkpoint of the last good state in "
                f"{self._ckpt_dir()}; lower optim.lr or check the data"
            )
        logs["tf_p"] = p
        if self.world > 1:  # log the mean over ranks, not rank 0's share
            keys = [k for k in ("loss", "ce", "clip", "aux", "tf_pred") if k in logs]
            t = torch.tensor([logs[k] for k in keys], dtype=torch.float64)
            torch.distributed.all_reduce(t)
            logs.update({k: float(v) / self.world for k, v in zip(keys, t)})
        return logs

    def _scalars(self, out: dict) -> dict:
        rec = {
            "loss/total": out["loss"],
            "loss/ce": out["ce"],
            "loss/clip": out["clip"],
            "loss/aux": out["aux"],
            "logit_scale": out["logit_scale"],
            "tf/p": out["tf_p"],
            "tf/pred_share": out["tf_pred"],
            "lr": self.engine.get_lr()[0],
            "epoch": self.epoch + self.batch_pos / max(self.steps_per_epoch, 1),
            "mem/rss_mib": rss_mib(),
            "mem/peak_rss_mib": peak_rss_mib(),
            "zero/param_share": self.param_share,
            "data/bad_records": float(len(self.train.bad)),
        }
        gn = self.engine.get_global_grad_norm()
        if gn is not None:
            rec["grad_norm"] = float(gn)
        if self.device.type == "cuda":
            rec["mem/max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
        for i, layer in enumerate(self.model.decoder.layers):
            if isinstance(layer.ffn, MoE) and layer.ffn.last_load is not None:
                for e, share in enumerate(layer.ffn.last_load.tolist()):
                    rec[f"expert_load/dec{i}/e{e}"] = share
        rec.update({k: v for k, v in out.items() if k.startswith("diag/")})
        return rec

    # ------------------------------------------------------------------ evaluation
    def eval_model(self) -> Captioner:
        """A plain (hook-free) copy of the current weights for decoding; collective call."""
        state = self._full_state()
        with torch.random.fork_rng(devices=[]):  # building it must not move the global RNG
            m = Captioner(self.cfg.model).to(self.device)
        m.load_state_dict(state)
        return m.eval()

    def periodic_eval(self) -> None:
        if self.val is None:
            return
        m = self.eval_model()
        if self.is_main:
            res = caption_split(
                m, self.val, self.tok, device=self.device, limit=self.cfg.eval_samples
            )
            metrics = score(res, self.val, full=False)
            line = " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
            print(f"\n[step {self.step}] val ({len(res)} images): {line}")
            self._print_samples(res, self.val, self.cfg.num_samples // 2)
            if self.wandb is not None:
                self.wandb.log({f"val/{k}": v for k, v in metrics.items()}, step=self.step)
        del m
        torch.distributed.barrier()

    def _print_samples(self, res: dict, cs: CaptionSet, n: int) -> None:
        for rec in cs.records[:n]:
            ok = ""
            if "objects" in rec.meta:
                from fastcap.data.shapes import caption_correct

                ok = "ok " if caption_correct(res[rec.id], rec.meta) else "BAD"
            print(f"  {ok} {rec.id:>6}  {res[rec.id]!r:55}  ref: {rec.captions[0]!r}")

    def final_eval(self) -> dict:
        cfg = self.cfg
        m = self.eval_model()
        metrics: dict = {}
        if self.is_main:
            mc = cfg.model
            for split in cfg.data.eval_splits:
                dc = cfg.data
                if not load_split_records(dc.data, split, dc.image_root):
                    log.warning("no images in split %r; skipped", split)
                    continue
                cs = open_split(
                    dc.data,
                    split,
                    image_root=dc.image_root,
                    tokenizer=self.tok,
                    image_size=mc.image_size,
                    max_len=mc.max_len,
                    in_memory=True,
                    progress=self.progress,
                    max_bad_fraction=dc.max_bad_fraction,
                )
                for name, kw in (("greedy", {}), ("beam3", {"strategy": "beam", "num_beams": 3})):
                    t0 = time.time()
                    # retrieval does not depend on the decoding strategy: computed once
                    mets, res = evaluate_split(
                        m, cs, self.tok, device=self.device, retrieval=name == "greedy", **kw
                    )
                    mets["images"] = len(res)
                    mets["decode_seconds"] = round(time.time() - t0, 2)
                    key = split if name == "greedy" else f"{split}_{name}"
                    metrics[key] = mets
                    print(f"\n== {split} ({len(res)} images, {name}) ==")
                    self._print_samples(res, cs, cfg.num_samples if name == "greedy" else 3)
                    print(
                        "  "
                        + " | ".join(
                            f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                            for k, v in mets.items()
                        )
                    )
                    atomic_write(
                        self.out / f"captions_{key}.json", json.dumps(coco_results(res)).encode()
                    )
            atomic_write(self.out / "metrics.json", json.dumps(metrics, indent=2).encode())
            print(f"\nwrote {self.out / 'metrics.json'}")
        del m
        torch.distributed.barrier()
        return metrics


# ---------------------------------------------------------------------- random state
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state(tf_gen: torch.Generator) -> dict:
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tf": tf_gen.get_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
    }


def set_rng_state(state: dict, tf_gen: torch.Generator) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tf_gen.set_state(state["tf"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out
