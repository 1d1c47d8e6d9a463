"""The pyramid's native CPU kernels (``pyrtok/_pyramid_native.c``) as differentiable torch operators.

Two linear operators on contiguous (N, H, W) stacks of float32 or float64 planes, and their transposes:

- ``down(x)``: (N, H, W) -> (N, ceil(H/2), ceil(W/2)), OpenCV's pyrDown;
- ``up(x, size, base, alpha)``: (N, h, w) -> (N, *size), ``base + alpha * 64 pyrUp(x)`` (``base`` may be None).

They give the same bits as :mod:`pyrtok.pyramid`'s elementwise torch ops (the kernels repeat those operations
in the same order, fused multiply-adds included), one pass per output row instead of a dozen tensor-wide ones.
``laplacian(x, levels)`` runs the whole Laplacian pyramid as one autograd node, whose backward adds each
level's gradients inside the transposes' kernels. Gradients run through the transposes, which are autograd
functions themselves (so double backward works), and forward-mode AD through the operators applied to the
tangents. The extension is an optional build: without it, and for tensors this module cannot take
(``usable``), the pyramid stays on torch's ops.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.autograd.forward_ad as forward_ad
from torch import Tensor

try:
    from pyrtok import _pyramid_native as _ext
except ImportError:  # built without a C compiler: the elementwise torch ops serve every call
    _ext = None

__all__ = ["available", "down", "isa", "laplacian", "laplacian_levels", "up", "usable"]

_DTYPES = (torch.float32, torch.float64)


def available() -> bool:
    """Whether the native kernels were built and import."""
    return _ext is not None


def isa() -> str | None:
    """The instruction set the kernels run with ("avx2+fma" or "baseline"), None when they are absent."""
    return None if _ext is None else _ext.isa


def usable(x: Tensor) -> bool:
    """Whether ``x`` can take the native kernels: a plain CPU float32/float64 tensor outside torch.compile and
    the torch.func transforms (their wrapped tensors have no data of their own)."""
    return (
        _ext is not None
        and x.device.type == "cpu"
        and x.dtype in _DTYPES
        and not torch.compiler.is_compiling()
        and not torch._C._functorch.is_functorch_wrapped_tensor(x)
    )


def _threads() -> int:
    return torch.get_num_threads()


def _down(x: Tensor) -> Tensor:
    x = x.contiguous()
    n, h, w = x.shape
    out = x.new_empty(n, (h + 1) // 2, (w + 1) // 2)
    _ext.down(x.data_ptr(), out.data_ptr(), n, h, w, x.dtype == torch.float64, _threads())
    return out


def _down_t(g: Tensor, size: tuple[int, int], base: Tensor | None = None) -> Tensor:
    g = g.contiguous()
    out = g.new_empty(g.shape[0], *size)
    if base is not None:
        base = base.contiguous()
    _ext.down_t(g.data_ptr(), out.data_ptr(), 0 if base is None else base.data_ptr(), g.shape[0], *size,
                g.dtype == torch.float64, _threads())
    return out


def _up(x: Tensor, size: tuple[int, int], base: Tensor | None, alpha: float) -> Tensor:
    x = x.contiguous()
    n, h, w = x.shape
    out = x.new_empty(n, *size)
    if base is not None:
        base = base.contiguous()
    _ext.up(x.data_ptr(), out.data_ptr(), 0 if base is None else base.data_ptr(), n, h, w, *size, alpha,
            x.dtype == torch.float64, _threads())
    return out


def _up_t(g: Tensor, size: tuple[int, int], alpha: float, base: Tensor | None = None) -> Tensor:
    g = g.contiguous()
    out = g.new_empty(g.shape[0], *size)
    if base is not None:
        base = base.contiguous()
    _ext.up_t(g.data_ptr(), out.data_ptr(), 0 if base is None else base.data_ptr(), g.shape[0], *size,
              *g.shape[-2:], alpha, g.dtype == torch.float64, _threads())
    return out


def laplacian_levels(x: Tensor, levels: int, down: Callable[[Tensor], Tensor],
                     up: Callable[[Tensor, tuple[int, int], Tensor, float], Tensor]) -> list[Tensor]:
    """(N, H, W) -> the ``levels`` Laplacian levels through the operators ``down`` and ``up(x, size, base,
    alpha)`` (``base + alpha * 64 pyrUp(x)``): each band's subtraction fused into its up-sampling. The one
    recurrence both paths run, these kernels and :mod:`pyrtok.pyramid`'s elementwise ops."""
    out = []
    current = x
    for _ in range(levels - 1):
        coarser = down(current)
        out.append(up(coarser, tuple(current.shape[-2:]), current, -1.0 / 64.0))
        current = coarser
    out.append(current)
    return out


def _laplacian(x: Tensor, levels: int) -> tuple[Tensor, ...]:
    return tuple(laplacian_levels(x, levels, _down, _up))


