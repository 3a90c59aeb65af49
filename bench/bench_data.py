"""The input pipeline at coco-base's image size (384 px): how many images per second one
DataLoader worker turns from JPEG files into a uint8 batch, and what the real ``StreamSet``
delivers with 0, 1 and 2 workers.

    pytest bench/bench_data.py --benchmark-only -q -s

The per-sample path, as a StreamSet worker runs it (``stream._Decode`` -> ``images.read_image``):
read the file, decode to RGB, resize the shorter side to 384 (bilinear, antialiased), centre-crop
384 x 384, then stack the batch as uint8 (B, 3, 384, 384). The product applies no augmentation
(a horizontal flip would break captions that say left or right); ``decode_jpeg+aug`` prices a
typical one (random resized crop + flip) as a separate row, not something the product does.

``test_per_worker``: one process, one torch thread (a DataLoader worker runs torch with one
thread), side by side on the same files, in rotated order (see :func:`rotated`):

* ``pil``: ``Image.open`` + ``convert("RGB")`` + ``resize(BILINEAR)`` + ``crop``, to a tensor;
* ``decode_jpeg``: ``torchvision.io.decode_jpeg`` + ``transforms.v2.functional.resize`` +
  ``center_crop``;
* ``fastcap``: ``images.read_image`` itself (``decode_image``, which hands a JPEG to the same
  libjpeg-turbo decoder as ``decode_jpeg``, and the same resize);
* ``decode_jpeg+aug``: ``decode_jpeg`` + random resized crop (scale 0.5-1, ratio 3/4-4/3) to
  384 x 384 + horizontal flip.

Sources: ``flickr``, the 1,000 Flickr8k photos of the shared folder (256 px on the longer side,
about 17 KB a file: the decode is cheap and the resize to 384 is an upscale); ``coco-size``, the
first 400 of them upscaled to 640 px on the longer side with Gaussian noise (sigma 8, fixed seed)
and saved at JPEG quality 95, about 155 KB a file like COCO's own (train2017: 18 GB for 118,287
images) -- a stand-in for COCO's decode cost, not COCO. Files come from the page cache (warm
after the first pass); a cold disk or network read is not measured.

``test_streamset_workers``: the real ``StreamSet`` (``open_split("folder:...", in_memory=False)``)
over the training split, whole epochs with 0, 1 and 2 workers, rotated; ``test_epoch_start``: what
one ``batches()`` call costs before its first batch (the workers' start, what persistent workers
would save). GPU only: batched ``decode_jpeg(device="cuda")``, and pinned against pageable
host-to-device copies of a coco-base batch.
"""

from __future__ import annotations

import io
import os
import random
import statistics
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision.transforms.v2.functional as TF
from conftest import interleaved_ratio, needs_gpu, sync, torch_threads
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg, read_file

from fastcap.data.images import read_image

S = 384  # coco-base's model.image_size
CHUNK = 32  # images per timed sample of test_per_worker
ROUNDS = 15
DL_BATCH = 32  # StreamSet rows: ~28 batches per epoch of the ~900 training images (256 gives 3)
DL_EPOCHS = 3
WORKERS = (0, 1, 2)
COCO_SIZE_N = 400
GPU_BATCH = 256  # coco-base's batch_size

