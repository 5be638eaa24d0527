"""Training-step throughput of VGG-11 (A), VGG-16 (D) and VGG-19 (E): fp32 eager vs bf16 + channels_last (+ compile).

One step = forward, cross-entropy, backward and an SGD-momentum update on a fixed random batch that already
sits on the device (no data loading: that is bench/loader.py). Variants, measured in the same run:

- baseline ``fp32``: fp32 eager, NCHW; on CUDA with TF32 off, so that it really is fp32;
- ``bf16+cl``: ``torch.autocast(bfloat16)`` (fp32 master weights) and channels_last activations and weights;
- ``bf16+cl+compile``: the same with ``torch.compile(model)`` (inductor).

Warm-up steps (which include compilation) are excluded; on CUDA ``torch.cuda.synchronize()`` brackets the
timed region only (img/s over all timed steps); on CPU img/s comes from the median step, on one thread, with
denormals flushed (the N(0, 0.01) init drives deep nets' activations into the denormal range). MFU = 3 × MACs/image (`vggdist.models.count_macs`, conv + FC) × 2 FLOP/MAC × img/s / peak,
with the peak of the variant's arithmetic: H100/H200 SXM 989 TFLOP/s bf16 dense, 67 TFLOP/s fp32 (non-tensor);
H100 PCIe 756 / 51, A100 312 / 19.5; ``--peak-tflops`` sets the bf16 peak of another device. A reference
point: VGG-16 at 224 at 4,000 img/s on one H100 is ≈ 43% MFU.

Sizes: with CUDA, the paper's networks at 224, batch 128 (``--quick``: 64). Without CUDA a reduced size runs
and the output says so: the mini widths (`SCALES["mini"]`) at crop 64, batch 8. On a CPU without bf16
arithmetic (AVX2 only, like this project's machines) autocast emulates bf16 and is *slower* than fp32, and
inductor takes about a minute per network to compile, so ``torch.compile`` is skipped on CPU unless
``--compile`` is given: the CPU run checks the code paths, the speed-ups are for the GPU.

How to read: ratio = ours / baseline for img/s and for MFU (both higher is better); baseline is always fp32.
"""

from __future__ import annotations

import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import Row, Timer, parser, report  # noqa: E402
from vggdist.models import build_vgg, count_macs  # noqa: E402
from vggdist.paper import SCALES, WEIGHT_LAYERS, WIDTHS  # noqa: E402

CONFIGS = ("A", "D", "E")
# name -> (bf16 autocast, channels_last, torch.compile)
VARIANTS = {
    "fp32": (False, False, False),
    "bf16+cl": (True, True, False),
    "bf16+cl+compile": (True, True, True),
}
# Dense peak FLOP/s (bf16 tensor core, fp32 non-tensor) by the device name's model number.
# The first name found in torch.cuda.get_device_name() wins: "H100 PCIe" before the SXM "H100".
PEAKS = {
    "H100 PCIe": (756e12, 51e12),
    "H100": (989e12, 67e12),
    "H200": (989e12, 67e12),
    "A100": (312e12, 19.5e12),
}


@dataclass(frozen=True)
class Setup:
    device: str
    widths: tuple[int, ...]
    fc_width: int
    crop_size: int
    batch_size: int
    warmup: int
    steps: int
    compile: bool
    label: str


def make_setup(quick: bool, smoke: bool, force_compile: bool) -> Setup:
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        return Setup(
            "cuda", WIDTHS, 4096, 224, 64 if quick else 128, 5, 10 if quick else 30, True,
            f"{name}: paper widths, crop 224, batch {64 if quick else 128}",
        )  # fmt: skip
    mini = SCALES["mini"]
    crop, batch = (32, 4) if smoke else (64, 8)
    return Setup(
        "cpu", mini["widths"], mini["fc_width"], crop, batch, 2 if smoke else 3, 2 if smoke else 5, force_compile,
        f"NO CUDA: reduced size on CPU ({torch.backends.cpu.get_cpu_capability()}, "
        f"1 thread, median step): mini widths, crop {crop}, batch {batch}",
    )  # fmt: skip


def peak_flops(setup: Setup, bf16: bool, peak_tflops: float | None) -> float | None:
    """Peak FLOP/s of the variant's arithmetic on this device, or None where no documented peak applies."""
    if setup.device != "cuda":
        return peak_tflops * 1e12 if peak_tflops and bf16 else None
    name = torch.cuda.get_device_name()
    for model, (bf16_peak, fp32_peak) in PEAKS.items():
        if model in name:
            return bf16_peak if bf16 else fp32_peak
    return peak_tflops * 1e12 if peak_tflops and bf16 else None


