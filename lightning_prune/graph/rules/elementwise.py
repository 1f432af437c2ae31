"""Elementwise ops (their inputs broadcast together), ops that keep their input's positions, and factories."""

from __future__ import annotations

from lightning_prune.graph.builder import TraceBuilder
from lightning_prune.graph.rules.base import Call, combine, effective_shape, names_in, rule, set_all

_ELEMENTWISE = names_in(
    """
add sub rsub mul div true_divide floor_divide remainder fmod pow float_power maximum minimum fmax fmin atan2
arctan2 hypot where lerp addcmul addcdiv masked_fill copy eq ne lt le gt ge greater greater_equal less
less_equal not_equal equal logical_and logical_or logical_xor bitwise_and bitwise_or bitwise_xor clamp clip
clamp_min clamp_max heaviside xlogy copysign nextafter relu relu6 leaky_relu elu selu celu gelu silu mish
sigmoid hardsigmoid hardswish hardtanh tanh softplus softsign tanhshrink hardshrink softshrink threshold
logsigmoid rrelu dropout dropout1d dropout2d dropout3d alpha_dropout feature_alpha_dropout abs absolute neg
negative exp exp2 expm1 log log2 log10 log1p sqrt rsqrt square reciprocal sin cos tan sinh cosh asin acos atan
arcsin arccos arctan erf erfc erfinv sign sgn signbit floor ceil round trunc fix frac nan_to_num pos positive
logit isnan isinf isfinite isposinf isneginf logical_not bitwise_not deg2rad rad2deg i0 sinc lgamma digamma
"""
)


@rule(*_ELEMENTWISE)
def elementwise(b: TraceBuilder, call: Call) -> None:
    out = call.outputs[0]
    items = [(b.label(t), effective_shape(b, t)) for t in call.inputs]
    set_all(b, call, combine(b, items, tuple(out.shape), call.name))


_LIKE = names_in(
    """
to type type_as contiguous clone detach float double half bfloat16 int long short bool cpu cuda requires_grad
zero fill bernoulli uniform normal exponential random cauchy log_normal geometric zeros_like ones_like
empty_like full_like rand_like randn_like randint_like data pin_memory share_memory_ coalesce
"""
)


@rule(*_LIKE)
def like(b: TraceBuilder, call: Call) -> None:
    """Same positions as the first argument (dtype or device changes, fills, ``*_like`` factories)."""
    source = call.inputs[0]
    for output in call.outputs:
        if output.shape == source.shape:
            b.set(output, b.label(source))


@rule("new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "detach_copy")
def factory(b: TraceBuilder, call: Call) -> None:
    """New tensors of explicit sizes: of unknown origin, and they read nothing of their template."""
