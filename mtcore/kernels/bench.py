"""Benchmark of the fused ops: each backend against the eager and compiled PyTorch reference.

For every op, every implementation (reference eager, ``torch.compile`` of the reference, each
available kernel backend) is timed on the same inputs in one process, forward, backward and both,
with repeats interleaved across implementations so that load drift hits all of them alike. Rows
report the median and spread (quartiles, min), the speed-up over eager and over compiled, peak
extra memory, and the fraction of the streaming-bandwidth floor. ``mtcore bench`` calls
:func:`main`; ``benchmarks/`` (pytest-benchmark) and ``docs/benchmarks.md`` reuse :data:`CASES`.

Definitions (also in docs/benchmarks.md):

* forward is a training forward: inputs require grad, so a fused loss also computes its gradient;
  backward is ``torch.autograd.grad`` of the output (no ``.grad`` accumulation); fwd+bwd is both.
* peak extra memory: the largest increase of allocated memory over the level before the call,
  during one fwd+bwd (``torch.cuda.max_memory_allocated`` on CUDA; on the CPU the allocations that
  ``torch.profiler(profile_memory=True)`` records, summed in time order). "held" is what is still
  allocated when the forward returns: saved-for-backward tensors plus the output.
* bandwidth floor: the bytes any implementation must move (each input read once, each output and
  each input gradient written once; backward: grad-output read and gradients written) divided by
  the copy bandwidth of this run (``dst.copy_(src)`` of a large tensor, read + write counted).
  ``bw`` = floor time / measured time: 1.0 is streaming speed; above 1 means cache-resident data.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from . import _backend
from . import reference as ref

__all__ = ["CASES", "IMPLS", "PASSES", "BenchCase", "Row", "copy_bandwidth", "main", "run"]

PASSES = ("fwd", "bwd", "fwd+bwd")
IMPLS = ("eager", "compiled", "cpp", "cuda", "triton")
COLUMNS = (
    "op", "impl", "pass", "median_ms", "q25_ms", "q75_ms", "min_ms",
    "vs_eager", "vs_compiled", "peak_MiB", "held_MiB", "bw",
)


# ----------------------------------------------------------------------------- the cases


@dataclass(frozen=True)
class BenchCase:
    """One op at one shape: how to make its inputs, call an implementation, and count its bytes.

    ``make(quick, device)`` returns the call's tensors (float leaves that need gradients have
    ``requires_grad``); ``call(fn, inputs)`` runs ``fn`` (the reference or a public op with
    ``backend=`` bound) and returns the tensor to differentiate.
    """

    name: str
    public: str
    shape: str
    quick_shape: str
    make: Callable[[bool, torch.device], dict[str, torch.Tensor]]
    call: Callable[[Callable, dict[str, torch.Tensor]], torch.Tensor]


def _randn(*shape: int, device: torch.device, grad: bool = True) -> torch.Tensor:
    return torch.randn(*shape, device=device).requires_grad_(grad)


def _make_seg_ce(quick: bool, device: torch.device) -> dict[str, torch.Tensor]:
    n, c, h, w = (4, 5, 8, 8) if quick else (32, 21, 64, 64)
    return {"logits": _randn(n, c, h, w, device=device),
            "target": torch.randint(0, c, (n, h, w), device=device)}


def _make_bias_act(quick: bool, device: torch.device) -> dict[str, torch.Tensor]:
    n, c, h, w = (4, 16, 8, 8) if quick else (32, 256, 32, 32)
    return {"x": _randn(n, c, h, w, device=device), "b": _randn(c, device=device)}


def _make_vae(quick: bool, device: torch.device) -> dict[str, torch.Tensor]:
    n, z, s = (4, 8, 8) if quick else (32, 128, 64)
    return {"recon": _randn(n, 3, s, s, device=device),
            "image": torch.rand(n, 3, s, s, device=device),
            "mu": _randn(n, z, device=device), "logvar": _randn(n, z, device=device)}


def _make_adv(quick: bool, device: torch.device) -> dict[str, torch.Tensor]:
    return {"logits": _randn(64 if quick else 4096, device=device)}


def _make_mbstd(quick: bool, device: torch.device) -> dict[str, torch.Tensor]:
    n, c, h, w = (8, 16, 4, 4) if quick else (32, 256, 8, 8)
    return {"x": _randn(n, c, h, w, device=device)}


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return x.detach().contiguous(memory_format=torch.channels_last).requires_grad_(x.requires_grad)


def _make_norm(quick: bool, device: torch.device) -> dict[str, torch.Tensor]:
    n, c, s = (4, 8, 8) if quick else (32, 64, 32)
    return {"x": _nhwc(_randn(n, c, s, s, device=device)), "w": _randn(c, device=device),
            "b": _randn(c, device=device)}


def _make_pixel_norm(quick: bool, device: torch.device) -> dict[str, torch.Tensor]:
    n, c, s = (4, 8, 8) if quick else (32, 64, 32)
    return {"x": _nhwc(_randn(n, c, s, s, device=device))}


def _make_upconv(quick: bool, device: torch.device) -> dict[str, torch.Tensor]:
    n, c, s = (4, 8, 4) if quick else (32, 64, 16)
    return {"x": _nhwc(_randn(n, c, s, s, device=device)),
            "w": _randn(c // 2, c, 3, 3, device=device), "b": _randn(c // 2, device=device)}


def _make_joint(quick: bool, device: torch.device) -> dict[str, torch.Tensor]:
    n, s, z = (4, 8, 8) if quick else (32, 64, 128)
    return {"seg_logits": _randn(n, 21, s, s, device=device),
            "seg_target": torch.randint(0, 21, (n, s, s), device=device),
            "cls_logits": _randn(n, 10, device=device),
            "cls_target": torch.randint(0, 10, (n,), device=device),
            "recon": _randn(n, 3, s, s, device=device),
            "image": torch.rand(n, 3, s, s, device=device),
            "mu": _randn(n, z, device=device), "logvar": _randn(n, z, device=device),
            "fake_logits": _randn(n, device=device),
            "weights": torch.ones(4, device=device).requires_grad_(True)}


def _call_joint(fn: Callable, t: dict[str, torch.Tensor]) -> torch.Tensor:
    # The default task set's settings: cls label smoothing 0.05, VAE beta 0.5, MSE, non-saturating.
    return fn(t["seg_logits"], t["seg_target"], t["cls_logits"], t["cls_target"], t["recon"],
              t["image"], t["mu"], t["logvar"], t["fake_logits"], t["weights"], "fixed",
              beta=0.5, label_smoothing=0.05).total


CASES: dict[str, BenchCase] = {c.name: c for c in (
    BenchCase("seg_ce", "seg_cross_entropy", "32x21x64x64", "4x5x8x8", _make_seg_ce,
              lambda fn, t: fn(t["logits"], t["target"])),
    BenchCase("bias_lrelu", "bias_act", "32x256x32x32", "4x16x8x8", _make_bias_act,
              lambda fn, t: fn(t["x"], t["b"], 1, "lrelu")),
    BenchCase("vae_loss", "vae_loss", "32x3x64x64 Z=128", "4x3x8x8 Z=8", _make_vae,
              lambda fn, t: fn(t["recon"], t["image"], t["mu"], t["logvar"], 0.5, "mse").total),
    # the default config's VAE: Bernoulli (BCE-with-logits) reconstruction
    BenchCase("vae_bce", "vae_loss", "32x3x64x64 Z=128", "4x3x8x8 Z=8", _make_vae,
              lambda fn, t: fn(t["recon"], t["image"], t["mu"], t["logvar"], 1.0,
                               "bernoulli").total),
    BenchCase("adversarial", "adversarial_loss", "4096", "64", _make_adv,
              lambda fn, t: fn(t["logits"], "non_saturating", "g")),
    BenchCase("mbstd", "minibatch_stddev", "32x256x8x8 G=4", "8x16x4x4 G=4", _make_mbstd,
              lambda fn, t: fn(t["x"], 4, 1)),
    # the backbone's and decoders' layers (channels-last, as the default model runs them)
    BenchCase("bn_relu", "batch_norm_act", "32x64x32x32 NHWC", "4x8x8x8 NHWC", _make_norm,
              lambda fn, t: fn(t["x"], None, None, t["w"], t["b"], True, 0.1, 1e-5, "relu")),
    BenchCase("pixel_norm_lrelu", "pixel_norm_act", "32x64x32x32 NHWC", "4x8x8x8 NHWC",
              _make_pixel_norm, lambda fn, t: fn(t["x"], 1e-8, "lrelu", 0.2)),
    BenchCase("upsample_conv", "upsample_conv2d", "32x64x16x16 -> 32 NHWC", "4x8x4x4 -> 4 NHWC",
              _make_upconv, lambda fn, t: fn(t["x"], t["w"], t["b"])),
    BenchCase("joint_loss", "joint_loss", "B=32 64x64 C=21/10 Z=128", "B=4 8x8", _make_joint,
              _call_joint),
)}


def _leaves(inputs: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    return [t for t in inputs.values() if t.requires_grad]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def floor_bytes(inputs: dict[str, torch.Tensor], out: torch.Tensor) -> dict[str, int]:
    """Bytes each pass must move: inputs read, output written, grad-output read, grads written."""
    read = sum(_nbytes(t) for t in inputs.values())
    grads = sum(_nbytes(t) for t in _leaves(inputs))
    o = _nbytes(out)
    return {"fwd": read + o, "bwd": o + grads, "fwd+bwd": read + 2 * o + grads}


# ----------------------------------------------------------------------------- measurement


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def copy_bandwidth(device: torch.device, quick: bool = False) -> float:
    """Copy bandwidth in bytes/s (read + write) of ``dst.copy_(src)`` on a tensor beyond the caches."""
    n = (8 if quick else 64) * 2**20  # float32 elements: 32 MiB quick, 256 MiB full
    src = torch.ones(n, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(3 if quick else 7):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        if i:  # the first copy faults the pages in
            times.append(time.perf_counter() - t0)
    return 2 * _nbytes(src) / statistics.median(times)


def _grad_out(out: torch.Tensor) -> torch.Tensor | None:
    return None if out.dim() == 0 else torch.randn_like(out)


class _Runner:
    """Times one implementation of one case: fwd, bwd or fwd+bwd, ``inner`` calls per sample."""

    def __init__(self, case: BenchCase, fn: Callable, inputs: dict[str, torch.Tensor],
                 grad_out: torch.Tensor | None, device: torch.device) -> None:
        self.case, self.fn, self.inputs, self.device = case, fn, inputs, device
        self.leaves = _leaves(inputs)
        self.grad_out = grad_out
        self.inner = 1

    def forward(self) -> torch.Tensor:
        return self.case.call(self.fn, self.inputs)

    def backward(self, out: torch.Tensor) -> None:
        torch.autograd.grad(out, self.leaves, self.grad_out)

    def sample(self, which: str) -> float:
        """Seconds per call of pass ``which``, averaged over ``self.inner`` calls."""
        outs = [self.forward() for _ in range(self.inner)] if which == "bwd" else []
        _sync(self.device)
        t0 = time.perf_counter()
        for i in range(self.inner):
            if which == "fwd":
                self.forward()
            elif which == "bwd":
                self.backward(outs[i])
            else:
                self.backward(self.forward())
        _sync(self.device)
        return (time.perf_counter() - t0) / self.inner


def _alloc_events(prof: torch.profiler.profile) -> tuple[list[tuple[int, int]], int | None]:
    """(start_ns, bytes) of every CPU allocation (negative: free) and the forward marker's end."""
    from torch._C._profiler import _EventType

    allocs, fwd_end = [], None
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        stack.extend(e.children)
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            allocs.append((e.start_time_ns, e.extra_fields.alloc_size))
        elif e.name == "mtcore_bench_forward":
            fwd_end = e.end_time_ns
    allocs.sort()
    return allocs, fwd_end