SHARED_DATA = Path(
    os.environ.get("FASTCAP_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data"
)


# ----------------------------------------------------------------------------- the sources


@pytest.fixture(scope="module")
def flickr() -> Path:
    path = SHARED_DATA / "flickr8k-1k"
    if not (path / "images").is_dir() or not (path / "captions.txt").is_file():
        pytest.skip(f"the shared photos {path} are missing (set FASTCAP_SHARED_DATA)")
    return path


@pytest.fixture(scope="module")
def folders(flickr, tmp_path_factory) -> dict[str, Path]:
    """``folder:`` datasets: the Flickr photos as they are, and the coco-size stand-in."""
    out = tmp_path_factory.mktemp("coco-size")
    (out / "images").mkdir()
    rng = np.random.default_rng(0)
    names = sorted(p.name for p in (flickr / "images").glob("*.jpg"))[:COCO_SIZE_N]
    for name in names:
        im = Image.open(flickr / "images" / name).convert("RGB")
        k = 640 / max(im.size)
        im = im.resize((round(im.size[0] * k), round(im.size[1] * k)), Image.BICUBIC)
        a = np.asarray(im, dtype=np.float32) + rng.normal(0.0, 8.0, (im.size[1], im.size[0], 3))
        Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(out / "images" / name, quality=95)
    keep = set(names)
    rows = (flickr / "captions.txt").read_text().splitlines()
    (out / "captions.txt").write_text(
        "\n".join([rows[0], *(r for r in rows[1:] if r.split(",", 1)[0] in keep)]) + "\n"
    )
    return {"flickr": flickr, "coco-size": out}


def _files(folder: Path) -> list[Path]:
    return sorted((folder / "images").glob("*.jpg"))


# ----------------------------------------------------------------------------- one worker


def pil_path(path: Path) -> torch.Tensor:
    with open(path, "rb") as f:
        im = Image.open(io.BytesIO(f.read())).convert("RGB")
    w, h = im.size
    # torchvision's sizes for resize(S): the shorter side to S, the longer one truncated
    nw, nh = (S, int(S * h / w)) if w <= h else (int(S * w / h), S)
    im = im.resize((nw, nh), Image.BILINEAR)  # antialiased (PIL widens the filter to shrink)
    left, top = int(round((nw - S) / 2.0)), int(round((nh - S) / 2.0))
    im = im.crop((left, top, left + S, top + S))
    return torch.from_numpy(np.array(im)).permute(2, 0, 1)


def decode_jpeg_path(path: Path) -> torch.Tensor:
    img = decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB)
    return TF.center_crop(TF.resize(img, S, antialias=True), [S, S])


def fastcap_path(path: Path) -> torch.Tensor:
    return read_image(path, S)


_aug_rng = random.Random(0)


def augment_path(path: Path) -> torch.Tensor:
    """decode_jpeg + RandomResizedCrop(S, scale 0.5-1, ratio 3/4-4/3) + flip: not the product."""
    img = decode_jpeg(read_file(str(path)), mode=ImageReadMode.RGB)
    H, W = img.shape[-2:]
    area = H * W * _aug_rng.uniform(0.5, 1.0)
    ratio = np.exp(_aug_rng.uniform(np.log(3 / 4), np.log(4 / 3)))
    h = min(H, round((area / ratio) ** 0.5))
    w = min(W, round((area * ratio) ** 0.5))
    top, left = _aug_rng.randint(0, H - h), _aug_rng.randint(0, W - w)
    img = TF.resized_crop(img, top, left, h, w, [S, S], antialias=True)
    return TF.horizontal_flip(img) if _aug_rng.random() < 0.5 else img


PATHS = {
    "pil": pil_path,
    "decode_jpeg": decode_jpeg_path,
    "fastcap": fastcap_path,
    "decode_jpeg+aug": augment_path,
}


def batch_of(per_sample, files: list[Path]) -> torch.Tensor:
    """The per-sample path over ``files``, collated: uint8 (len(files), 3, S, S)."""
    return torch.stack([per_sample(f) for f in files])


def rotated(fns: dict, chunks: list[list[Path]]) -> dict[str, list[float]]:
    """Seconds per image of every ``fns[k](chunk)``, one sample per chunk and side.

    Round r runs every side on chunk r (the same files, fresh each round), in an order rotated
    by r: a burst of load on the shared machine hits the sides of a round alike, and no side
    always runs first. The spread of the per-round ratios is what to trust, not one sample."""
    names = list(fns)
    secs: dict[str, list[float]] = {k: [] for k in names}
    for r, chunk in enumerate(chunks):
        for k in names[r % len(names) :] + names[: r % len(names)]:
            t0 = time.perf_counter()
            fns[k](chunk)
            secs[k].append((time.perf_counter() - t0) / len(chunk))
    return secs


def _spread(xs: list[float]) -> dict[str, float]:
    q1, med, q3 = statistics.quantiles(xs, n=4)
    return {"median": med, "q1": q1, "q3": q3, "min": min(xs), "max": max(xs)}


