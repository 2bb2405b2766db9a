"""PIE (Tewari et al., "PIE: Portrait Image Embedding for Semantic Control", SIGGRAPH Asia 2020).

Built so far (issue 15):

* :mod:`.face_model`: the face rig (linear geometry, reflectance, SH light, pose) rendered differentiably, in place
  of the Basel Face Model;
* :mod:`.build`: fits the rig to MediaPipe meshes of real photos (rigid pose, measured expression, identity PCA,
  albedo under SH light) -- the shipped ``face-rig``;
* :mod:`.estimator` and :mod:`.train`: the MoFA-style parameter estimator ``theta(I)`` and its training on photos;
* :mod:`.rignet`: StyleRig's RigNet per mode (pose, expression, light) and its self-supervised losses.

Still to come: RigNet training on a generator, the hierarchical W -> W+ embedding with PIE's energies
(eqs. 6-15) and the ``portrait3d pie`` command.
"""
