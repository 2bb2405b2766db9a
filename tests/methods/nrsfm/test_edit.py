"""Edits through φ: eq. 14 (linear), eq. 15 (gradient), transfer, edit specifications."""

from __future__ import annotations

import pytest
import torch

from portrait3d.methods.nrsfm.edit import EditSpec, edit_target, gradient_edit, linear_edit, parse_expr, transfer_target
from portrait3d.methods.nrsfm.regressor import ParamRegressor


class _Layout:
    """Stand-in for the model's parameter layout: [k, yaw, pitch, roll, a1, a2, tx, ty]."""

    num_basis = 2
    k, theta, alpha, t = slice(0, 1), slice(1, 4), slice(4, 6), slice(6, 8)
    size = 8


def _phi(seed: int = 0) -> ParamRegressor:
    torch.manual_seed(seed)
    phi = ParamRegressor(12, 8, hidden=32, layers=3)
    with torch.no_grad():
        phi.q_std.copy_(torch.tensor([0.05, 10.0, 5.0, 3.0, 0.02, 0.02, 0.01, 0.01]))
    return phi.eval()


def test_linear_edit_reaches_target_of_a_linear_map():
    phi = ParamRegressor(12, 8, hidden=8, layers=0)  # no hidden layer: φ is affine, eq. 14 is exact
    w = torch.randn(4, 12)
    q_star = phi(w).detach() + torch.randn(4, 8) * 0.1
    w1 = linear_edit(phi, w, q_star)
    assert torch.allclose(phi(w1), q_star, atol=1e-4)
    # Minimum-norm: the step lies in the row space of J (orthogonal to J's null space).
    jac = phi.net[0].weight  # [8, 12]
    null = torch.linalg.svd(jac, full_matrices=True).Vh[8:]
    assert (null @ (w1 - w).T).abs().max() < 1e-4


def test_linear_edit_iterations_converge_on_nonlinear_phi():
    phi = _phi()
    w = torch.randn(3, 12)
    q0 = phi(w).detach()
    q_star = edit_target(q0, EditSpec(yaw=5.0), _Layout, torch.ones(2))
    err1 = ((phi(linear_edit(phi, w, q_star, iterations=1)) - q_star) / phi.q_std).norm()
    err4 = ((phi(linear_edit(phi, w, q_star, iterations=4)) - q_star) / phi.q_std).norm()
    assert err4 < err1


def test_gradient_edit_reduces_parameter_loss_and_uses_image_terms():
    phi = _phi(1)
    w = torch.randn(2, 12)
    q_star = phi(w + 0.5 * torch.randn(2, 12)).detach()  # a reachable target
    calls = []

    def render(x):
        return x[:, None, :, None].expand(-1, 3, -1, 12)

    def id_loss(img):
        calls.append(img.shape)
        return (img - render(w)).square().mean((1, 2, 3))

    w1, hist = gradient_edit(phi, w, q_star, steps=60, lr=0.1, render=render, identity_loss=id_loss, lambda_id=0.01)
    assert hist[-1]["q"] < 0.2 * hist[0]["q"]
    assert "id" in hist[-1] and len(calls) == 60
    with pytest.raises(ValueError, match="render"):
        gradient_edit(phi, w, q_star, steps=1, identity_loss=id_loss)


def test_identity_term_keeps_latent_closer():
    phi = _phi(2)
    w = torch.randn(2, 12)
    q_star = edit_target(phi(w).detach(), EditSpec(yaw=20.0), _Layout, torch.ones(2))

    def render(x):
        return x[:, None, :, None].expand(-1, 3, -1, 12)

    def id_loss(img):
        return (img - render(w)).square().mean((1, 2, 3))

    free, _ = gradient_edit(phi, w, q_star, steps=80, lr=0.1)
    held, _ = gradient_edit(phi, w, q_star, steps=80, lr=0.1, render=render, identity_loss=id_loss, lambda_id=5.0)
    assert (held - w).norm() < (free - w).norm()


def test_edit_target_and_transfer():
    q0 = torch.zeros(1, 8)
    q = edit_target(q0, EditSpec(yaw=20, pitch=-5, roll=3, expr={2: 1.5}), _Layout, torch.tensor([0.1, 0.2]))
    assert q[0, 1:4].tolist() == [20.0, -5.0, 3.0]
    assert q[0, 5].item() == pytest.approx(0.3)
    assert q[0, 0] == 0 and q[0, 4] == 0 and (q[0, 6:] == 0).all()
    src = torch.arange(8.0)[None]
    tgt = -torch.ones(1, 8)
    pose = transfer_target(tgt, src, _Layout, "pose")
    assert pose[0, 1:4].tolist() == [1.0, 2.0, 3.0] and (pose[0, 4:6] == -1).all()
    expr = transfer_target(tgt, src, _Layout, "expression")
    assert expr[0, 4:6].tolist() == [4.0, 5.0] and (expr[0, 1:4] == -1).all()
    with pytest.raises(ValueError, match="transfer part"):
        transfer_target(tgt, src, _Layout, "hair")


@pytest.mark.parametrize("spec, msg", [
    (EditSpec(yaw=61), "yaw 61 is out of range"),
    (EditSpec(pitch=-50), "pitch -50 is out of range"),
    (EditSpec(roll=float("nan")), "roll nan is out of range"),
    (EditSpec(expr={3: 1.0}), "component 3 does not exist"),
    (EditSpec(expr={1: 9.0}), "out of range"),
])
def test_edit_spec_validation(spec, msg):
    with pytest.raises(ValueError, match=msg):
        spec.validate(num_basis=2)


