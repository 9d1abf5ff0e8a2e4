"""`LinearOver`: an `nn.Linear` subclass built over another Linear's parameters, for layers that compute the same
product another way (`RowBlockedLinear`, `ManyRowInt4Linear`) while keeping its state dict keys."""

from __future__ import annotations

from typing import TypeVar

from torch import nn

L = TypeVar("L", bound="LinearOver")


class LinearOver(nn.Linear):
    """Base of Linear layers that take over an existing layer's weight and bias. Build one with `from_linear`."""

    @classmethod
    def from_linear(cls: type[L], linear: nn.Linear) -> L:
        """A layer of this class sharing `linear`'s parameters (nothing is copied), in its training mode."""
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.register_parameter("weight", linear.weight)
        layer.register_parameter("bias", linear.bias)
        return layer.train(linear.training)