@pytest.mark.parametrize("source", ["flickr", "coco-size"])
def test_per_worker(benchmark, folders, source):
    """Images/s of one worker, each implementation on the same files; pil / decode_jpeg ratio
    with its spread over the rounds."""
    files = _files(folders[source])
    # PIL's and torchvision's antialiased bilinear filters are the same algorithm: same work
    a, b = pil_path(files[0]).float(), decode_jpeg_path(files[0]).float()
    assert a.shape == b.shape == (3, S, S) and (a - b).abs().mean() < 3.0
    assert torch.equal(fastcap_path(files[0]), decode_jpeg_path(files[0]))

    n = len(files)
    chunks = [[files[(r * CHUNK + i) % n] for i in range(CHUNK)] for r in range(ROUNDS + 1)]
    fns = {k: (lambda fs, p=p: batch_of(p, fs)) for k, p in PATHS.items()}
    with torch_threads(1):
        rotated(fns, chunks[:1])  # warm-up: page cache, lazy inits
        secs = rotated(fns, chunks[1:])
    print(f"\n{source}: images/s of one worker at {S} px (median [q1, q3] over {ROUNDS} rounds)")
    for k, xs in secs.items():
        rate = _spread([1.0 / x for x in xs])
        benchmark.extra_info[f"{k}_images_per_s"] = round(rate["median"], 1)
        benchmark.extra_info[f"{k}_images_per_s_q1_q3"] = [round(rate["q1"]), round(rate["q3"])]
        print(f"  {k:16s} {rate['median']:7.1f}  [{rate['q1']:.1f}, {rate['q3']:.1f}]")
    ratio = _spread([p / d for p, d in zip(secs["pil"], secs["decode_jpeg"])])
    benchmark.extra_info["pil_over_decode_jpeg"] = {k: round(v, 3) for k, v in ratio.items()}
    print(
        f"  pil / decode_jpeg time: median {ratio['median']:.2f}x "
        f"[{ratio['min']:.2f}, {ratio['max']:.2f}]"
    )
    benchmark.pedantic(lambda: None, rounds=1)  # the figures are the extra_info above


# ----------------------------------------------------------------------------- the DataLoader


@pytest.fixture(scope="module")
def tok(flickr):
    from fastcap.data.tokenizer import CaptionTokenizer

    rows = (flickr / "captions.txt").read_text().splitlines()[1:]
    return CaptionTokenizer.train([r.split(",", 1)[1] for r in rows], 1024)


def _open(folder: Path, tok, workers: int):
    from fastcap.data.sources import open_split

    return open_split(
        f"folder:{folder}",
        "train",
        tokenizer=tok,
        image_size=S,
        max_len=40,
        in_memory=False,
        num_workers=workers,
    )


@pytest.mark.parametrize("source", ["flickr", "coco-size"])
def test_streamset_workers(benchmark, folders, tok, source):
    """Whole epochs of the training split through StreamSet with 0, 1, 2 workers, rotated;
    images/s over the epoch, after its first batch (steady), and the first batch's latency.
    The batches must be the same whatever the worker count (the resume contract)."""
    sets = {n: _open(folders[source], tok, n) for n in WORKERS}
    got: dict[int, dict[str, list[float]]] = {
        n: {"epoch": [], "steady": [], "first_s": []} for n in WORKERS
    }
    for epoch in range(DL_EPOCHS):
        ids = {}
        for n in WORKERS[epoch % len(WORKERS) :] + WORKERS[: epoch % len(WORKERS)]:
            # in-process decoding runs on one thread, as a worker does
            with torch_threads(1 if n == 0 else None):
                t0 = time.perf_counter()
                first_t, first_n, count, ids[n] = None, 0, 0, []
                for b in sets[n].batches(epoch, 0, DL_BATCH, seed=0):
                    if first_t is None:
                        first_t, first_n = time.perf_counter() - t0, len(b.ids)
                    count += len(b.ids)
                    ids[n] += b.ids
                total = time.perf_counter() - t0
            got[n]["epoch"].append(count / total)
            got[n]["steady"].append((count - first_n) / (total - first_t))
            got[n]["first_s"].append(first_t)
        assert all(ids[n] == ids[0] for n in WORKERS), "batches differ with the worker count"
    print(
        f"\n{source}: StreamSet, batch {DL_BATCH}, {len(sets[0])} images/epoch, {S} px "
        f"(median of {DL_EPOCHS} epochs)"
    )
    for n in WORKERS:
        med = {k: statistics.median(v) for k, v in got[n].items()}
        lo, hi = min(got[n]["steady"]), max(got[n]["steady"])
        benchmark.extra_info[f"workers{n}"] = {k: round(v, 3) for k, v in med.items()}
        print(
            f"  num_workers {n}: {med['epoch']:6.1f} images/s per epoch, steady "
            f"{med['steady']:6.1f} [{lo:.1f}, {hi:.1f}], first batch {med['first_s']:.3f} s"
        )
    benchmark.pedantic(lambda: None, rounds=1)


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # 8 workers on 2 cores
def test_epoch_start(benchmark, folders, tok):
    """Seconds from ``batches()`` to its first batch (of one image) and back out of the closed
    generator: the DataLoader's fixed cost per epoch or resume, all of it worker start and
    shutdown once the workers count -- the most ``persistent_workers`` could save."""
    counts = (0, 1, 2, 8)
    sets = {n: _open(folders["flickr"], tok, n) for n in counts}
    secs: dict[int, list[float]] = {n: [] for n in counts}
    for r in range(5):
        for n in counts[r % len(counts) :] + counts[: r % len(counts)]:
            t0 = time.perf_counter()
            g = sets[n].batches(r, 0, 1, seed=0)
            next(g)
            g.close()  # the DataLoader's iterator goes with the generator: workers shut down
            secs[n].append(time.perf_counter() - t0)
    print("\nStreamSet: one batches() call to its first batch of 1 image and closed (median)")
    for n in counts:
        med = statistics.median(secs[n])
        benchmark.extra_info[f"workers{n}_start_stop_s"] = round(med, 4)
        print(
            f"  num_workers {n}: {med * 1e3:7.1f} ms  [{min(secs[n]) * 1e3:.1f}, "
            f"{max(secs[n]) * 1e3:.1f}]"
        )
    benchmark.pedantic(lambda: None, rounds=1)


