"""FreeCure's own settings (:class:`FreeCureConfig`), its corrections and its documented presets."""

from __future__ import annotations

from dataclasses import dataclass, replace

from ..attention.capture import AGGREGATIONS
from ..core.errors import InputError, check_number
from .base import Correction
from .fasa import Fasa, FasaConfig
from .masks import PD_REGION_MODES
from .rofa import Rofa

#: The corrections after the SAME pass, by ``FreeCureConfig.method``.
CORRECTIONS: dict[str, type[Correction]] = {Rofa.name: Rofa, Fasa.name: Fasa}
#: Correction methods after the SAME pass (``FreeCureConfig.method``).
METHODS = tuple(CORRECTIONS)


@dataclass(frozen=True)
class FreeCureConfig:
    """FreeCure's own settings (the diffusion settings are call arguments).

    Attributes:
        gamma: γ of §4.2: the expression stage inverts and re-denoises round(γ·T) of the T
            steps. Must lie in (0, 1].
        inversion_guidance_scale: guidance scale of the expression stage's DDIM inversion with
            the template prompt; 1.0 (no CFG, the default) keeps the inversion closest to exact
            (see :mod:`freecure.inversion`).
        expression_guidance_scale: guidance scale of the re-denoising with the expression
            prompt; None (default) = the run's ``guidance_scale`` (the backend's, from the CLI):
            the expression comes from the foundation model's guided controllability (§4.2).
            ``inversion_guidance_scale=1.0, expression_guidance_scale=1.0`` is the former
            single-setting behaviour.
        approximate_shared_uncond: after injection, evaluate the unconditional branch once, on
            PD's latent, for both lanes (3 batch rows instead of 4). PD stays exact; FD's
            guidance becomes approximate. Off by default.
        attention_layers: names of the attention processors to capture; None = every
            cross-attention layer of the UNet's up-sampling blocks (the paper's choice), or
            for FLUX every double-stream block's joint attention (docs/engine.md).
        pd_region: PD's factor of eq. 4. ``"placement"`` (default): where the attribute
            belongs on PD's face (:func:`freecure.masks.placement_region`), so an accessory
            PD failed to draw can be restored; ``"literal"``: the attribute's own class in PD's
            image, Ψ(I_p)_i as eq. 4 reads, which skips any attribute PD did not draw.
        attention_aggregation: how H_i averages the captured layers: ``"per_resolution"``
            (default; each resolution weighs the same) or ``"per_layer"`` (every layer the same,
            so SDXL's 30 layers at 32² outweigh its 6 at 64²). See :class:`AttentionStore`.
        method: the correction after the SAME pass (:data:`CORRECTIONS`): ``"rofa"`` (the
            arXiv paper's noise blending) or ``"fasa"`` (foundation-aware self-attention, the
            released code and the NeurIPS paper, :mod:`freecure.stages.fasa`).
        fasa: settings of the FASA method.
        expression: whether the expression stage (§4.2; the NeurIPS paper's asymmetric prompt
            guidance) follows the correction; None (default): the correction's own default,
            on after ROFA, off after FASA (the released code has none).
    """

    gamma: float = 0.5
    expression_guidance_scale: float | None = None
    inversion_guidance_scale: float = 1.0
    approximate_shared_uncond: bool = False
    attention_layers: tuple[str, ...] | None = None
    pd_region: str = "placement"
    attention_aggregation: str = "per_resolution"
    method: str = "rofa"
    fasa: FasaConfig = FasaConfig()
    expression: bool | None = None

    def __post_init__(self):
        if self.expression not in (None, True, False):
            raise InputError(f"expression must be True, False or None, got {self.expression!r}")
        if self.method not in METHODS:
            raise InputError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.attention_aggregation not in AGGREGATIONS:
            raise InputError(
                f"attention_aggregation must be one of {', '.join(AGGREGATIONS)}, got {self.attention_aggregation!r}"
            )
        if self.pd_region not in PD_REGION_MODES:
            raise InputError(f"pd_region must be one of {', '.join(PD_REGION_MODES)}, got {self.pd_region!r}")
        check_number("gamma", self.gamma, 0.0, 1.0, open_minimum=True)
        if self.expression_guidance_scale is not None:
            check_number("expression_guidance_scale", self.expression_guidance_scale, 1.0)
        check_number("inversion_guidance_scale", self.inversion_guidance_scale, 1.0)

    @property
    def correction(self) -> Correction:
        """The correction stage of :attr:`method`."""
        return CORRECTIONS[self.method](self)

    @property
    def runs_expression(self) -> bool:
        """Whether the expression stage follows the correction (:attr:`expression`, else the
        correction's default)."""
        if self.expression is not None:
            return self.expression
        return CORRECTIONS[self.method].expression_by_default

    def expression_scale(self, loop_scale: float) -> float:
        """Guidance of the expression re-denoising: :attr:`expression_guidance_scale`, else the
        run's loop guidance (Stable Diffusion: the CFG scale w; FLUX: ``true_cfg_scale``, its
        distilled guidance being an embedding that every FLUX call already carries)."""
        return loop_scale if self.expression_guidance_scale is None else self.expression_guidance_scale

    @classmethod
    def from_preset(cls, name: str, **overrides) -> FreeCureConfig:
        """The configuration of a documented preset (:data:`PRESETS`), with ``overrides`` on top
        (``fasa`` overrides are a :class:`FasaConfig` or a dict of its fields)."""
        if name not in PRESETS:
            raise InputError(f"unknown preset {name!r}: use one of {', '.join(PRESETS)}")
        preset = PRESETS[name]
        fasa = overrides.pop("fasa", None)
        if isinstance(fasa, dict):
            fasa = replace(preset.fasa, **fasa)
        settings = dict(method=preset.method, expression=preset.expression, fasa=fasa or preset.fasa)
        settings.update(overrides)
        return cls(**settings)


@dataclass(frozen=True)
class Preset:
    """A documented set of method settings, named after its source (docs/engine.md, "Presets").

    Attributes:
        source: where the settings come from, in words.
        method, expression, fasa: the :class:`FreeCureConfig` fields the preset sets.
    """

    source: str
    method: str
    expression: bool
    fasa: FasaConfig = FasaConfig()


#: The three readings of FreeCure, each from its source. γ = 0.5 in all three (§4.2).
PRESETS: dict[str, Preset] = {
    "arxiv-v1": Preset(
        source="the arXiv paper (v1, §4): SAME masks, ROFA noise blending (eq. 6), expression restore",
        method="rofa",
        expression=True,
    ),
    "neurips": Preset(
        source="the NeurIPS paper: FASA as Softmax(([1, ωℳ] ⊙ Q_p K̂ᵀ)/√d)·V̂ with ω = 2.0 on SAME's ℳ, "
        "then asymmetric prompt guidance (the expression stage)",
        method="fasa",
        expression=True,
        fasa=FasaConfig(layers="up", mask_source="same", mask_weight=2.0, form="paper"),
    ),
    "official-code": Preset(
        source="the released code (YIYANGCAI/FreeCure): FASA with a bias ω = 1.5 inside the FD-parse mask, "
        "FD's keys outside it blocked, no expression stage",
        method="fasa",
        expression=False,
        fasa=FasaConfig(layers="up", mask_source="fd-parse", mask_weight=1.5, form="code"),
    ),
}
