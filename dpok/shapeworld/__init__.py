"""ShapeWorld: the embedded procedural world (see SHAPEWORLD in the docs)."""

from .distribution import (
    COMMON_PAIRS,
    HELD_OUT_PAIRS,
    RARE_PAIRS,
    pair_category,
    prompt_sets,
    sample_caption,
    sample_training_example,
)
from .grammar import (
    ALL_PAIRS,
    COLORS,
    RELATIONS,
    SHAPES,
    Group,
    ParsedPrompt,
    PromptError,
    format_prompt,
    parse_prompt,
    vocabulary,
)
from .render import IMAGE_SIZE, Scene, Shape, render_prompt, render_scene, scene_for_prompt, scene_matches

__all__ = [
    "ALL_PAIRS", "COLORS", "COMMON_PAIRS", "HELD_OUT_PAIRS", "IMAGE_SIZE", "RARE_PAIRS", "RELATIONS",
    "SHAPES", "Group", "ParsedPrompt", "PromptError", "Scene", "Shape", "format_prompt",
    "pair_category", "parse_prompt", "prompt_sets", "render_prompt", "render_scene",
    "sample_caption", "sample_training_example", "scene_for_prompt", "scene_matches", "vocabulary",
]
