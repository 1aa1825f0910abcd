"""ConceptAttention: where each concept lives in an image, read from a diffusion transformer.

Public API (see README):

- :class:`ConceptAttention` -- attach a concept stream to a diffusers MM-DiT and read saliency maps.
- :data:`READOUTS`, :class:`Readout` -- the paper's method, its ablations and attention baselines.
- :data:`ADAPTERS`, :class:`MMDiTAdapter` -- model families (Flux.1, SD3/SD3.5) and how to add one.
- :class:`ConceptAttentionError` -- raised for every input error a user can cause.
"""

from .adapters import ADAPTERS, FluxAdapter, MMDiTAdapter, SD3Adapter, get_adapter
from .core import ConceptAttention, default_layers
from .errors import ConceptAttentionError, UnsupportedModelError
from .readouts import READOUTS, Readout

__version__ = "0.1.0"

__all__ = [
    "ADAPTERS",
    "ConceptAttention",
    "ConceptAttentionError",
    "FluxAdapter",
    "MMDiTAdapter",
    "READOUTS",
    "Readout",
    "SD3Adapter",
    "UnsupportedModelError",
    "default_layers",
    "get_adapter",
]
