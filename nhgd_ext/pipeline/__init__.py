"""Producer-consumer pipeline for the curvature updates (docs/design.md §3.4, paper Algorithm 2)."""

from ._messages import PipelineClosed, PipelineError
from ._pipeline import Pipeline, engine_kind
from .distributed import serve

__all__ = ["Pipeline", "PipelineError", "PipelineClosed", "engine_kind", "serve"]
