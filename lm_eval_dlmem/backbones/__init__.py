"""Own implementations of the LLaDA, Dream and LLaDA-MoE backbones (no remote code)."""

from .loading import Backbone, detect_family, load_backbone
from .spec import FAMILIES, FamilySpec, get_spec

__all__ = ["Backbone", "FAMILIES", "FamilySpec", "detect_family", "get_spec", "load_backbone"]