def test_parse_expr():
    assert parse_expr(["1=2", "3=-1.5"]) == {1: 2.0, 3: -1.5}
    for bad in (["x=1"], ["1"], ["1=a"], ["1=1", "1=2"]):
        with pytest.raises(ValueError):
            parse_expr(bad)


def test_prior_factor_reproduces_the_covariance():
    from portrait3d.methods.nrsfm.edit import prior_factor

    gen = torch.Generator().manual_seed(0)
    a = torch.randn(6, 6, generator=gen)
    x = torch.randn(5000, 6, generator=gen) @ a.T + 3.0
    L = prior_factor(x)
    assert L.shape == (6, 6)
    assert torch.allclose(L @ L.T, torch.cov(x.T).float(), atol=1e-3)
    assert prior_factor(x, max_rank=2).shape == (6, 2)
    with pytest.raises(ValueError):
        prior_factor(x[:1])


def test_linear_edit_in_the_prior_metric_is_the_conditional_mean_step():
    """For an affine φ the prior-metric step is Σ Jᵀ (J Σ Jᵀ)⁻¹ r: the Gaussian conditional mean shift, which
    follows the latents' own direction of variation instead of the shortest Euclidean one."""
    phi = ParamRegressor(12, 8, hidden=8, layers=0)
    gen = torch.Generator().manual_seed(1)
    L = torch.randn(12, 5, generator=gen)                  # a low-rank prior: latents live in a 5-D subspace
    w = torch.randn(3, 12)
    q_star = phi(w).detach()
    q_star[:, 1] += 7.0
    rows = [1]
    w1 = linear_edit(phi, w, q_star, metric=L, rows=rows)
    assert torch.allclose(phi(w1)[:, 1], q_star[:, 1], atol=1e-3)
    J = (phi.net[0].weight * phi.q_std[:, None] / phi.latent_std)[rows]   # d q / d w, [1, 12]
    sigma = L @ L.T
    r = (q_star - phi(w).detach())[:, rows]
    expected = (sigma @ J.T @ torch.linalg.solve(J @ sigma @ J.T, r.T)).T
    assert torch.allclose(w1 - w, expected, atol=1e-3)
    # The step stays in the prior's subspace, unlike the Euclidean one.
    proj = L @ torch.linalg.pinv(L)
    assert torch.allclose((w1 - w) @ proj.T, w1 - w, atol=1e-4)
    w_e = linear_edit(phi, w, q_star, rows=rows)
    assert ((w_e - w) - (w_e - w) @ proj.T).norm() > 1e-2


def test_constrained_rows_policies():
    from portrait3d.methods.nrsfm.edit import constrained_rows

    q0 = torch.zeros(2, 8)
    yaw = q0.clone()
    yaw[:, 1] = 20.0
    expr = q0.clone()
    expr[0, 4] = 1.0
    assert constrained_rows(q0, yaw, _Layout, "all") == list(range(8))
    assert constrained_rows(q0, yaw, _Layout, "asked") == [1]
    assert constrained_rows(q0, yaw, _Layout, "auto") == [1]            # an angle is asked: only it is held
    assert constrained_rows(q0, expr, _Layout, "auto") == [1, 2, 3, 4]  # expression only: the head is held too
    assert constrained_rows(q0, expr, _Layout, "pose") == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="hold"):
        constrained_rows(q0, yaw, _Layout, "some")


def test_gradient_edit_in_the_prior_metric_stays_in_the_prior_subspace():
    phi = _phi(3)
    gen = torch.Generator().manual_seed(2)
    L = torch.randn(12, 4, generator=gen)
    w = torch.randn(2, 12)
    q_star = phi(w).detach()
    q_star[:, 1] += 5.0
    w1, hist = gradient_edit(phi, w, q_star, steps=200, lr=0.1, metric=L, rows=[1])
    assert hist[-1]["q"] < 0.1 * hist[0]["q"]
    proj = L @ torch.linalg.pinv(L)
    assert torch.allclose((w1 - w) @ proj.T, w1 - w, atol=1e-4)


def test_editor_metric_presets():
    """``metric='euclidean'`` is the paper's eq. 14 (every parameter held); ``'prior'`` steps in the latents'
    covariance and holds only what is asked."""
    from portrait3d.face.pose import mean_face_68
    from portrait3d.methods.nrsfm.edit import constrained_rows, prior_factor
    from portrait3d.methods.nrsfm.editor import NRSfMEditor
    from portrait3d.methods.nrsfm.model import RankOneModel

    mf = torch.tensor(mean_face_68(), dtype=torch.float32)
    model = RankOneModel((mf - mf.mean(0)).T.contiguous(), torch.randn(2, 3, 68) * 0.01)
    torch.manual_seed(0)
    phi = ParamRegressor(12, model.layout.size, hidden=16, layers=2).eval()
    L = prior_factor(torch.randn(300, 12) @ torch.randn(12, 12))
    editor = NRSfMEditor(model, phi, "w", torch.ones(2), latent_factor=L)
    w = torch.randn(3, 12)
    q = editor.target(w, EditSpec(yaw=10.0))
    paper, _ = editor.edit(None, w, q, "linear", metric="euclidean")
    assert torch.equal(paper, linear_edit(phi, w, q))
    ours, _ = editor.edit(None, w, q, "linear")
    with torch.no_grad():
        rows = constrained_rows(phi(w), q, model.layout, "auto")
    assert rows == [model.layout.theta.start]
    assert torch.equal(ours, linear_edit(phi, w, q, metric=L, rows=rows))
