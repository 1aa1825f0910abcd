"""The one interface every pipeline offers: ``generate``, ``encode``, ``token_maps``, ``prompt_maps``.

The shapes model's pipeline and the diffusers one (:class:`~.mmdit.MMDiTPipeline`) both implement
it, with the same results (:class:`~.result.ConceptResult`) and the same shared options. What a
pipeline takes beyond them it lists in :attr:`MapsPipeline.options`, so callers (the CLI, the web
page, eval) check a setting against the pipeline instead of recognising the pipeline.
"""

from __future__ import annotations

import torch

#: Every optional setting some pipeline takes, with what it means (the keys of ``options``).
OPTIONS = {
    "height": "image height in pixels (generate)",
    "width": "image width in pixels (generate)",
    "size": "the (width, height) a real image is resized to (encode, token_maps, prompt_maps)",
    "shift": "the sampler's timestep shift (generate)",
    "concept_tokens": "'first' (paper) or 'mean' of a concept word's tokens",
    "progress": "a progress bar over the denoising steps (generate)",
    "frames": "the number of frames (video models: generate, and at most this many for encode)",
}


class MapsPipeline:
    """What every pipeline offers. Subclasses set the attributes and implement, with the same shared
    keyword options (``seed``, ``layers``, ``readouts``, ``t``, ``samples``, ``steps``, ``guidance``,
    ``caption``/``captions``, ``seeds``, ``map_steps``) plus those in :attr:`options`:

    - ``generate(prompt, concepts, ...)``: text -> image and one map per concept (a ConceptResult);
    - ``encode(image, concepts, ...)``: a real image -> one map per concept (a ConceptResult);
    - ``token_maps(images, concepts, captions, ...)``: ``{readout: [B, K, h, w]}`` float32 on the CPU;
    - ``prompt_maps(images, concepts, captions, ...)``: the DAAM-style baseline, ``[B, K, h, w]``.
    """

    #: The optional settings (keys of :data:`OPTIONS`) this pipeline takes.
    options: frozenset[str] = frozenset()
    #: Noise level of a real-image pass, and noise draws averaged, unless told otherwise.
    default_t: float = 0.5
    default_samples: int = 5
    name: str

    @property
    def device(self) -> torch.device:
        raise NotImplementedError

    @property
    def default_layers(self) -> tuple[int, ...]:
        """Double-stream blocks read unless told otherwise."""
        raise NotImplementedError
