"""Reading and writing generator checkpoints: NVIDIA pickles, rosinality ``.pt``, our safetensors."""

from portrait3d.checkpoints.load import BUILTIN_NETWORKS, load_network
from portrait3d.checkpoints.native import save_network
from portrait3d.checkpoints.safe_pickle import CheckpointError, UnsafeCheckpointError

__all__ = ["load_network", "save_network", "CheckpointError", "UnsafeCheckpointError", "BUILTIN_NETWORKS"]
