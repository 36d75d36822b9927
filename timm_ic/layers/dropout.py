"""Dropout kinds and the IC layer.

- Uout (Li et al. 2019): multiplicative uniform noise, x + x * r with r ~ U(-beta, beta) per element.
  Its train/test variance shift is 3 / (3 + beta^2) for zero-mean input, against p_keep for Bernoulli dropout.
- IC layer (Chen et al. 2019): a normalizer followed by a dropout, placed right before a weight layer.
  BN centres the units so that dropout's gates scale pairwise correlation by p_keep.

Training speed on CPU: torch's `F.dropout` and `uniform_` spend most of their time drawing a random float per
element, then make several full passes (mask, scale, multiply). On CPU the layers here draw from torch's own
generator (64-bit words, `random_`), as few bits as the distribution needs, and apply mask and scale in a custom
autograd function:
- Bernoulli dropout at rates up to 1/8 (the IC layer's 0.05, Kim et al.'s 0.1) draws where the drops are, not
  whether each unit drops: the gaps between drops are independent geometric variables (memorylessness makes
  that the same as independent Bernoulli units), one 32-bit draw per dropped unit by inversion, instead of 16 bits
  per unit. The output is x * 1/(1-p) with the drops zeroed; backward keeps only the drops' flat indices (8 bytes
  per dropped unit: 8p bytes per unit on average, one at p = 1/8). Each gap's law is exact to 2^-32, so a unit's
  drop probability is the requested one to within about 1e-9 (under 25 p 2^-32: the gap's ~22/p possible lengths).
- Bernoulli dropout at other rates and Uout draw 16 bits per element (four per word) and keep a 1-byte mask
  (Uout: the 2-byte draws). A drop probability is then a multiple of 1/65536 (the requested one rounded, off by at
  most 2^-17); Uout's noise takes 65536 equally likely values, the midpoints of an even split of [1 - beta,
  1 + beta].
- A dropout or Uout right after a ReLU (`after_relu=True`, which placement slots use in training: DenseNet's
  BN-ReLU-Uout, Kim et al.'s BN-ReLU-dropout) is one autograd op in eager: the multiplier is never negative (Uout's for
  beta < 1), so relu(x) * m = max(x * m, 0), and backward needs only the output (which the next weight layer
  keeps anyway) and what was drawn, not the ReLU's output too (4 bytes per unit in float32).
Since the draws come from torch's default generator, `torch.manual_seed`, `torch.get_rng_state` /
`set_rng_state` (exact resume) and activation checkpointing work as before. Other devices (GPU, meta),
TorchScript, and rates near 1 use torch's own ops, which are already the fastest there. Under torch.compile on
CPU the same draws run as custom ops, opaque to inductor, whose own CPU dropout is several times slower: the
16-bit draws as `timm_ic::cpu_draw`, whose mask or noise inductor then multiplies in, fused with the ops around
it; the drop positions as `timm_ic::cpu_drop_positions` (and its backward), draw and multiply in one. They draw
from the default generator in program order, as eager does (each op takes a token from the one before, which
keeps inductor from reordering them), so a compiled graph whose only random ops are these drops the same units as
eager from the same seed and leaves the generator where eager does (inductor's own random ops, e.g. a head's
F.dropout, draw a seed of their own and move the generator). `timm_ic::cpu_draw` returns Uout's draws as int32
(4 bytes a unit); what a compiled backward keeps of them is the partitioner's choice. Below a full
`activation_memory_budget`, with `aggressive_recomputation` or without `ban_recompute_not_in_allowlist` the
partitioner may run any op again in backward, which would draw again: there the dropouts of a tensor that
requires grad are graph breaks, eager inside (so `fullgraph=True` fails). A budget set for a region
(`torch.autograd.graph.region_activation_memory_budget`) is not seen, and its draws may be run again. Keeping the
token is a side effect, which dynamo refuses inside `torch.utils.checkpoint`: a compiled checkpointed block with a
dropout breaks the graph there (same draws as eager; `fullgraph=True` fails).

On CUDA, torch's dropout keeps a 1-byte mask and Uout its noise (2 or 4 bytes) for backward, next to the
activations the weight layers keep: up to 2x a baseline's peak training memory. With `redraw` (per module, or
`set_dropout_redraw(model)`) eager CUDA training keeps only an 8-byte seed drawn from torch's generator: one
Triton pass (`dropout_triton.py`) draws each unit's multiplier from Philox keyed by the seed and the unit's
position, and multiplies, in forward and again in backward (`_Redraw`; a ReLU before it is folded in, as on CPU).
Its draws are not `F.dropout`'s or `uniform_`'s: the same seed gives other masks and noise of the same law than
without `redraw`. The kernel replaced a replay of `bernoulli_`/`uniform_` from the saved generator state, which
an H200 measured at about the baseline's memory for 3 to 20% slower training (README, "On one H200"); the
kernel itself has run only in Triton's interpreter on CPU so far.
"""
import math
from typing import Callable, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_function

