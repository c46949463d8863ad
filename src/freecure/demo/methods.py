"""The FreeCure methods the demo offers: the one place the page's method list comes from.

A method turns a :class:`~freecure.pipeline.FreeCurePipeline` and the call's keyword arguments
(those of ``FreeCurePipeline.__call__``) into a :class:`~freecure.pipeline.FreeCureOutput`.
A new method registers itself by adding an entry to :data:`METHODS`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

from ..pipeline import PRESETS, FreeCureConfig, FreeCurePipeline
from ..stages.records import FreeCureOutput


@dataclass(frozen=True)
class Method:
    """One entry of the page's method list.

    Args:
        name: the value the page sends ("rofa").
        title: what the page shows.
        run: ``run(freecure, **call_kwargs)`` → the run's output.
    """

    name: str
    title: str
    run: Callable[..., FreeCureOutput]


def _rofa(freecure: FreeCurePipeline, **call_kwargs) -> FreeCureOutput:
    """The paper's method: SAME masks, ROFA noise blending (eq. 6), expression restore (§4.2)."""
    return freecure(**call_kwargs)


def _with(freecure: FreeCurePipeline, config, **call_kwargs) -> FreeCureOutput:
    """Run ``freecure``'s backend and parser with another configuration, reporting progress alike."""
    other = FreeCurePipeline(freecure.backend, freecure.face_parser, config)
    other.progress, other.progress_callback = freecure.progress, freecure.progress_callback
    return other(**call_kwargs)


def _fasa(freecure: FreeCurePipeline, **call_kwargs) -> FreeCureOutput:
    """The authors' released correction: foundation-aware self-attention (:mod:`freecure.stages.fasa`)."""
    return _with(freecure, replace(freecure.config, method="fasa"), **call_kwargs)


def _preset(name: str) -> Callable[..., FreeCureOutput]:
    """A preset (:data:`freecure.pipeline.PRESETS`), with the page's γ and guidance settings."""

    def run(freecure: FreeCurePipeline, **call_kwargs) -> FreeCureOutput:
        config = freecure.config
        kept = dict(
            gamma=config.gamma,
            expression_guidance_scale=config.expression_guidance_scale,
            inversion_guidance_scale=config.inversion_guidance_scale,
        )
        return _with(freecure, FreeCureConfig.from_preset(name, **kept), **call_kwargs)

    return run


METHODS: dict[str, Method] = {
    "rofa": Method("rofa", "ROFA: SAME masks + noise blending + expression restore (paper §4)", _rofa),
    "fasa": Method("fasa", "FASA: foundation-aware self-attention (the authors' released code)", _fasa),
    **{
        f"preset:{name}": Method(f"preset:{name}", f"preset {name}: {preset.source}", _preset(name))
        for name, preset in PRESETS.items()
    },
}
