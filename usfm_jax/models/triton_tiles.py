"""Pieces shared by the Pallas (Triton) kernels of ``fused_attention``, ``fused_mlp`` and
``fused_norm``.

A kernel's tiling (block sizes and launch parameters, validated and parsed from the command
line), float32-accumulated tensor-core dots of 2-D tiles, and the block arithmetic and masked
loads for sizes the blocks do not divide. Kernels are compiled by Triton where the program is
lowered for a GPU and run in Pallas' interpreter elsewhere (tests on a CPU): the choice is made
per lowering platform, so a step compiled ahead of time for a GPU on a machine without one gets
the Triton kernels. Triton's dot needs power-of-two tiles of at least 16.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


@dataclasses.dataclass(frozen=True)
class KernelTiling:
    """Base of a kernel family's tiling (a frozen dataclass with a ``stages`` field): fields
    named ``block*`` are power-of-two block sizes >= 16, ``warps*`` powers of two, other
    integer fields positive; a string field is a choice among the values its class lists in
    ``CHOICES`` (field name -> allowed values)."""

    CHOICES: ClassVar[dict[str, tuple[str, ...]]] = {}  # not a field: each string field's values

    def __post_init__(self):
        kind = type(self).__name__
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, str):
                allowed = self.CHOICES.get(field.name, ())
                if value not in allowed:
                    raise ValueError(f"{kind}.{field.name} must be one of {allowed}, got {value!r}")
                continue
            if field.name.startswith("block") and (value < 16 or value & (value - 1)):
                raise ValueError(f"{kind}.{field.name} must be a power of two >= 16, got {value}")
            if field.name.startswith("warps") and (value < 1 or value & (value - 1)):
                raise ValueError(f"{kind}.{field.name} must be a power of two, got {value}")
            if value < 1:
                raise ValueError(f"{kind}.{field.name} must be positive, got {value}")

    @classmethod
    def parse(cls, text: str):
        """'warps=8,block_m=64' -> cls(warps=8, block_m=64), the other fields at their
        defaults; a string field takes its value as written ('bias_grad=dkv')."""
        names = [f.name for f in dataclasses.fields(cls)]
        values = {}
        for item in filter(None, text.split(",")):
            name, sep, value = item.strip().partition("=")
            if sep and name in cls.CHOICES:
                values[name] = value
                continue
            if not sep or name not in names or not value.isdigit():
                raise ValueError(
                    f"a tiling is name=integer pairs of {names} (or name=choice for "
                    f"{dict(cls.CHOICES)}), got {item!r}"
                )
            values[name] = int(value)
        return cls(**values)

    def compiler_params(self, warps: int) -> plgpu.CompilerParams:
        return plgpu.CompilerParams(num_warps=warps, num_stages=self.stages)


def pallas_call(kernel: Callable, *, interpret: bool | None, **kwargs) -> Callable:
    """``pl.pallas_call(kernel, **kwargs)``: Triton where the program is lowered for a GPU and
    Pallas' interpreter elsewhere (``interpret=None``), or as ``interpret`` says.

    The platform is the lowering's (``lax.platform_dependent``), not the default backend's: an
    ahead-of-time compile for a GPU on a CPU-only machine gets the Triton kernels, and each
    lowering contains only its own branch.
    """
    if interpret is not None:
        return pl.pallas_call(kernel, interpret=interpret, **kwargs)
    triton = pl.pallas_call(kernel, interpret=False, **kwargs)
    interpreted = pl.pallas_call(kernel, interpret=True, **kwargs)
    return lambda *args: jax.lax.platform_dependent(
        *args, cuda=triton, rocm=triton, default=interpreted
    )


def dot(a: jax.Array, b: jax.Array, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
    """a @ b of 2-D tiles (either transposed), accumulated in float32: a tensor-core matmul."""
    dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def load(ref, mask: jax.Array | None) -> jax.Array:
    """A block of ``ref``, zero where ``mask`` (if any) is False."""
    return plgpu.load(ref) if mask is None else plgpu.load(ref, mask=mask, other=0.0)


def within(start: jax.Array | int, block: int, size: int) -> jax.Array:
    """[block] bool: which of the indices start, start + 1, ... lie below ``size``."""
    return start + jnp.arange(block) < size


def fit_block(block: int, size: int) -> int:
    """A block no longer than needed for ``size`` elements (and >= 16, Triton's smallest dot)."""
    return min(block, max(16, pl.next_power_of_2(size)))


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple
