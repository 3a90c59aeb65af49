"""The one check to run when a GPU is lent: ceilings, the CUDA extension, every kernel checked
against its reference in bf16/fp16/fp32, every kernel timed against its reference and peers at
the benchmark shapes, and a 50-step training run of the captioner with ``ref`` and ``auto``.

    python bench/gpu_check --out runs/gpu-check            # on the GPU (make gpu-check)
    python bench/gpu_check --dry-run --out /tmp/gpu-check  # on a CPU, before spending a GPU

Stages, in order (``--stages env,ext`` runs a subset), one module each:

* ``env``     (:mod:`.stage_env`) device, torch/Triton/CUDA versions, which optional packages
              exist, and measured ceilings: a 2 GiB device-to-device copy (GB/s, read + write
              counted) and a bf16 8192^3 matmul (TFLOP/s).
* ``ext``     (:mod:`.stage_ext`) build ``fastcap_C`` (:mod:`fastcap.common.moe_align`) for this
              device's architecture only, then check it against the PyTorch alignment.
* ``correct`` (:mod:`.stage_correct`) each kernel against its reference in bf16, fp16 and fp32:
              outputs and every gradient, fresh random inputs (the seed is recorded), output
              buffers poisoned with NaN through the CUDA caching allocator (the launchers
              allocate their own outputs). Rule (flash-attention's): the kernel's error against
              the reference computed in fp64 is at most 2x the reference's own error in the same
              dtype plus ``TOL[dtype]``, errors as max |got - gold| / max |gold|.
* ``timing``  (:mod:`.stage_timing`) kernels against references and peers at the issues'
              shapes: CUDA events, warm-up (which also absorbs autotuning), median of repeats,
              TFLOP/s from the analytic counts of ``bench/flops.py``, peak memory above the
              inputs.
* ``train``   (:mod:`.stage_train`) the product: ``fastcap-train`` (``python -m
              fastcap.cli.train``) under DeepSpeed ZeRO-3 in bf16 on generated shapes data, 50
              steps with ``FASTCAP_KERNELS=ref`` and with ``auto`` from the same seed: losses
              side by side, images/s, tokens/s, MFU, peak memory, and a gate on the two curves.
              Where DeepSpeed is missing it first installs the wheels of ``make gpu-wheels``
              (:mod:`.wheels`, ``--wheels``, default ``.gpu-wheels/``) with ``pip --target``,
              after checking offline that they resolve for this Python with what the
              machine has (``train/wheels``).

Each stage runs in its own process with a time limit (the process group is killed when it runs
over) inside a global budget of 9 minutes (:mod:`.runner`; the device tool allows 10 a
command), each stage's expected time and limit printed before the first starts. Each stage
writes ``<out>/<stage>.json`` after every item (:class:`.harness.Report`), so a hang or a crash
loses at most the item in flight; ``<out>/summary.json`` and the short table
``<out>/table.txt`` are rewritten as each stage ends (a run cut off by the machine still leaves
them), and the table is printed last.

``--dry-run`` (no GPU needed): the same stages at tiny shapes and few steps, Triton under
``TRITON_INTERPRET=1``; bf16 checks are skipped there (the interpreter's bf16 is wrong) and the
timings only prove that the code runs. On a CPU ``auto`` would pick the references, so the
dry run's second training run forces the Triton kernels instead (``triton``, interpreted, in
fp32): the comparison is between two implementations, not two runs of the same code.
``--quick``: fewer repeats and steps, largest shapes left out.

``make gpu-check-dry`` rehearses the device machine on a CPU: the dry run under ``.venv-low``
(Python 3.12, torch 2.11, Triton 3.6, no DeepSpeed: ``make venv-low``), with no network
(``unshare -n``, ``PIP_NO_INDEX``), the wheels of ``.gpu-wheels`` installed with ``pip
--target`` as on the machine.

Needs torch, Triton, ninja and nvcc; the train stage also needs numpy, Pillow, torchvision and
tokenizers (it says so and skips when one is missing) and DeepSpeed (installed from the wheels,
or skipped saying how to make them). Works from a plain checkout without ``pip install``.
Nothing here is collected by pytest (no ``test_*``/``bench_*`` file names).
"""

STAGES = ("env", "ext", "correct", "timing", "train")
