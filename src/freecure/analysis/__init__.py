"""The paper's motivation studies (§3): per-token cross-attention maps of FD and PD
(Figure 3) and the identity-column interpolation of eq. 3 (Figures 4 and 10)."""

from ..attention.projections import (
    JointProjection,
    cross_attention_logits,
    cross_query_key,
    cross_value,
    joint_projection,
)
from .grids import GridLayout, labelled_grid
from .interpolate import (
    HandedIdentityInterpolation,
    IdentityInterpolation,
    InterpolationState,
    JointIdentityInterpolation,
    interpolate_across_calls,
    interpolate_identity,
    interpolate_scores,
)
from .maps import (
    JointTokenMapRecorder,
    TokenMapRecorder,
    TokenMapStore,
    block_group,
    cross_attention_groups,
    joint_text_maps,
    record_token_maps,
)
from .studies import AttentionStudy, InterpolationStudy, attention_study, interpolation_study, prepare
from .tokens import TokenAlignment, align_tokens, identity_in_prompt

__all__ = [
    "AttentionStudy",
    "GridLayout",
    "HandedIdentityInterpolation",
    "IdentityInterpolation",
    "InterpolationState",
    "InterpolationStudy",
    "JointIdentityInterpolation",
    "JointProjection",
    "JointTokenMapRecorder",
    "TokenAlignment",
    "TokenMapRecorder",
    "TokenMapStore",
    "align_tokens",
    "attention_study",
    "block_group",
    "cross_attention_groups",
    "cross_attention_logits",
    "cross_query_key",
    "cross_value",
    "identity_in_prompt",
    "interpolate_across_calls",
    "interpolate_identity",
    "interpolate_scores",
    "interpolation_study",
    "joint_projection",
    "joint_text_maps",
    "labelled_grid",
    "prepare",
    "record_token_maps",
]
