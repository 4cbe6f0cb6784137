"""The class swap behind ``apply_ats`` and ``apply_tome``: a token-reduction plug-in replaces the host model's class
by a cached subclass whose ``forward_features`` runs the plug-in, so parameters, buffers and ``state_dict`` keys stay
the host's and the swap undoes by assigning the host class back. Settings live in one frozen attribute per plug-in,
never in module state.
"""

from __future__ import annotations

import functools

import torch

from ravit.errors import InvalidArgumentError

__all__ = ["TokenReducer", "attach", "detach", "reduced_class"]


class TokenReducer:
    """Mixed in front of the host class. Subclasses set ``_name``, ``_why`` (why the token count differs) and
    ``_features(images) -> (B, N', C)``."""

    _name = ""
    _why = ""

    def _features(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_features(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False):
        if attn_mask is not None or is_causal:
            raise InvalidArgumentError(f"attn_mask / is_causal are not supported with {self._name} ({self._why})")
        return self._features(x)

    def forward_intermediates(self, *args, **kwargs):
        raise NotImplementedError(
            f"forward_intermediates is not available while {self._name} is applied ({self._why}); remove it first "
            f"(ravit.remove_{self._name.lower()})")


@functools.cache
def reduced_class(reducer: type, host: type) -> type:
    """``reducer`` mixed in front of ``host``; the host class is kept as ``_host`` for the way back."""
    return type(f"{reducer._name}{host.__name__}", (reducer, host), {"_host": host})


def attach(model: torch.nn.Module, reducer: type, attr: str, config: object) -> torch.nn.Module:
    """Swap ``model`` to ``reducer`` over its class and store the plug-in's frozen ``config`` as ``model.<attr>``."""
    model.__class__ = reduced_class(reducer, type(model))
    setattr(model, attr, config)
    return model


def detach(model: torch.nn.Module, attr: str) -> torch.nn.Module:
    """Undo :func:`attach`: the host class back, ``model.<attr>`` dropped."""
    model.__class__ = model._host
    delattr(model, attr)
    return model
