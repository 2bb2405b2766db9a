"""``edit_and_measure`` on the shipped ``default-2d`` and its NRSfM editor: the landmark feedback step."""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(scope="module")
def shipped():
    from portrait3d.checkpoints import load_network
    from portrait3d.methods.nrsfm.pipeline import latent_from_seed, resolve_editor

    torch.set_num_threads(1)
    G = load_network("default-2d").eval().requires_grad_(False)
    editor = resolve_editor("default-2d", None)
    return G, editor, latent_from_seed(G, editor, 3)


def test_feedback_corrects_the_asked_angle_by_the_landmarks_miss(shipped):
    from portrait3d.methods.nrsfm.edit import EditSpec
    from portrait3d.methods.nrsfm.pipeline import edit_and_measure

    G, editor, w = shipped
    spec = EditSpec(yaw=20.0)  # a change of the face's own yaw
    q = editor.target(w, spec)
    rep = edit_and_measure(G, editor, w, q, "linear", 0, 0.0, "template", feedback=2,
                           spec=spec)
    yaw = editor.layout.theta.start
    assert rep.target == q[0].tolist()  # the record keeps what was asked
    tries = rep.feedback
    assert tries is not None and 2 <= len(tries) <= 3 and all(t["miss_deg"] is not None for t in tries[:-1])
    # Each further edit asks for the previous target plus what the previous edit missed.
    for a, b in zip(tries, tries[1:]):
        assert b["target_angles_deg"][0] == pytest.approx(a["target_angles_deg"][0] + a["miss_deg"]["yaw"], abs=1e-3)
    kept = [t for t in tries if t["kept"]]
    assert len(kept) == 1
    scored = [t for t in tries if t["miss_deg"] is not None]
    assert abs(kept[0]["miss_deg"]["yaw"]) == min(abs(t["miss_deg"]["yaw"]) for t in scored)
    # The miss is eq. 11's fit to the landmarks of the kept edit against the asked change.
    assert kept[0]["miss_deg"]["yaw"] == pytest.approx(20.0 - (rep.fit_after[yaw] - rep.fit_before[yaw]), abs=1e-3)


def test_no_feedback_is_one_edit_without_a_record(shipped):
    from portrait3d.methods.nrsfm.edit import EditSpec
    from portrait3d.methods.nrsfm.pipeline import edit_and_measure

    G, editor, w = shipped
    spec = EditSpec(yaw=20.0)
    q = editor.target(w, spec)
    rep = edit_and_measure(G, editor, w, q, "linear", 0, 0.0, "template")
    assert rep.feedback is None and "feedback_edits" not in rep.record()
    want = editor.edit(G, w, q, "linear")[0]
    assert torch.allclose(rep.latent_after, want)
