"""What a run reports: the scalars of a step, ``RUN/train_log.jsonl``, Weights & Biases and
the progress bar. Only rank 0 writes; the others hold a quiet tracker."""

from __future__ import annotations

import json
import os
import resource
import uuid
from pathlib import Path

import torch

from fastcap.model import MoE
from fastcap.train.config import TrainConfig, to_dict


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def step_scalars(out: dict, model, engine, device: torch.device) -> dict:
    """The per-step record: the step's averaged terms, the optimiser's state (the LR the
    update used, steps taken and discarded, the grad norm), the instruments, memory."""
    rec = {
        "lr": out["lr"],
        "optim/global_steps": engine.global_steps,
        "optim/skipped_steps": engine.skipped_steps,
        "loss/total": out["loss"],
        "loss/ce": out["ce"],
        "loss/clip": out["clip"],
        "loss/aux": out["aux"],
        "logit_scale": out["logit_scale"],
        "tf/p": out["tf_p"],
        "tf/pred_share": out["tf_pred"],
        "mem/rss_mib": rss_mib(),
        "mem/peak_rss_mib": peak_rss_mib(),
    }
    gn = engine.get_global_grad_norm()
    if gn is not None:
        rec["grad_norm"] = float(gn)
    if device.type == "cuda":
        rec["mem/max_allocated_mib"] = torch.cuda.max_memory_allocated() / 2**20
    for i, layer in enumerate(model.decoder.layers):
        if isinstance(layer.ffn, MoE) and layer.ffn.last_load is not None:
            for e, share in enumerate(layer.ffn.last_load.tolist()):
                rec[f"expert_load/dec{i}/e{e}"] = share
    rec.update({k: v for k, v in out.items() if k.startswith(("diag/", "scst/"))})
    return rec


class Tracker:
    """train_log.jsonl + W&B + tqdm for rank 0; every method is a no-op elsewhere."""

    def __init__(self, cfg: TrainConfig, out: Path, *, active: bool, progress: bool):
        self.out, self.active = out, active
        self.wandb = _init_wandb(cfg, out) if active and cfg.wandb != "disabled" else None
        self.bar = None
        self._progress = progress and active

    def start_bar(self, total: int, initial: int) -> None:
        if self._progress:
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                initial=initial,
                desc="train",
                unit="step",
                dynamic_ncols=True,
                mininterval=1.0,
            )

    def tick(self, rec: dict | None = None) -> None:
        """One step done; ``rec`` (a logged step) updates the bar's figures."""
        if self.bar is None:
            return
        if rec is not None:
            figure = (
                ("reward", rec["scst/reward"]) if "scst/reward" in rec else ("ce", rec["loss/ce"])
            )
            self.bar.set_postfix(
                loss=f"{rec['loss/total']:.3f}",
                **{figure[0]: f"{figure[1]:.3f}"},
                img_s=f"{rec['perf/images_per_s']:.0f}",
                tok_s=f"{rec['perf/tokens_per_s']:.0f}",
                refresh=False,
            )
        self.bar.update(1)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def log(self, step: int, rec: dict, *, wandb: bool = True) -> None:
        """One JSON line in RUN/train_log.jsonl (the same scalars W&B gets)."""
        if not self.active:
            return
        if wandb and self.wandb is not None:
            self.wandb.log(rec, step=step)
        with open(self.out / "train_log.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in rec.items()}}) + "\n")

    def log_wandb(self, step: int, rec: dict) -> None:
        if self.wandb is not None:
            self.wandb.log(rec, step=step)

    def log_eval(self, step: int, rec: dict) -> None:
        """Periodic validation scores: W&B and one JSON line in RUN/eval_log.jsonl."""
        if not self.active:
            return
        self.log_wandb(step, rec)
        with open(self.out / "eval_log.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **{k: float(v) for k, v in rec.items()}}) + "\n")

    def finish(self, metrics: dict, bad_records: int) -> None:
        if self.wandb is not None:
            self.wandb.summary.update({f"final/{k}": v for k, v in _flat(metrics).items()})
            self.wandb.summary["data/bad_records"] = bad_records
            self.wandb.finish()


def _init_wandb(cfg: TrainConfig, out: Path):
    import wandb

    id_file = out / "wandb_id"
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id)
    return wandb.init(
        project=cfg.wandb_project,
        mode=cfg.wandb,
        dir=str(out),
        id=run_id,
        resume="allow",
        name=out.name,
        config=to_dict(cfg),
    )


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out
