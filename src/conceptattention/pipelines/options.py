"""Checks of the inputs every pipeline shares (concept lists, seeds, devices), each failing with one
clear :class:`~conceptattention.errors.ConceptAttentionError`. Imports no torch until a device is checked."""

from __future__ import annotations

import math
from collections.abc import Iterable

from ..errors import ConceptAttentionError, short

#: Seeds go to ``torch.Generator.manual_seed``, which takes a signed 64-bit value.
MAX_SEED = 2**63 - 1


def concept_words(concepts: str | Iterable[str]) -> list[str]:
    """Concept words as typed on a command line or a web page: split on commas and spaces, then
    checked by :func:`distinct_concepts`."""
    if isinstance(concepts, str):
        concepts = [concepts]
    words = [w for c in concepts for w in str(c).replace(",", " ").split()]
    if not words:
        raise ConceptAttentionError("no concepts given: pass at least one concept word, e.g. --concepts dog tree sky")
    return distinct_concepts(words)


def distinct_concepts(concepts: Iterable[str]) -> list[str]:
    """The concepts, stripped; an empty list and repeats (ignoring case) are refused, since a
    repeated concept splits its own map with its copy. (Whether a word means anything is the text
    encoder's to say.)"""
    words = [str(c).strip() for c in concepts]
    if not words:
        raise ConceptAttentionError("the concept list is empty: pass at least one concept")
    seen: set[str] = set()
    for word in words:
        if word.lower() in seen:
            raise ConceptAttentionError(
                f"the concept {short(word)} is given twice; each concept gets one map and a copy would split it "
                "in half: give every concept once"
            )
        seen.add(word.lower())
    return words


def check_seed(seed: object, name: str = "seed") -> int:
    """``seed`` as an int in ``0 .. 2**63 - 1``."""
    if (
        isinstance(seed, bool)
        or not isinstance(seed, (int, float))
        or (isinstance(seed, float) and not seed.is_integer())
    ):
        raise ConceptAttentionError(f"{name} must be a whole number from 0 to {MAX_SEED}, not {seed!r}")
    value = int(seed)
    if not 0 <= value <= MAX_SEED:
        raise ConceptAttentionError(f"{name} must be a whole number from 0 to {MAX_SEED} (2**63 - 1), not {value}")
    return value


def check_number(value: object, name: str, low: float | None = None, high: float | None = None) -> float:
    """``value`` as a finite float in ``[low, high]`` (either bound may be None)."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConceptAttentionError(f"{name} must be a number, not {value!r}") from None
    if not math.isfinite(number):
        raise ConceptAttentionError(f"{name} must be a finite number, not {value!r}")
    if (low is not None and number < low) or (high is not None and number > high):
        span = (
            f"from {low:g} to {high:g}"
            if low is not None and high is not None
            else (f"at least {low:g}" if low is not None else f"at most {high:g}")
        )
        raise ConceptAttentionError(f"{name} must be {span}, not {number:g}")
    return number


def check_device(device: str | None) -> str | None:
    """``device`` if torch can use it here; one clear error for a nonsense name or a missing GPU."""
    if device is None:
        return None
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError, TypeError):
        raise ConceptAttentionError(
            f"unknown device {short(device)}: use cpu, cuda, cuda:N (N-th GPU) or mps"
        ) from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = "this torch is a CPU-only build" if torch.version.cuda is None else "no CUDA GPU is visible"
            raise ConceptAttentionError(
                f"device {device!r} asked for, but {build}: use --device cpu, "
                "or install a CUDA build of torch on a machine with a GPU"
            )
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ConceptAttentionError(
                f"device {device!r} asked for, but this machine has {count} GPU(s): use cuda:0 .. cuda:{count - 1}"
            )
    elif parsed.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ConceptAttentionError(f"device {device!r} asked for, but MPS is not available here: use --device cpu")
    elif parsed.type != "cpu":
        raise ConceptAttentionError(f"device {device!r} is not supported: use cpu, cuda, cuda:N or mps")
    return device
