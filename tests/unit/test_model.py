"""TD-CNN: shape, receptive field, causality, window equality."""
import numpy as np
import pytest
import torch

from training.model import TDCNN, TDCNNConfig, predict_ragged

torch.set_num_threads(1)


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    m = TDCNN(**kw)
    # non-trivial BatchNorm statistics, then eval mode
    m.train()
    with torch.no_grad():
        m(torch.randn(4, 200, 3))
    return m.eval()


def test_shapes_and_receptive_field():
    m = _model()
    assert m(torch.randn(2, 50, 3)).shape == (2, 50, 2)
    assert m.receptive_field == 97
    assert TDCNN(dilations=(1, 1, 1)).receptive_field == 19
    assert TDCNN(**TDCNNConfig().kwargs()).config == TDCNNConfig()
    with pytest.raises(ValueError):
        TDCNN(dilations=(1, 2))


def test_causality_future_points_do_not_change_the_past():
    m = _model()
    x = torch.randn(1, 300, 3)
    y = x.clone()
    n = 150
    y[:, n:] = torch.randn(1, 300 - n, 3) * 5
    with torch.no_grad():
        a, b = m(x), m(y)
    assert torch.equal(a[:, :n], b[:, :n])
    assert not torch.allclose(a[:, n:], b[:, n:])


def test_last_receptive_field_window_equals_full_run():
    m = _model()
    r = m.receptive_field
    x = torch.randn(3, 400, 3)
    with torch.no_grad():
        full = m(x)
        for pos in (r - 1, 200, 399):
            win = m(x[:, pos - r + 1:pos + 1])
            torch.testing.assert_close(win[:, -1], full[:, pos], atol=1e-5, rtol=0)


def test_predict_ragged_matches_single_runs():
    m = _model()
    rng = np.random.default_rng(0)
    curves = [rng.normal(size=(n, 3)).astype(np.float32) for n in (5, 120, 33)]
    out = predict_ragged(m, curves, batch_size=2)
    for c, p in zip(curves, out):
        with torch.no_grad():
            ref = torch.softmax(m(torch.from_numpy(c)[None]), -1)[0, :, 1].numpy()
        np.testing.assert_allclose(p, ref, atol=1e-6)


@pytest.mark.parametrize("t,n_last", [(97, 1), (101, 5), (40, 1), (300, 3)])
def test_forward_last_equals_full_run(t, n_last):
    m = _model()
    x = torch.randn(4, t, 3)
    with torch.no_grad():
        torch.testing.assert_close(m.forward_last(x, n_last), m(x)[:, -n_last:], atol=1e-5, rtol=0)
    plan = m._cone_plan(97, 1, "cpu")
    assert [len(p) for p, _ in plan] == [97, 23, 5, 1]
