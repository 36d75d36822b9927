"""The redrawing dropout's kernel (`dropout.py`, `redraw`): one Triton pass that draws each unit's multiplier and
multiplies by it, forward and backward alike, so backward keeps a seed instead of a mask or noise.

Each unit's draw is a pure function of (seed, the unit's position in memory): Philox-4x32-10 (`tl.randint4x`, as
torch's CUDA generator and inductor use) on counter `position // (4 * BLOCK) * BLOCK + position % BLOCK`, word
`position // BLOCK % 4`. The seed is 64 bits drawn from torch's default generator of the tensor's device, so
`torch.manual_seed` and a restored generator state (exact resume) give the same masks, and backward run with the
same seed redraws each multiplier exactly. Imported on first use only: on CUDA, or on CPU tensors through Triton's
interpreter (`TRITON_INTERPRET=1` before triton is imported, as the tests do where there is no GPU).
"""
import torch
import triton
import triton.language as tl

__all__ = ['redraw_multiply']

BLOCK = 1024  # Philox counters per program: each gives four 32-bit words, for four units


@triton.jit
def _times_drawn(in_ptr, out_ptr, relu_out_ptr, offsets, bits, n, a, b, KEEP: tl.constexpr,
                 AFTER_RELU: tl.constexpr, BACKWARD: tl.constexpr, COMPUTE: tl.constexpr):
    inside = offsets < n
    t = tl.load(in_ptr + offsets, mask=inside).to(COMPUTE)
    # the top 23 bits as a midpoint of 2^23 equal parts of (0, 1): k + 1/2 is exact in float32
    v = ((bits >> 9).to(tl.int32).to(tl.float32) + 0.5) * 1.1920928955078125e-07
    if KEEP:  # a = the drop rate, b = 1 / (1 - a): P(v < a) is a to within 2^-23
        m = tl.where(v >= a, b, 0.0).to(COMPUTE)
    else:  # Uout: a = 1 - beta, b = 2 beta: 2^23 evenly spaced points of [1 - beta, 1 + beta], to float32 rounding
        m = (a + b * v).to(COMPUTE)
    if BACKWARD:
        out = t * m
        if AFTER_RELU:  # ReLU's backward from the output kept: zero where it is not positive
            kept = tl.load(relu_out_ptr + offsets, mask=inside)
            out = tl.where(kept <= 0, 0.0, out)
    else:
        if AFTER_RELU and KEEP:  # relu first: a dropped -inf would give NaN, not relu's 0
            t = tl.where(t < 0, 0.0, t)
        out = t * m
        if AFTER_RELU:  # m >= 0, so relu(x) * m = max(x * m, 0); NaN stays NaN, as in relu
            out = tl.where(out < 0, 0.0, out)
    tl.store(out_ptr + offsets, out, mask=inside)


@triton.jit
def _redraw_kernel(in_ptr, out_ptr, relu_out_ptr, seed_ptr, n, a, b, KEEP: tl.constexpr, AFTER_RELU: tl.constexpr,
                   BACKWARD: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
    program = tl.program_id(0).to(tl.int64)
    counter = program * BLOCK + tl.arange(0, BLOCK)
    bits0, bits1, bits2, bits3 = tl.randint4x(tl.load(seed_ptr), counter)
    first = program * (4 * BLOCK) + tl.arange(0, BLOCK)
    _times_drawn(in_ptr, out_ptr, relu_out_ptr, first, bits0, n, a, b, KEEP, AFTER_RELU, BACKWARD, COMPUTE)
    _times_drawn(in_ptr, out_ptr, relu_out_ptr, first + BLOCK, bits1, n, a, b, KEEP, AFTER_RELU, BACKWARD, COMPUTE)
    _times_drawn(in_ptr, out_ptr, relu_out_ptr, first + 2 * BLOCK, bits2, n, a, b, KEEP, AFTER_RELU, BACKWARD,
                 COMPUTE)
    _times_drawn(in_ptr, out_ptr, relu_out_ptr, first + 3 * BLOCK, bits3, n, a, b, KEEP, AFTER_RELU, BACKWARD,
                 COMPUTE)


def redraw_multiply(t: torch.Tensor, seed: torch.Tensor, keep: bool, a: float, b: float, after_relu: bool,
                    relu_out: torch.Tensor = None) -> torch.Tensor:
    """t times the multipliers drawn from `seed` (a one-element int64 tensor on t's device), in a new tensor of
    t's layout; `keep`: Bernoulli (a = drop rate, b = 1 / keep), else Uout (a = 1 - beta, b = 2 beta). Forward
    (no `relu_out`) with `after_relu` gives relu(t) times them; backward passes the forward's output as `relu_out`
    for ReLU's gradient. A draw belongs to a position in memory: backward's gradient must come in the layout of
    forward's output."""
    out = torch.empty_like(t)
    if out.stride() != t.stride():  # gaps or overlaps (a slice, an expanded tensor): a dense copy in out's layout
        t = torch.empty_like(out).copy_(t)
    if t.numel():
        compute = tl.float64 if t.dtype == torch.float64 else tl.float32
        with torch.cuda.device_of(t):  # Triton launches on the current device
            _redraw_kernel[(triton.cdiv(t.numel(), 4 * BLOCK),)](
                t, out, out if relu_out is None else relu_out, seed, t.numel(), a, b, KEEP=keep,
                AFTER_RELU=after_relu, BACKWARD=relu_out is not None, COMPUTE=compute, BLOCK=BLOCK)
    return out
