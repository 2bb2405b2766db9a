"""W / W+ optimisation projector (StyleGAN2 GAN inversion with perceptual and identity losses), and pivotal tuning
of the generator around its result (PTI, Roich et al.)."""

from portrait3d.methods.projector.photo import PhotoLatent, project_photo
from portrait3d.methods.projector.projector import (
    SPACES,
    ProjectionResult,
    ProjectorConfig,
    compute_w_stats,
    noise_buffer_names,
    project,
    resize_target,
    synthesize,
)
from portrait3d.methods.projector.pti import PivotalTuningConfig, PivotalTuningResult, pivotal_tuning

__all__ = ["PhotoLatent", "project_photo", "SPACES", "ProjectionResult", "ProjectorConfig", "compute_w_stats",
           "noise_buffer_names", "project", "resize_target", "synthesize", "PivotalTuningConfig", "PivotalTuningResult",
           "pivotal_tuning"]
