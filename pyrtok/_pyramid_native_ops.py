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


def usable(x: Tensor, *others: Tensor | None) -> bool:
    """Whether ``x`` (and every tensor of ``others`` that is not None) can take the native kernels: plain CPU
    tensors of one dtype, float32 or float64, outside torch.compile, ``torch.jit.trace`` (the kernels' writes
    are invisible to both), the torch.func transforms and batched gradients (``is_grads_batched``, a vectorised
    ``jacobian``): their tensors have no data of their own."""
    if (_ext is None or torch.compiler.is_compiling() or torch.jit.is_tracing()
            or torch._C._functorch.peek_interpreter_stack() is not None):  # inside a torch.func transform
        return False
    return all(
        t.device.type == "cpu" and t.dtype == x.dtype and torch._C._has_storage(t)
        and not torch._C._functorch.is_functorch_wrapped_tensor(t)
        for t in (x, *others) if t is not None
    ) and x.dtype in _DTYPES


def _portable_vjp(forward: Callable[[Tensor], Tensor | tuple[Tensor, ...]], shape: tuple[int, ...],
                  grads: tuple[Tensor, ...]) -> Tensor:
    """The transpose of the linear operator ``forward`` applied to ``grads``, by autograd through torch's
    elementwise ops: for gradients the kernels cannot take (batched by ``is_grads_batched`` or a vectorised
    ``jacobian``). A linear map's vector-Jacobian product is the same at every point; zeros serve."""
    from pyrtok import pyramid  # the elementwise ops live there; imported here, where no cycle remains

    point = torch.zeros(shape, dtype=grads[0].dtype, device=grads[0].device, requires_grad=True)
    with torch.enable_grad(), pyramid.elementwise():
        out = forward(point)
    outputs = out if isinstance(out, tuple) else (out,)
    return torch.autograd.grad(outputs, point, grads, create_graph=torch.is_grad_enabled())[0]


def _portable(op: Callable[..., Tensor | list[Tensor]], *args: object) -> Tensor | list[Tensor]:
    """``op(*args)`` on torch's elementwise ops (for the transposes' own backward with such gradients)."""
    from pyrtok import pyramid

    with pyramid.elementwise():
        return op(*args)


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
        if usable(grad):
            return _DownT.apply(grad, ctx.size)
        from pyrtok.pyramid import _down

        return _portable_vjp(_down, (*grad.shape[:-2], *ctx.size), (grad,))

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
        if usable(grad):
            return _Down.apply(grad), None
        from pyrtok.pyramid import _down

        return _portable(_down, grad), None

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
        grad_x = None
        if ctx.needs_input_grad[0] and usable(grad):
            grad_x = _UpT.apply(grad, ctx.small, ctx.alpha)
        elif ctx.needs_input_grad[0]:
            from pyrtok.pyramid import _up

            size, alpha = ctx.size, ctx.alpha
            grad_x = _portable_vjp(lambda p: _up(p, size, None, alpha), (*grad.shape[:-2], *ctx.small), (grad,))
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
        if usable(grad):
            return _Up.apply(grad, ctx.size, None, ctx.alpha), None, None
        from pyrtok.pyramid import _up

        return _portable(_up, grad, ctx.size, None, ctx.alpha), None, None

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
        ctx.shape = tuple(inputs[0].shape)

    @staticmethod
    def backward(ctx: Any, *grads: Tensor) -> tuple[Tensor, None]:
        if usable(*grads):
            return _LaplacianT.apply(*grads), None
        from pyrtok.pyramid import _down, _up

        levels = ctx.levels
        return _portable_vjp(lambda p: tuple(laplacian_levels(p, levels, _down, _up)), ctx.shape, grads), None

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
        if usable(grad):
            return _Laplacian.apply(grad, ctx.levels)
        from pyrtok.pyramid import _down, _up

        return tuple(_portable(laplacian_levels, grad, ctx.levels, _down, _up))

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