# ----------------------------------------------------------------------------- GPU only


@needs_gpu
def test_gpu_decode_jpeg(benchmark, folders):
    """A coco-base batch decoded on the GPU in one call (nvJPEG), resized and cropped there,
    against one CPU worker's decode_jpeg path on the same files (one thread, interleaved)."""
    files = (_files(folders["coco-size"]) * 2)[:GPU_BATCH]
    data = [read_file(str(f)) for f in files]

    def gpu():
        imgs = decode_jpeg(data, mode=ImageReadMode.RGB, device="cuda")
        return torch.stack([TF.center_crop(TF.resize(x, S, antialias=True), [S, S]) for x in imgs])

    def cpu():
        return batch_of(decode_jpeg_path, files[:CHUNK])

    r = interleaved_ratio(cpu, gpu, (), pairs=7, threads=1)
    per_worker, gpu_rate = CHUNK / r["slow_s"], GPU_BATCH / r["fast_s"]
    benchmark.extra_info.update(
        {
            "gpu_images_per_s": round(gpu_rate, 1),
            "cpu_worker_images_per_s": round(per_worker, 1),
            "workers_one_gpu_decoder_replaces": round(gpu_rate / per_worker, 1),
        }
    )
    print(
        f"\ncoco-size: GPU decode_jpeg batch {GPU_BATCH}: {gpu_rate:.0f} images/s; one CPU "
        f"worker {per_worker:.0f} images/s"
    )
    benchmark.pedantic(lambda: None, rounds=1)


@needs_gpu
def test_h2d_pinned(benchmark):
    """A coco-base batch (256, 3, 384, 384) uint8 to the GPU: pageable ``.to`` against pinned
    ``.to(non_blocking=True)``, interleaved; and what pinning it costs (the pin thread's copy)."""
    x = torch.randint(0, 256, (GPU_BATCH, 3, S, S), dtype=torch.uint8)
    xp = x.pin_memory()
    r = interleaved_ratio(
        lambda: x.to("cuda"), lambda: xp.to("cuda", non_blocking=True), (), pairs=11
    )
    t0 = time.perf_counter()
    for _ in range(5):
        x.pin_memory()
    pin_s = (time.perf_counter() - t0) / 5
    sync()
    gb = x.numel() / 1e9
    benchmark.extra_info.update(
        {
            "pageable_gbps": round(gb / r["slow_s"], 2),
            "pinned_gbps": round(gb / r["fast_s"], 2),
            "pin_copy_ms": round(pin_s * 1e3, 2),
            "ratio_median": round(r["median"], 3),
        }
    )
    print(
        f"\nH2D {gb * 1e3:.0f} MB: pageable {gb / r['slow_s']:.1f} GB/s, pinned "
        f"{gb / r['fast_s']:.1f} GB/s ({r['median']:.2f}x), pinning {pin_s * 1e3:.1f} ms"
    )
    benchmark.pedantic(lambda: None, rounds=1)
