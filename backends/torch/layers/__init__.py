"""The torch backend's ``nn.Module`` layers: :class:`FSATAttention` (:mod:`.fsat_attention`) and
:class:`RoutingAttention` (:mod:`.routing_attention`)."""

from .fsat_attention import FSATAttention
from .routing_attention import RoutingAttention

__all__ = ["FSATAttention", "RoutingAttention"]
