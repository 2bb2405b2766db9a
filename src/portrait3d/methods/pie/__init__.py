"""PIE (Tewari et al., "PIE: Portrait Image Embedding for Semantic Control", SIGGRAPH Asia 2020).

* :mod:`.face_model`: the face rig (linear geometry, reflectance, SH light, pose) rendered differentiably.
* :mod:`.build`: fits the rig to MediaPipe meshes of real photos (rigid pose, identity / expression, albedo).
"""
