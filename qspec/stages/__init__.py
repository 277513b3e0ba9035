"""The stages of a run, in the order the data flows (README, Development): each is a function of a
RunContext that yields typed records, which the runner writes."""

from itertools import chain

from qspec.stages.accuracy import task_stage
from qspec.stages.build import build_heads, build_variants
from qspec.stages.generation import generation_stage
from qspec.stages.screen import quality_stage
from qspec.stages.serving import serving_stage

STAGES = {
    "variants": lambda ctx, progress: chain(build_variants(ctx), build_heads(ctx)),
    "quality": quality_stage,
    "generation": generation_stage,
    "serving": serving_stage,
    "tasks": task_stage,
}

__all__ = [
    "STAGES",
    "build_variants",
    "generation_stage",
    "quality_stage",
    "serving_stage",
    "task_stage",
]
