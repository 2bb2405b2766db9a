"""``portrait3d web``: a browser portrait editor (gradio), served on localhost.

* :mod:`.methods`: the method adapters (3D inversion, NRSfM, LiftedGAN) behind one interface; no gradio.
* :mod:`.upload`: checks on uploaded photos; no gradio.
* :mod:`.app`: the page and its event handlers (imports gradio, with its analytics switched off).

``app`` is not imported here: importing gradio takes seconds, and the adapters and upload checks are
useful (and tested) without it.
"""

from portrait3d.interfaces.web.methods import (
                                               ADAPTERS,
                                               Availability,
                                               Control,
                                               Embedding,
                                               MethodAdapter,
                                               MethodSettings,
                                               build_registry,
)
from portrait3d.interfaces.web.upload import ACCEPTED_FORMATS, UploadLimits, decode_upload

__all__ = ["ACCEPTED_FORMATS", "ADAPTERS", "Availability", "Control", "Embedding", "MethodAdapter", "MethodSettings",
           "UploadLimits", "build_registry", "decode_upload"]
