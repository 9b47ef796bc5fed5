"""JointDiT and its parts: the transformer, joint attention, RoPE, embeddings and CLIP conditioning."""

from jointdit.models.attention import MODES, AttentionKnobs, joint_attention
from jointdit.models.conditioning import ClipConditioner, Condition, ConditionEmbedder
from jointdit.models.jointdit import (
    DEFAULT_PRESET,
    PRESETS,
    JointDiT,
    build_model,
    count_flops,
    full_config,
    model_config,
)
from jointdit.models.rope import JointRope, apply_rope

__all__ = [
    "MODES", "AttentionKnobs", "joint_attention",
    "ClipConditioner", "Condition", "ConditionEmbedder",
    "DEFAULT_PRESET", "PRESETS", "JointDiT", "build_model", "count_flops", "full_config", "model_config",
    "JointRope", "apply_rope",
]