def images_per_s(config: str, variant: str, setup: Setup) -> float:
    """Train `config` for warm-up + timed steps with `variant`; images per second of the timed steps."""
    seconds = _step_seconds(config, variant, setup)  # the model and its optimizer are freed on return
    if VARIANTS[variant][2]:
        torch._dynamo.reset()
    if setup.device == "cuda":
        torch.cuda.empty_cache()
    return setup.batch_size / seconds


def _step_seconds(config: str, variant: str, setup: Setup) -> float:
    bf16, channels_last, compiled = VARIANTS[variant]
    device = torch.device(setup.device)
    torch.manual_seed(0)
    model = build_vgg(
        config, 1000, widths=setup.widths, fc_width=setup.fc_width, crop_size=setup.crop_size
    ).to(device)
    x = torch.randn(setup.batch_size, 3, setup.crop_size, setup.crop_size, device=device)
    y = torch.randint(0, 1000, (setup.batch_size,), device=device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    forward = torch.compile(model) if compiled else model

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(forward(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(setup.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()  # only around the timed region: the steps themselves stay asynchronous
        with Timer() as t:
            for _ in range(setup.steps):
                step()
            torch.cuda.synchronize()
        return t.seconds / setup.steps
    # CPU: the median step, robust to the stalls other processes on a shared 2-core machine cause
    times = []
    for _ in range(setup.steps):
        with Timer() as t:
            step()
        times.append(t.seconds)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> list[Row]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="VGG-11 only at the smallest size (tests)")
    p.add_argument("--compile", action="store_true", help="also run torch.compile on CPU (~1 min/net)")
    p.add_argument("--peak-tflops", type=float, help="bf16 dense peak of a device not in the table")
    args = p.parse_args(argv)
    setup = make_setup(args.quick, args.smoke, args.compile)
    if setup.device == "cuda":
        # the baseline is true fp32: no TF32 tensor cores in matmuls or cuDNN convolutions
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    else:
        # §3.1's N(0, 0.01) init shrinks activations layer by layer into the denormal range, where x86 CPUs
        # are ~100x slower (VGG-19 fp32 ran 30x slower than VGG-16 here); GPUs flush them anyway.
        torch.set_flush_denormal(True)
        # one thread: with two, every OpenMP region waits whenever another process holds the other core
        torch.set_num_threads(1)
    variants = [v for v in VARIANTS if setup.compile or not VARIANTS[v][2]]
    configs = ("A",) if args.smoke else CONFIGS
    notes = [setup.label]
    if not setup.compile:
        notes.append("torch.compile skipped on CPU (about a minute of inductor compilation per network)")
    if setup.device == "cpu":
        notes.append(
            "CPU: bf16 autocast without bf16 hardware is emulated (slower than fp32); MFU not meaningful"
        )
    rows = []
    for config in configs:
        name = f"VGG-{WEIGHT_LAYERS[config]}"
        macs = count_macs(
            build_vgg(config, 1000, widths=setup.widths, fc_width=setup.fc_width, crop_size=setup.crop_size)
        )  # fmt: skip
        rate = {v: images_per_s(config, v, setup) for v in variants}
        for v in variants[1:]:
            rows.append(Row(f"{name} img/s fp32 vs {v}", "img/s", rate["fp32"], rate[v]))
        mfu = {}
        for v in variants:
            peak = peak_flops(setup, VARIANTS[v][0], args.peak_tflops)
            if peak:
                mfu[v] = 100 * 3 * macs * 2 * rate[v] / peak
        if "fp32" in mfu:
            best = variants[-1]
            rows.append(Row(f"{name} MFU fp32 vs {best}", "% of peak", mfu["fp32"], mfu[best]))
        notes.append(
            f"{name}: {macs / 1e9:.3g} GMAC/img; "
            + ", ".join(
                f"{v} {rate[v]:.4g} img/s" + (f" ({mfu[v]:.1f}% MFU)" if v in mfu else "") for v in variants
            )
        )
        if config == "D" and setup.device == "cuda" and setup.crop_size == 224:
            best_rate = max(rate.values())
            verdict = "above" if best_rate >= 4000 else "below"
            notes.append(f"VGG-16: {best_rate:.0f} img/s, {verdict} 4,000 img/s (≈ 43% MFU on one H100)")
    report("Training step throughput (forward + backward + SGD step)", rows, args.json, notes)
    return rows


if __name__ == "__main__":
    main()