from .norm import create_norm

__all__ = ['Dropout', 'Uout', 'ICLayer', 'create_dropout', 'DROP_KINDS', 'dropout', 'uout', 'set_dropout_redraw']

DROP_KINDS = ('dropout', 'uout', 'none')

LEVELS = 1 << 16  # values of one 16-bit draw
# keep probabilities below this many of LEVELS would move by more than ~1% of themselves if rounded to a multiple
# of 1/LEVELS: such rates (near 1) take torch's exact F.dropout
MIN_LEVELS = 64


def check_drop_rate(drop_rate: float) -> float:
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f'drop_rate must be in [0, 1) (the probability of zeroing a unit), got {drop_rate}')
    return float(drop_rate)


def check_beta(beta: float) -> float:
    if not beta >= 0.0:
        raise ValueError(f'Uout beta must be >= 0 (noise r ~ U(-beta, beta)), got {beta}')
    return float(beta)


def random_bits(n: int, dtype: torch.dtype, device: torch.device,
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """n uniform integers of `dtype` (int16, int32 or int64) covering its whole range, from torch's default
    generator of `device` (or from `generator`).

    `random_(-2**63, None)` fills an int64 with all 64 bits random (the default range leaves the sign bit 0),
    so each of its 16- or 32-bit pieces is uniform and independent of the others."""
    per_word = 8 // dtype.itemsize
    words = torch.empty((n + per_word - 1) // per_word, dtype=torch.int64, device=device)
    words.random_(-2 ** 63, None, generator=generator)
    return words.view(dtype)[:n]


def random_int16(like: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Uniform int16 in [-32768, 32767], one per element of `like`."""
    return random_bits(like.numel(), torch.int16, like.device, generator).view(like.shape)


# rates up to this draw the drops' positions: faster than 16 bits per unit, and at most 1 byte per unit kept on average
GEOMETRIC_MAX_RATE = 1 / 8


def geometric_steps(bits: torch.Tensor, p: float, longest: int) -> torch.Tensor:
    """1 + the number of kept units before the next drop, by inversion of 32-bit draws `bits` (int32): with
    u = (bits + 2^31 + 1) / 2^32, uniform on {1, ..., 2^32} / 2^32, floor(log(u) / log(1 - p)) >= g exactly
    when u <= (1 - p)^g, so P(g or more kept) is (1 - p)^g to within 2^-32. Steps are cut to `longest` (one
    that long already passes the last unit), which keeps those of tiny rates inside int64."""
    u = bits.to(torch.float64).add_(2 ** 31 + 1).mul_(2.0 ** -32)  # exact in float64
    return u.log_().div_(math.log1p(-p)).floor_().add_(1).clamp_max_(longest).to(torch.int64)


def drop_positions(n: int, p: float, device: torch.device, sigmas: float = 6.0,
                   generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Sorted flat indices of the dropped units among n, each dropped independently with probability p.

    Draws enough gaps to pass n but for a chance of about 1e-9 (`sigmas` standard deviations above the
    expected count), and draws again from where they stopped when not."""
    chunks, start = [], 0  # start: the first unit not yet decided
    while True:
        expected = (n - start) * p
        count = max(int(expected + sigmas * math.sqrt(expected) + 16), 1)
        steps = geometric_steps(random_bits(count, torch.int32, device, generator), p, longest=n - start + 1)
        positions = steps.cumsum_(0).add_(start - 1)
        last = int(positions[-1])
        if last >= n:
            chunks.append(positions[:int(torch.searchsorted(positions, n))])
            return chunks[0] if len(chunks) == 1 else torch.cat(chunks)
        chunks.append(positions)
        start = last + 1


def _fast_path(x: torch.Tensor) -> bool:
    # CPU only: CUDA's fused dropout kernel (Philox, one pass) is already faster than anything composed here.
    # Under torch.compile the same draws run as opaque ops (`timm_ic::cpu_draw`, `timm_ic::cpu_drop_positions`):
    # inductor's own CPU dropout is several times slower
    return x.device.type == 'cpu'


# Each multiplier builds its result in the one tensor it allocates (mask, noise or scaled copy, then in-place
# ops): on CPU a fresh tensor's first touch (page faults) costs about as much as a pass over it.

def keep_times(t: torch.Tensor, keep: torch.Tensor, scale: float) -> torch.Tensor:
    """t * keep * scale, from the 1-byte mask `keep`."""
    # bool -> float is a slow conversion on CPU; uint8 -> float (the same bytes) is not
    return keep.view(torch.uint8).to(t.dtype).mul_(t).mul_(scale)


def drop_positions_times(t: torch.Tensor, positions: torch.Tensor, scale: float) -> torch.Tensor:
    """t * scale with the units at flat `positions` zeroed."""
    # contiguous whatever t's layout (channels_last, an expanded gradient): positions index that layout;
    # mul's out= is not differentiable, so a gradient that is (double backward) takes the plain product
    if t.requires_grad and torch.is_grad_enabled():
        out = (t * scale).contiguous()
    else:
        out = torch.mul(t, scale, out=torch.empty_like(t, memory_format=torch.contiguous_format))
    out.view(-1).index_fill_(0, positions, 0)
    return out


def uout_times(t: torch.Tensor, draws: torch.Tensor, beta: float) -> torch.Tensor:
    """t * u, Uout's noise u = 1 + beta * (k + 1/2) / 32768 from the 16-bit draws k."""
    # the noise in at least float32: bfloat16 would round the 65536 values to a few hundred
    step = beta / (LEVELS // 2)
    u = draws.to(torch.promote_types(t.dtype, torch.float32)).mul_(step).add_(1.0 + step / 2)
    return u.to(t.dtype).mul_(t)


Multiplier = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]


class _Multiply(torch.autograd.Function):
    """y = x * m for a dropout's multiplier m: `times(t, drawn, arg)` multiplies t by it, rebuilt from what was
    drawn (the 1-byte mask, the drop positions, Uout's 2-byte draws), which is all backward keeps.

    With `after_relu`, y = relu(x) * m as one op, for m >= 0 (Bernoulli's 0 or 1/(1-p), Uout's noise for
    beta < 1): y = max(x * m, 0), the same values from the same draws. Backward keeps y, which the next weight
    layer keeps anyway, where a ReLU then a dropout would keep the ReLU's output as well (4 bytes per element);
    its gradient is zero where y is not positive, which differs from the two ops' only for a non-finite gradient
    at a dropped unit or where x * m underflows to 0. The output must not be changed in place before backward
    (it is saved), as a ReLU's must not."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, drawn: torch.Tensor, arg: float, times: Multiplier,
                after_relu: bool) -> torch.Tensor:
        ctx.times, ctx.arg = times, arg
        y = multiply(x, drawn, arg, times, after_relu)
        ctx.save_for_backward(drawn, y if after_relu else None)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], None, None, None, None]:
        drawn, relu_out = ctx.saved_tensors
        return multiply_backward(grad, drawn, ctx.arg, ctx.times, relu_out), None, None, None, None


def multiply(x: torch.Tensor, drawn: torch.Tensor, arg: float, times: Multiplier, after_relu: bool) -> torch.Tensor:
    """`_Multiply`'s forward: x (with `after_relu`, relu(x)) times the multiplier rebuilt from `drawn`."""
    if after_relu and times is keep_times:
        # the mask's 0 times -inf is NaN, not relu's 0 (rates above 1/8 only); zeroing by the bool mask
        # (torch.where, masked_fill_) instead is about 4x slower than the uint8 multiply on CPU
        x = x.clamp_min(0.0)
    y = times(x, drawn, arg)
    return y.clamp_min_(0.0) if after_relu else y  # clamp keeps NaN, as relu does


def multiply_backward(grad: torch.Tensor, drawn: torch.Tensor, arg: float, times: Multiplier,
                      relu_out: Optional[torch.Tensor]) -> torch.Tensor:
    """`_Multiply`'s backward; `relu_out`: forward's output after a ReLU, for ReLU's own backward."""
    grad = times(grad, drawn, arg)  # a new tensor: each multiplier converts what was drawn into one
    if relu_out is None:
        return grad
    if torch.is_grad_enabled():  # a backward that builds a graph (create_graph): out= is not differentiable
        return torch.ops.aten.threshold_backward(grad, relu_out, 0)
    # written over the multiplier's product: a fresh tensor's first touch costs about a pass on CPU
    return torch.ops.aten.threshold_backward.grad_input(grad, relu_out, 0, grad_input=grad)


def _cpu_draw(kind: str, like: torch.Tensor, arg: float,
              generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """What a CPU dropout of `kind` draws for a tensor like `like`: 'positions' (Bernoulli at rate arg <= 1/8:
    the drops' flat indices), 'keep' (Bernoulli, 16-bit draws: the 1-byte mask) or 'uout' (beta: the draws)."""
    if kind == 'positions':
        return drop_positions(like.numel(), arg, like.device, generator=generator)
    if kind == 'keep':  # k drops iff k < levels - 32768: probability exactly levels / 65536
        return random_int16(like, generator) >= drop_levels(arg) - LEVELS // 2
    return random_int16(like, generator)


def _cpu_multiplier(kind: str, arg: float) -> Tuple[Multiplier, float]:
    """The multiplier that rebuilds `_cpu_draw`'s draws, and its argument (the scales keep E[y] = x exactly)."""
    if kind == 'positions':
        return drop_positions_times, 1 / (1 - arg)
    if kind == 'keep':
        return keep_times, LEVELS / (LEVELS - drop_levels(arg))
    return uout_times, arg


def _cpu_multiply(x: torch.Tensor, kind: str, arg: float, after_relu: bool) -> torch.Tensor:
    times, times_arg = _cpu_multiplier(kind, arg)
    if not torch.compiler.is_compiling():
        return _Multiply.apply(x, _cpu_draw(kind, x, arg), times_arg, times, after_relu)
    if x.requires_grad and torch.is_grad_enabled() and _partitioner_may_recompute():
        return _eager_cpu_multiply(x, kind, arg, after_relu)
    # dynamo cannot trace random_(from, None): the draws are an opaque op
    if kind == 'positions':  # a random count of drops: forward and backward are one op each
        return _in_draw_order(torch.ops.timm_ic.cpu_drop_positions, x, arg, after_relu)[0]
    # a fixed-size draw: only it is opaque, and inductor fuses the multiply with the norm and ReLU around it. It
    # takes x's shape, not x: x as an op's input would be written out in full where inductor would fuse it away
    drawn = _in_draw_order(torch.ops.timm_ic.cpu_draw, x.shape, x.device, kind, arg)[0]
    return multiply(x, drawn, times_arg, times, after_relu)


def _partitioner_may_recompute() -> bool:
    # with these settings AOTAutograd's partitioner may run any op again in backward to save memory, the draw ops
    # too (its own ban covers only aten's random ops): they would draw other masks, and move the generator. Not
    # seen from here: a budget set for a region (`torch.autograd.graph.region_activation_memory_budget`)
    config = torch._functorch.config
    return (config.activation_memory_budget < 1.0 or config.aggressive_recomputation
            or not config.ban_recompute_not_in_allowlist)


@torch.compiler.disable
def _eager_cpu_multiply(x: torch.Tensor, kind: str, arg: float, after_relu: bool) -> torch.Tensor:
    """The eager path, as a graph break: a compiled graph then keeps what was drawn, as eager does."""
    return _cpu_multiply(x, kind, arg, after_relu)


# The CPU draws as custom ops, for torch.compile: the same draws from the default generator, in program order, as
# eager. Inductor orders ops only by the tensors they read, and reorders independent draws (to lower peak memory;
# an ordered effect, `register_effect`, did not stop it): so each op reads the token the one before returned, and
# returns the next. Rename an op when its outputs' shapes or dtypes change: inductor's cache keeps compiled graphs
# with the fake outputs of the op's name.
_DRAW_TOKEN = [torch.zeros((), dtype=torch.int64, device='cpu')]  # the last compiled draw's; its value means nothing


def _in_draw_order(op: Callable, *args) -> Tuple[torch.Tensor, ...]:
    """op(token, *args), which returns (next token, *outputs): its outputs."""
    if not torch.compiler.is_dynamo_compiling():  # e.g. non-strict torch.export: fake tensors, not to be kept
        return tuple(op(torch.zeros((), dtype=torch.int64, device='cpu'), *args)[1:])
    _DRAW_TOKEN[0], *outputs = op(_DRAW_TOKEN[0], *args)
    return tuple(outputs)


def _next_token(token: torch.Tensor) -> torch.Tensor:
    return token + 1  # a new tensor: an op's output must not alias its input


@torch.library.custom_op('timm_ic::cpu_draw', mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _cpu_draw_op(token: torch.Tensor, size: Sequence[int], device: torch.device, kind: str,
                 arg: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """`_cpu_draw` of 'keep' (the 1-byte mask) or 'uout' (the 16-bit draws, as int32: inductor's CPU code vectorizes
    no int16, and a kernel loading one runs scalar, the norm and ReLU fused into it too), contiguous."""
    drawn = _cpu_draw(kind, torch.empty((), device=device).expand(size), arg)  # a shape, allocating nothing
    return _next_token(token), drawn if kind == 'keep' else drawn.to(torch.int32)


@_cpu_draw_op.register_fake
def _(token: torch.Tensor, size: Sequence[int], device: torch.device, kind: str,
      arg: float) -> Tuple[torch.Tensor, torch.Tensor]:
    drawn = torch.empty(size, device=device, dtype=torch.bool if kind == 'keep' else torch.int32)  # contiguous
    return torch.empty_like(token), drawn


# Bernoulli's drop positions are a random count of indices, which a compiled graph cannot hold: forward returns
# the generator's state from before its draws, and backward draws them again (a few draws per hundred units).
_STATE_BYTES = torch.default_generator.get_state().numel()


@torch.library.custom_op('timm_ic::cpu_drop_positions', mutates_args=(), tags=(torch.Tag.nondeterministic_seeded,))
def _cpu_drop_positions_op(token: torch.Tensor, x: torch.Tensor, p: float,
                           after_relu: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    state = torch.default_generator.get_state()
    times, scale = _cpu_multiplier('positions', p)
    return _next_token(token), multiply(x, _cpu_draw('positions', x, p), scale, times, after_relu), state


@_cpu_drop_positions_op.register_fake
def _(token: torch.Tensor, x: torch.Tensor, p: float,
      after_relu: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # the multiplier writes a contiguous output whatever x's layout
    return torch.empty_like(token), x.new_empty(x.shape), x.new_empty((_STATE_BYTES,), dtype=torch.uint8)


@torch.library.custom_op('timm_ic::cpu_drop_positions_backward', mutates_args=())
def _cpu_drop_positions_backward_op(grad: torch.Tensor, state: torch.Tensor, relu_out: Optional[torch.Tensor],
                                    p: float) -> torch.Tensor:
    generator = torch.Generator()
    generator.set_state(state)
    times, scale = _cpu_multiplier('positions', p)
    return multiply_backward(grad, _cpu_draw('positions', grad, p, generator), scale, times, relu_out)


@_cpu_drop_positions_backward_op.register_fake
def _(grad: torch.Tensor, state: torch.Tensor, relu_out: Optional[torch.Tensor], p: float) -> torch.Tensor:
    return grad.new_empty(grad.shape)


def _save_cpu_drop_positions(ctx, inputs: Tuple, output: Tuple[torch.Tensor, ...]) -> None:
    _, _, ctx.p, after_relu = inputs
    _, y, state = output
    ctx.save_for_backward(state, y if after_relu else None)


def _cpu_drop_positions_grad(ctx, _, grad: torch.Tensor, __) -> Tuple[None, Optional[torch.Tensor], None, None]:
    state, relu_out = ctx.saved_tensors
    return None, torch.ops.timm_ic.cpu_drop_positions_backward(grad, state, relu_out, ctx.p), None, None


_cpu_drop_positions_op.register_autograd(_cpu_drop_positions_grad, setup_context=_save_cpu_drop_positions)


def _redraw_path(x: torch.Tensor) -> bool:
    # eager CUDA (asked for by `redraw`): a seed kept for backward instead of a mask or noise. Not under compile
    # (inductor fuses torch's own ops) or CUDA graph capture (not tried there)
    return (x.is_cuda and x.is_floating_point() and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing())


class _Redraw(torch.autograd.Function):
    """y = x * m (with `after_relu`, relu(x) * m), each multiplier drawn in one Triton pass from a 64-bit seed
    (drawn from torch's default generator of x's device) and the unit's position in memory; backward keeps the
    seed (8 bytes) and runs the same pass on the gradient, which draws each m again, instead of keeping m (a byte
    per element for a mask, two or four for noise). `keep`: Bernoulli (a = drop rate, b = 1 / keep prob), else
    Uout (a = 1 - beta, b = 2 beta). With `after_relu` backward keeps y, which the next weight layer keeps anyway
    (`_Multiply` says why m >= 0 makes this exact). Without grad it draws the same way: reentrant activation
    checkpointing runs forward without grad, then again with it from the same generator state, and backward must
    see the mask the first forward used."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: bool, a: float, b: float, after_relu: bool) -> torch.Tensor:
        try:
            from .dropout_triton import redraw_multiply  # on first use: only this path needs Triton
        except ImportError as e:
            raise RuntimeError('redraw=True needs Triton on CUDA (pip install triton), or set redraw=False '
                               '(set_dropout_redraw(model, False), or train.py without --redraw-dropout)') from e
        seed = random_bits(1, torch.int64, x.device)
        y = redraw_multiply(x, seed, keep, a, b, after_relu)
        ctx.draw = (keep, a, b, y.stride())
        ctx.save_for_backward(seed, y if after_relu else None)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], None, None, None, None]:
        return _Redrawn.apply(grad, *ctx.saved_tensors, *ctx.draw), None, None, None, None


class _Redrawn(torch.autograd.Function):
    """`_Redraw`'s backward: g times the multipliers `seed` draws again (and ReLU's gradient, from the output
    `relu_out`), g first put in forward's layout (`stride`: a draw belongs to a position in memory). Linear in g,
    so its own backward is itself: double backward (a gradient penalty) works as with torch's ops."""

    @staticmethod
    def forward(ctx, g: torch.Tensor, seed: torch.Tensor, relu_out: Optional[torch.Tensor], keep: bool, a: float,
                b: float, stride: Tuple[int, ...]) -> torch.Tensor:
        from .dropout_triton import redraw_multiply
        if g.stride() != stride:
            g = torch.empty_strided(g.shape, stride, dtype=g.dtype, device=g.device).copy_(g)
        ctx.draw = (keep, a, b, stride)
        ctx.save_for_backward(seed, relu_out)
        return redraw_multiply(g, seed, keep, a, b, relu_out is not None, relu_out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> Tuple[Optional[torch.Tensor], None, None, None, None, None, None]:
        return _Redrawn.apply(grad, *ctx.saved_tensors, *ctx.draw), None, None, None, None, None, None


def drop_levels(p: float) -> int:
    """How many of the 65536 values of a 16-bit draw drop a unit: round(p * 65536)."""
    return round(p * LEVELS)


@torch.fx.wrap
@register_notrace_function
@torch.jit.unused
def dropout(x: torch.Tensor, p: float, training: bool = True, after_relu: bool = False,
            redraw: bool = False) -> torch.Tensor:
    """Bernoulli dropout, `F.dropout`'s contract; on CPU above rate 1/8, p is rounded to a multiple of 1/65536
    (see module doc). `after_relu`: dropout(relu(x)), as one op on CPU (`_Multiply`). `redraw`: on CUDA, keep a
    seed for backward instead of the mask, and draw it again there (`_Redraw`: less memory)."""
    if redraw and training and 0.0 < p < 1.0 and _redraw_path(x):
        return _Redraw.apply(x, True, p, 1.0 / (1.0 - p), after_relu)
    kind = _cpu_dropout_kind(p) if training and 0.0 < p < 1.0 and _fast_path(x) else None
    if kind is None:  # F.dropout's own error for a rate outside [0, 1]
        return F.dropout(F.relu(x) if after_relu else x, p, training)
    return _cpu_multiply(x, kind, p, after_relu)


def _cpu_dropout_kind(p: float) -> Optional[str]:
    """What a CPU Bernoulli dropout in training at rate 0 < p < 1 draws (`_cpu_draw`): 'positions' up to 1/8,
    'keep' above, None within 64/65536 of 1, where it takes `F.dropout`."""
    if p <= GEOMETRIC_MAX_RATE:
        return 'positions'
    return None if LEVELS - drop_levels(p) < MIN_LEVELS else 'keep'


@torch.fx.wrap
@register_notrace_function
@torch.jit.unused
def uout(x: torch.Tensor, beta: float, training: bool = True, after_relu: bool = False,
         redraw: bool = False) -> torch.Tensor:
    """Uout: x * u with u ~ U(1 - beta, 1 + beta) per element in training, x in eval (see module doc on CPU).
    `after_relu`: uout(relu(x)), as one op on CPU for beta < 1 (`_Multiply`; the noise is positive). `redraw`: on
    CUDA, keep a seed for backward instead of the noise (`_Redraw`), also after a ReLU."""
    redraws = redraw and _redraw_path(x)
    if after_relu and (not training or not 0.0 < beta < 1.0 or not (_fast_path(x) or redraws)):  # else u > 0
        return uout(F.relu(x), beta, training, redraw=redraw)
    if not training or beta == 0.0:
        return x
    if redraws:
        return _Redraw.apply(x, False, 1.0 - beta, 2.0 * beta, after_relu)
    if not _fast_path(x):
        # x + x * r with r ~ U(-beta, beta), as one multiply: 1 + r ~ U(1 - beta, 1 + beta)
        return x * torch.empty_like(x).uniform_(1.0 - beta, 1.0 + beta)
    return _cpu_multiply(x, 'uout', beta, after_relu)


class Dropout(nn.Dropout):
    """`nn.Dropout` drawing its mask through `dropout` above: faster on CPU, the same as `nn.Dropout` elsewhere.

    A subclass, so code that looks for torch dropouts (`isinstance(m, nn.Dropout)`, `m.p`) still finds it.
    `redraw` (off by default; `set_dropout_redraw` sets it model-wide): on CUDA, keep only a seed for backward
    and draw the mask again there, in one Triton pass each way (`_Redraw`): less memory."""

    def __init__(self, p: float = 0.5, redraw: bool = False):
        super().__init__(check_drop_rate(p))
        self.redraw = redraw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():
            return F.dropout(x, self.p, self.training)
        return dropout(x, self.p, self.training, redraw=self.redraw)

    @torch.jit.unused
    def forward_after_relu(self, x: torch.Tensor) -> torch.Tensor:
        """self(relu(x)), as one op on CPU (and on CUDA with `redraw`): for a slot that holds a ReLU then this."""
        return dropout(x, self.p, self.training, after_relu=True, redraw=self.redraw)

    def extra_repr(self) -> str:
        return super().extra_repr() + (', redraw=True' if self.redraw else '')


class Uout(nn.Module):
    """Uniform multiplicative noise: training x + x * r, r ~ U(-beta, beta) drawn per element; eval identity.

    The default beta 0.2 is our choice: it is the one setting Li et al. 2019 report an accuracy result for
    (CIFAR-100, DenseNet and WRN), not a recommendation of theirs for every network.
    `redraw`: as `Dropout`'s, for the noise.
    """

    def __init__(self, beta: float = 0.2, redraw: bool = False):
        super().__init__()
        self.beta = check_beta(beta)
        self.redraw = redraw

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.beta == 0.0:
            return x
        if torch.jit.is_scripting():
            return x * torch.empty_like(x).uniform_(1.0 - self.beta, 1.0 + self.beta)
        return uout(x, self.beta, redraw=self.redraw)

    @torch.jit.unused
    def forward_after_relu(self, x: torch.Tensor) -> torch.Tensor:
        """self(relu(x)), as one op on CPU (and on CUDA with `redraw`): for a slot that holds a ReLU then this."""
        return uout(x, self.beta, self.training, after_relu=True, redraw=self.redraw)

    def extra_repr(self) -> str:
        return f'beta={self.beta}' + (', redraw=True' if self.redraw else '')


def set_dropout_redraw(model: nn.Module, enable: bool = True) -> int:
    """Sets `redraw` on every `Dropout` and `Uout` of `model` (like timm's `set_grad_checkpointing`, memory for
    compute): on CUDA they keep a seed for backward, not their masks or noise, and draw those again in
    backward. Returns how many it set. On the CPU it changes nothing (the CPU path keeps a small mask)."""
    layers = [m for m in model.modules() if isinstance(m, (Dropout, Uout))]
    for m in layers:
        m.redraw = enable
    return len(layers)


def create_dropout(kind: str = 'dropout', drop_rate: float = 0.0, beta: float = 0.0) -> nn.Module:
    """A dropout module by kind: 'dropout' (Bernoulli, `drop_rate`), 'uout' (`beta`) or 'none'."""
    if kind not in DROP_KINDS:
        raise ValueError(f'unknown dropout kind {kind!r}; valid: {list(DROP_KINDS)}')
    drop_rate, beta = check_drop_rate(drop_rate), check_beta(beta)
    if kind == 'dropout' and drop_rate > 0.0:
        return Dropout(drop_rate)
    if kind == 'uout' and beta > 0.0:
        return Uout(beta)
    return nn.Identity()


class ICLayer(nn.Sequential):
    """Independent-Component layer: normalizer then dropout, to sit right before a weight layer."""

    def __init__(
            self,
            num_features: int,
            norm: str = 'batchnorm',
            drop: str = 'dropout',
            drop_rate: float = 0.05,
            beta: float = 0.0,
            groups: Optional[int] = None,
            group_size: Optional[int] = None,
    ):
        super().__init__()
        self.norm = create_norm(norm, num_features, groups=groups, group_size=group_size)
        self.drop = create_dropout(drop, drop_rate=drop_rate, beta=beta)
