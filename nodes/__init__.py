"""ComfyUI nodes (V3 schema). One module per capability; registration is in the package root."""

from ..svdiff.comfy.folders import register_model_folder
from .custom_diffusion import NODES as CUSTOM_DIFFUSION_NODES
from .demo import NODES as DEMO_NODES
from .editing import NODES as EDITING_NODES
from .multisubject import NODES as MULTISUBJECT_NODES
from .patching import NODES as PATCHING_NODES
from .training import NODES as TRAINING_NODES

ALL_NODES = [*PATCHING_NODES, *TRAINING_NODES, *MULTISUBJECT_NODES, *EDITING_NODES, *CUSTOM_DIFFUSION_NODES, *DEMO_NODES]

__all__ = ["ALL_NODES", "register_model_folder"]
