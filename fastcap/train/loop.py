"""The training loop: data, tokenizer, model, DeepSpeed engine, scheduled teacher forcing, the step,
periodic evaluation and checkpoints, resume, Ctrl-C.

Checkpoints live in :mod:`fastcap.train.checkpoint`, logging in :mod:`fastcap.train.tracking`,
the evaluation hooks in :mod:`fastcap.train.evaluate`. A run folder holds everything needed to
caption images later without DeepSpeed: ``config.json``, ``tokenizer.json``, ``model.pt`` (full
fp32 weights), plus ``checkpoints/`` for exact resume and ``metrics.json``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
from pathlib import Path

import torch

from fastcap.bundle import write_bundle
from fastcap.data.features import split_features
from fastcap.data.records import Batch
from fastcap.data.sources import check_spec
from fastcap.data.tokenizer import CaptionTokenizer
from fastcap.model import Captioner, param_count
from fastcap.ops import dispatch
from fastcap.train import checkpoint as ckpt
from fastcap.train import engine as eng
from fastcap.train.collectives import any_rank
from fastcap.train.config import ConfigError, TrainConfig, to_dict
from fastcap.train.evaluate import final_eval, periodic_eval, write_metrics
from fastcap.train.inputs import open_run_data, with_tokenizer
from fastcap.train.scst import objective_factory, read_init
from fastcap.train.selection import BestKeeper, resolve_metric
from fastcap.train.signals import GracefulStop, StopRequested
from fastcap.train.step import StepRunner
from fastcap.train.teacher_forcing import tf_prob
from fastcap.train.tracking import Tracker, step_scalars

log = logging.getLogger("fastcap.train")


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss."""