def _laplacian_t(grads: tuple[Tensor, ...]) -> Tensor:
    """The transpose of ``_laplacian``: the gradients of its levels -> the gradient of x (N, H, W).

    From the residual up: Gaussian level i + 1 gathers its own gradient and -1/64 U^T of band i's, then level i
    is band i's gradient plus D^T of that; both sums are fused into the kernels (their ``base``)."""
    grad = grads[-1]
    for i in range(len(grads) - 2, -1, -1):
        grad = _up_t(grads[i], tuple(grad.shape[-2:]), -1.0 / 64.0, base=grad)
        grad = _down_t(grad, tuple(grads[i].shape[-2:]), base=grads[i])
    return grad


class _Down(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor) -> Tensor:
        return _down(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor], output: Tensor) -> None:
        ctx.size = tuple(inputs[0].shape[-2:])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> Tensor:
        return _DownT.apply(grad, ctx.size)

    @staticmethod
    def jvp(ctx: Any, tangent: Tensor) -> Tensor:
        return _down(tangent)


class _DownT(torch.autograd.Function):
    @staticmethod
    def forward(grad: Tensor, size: tuple[int, int]) -> Tensor:
        return _down_t(grad, size)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, tuple[int, int]], output: Tensor) -> None:
        ctx.size = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _Down.apply(grad), None

    @staticmethod
    def jvp(ctx: Any, tangent: Tensor, _: None) -> Tensor:
        return _down_t(tangent, ctx.size)


class _Up(torch.autograd.Function):
    @staticmethod
    def forward(x: Tensor, size: tuple[int, int], base: Tensor | None, alpha: float) -> Tensor:
        return _up(x, size, base, alpha)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, tuple[int, int], Tensor | None, float], output: Tensor) -> None:
        x, ctx.size, base, ctx.alpha = inputs
        ctx.small = tuple(x.shape[-2:])
        ctx.has_base = base is not None

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, None, Tensor | None, None]:
        grad_x = _UpT.apply(grad, ctx.small, ctx.alpha) if ctx.needs_input_grad[0] else None
        grad_base = grad if ctx.has_base and ctx.needs_input_grad[2] else None
        return grad_x, None, grad_base, None

    @staticmethod
    def jvp(ctx: Any, tangent_x: Tensor | None, _: None, tangent_base: Tensor | None, __: None) -> Tensor:
        if tangent_x is None:
            return tangent_base.clone()
        return _up(tangent_x, ctx.size, tangent_base, ctx.alpha)


class _UpT(torch.autograd.Function):
    @staticmethod
    def forward(grad: Tensor, small: tuple[int, int], alpha: float) -> Tensor:
        return _up_t(grad, small, alpha)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, tuple[int, int], float], output: Tensor) -> None:
        grad, ctx.small, ctx.alpha = inputs
        ctx.size = tuple(grad.shape[-2:])

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:
        return _Up.apply(grad, ctx.size, None, ctx.alpha), None, None

    @staticmethod
    def jvp(ctx: Any, tangent: Tensor, _: None, __: None) -> Tensor:
        return _up_t(tangent, ctx.small, ctx.alpha)


class _Laplacian(torch.autograd.Function):
    """The whole pyramid as one autograd node: one backward call, no separate gradient sums per level."""

    @staticmethod
    def forward(x: Tensor, levels: int) -> tuple[Tensor, ...]:
        return _laplacian(x, levels)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, int], output: tuple[Tensor, ...]) -> None:
        ctx.levels = inputs[1]

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor, None]:
        return _LaplacianT.apply(*grads), None

    @staticmethod
    def jvp(ctx: Any, tangent: Tensor, _: None) -> tuple[Tensor, ...]:
        return _laplacian(tangent, ctx.levels)


class _LaplacianT(torch.autograd.Function):
    @staticmethod
    def forward(*grads: Tensor) -> Tensor:
        return _laplacian_t(grads)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        ctx.levels = len(inputs)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, ...]:
        return _Laplacian.apply(grad, ctx.levels)

    @staticmethod
    def jvp(ctx: Any, *tangents: Tensor) -> Tensor:
        return _laplacian_t(tangents)


def _tracked(*tensors: Tensor | None) -> bool:
    """Whether autograd (reverse or forward mode) must see this call."""
    if forward_ad._current_level >= 0:
        return True
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def down(x: Tensor) -> Tensor:
    """(N, H, W) -> (N, ceil(H/2), ceil(W/2)): OpenCV's pyrDown of a ``usable`` stack."""
    return _Down.apply(x) if _tracked(x) else _down(x)


def up(x: Tensor, size: tuple[int, int], base: Tensor | None = None, alpha: float = 1.0 / 64.0) -> Tensor:
    """(N, h, w) -> (N, *size): ``base + alpha * 64 pyrUp(x)`` cropped to ``size`` (each side 2n - 1 or 2n);
    ``base`` (N, *size) of x's dtype, or None for zeros."""
    return _Up.apply(x, size, base, alpha) if _tracked(x, base) else _up(x, size, base, alpha)


def laplacian(x: Tensor, levels: int) -> tuple[Tensor, ...]:
    """(N, H, W) -> ``levels`` tensors: the Laplacian bands of a ``usable`` stack, then the residual
    (``levels`` >= 2)."""
    return _Laplacian.apply(x, levels) if _tracked(x) else _laplacian(x, levels)
