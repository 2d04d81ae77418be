"""Teachers from diffusers pipelines (base.py), one short adapter per pipeline family (adapter.py; sd.py, flux.py,
qwenimage.py, wan.py), and files of precomputed prompt embeddings (conditions.py). docs/pipelines.md says which
families are supported and how to add one."""
from .adapter import FAMILIES, FamilyError, PipelineNet
from .base import (SUPPORTED, PipelineTeacher, latents_state, pipeline_latents, pipeline_teacher, read_conditions,
                   verify_checksums)
from .conditions import encode_conditions, load_conditions

__all__ = ["FAMILIES", "FamilyError", "PipelineNet", "SUPPORTED", "PipelineTeacher", "pipeline_teacher",
           "read_conditions", "verify_checksums", "pipeline_latents", "latents_state", "encode_conditions", "load_conditions"]
