"""The W_tri encoder (Oh & Jo): an iterative encoder into EG3D with per-plane codes (issue 16).

* :mod:`.encoder`: the ReStyle-style encoder with a backbone head and a pSp pyramid head.
"""