def peak_memory(runner: _Runner) -> tuple[float, float]:
    """(peak extra, held after forward) in bytes over one fwd+bwd; see the module docstring."""
    dev = runner.device
    if dev.type == "cuda":
        _sync(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        out = runner.forward()
        _sync(dev)
        held = torch.cuda.memory_allocated(dev) - base
        runner.backward(out)
        del out
        _sync(dev)
        return float(torch.cuda.max_memory_allocated(dev) - base), float(held)
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        with record_function("mtcore_bench_forward"):
            out = runner.forward()
        runner.backward(out)
        del out
    allocs, fwd_end = _alloc_events(prof)
    cur = peak = held = 0
    for start, size in allocs:
        cur += size
        peak = max(peak, cur)
        if fwd_end is not None and start <= fwd_end:
            held = cur
    return float(peak), float(held)


@dataclass
class Row:
    """One line of the table: an (op, implementation, pass) with its timing and memory."""

    op: str
    impl: str
    pass_: str
    times: list[float] = field(repr=False)
    vs_eager: float = float("nan")
    vs_compiled: float = float("nan")
    peak_mib: float = float("nan")
    held_mib: float = float("nan")
    bw: float = float("nan")

    @property
    def median_ms(self) -> float:
        return 1e3 * statistics.median(self.times)

    def quantile_ms(self, q: float) -> float:
        s = sorted(self.times)
        pos = q * (len(s) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        return 1e3 * (s[lo] + (s[hi] - s[lo]) * (pos - lo))

    def values(self) -> dict[str, object]:
        """The row keyed by :data:`COLUMNS`."""
        return {"op": self.op, "impl": self.impl, "pass": self.pass_,
                "median_ms": self.median_ms, "q25_ms": self.quantile_ms(0.25),
                "q75_ms": self.quantile_ms(0.75), "min_ms": 1e3 * min(self.times),
                "vs_eager": self.vs_eager, "vs_compiled": self.vs_compiled,
                "peak_MiB": self.peak_mib, "held_MiB": self.held_mib, "bw": self.bw}


@dataclass
class Report:
    """Everything one run measured: rows, notes (skips and why), and the machine it ran on."""

    rows: list[Row]
    notes: list[str]
    device: torch.device
    copy_gbs: float
    quick: bool


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _implementations(case: BenchCase, device: torch.device, impls: Sequence[str],
                     notes: list[str]) -> dict[str, Callable]:
    """The callables to time for ``case``: eager, compiled (if requested) and available backends."""
    import functools

    from mtcore import kernels

    reference = getattr(ref, case.public)
    out: dict[str, Callable] = {}
    for impl in impls:
        if impl == "eager":
            out[impl] = reference
        elif impl == "compiled":
            out[impl] = torch.compile(reference, dynamic=False)
        elif impl == "triton" and device.type != "cuda":
            continue  # on the CPU triton only runs in its interpreter: a test tool, not a backend
        else:
            why = _backend._why_unavailable(impl, device, None)
            if why is not None:
                note = f"{impl}: not timed ({why})"
                if note not in notes:
                    notes.append(note)
                continue
            out[impl] = functools.partial(getattr(kernels, case.public), backend=impl)
    return out


def _warm(runner: _Runner, warmup: int) -> float:
    """Run fwd+bwd ``warmup`` times (compiling, building, faulting pages in); seconds of the last."""
    last = 0.0
    for _ in range(max(warmup, 1)):
        last = runner.sample("fwd+bwd")
    return last


def bench_case(case: BenchCase, *, quick: bool, impls: Sequence[str], passes: Sequence[str],
               device: torch.device, copy_bps: float, notes: list[str],
               repeats: int | None = None) -> list[Row]:
    """Time every implementation of ``case`` on the same inputs; repeats interleave implementations."""
    torch.manual_seed(0)
    inputs = case.make(quick, device)
    probe = case.call(getattr(ref, case.public), inputs)
    grad_out = _grad_out(probe.detach())
    floors = floor_bytes(inputs, probe)
    del probe
    runners: dict[str, _Runner] = {}
    target_s = 0.002 if quick else 0.02
    for impl, fn in _implementations(case, device, impls, notes).items():
        runner = _Runner(case, fn, inputs, grad_out, device)
        try:
            t0 = time.perf_counter()
            once = _warm(runner, 1 if quick else 3)
        except Exception as exc:  # noqa: BLE001 - a failing implementation is reported, not fatal
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            notes.append(f"{case.name}/{impl}: skipped, it failed on this machine: "
                         f"{type(exc).__name__}: {first[:200]}")
            continue
        if impl == "compiled":
            notes.append(f"{case.name}/compiled: warm-up incl. compilation "
                         f"{time.perf_counter() - t0:.1f} s")
        runner.inner = max(1, min(1000, math.ceil(target_s / max(once, 1e-7))))
        runners[impl] = runner
    reps = repeats if repeats is not None else (3 if quick else 15)
    rows: list[Row] = []
    for which in passes:
        times: dict[str, list[float]] = {impl: [] for impl in runners}
        for _ in range(reps):
            for impl, runner in runners.items():
                times[impl].append(runner.sample(which))
        by_impl = {impl: Row(case.name, impl, which, ts) for impl, ts in times.items()}
        for row in by_impl.values():
            med = statistics.median(row.times)
            if "eager" in by_impl:
                row.vs_eager = statistics.median(by_impl["eager"].times) / med
            if "compiled" in by_impl:
                row.vs_compiled = statistics.median(by_impl["compiled"].times) / med
            row.bw = floors[which] / copy_bps / med
        rows.extend(by_impl.values())
    if "fwd+bwd" in passes:
        for impl, runner in runners.items():
            peak, held = peak_memory(runner)
            for row in rows:
                if row.impl == impl and row.pass_ == "fwd+bwd":
                    row.peak_mib, row.held_mib = peak / 2**20, held / 2**20
    return rows


def run(ops: Sequence[str] | None = None, quick: bool = False,
        impls: Sequence[str] = IMPLS, passes: Sequence[str] = PASSES,
        repeats: int | None = None) -> Report:
    """Benchmark ``ops`` (names in :data:`CASES`; all if None) and return the report."""
    names = list(CASES) if not ops else list(ops)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise ValueError(f"ops: unknown op(s) {unknown}; choose from {list(CASES)}")
    bad = [i for i in impls if i not in IMPLS]
    if bad:
        raise ValueError(f"impls: unknown implementation(s) {bad}; choose from {list(IMPLS)}")
    bad = [p for p in passes if p not in PASSES]
    if bad:
        raise ValueError(f"passes: unknown pass(es) {bad}; choose from {list(PASSES)}")
    device = _device()
    notes: list[str] = []
    if device.type == "cpu" and "triton" in impls:
        notes.append("triton: not timed on the CPU (only its interpreter runs there)")
    copy_bps = copy_bandwidth(device, quick)
    rows: list[Row] = []
    for name in names:
        rows.extend(bench_case(CASES[name], quick=quick, impls=impls, passes=passes,
                               device=device, copy_bps=copy_bps, notes=notes, repeats=repeats))
    return Report(rows, notes, device, copy_bps / 1e9, quick)


# ----------------------------------------------------------------------------- output


def _fmt(value: object) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def machine_line(report: Report) -> str:
    """Device, torch version, threads and copy bandwidth of a report."""
    if report.device.type == "cuda":
        what = torch.cuda.get_device_name(report.device)
    else:
        what = f"CPU ({torch.get_num_threads()} threads)"
    mode = "quick (small shapes: timings are overhead, not kernels)" if report.quick else "full"
    return (f"device: {what}; torch {torch.__version__}; copy bandwidth "
            f"{report.copy_gbs:.1f} GB/s; mode: {mode}")


def format_table(report: Report, markdown: bool = False) -> str:
    """The report as a Markdown table, or as aligned plain text."""
    cells = [list(COLUMNS)] + [[_fmt(v) for v in r.values().values()] for r in report.rows]
    if markdown:
        lines = ["| " + " | ".join(cells[0]) + " |",
                 "|" + "|".join("---" if i < 3 else "---:" for i in range(len(COLUMNS))) + "|"]
        lines += ["| " + " | ".join(c) + " |" for c in cells[1:]]
    else:
        widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
        lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w)
                           for i, (c, w) in enumerate(zip(row, widths, strict=True)))
                 for row in cells]
    return "\n".join(lines)


def main(ops: Sequence[str] | None = None, quick: bool = False, markdown: bool = False,
         impls: Sequence[str] = IMPLS) -> int:
    """Run the benchmark and print the table (the ``mtcore bench`` command); 0 on success."""
    try:
        report = run(ops, quick=quick, impls=impls)
    except ValueError as exc:
        print(f"mtcore bench: {exc}", file=sys.stderr)
        return 2
    shapes = ", ".join(f"{n} {CASES[n].quick_shape if quick else CASES[n].shape}"
                       for n in dict.fromkeys(r.op for r in report.rows))
    print(machine_line(report))
    print(f"shapes: {shapes}")
    print(format_table(report, markdown))
    for note in report.notes:
        print(f"note: {note}")
    return 0