class Trainer:
    def __init__(self, cfg: TrainConfig, *, resume: str | None = None, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.resume = Path(resume) if resume else None
        # everything that can be wrong with the input is checked before any work starts
        if self.resume is not None:
            ckpt.check_run_dir(self.resume)
            self.resume_tag = ckpt.resumable_tag(self.resume)
            tok = CaptionTokenizer.load(self.resume / "tokenizer.json")
            shapes = ckpt.model_shapes(with_tokenizer(cfg.model, tok))
            world = int(os.environ.get("WORLD_SIZE", "1"))
            layout = {"world": world, "zero_stage": eng.zero_stage(cfg, world)}
            ckpt.check_compatible(self.resume, self.resume_tag, shapes, layout)
            cfg.out = str(self.resume)
        check_spec(cfg.data.data, cfg.data.image_root)
        self.init = None
        if cfg.scst.enabled and self.resume is None:  # the starting weights, checked now
            self.init = read_init(cfg)
        ops = ("attention", "siglip", "lce") + (("moe",) if cfg.model.moe.enabled else ())
        try:  # a FASTCAP_KERNELS value that cannot run here fails now, not at the first step
            dispatch.validate(ops, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        except (ValueError, RuntimeError) as e:
            raise ConfigError(str(e)) from None
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
        ckpt.seed_everything(cfg.seed + self.rank)
        self.out.mkdir(parents=True, exist_ok=True)
        self.tok, self.train, self.val = open_run_data(
            cfg,
            self.out,
            is_main=self.is_main,
            new_run=self.resume is None,
            progress=self.progress,
            tokenizer_from=None if self.init is None else self.init[1],
        )
        mc = cfg.model
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = Captioner(mc)
        if self.init is not None:
            self.model.load_state_dict(self.init[0])
            self.init = None  # the engine holds them from here
        self.n_params = param_count(self.model)  # before ZeRO-3 partitions them away
        self.shapes = {k: list(v.shape) for k, v in self.model.state_dict().items()}
        self.precision = eng.resolve_precision(cfg, self.device)
        self.model.to(self.device)
        # a trunk frozen for the whole run: its maps of the training images, once (before the
        # engine: under ZeRO-3 the trunk's parameters are partitioned after it)
        self.features = None
        if mc.freeze_trunk:
            self.features = split_features(
                self.model.vision,
                self.train,
                cfg.data.feature_cache,
                device=self.device,
                progress=self.is_main,
            )
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
        self.stage = eng.zero_stage(cfg, self.world)
        self.stepper = StepRunner(
            self.engine,
            grad_accum=cfg.grad_accum,
            device=self.device,
            dtype=eng.DTYPES[self.precision],
            objective_for=self._scst_objective() if cfg.scst.enabled else None,
            features=self.features,
        )
        try:
            metric = resolve_metric(cfg.select_metric, self.val)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.best = BestKeeper(self.out, metric, to_dict(cfg)["model"], self.out / "tokenizer.json")
        self.tf_gen = torch.Generator().manual_seed(cfg.seed * 7919 + self.rank)
        self.step, self.epoch, self.batch_pos, self._fault_streak = 0, 0, 0, 0
        if self.resume is not None:
            root = self.out / "checkpoints"
            client = ckpt.load(self.engine, root, self.resume_tag, self.rank, self.tf_gen)
            self.step, self.epoch = client["step"], client["epoch"]
            self.batch_pos = client["batch_pos"]
            if self.is_main:
                print(
                    f"resumed {self.out} at step {self.step} (epoch {self.epoch}, batch "
                    f"{self.batch_pos})"
                )
        self.tracker = Tracker(cfg, self.out, active=self.is_main, progress=self.progress)
        if self.is_main:
            print(
                f"model: {self.n_params / 1e6:.2f}M parameters | {self.world} rank(s) "
                f"on {self.device.type} | {self.precision} | ZeRO-{self.stage} | "
                f"{self.total_steps} steps ({self.steps_per_epoch}/epoch, batch "
                f"{cfg.batch_size}) | kernels: {os.environ.get('FASTCAP_KERNELS', 'auto')}"
            )

    def save_checkpoint(self, final: bool = False) -> None:
        """Engine state + data position + every RNG (see :func:`fastcap.train.checkpoint.save`)
        and ``model.pt``; at the end of a run (``final``) also the inference bundle's
        ``model.safetensors`` and ``model_config.json`` beside them."""
        client = {"step": self.step, "epoch": self.epoch, "batch_pos": self.batch_pos}
        ckpt.save(
            self.engine,
            self.out / "checkpoints",
            step=self.step,
            client=client,
            tf_gen=self.tf_gen,
            rank=self.rank,
            device=self.device,
            shapes=self.shapes,
            layout={"world": self.world, "zero_stage": self.stage},
            keep=self.cfg.keep_checkpoints,
        )
        state = eng.full_state_dict(self.engine)  # a collective: every rank gathers
        if self.is_main:
            model_cfg = to_dict(self.cfg)["model"]
            ckpt.save_model(self.out / "model.pt", state, model_cfg)
            if final:
                write_bundle(state, model_cfg, self.out / "tokenizer.json", self.out)

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
        self.save_checkpoint(final=True)
        m = self.eval_model()
        metrics = {}
        if self.is_main:
            metrics = self._final_eval(m)
            print(f"bad records skipped in {self.cfg.data.train_split}: {len(self.train.bad)}")
        # no barrier: the other ranks leave now (rank 0 makes no collective call after the
        # gather above), so an evaluation longer than the process group's timeout cannot fail
        self.tracker.finish(metrics, len(self.train.bad))
        return metrics

    def _train(self) -> None:
        cfg = self.cfg
        self.tracker.start_bar(self.total_steps, self.step)
        t_last, tok_count, img_count = time.time(), 0, 0
        eval_every = cfg.eval_every or self.steps_per_epoch
        save_every = cfg.save_every or self.steps_per_epoch
        while self.step < self.total_steps:
            for batch in self.train.batches(
                self.epoch,
                self.batch_pos,
                cfg.batch_size,
                seed=cfg.seed,
                rank=self.rank,
                world=self.world,
            ):
                out = self.train_step(batch)
                self.step += 1
                self.batch_pos += 1
                tok_count += int(batch.lens.sum()) * self.world
                img_count += len(batch.ids) * self.world
                rec = None
                if self.step % cfg.log_every == 0 or self.step == self.total_steps:
                    dt = max(time.time() - t_last, 1e-9)
                    rec = step_scalars(out, self.model, self.engine, self.device)
                    rec.update(
                        {
                            "epoch": self.epoch + self.batch_pos / max(self.steps_per_epoch, 1),
                            "zero/param_share": self.param_share,
                            "data/bad_records": float(len(self.train.bad)),
                        }
                    )
                    rec.update(
                        {"perf/tokens_per_s": tok_count / dt, "perf/images_per_s": img_count / dt}
                    )
                    t_last, tok_count, img_count = time.time(), 0, 0
                    self.tracker.log(self.step, rec)
                self.tracker.tick(rec)
                if self.step % eval_every == 0 and self.step < self.total_steps:
                    self._periodic_eval()
                if self.step % save_every == 0 and self.step < self.total_steps:
                    self.save_checkpoint()
                if any_rank(self._stop.requested, self.device):  # all ranks stop together
                    raise StopRequested
                if self.step >= self.total_steps:
                    break
            else:
                self.epoch, self.batch_pos = self.epoch + 1, 0
        self.tracker.close_bar()
        if self.best.active and self.best.step != self.step:
            self._periodic_eval()  # the last weights are candidates for best/ too

    def train_step(self, batch: Batch) -> dict:
        """One optimiser step (see :class:`fastcap.train.step.StepRunner`) and the fault
        accounting: too many consecutive skipped steps stop the run."""
        cfg = self.cfg
        p = tf_prob(cfg.tf, self.step, self.total_steps)
        capture = cfg.diag_every > 0 and (self.step + 1) % cfg.diag_every == 0
        logs = self.stepper.run(
            batch, p=p, generator=self.tf_gen, capture=capture, step=self.step + 1
        )
        logs["tf_p"] = p
        skipped = int(logs["fault/skipped"])
        self._fault_streak = self._fault_streak + 1 if skipped else 0
        if skipped:
            fault = {k: v for k, v in logs.items() if k.startswith("fault/")}
            self.tracker.log(self.step + 1, fault, wandb=False)
        if self._fault_streak >= cfg.max_bad_steps:
            raise NonFiniteError(
                f"{self._fault_streak} consecutive steps had a non-finite loss (last at step "
                f"{self.step + 1}); stopped with a checkpoint of the last good state in "
                f"{self.out / 'checkpoints'}; lower optim.lr or check the data"
            )
        return logs

    # ------------------------------------------------------------------ evaluation
    def eval_model(self) -> Captioner:
        """A plain (hook-free) copy of the current weights for decoding, in the training
        precision (what the run would be judged on, not a silent fp32 copy); collective."""
        return self._model_from(eng.full_state_dict(self.engine))

    def _periodic_eval(self) -> None:
        """Val scores of the current weights, logged; the best by ``select_metric`` kept."""
        if self.val is None:
            return
        state = eng.full_state_dict(self.engine)  # a collective: every rank gathers
        m = self._model_from(state)
        if self.is_main:
            metrics = periodic_eval(
                m, self.val, self.tok, device=self.device, step=self.step, cfg=self.cfg
            )
            if self.best.offer(self.step, metrics, state):
                b = self.best
                print(f"  kept in {b.dir}: {b.metric} {b.value:.4f} (highest so far {b.top:.4f})")
            self.tracker.log_eval(self.step, {f"val/{k}": v for k, v in metrics.items()})
        del m, state
        torch.distributed.barrier()

    def _final_eval(self, last: Captioner) -> dict:
        """Test scores of the best weights by validation and of the last ones (rank 0)."""
        cfg, kw = self.cfg, {"device": self.device, "progress": self.progress}
        selection = {
            "metric": self.best.metric,
            "best_step": self.best.step,
            "last_step": self.step,
        }
        if self.best.step is not None:
            selection["best_val"] = self.best.value
        if self.best.step is None or self.best.step == self.step:
            scores = final_eval(last, self.tok, cfg=cfg, out=self.out, **kw)
            return write_metrics(self.out, None, scores, {**selection, "scored": "last"})
        from fastcap.bundle import read_bundle

        best = self._model_from(read_bundle(self.best.dir)[0])
        print(f"\nscoring the best weights (step {self.best.step}) and the last (step {self.step})")
        best_scores = final_eval(best, self.tok, cfg=cfg, out=self.out, **kw)
        last_scores = final_eval(last, self.tok, cfg=cfg, out=self.out, tag="last_", **kw)
        return write_metrics(self.out, best_scores, last_scores, {**selection, "scored": "best"})

    def _model_from(self, state: dict) -> Captioner:
        """A plain copy of ``state`` for decoding, in the training precision."""
        # the trained weights replace the trunk's initial ones: never re-read trunk_weights
        mc = dataclasses.replace(self.cfg.model, trunk_weights=None)
        with torch.random.fork_rng(devices=[]):  # building it must not move the global RNG
            m = Captioner(mc).to(self.device)
        m.load_state_dict(state)
        return m.to(eng.DTYPES[self.precision]).eval()

    def _scst_objective(self):
        """micro-batch -> its SCST objective (:func:`fastcap.train.scst.objective_factory`),
        seeded by the step this trainer is at."""
        return objective_factory(
            self.cfg,
            self.train.records,
            self.tok,
            device=self.device,
            rank=self.rank,
            fixed_length=self.world > 1 and self.stage == 3,
            step=lambda: self.step,
        )
