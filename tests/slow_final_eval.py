"""``fastcap-train`` whose process group times out after ``FASTCAP_PG_TIMEOUT`` seconds and
whose final evaluation (rank 0's alone) takes ``FASTCAP_EVAL_SLEEP`` seconds longer: a final
evaluation that outlasts the process-group timeout, as COCO's 5,000 val images, greedy, beam-3
and METEOR on the best and the last weights, can outlast the default 30 minutes. Run as a
script under torchrun (tests/test_final_eval_wait.py)."""

from __future__ import annotations

import datetime
import os
import sys
import time

import torch.distributed

from fastcap.cli.train import main
from fastcap.train import loop

_init = torch.distributed.init_process_group


def init_process_group(*args, **kw):
    kw["timeout"] = datetime.timedelta(seconds=float(os.environ["FASTCAP_PG_TIMEOUT"]))
    return _init(*args, **kw)


torch.distributed.init_process_group = init_process_group

_final_eval = loop.Trainer._final_eval


def _slow_final_eval(self, last):
    time.sleep(float(os.environ["FASTCAP_EVAL_SLEEP"]))
    return _final_eval(self, last)


loop.Trainer._final_eval = _slow_final_eval

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
