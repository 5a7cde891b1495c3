"""Teacher and query files, probing, augmentation, demo teachers (expand_and_cluster.teacher)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from expand_and_cluster.errors import InputError
from expand_and_cluster.network import Network
from expand_and_cluster.teacher import (
    biased_noise_augmentation,
    load_network,
    load_probe_inputs,
    load_queries,
    planted_teacher,
    probe,
    save_network,
    save_queries,
    train_digits_teacher,
)


def _arrays_equal(a: Network, b: Network) -> bool:
    da, db = a.to_arrays(), b.to_arrays()
    return da.keys() == db.keys() and all(
        da[k].dtype == db[k].dtype and np.array_equal(da[k], db[k]) for k in da
    )


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


@pytest.fixture
def net() -> Network:
    return planted_teacher(4, [5, 3], 2, "tanh", seed=1)


@pytest.fixture
def net_file(tmp_path, net):
    return save_network(net, tmp_path / "teacher.npz")


# ------------------------------------------------------------------------------------------------
# network files
# ------------------------------------------------------------------------------------------------


def test_network_npz_round_trip_is_exact(tmp_path, net):
    loaded = load_network(save_network(net, tmp_path / "t.npz"))
    assert loaded.activation == "tanh" and _arrays_equal(net, loaded)


def test_network_round_trip_with_linear_term_and_mask(tmp_path):
    base = planted_teacher(3, [4], 2, "softplus", seed=2)
    rng = np.random.default_rng(0)
    net = Network(
        base.weights,
        base.biases,
        "softplus",
        linear_weight=rng.standard_normal((2, 3)),
        linear_bias=rng.standard_normal(2),
        input_mask=np.array([True, False, True]),
    )
    loaded = load_network(save_network(net, tmp_path / "r.npz"))
    assert _arrays_equal(net, loaded)
    assert loaded.input_mask.dtype == bool
    x = rng.standard_normal((7, 3))
    np.testing.assert_array_equal(net.forward(x), loaded.forward(x))


def test_save_network_is_atomic_and_overwrites(tmp_path, net):
    path = tmp_path / "t.npz"
    save_network(planted_teacher(2, [2], 1, "relu", seed=0), path)
    save_network(net, path)
    assert _arrays_equal(load_network(path), net)
    assert [p.name for p in tmp_path.iterdir()] == ["t.npz"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_state_dict_round_trip(tmp_path, dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Linear(4, 6),
        torch.nn.Tanh(),
        torch.nn.Linear(6, 5),
        torch.nn.Tanh(),
        torch.nn.Linear(5, 3),
    ).to(dtype)
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    net = load_network(path, activation="tanh")
    assert net.hidden_sizes == [6, 5] and (net.d_in, net.d_out) == (4, 3)
    assert all(w.dtype == np.float64 for w in net.weights)
    x = torch.randn(9, 4, dtype=dtype)
    with torch.no_grad():
        expected = model(x).double().numpy()
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    np.testing.assert_allclose(net.forward(x.double().numpy()), expected, rtol=tol, atol=tol)


def test_state_dict_with_prefix_and_no_bias(tmp_path):
    state = {
        "net.0.weight": torch.ones(3, 2),
        "net.2.weight": torch.ones(1, 3),
        "net.2.bias": torch.zeros(1),
    }
    torch.save(state, tmp_path / "m.pth")
    net = load_network(tmp_path / "m.pth", activation="relu")
    np.testing.assert_array_equal(net.biases[0], np.zeros(3))


def test_state_dict_needs_activation(tmp_path):
    torch.save(torch.nn.Linear(2, 1).state_dict(), tmp_path / "m.pt")
    with pytest.raises(InputError, match="m.pt.*activation"):
        load_network(tmp_path / "m.pt")


def test_state_dict_errors(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(InputError, match="junk.pt: not a loadable torch state_dict"):
        load_network(tmp_path / "junk.pt", activation="tanh")
    torch.save({"0.weight": torch.ones(2, 2), "1.running_mean": torch.ones(2)}, tmp_path / "b.pt")
    with pytest.raises(InputError, match="unexpected key.*1.running_mean"):
        load_network(tmp_path / "b.pt", activation="tanh")
    torch.save({"0.weight": torch.ones(3, 2), "2.weight": torch.ones(1, 4)}, tmp_path / "s.pt")
    with pytest.raises(InputError, match="2.weight has 4 inputs but 0.weight has 3 outputs"):
        load_network(tmp_path / "s.pt", activation="tanh")
    torch.save({}, tmp_path / "e.pt")
    with pytest.raises(InputError, match="e.pt: empty state_dict"):
        load_network(tmp_path / "e.pt", activation="tanh")
    torch.save({"a.0.weight": torch.ones(1, 1), "b.1.weight": torch.ones(1, 1)}, tmp_path / "p.pt")
    with pytest.raises(InputError, match="keys of several modules"):
        load_network(tmp_path / "p.pt", activation="tanh")


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="nope.npz: no such file"):
        load_network(tmp_path / "nope.npz")


def test_not_an_npz(tmp_path):
    (tmp_path / "bad.npz").write_text("hello")
    with pytest.raises(InputError, match="bad.npz: not a readable .npz"):
        load_network(tmp_path / "bad.npz")
    np.save(tmp_path / "arr.npy", np.ones(3))
    (tmp_path / "arr.npy").rename(tmp_path / "arr.npz")
    with pytest.raises(InputError, match="arr.npz: not an .npz archive"):
        load_network(tmp_path / "arr.npz")


def test_unknown_suffix(tmp_path):
    (tmp_path / "t.txt").write_text("x")
    with pytest.raises(InputError, match="unknown network file type '.txt'"):
        load_network(tmp_path / "t.txt")


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        ("bias_1", "missing key.*bias_1"),
        ("weight_1", "missing key.*weight_1"),
        ("weight_0", "missing key.*weight_0"),
        ("activation", "missing key activation"),
    ],
)
def test_missing_keys(tmp_path, net, drop, message):
    arrays = {k: v for k, v in net.to_arrays().items() if k != drop}
    if drop == "weight_0":
        arrays = {k: v for k, v in arrays.items() if not k.startswith("weight")}
    path = _write_npz(tmp_path / "t.npz", **arrays)
    with pytest.raises(InputError, match=message):
        load_network(path)


def test_missing_activation_can_be_given(tmp_path, net):
    arrays = {k: v for k, v in net.to_arrays().items() if k != "activation"}
    loaded = load_network(_write_npz(tmp_path / "t.npz", **arrays), activation="tanh")
    assert loaded.activation == "tanh"


def test_activation_argument_must_agree(net_file):
    assert load_network(net_file, activation="tanh").activation == "tanh"
    with pytest.raises(InputError, match="activation is 'tanh' but 'relu' was given"):
        load_network(net_file, activation="relu")


def test_unknown_activation(tmp_path, net, net_file):
    arrays = net.to_arrays()
    arrays["activation"] = np.array("swish9")
    path = _write_npz(tmp_path / "u.npz", **arrays)
    with pytest.raises(InputError, match="unknown activation 'swish9'.*relu.*tanh"):
        load_network(path)
    with pytest.raises(InputError, match="unknown activation 'bogus'"):
        load_network(net_file, activation="bogus")


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_weights(tmp_path, net, value):
    arrays = net.to_arrays()
    arrays["weight_1"] = arrays["weight_1"].copy()
    arrays["weight_1"][0, 0] = value
    with pytest.raises(InputError, match="weight_1 has 1 NaN/Inf"):
        load_network(_write_npz(tmp_path / "t.npz", **arrays))


def test_shape_mismatch(tmp_path, net):
    arrays = net.to_arrays()
    arrays["weight_1"] = np.ones((3, 4))
    with pytest.raises(InputError, match="weight_1 has 4 inputs but weight_0 has 5 outputs"):
        load_network(_write_npz(tmp_path / "t.npz", **arrays))
    arrays = net.to_arrays()
    arrays["bias_0"] = np.ones(2)
    with pytest.raises(InputError, match="bias_0 must have shape"):
        load_network(_write_npz(tmp_path / "t.npz", **arrays))
    arrays = net.to_arrays()
    arrays["input_mask"] = np.ones(3, dtype=bool)
    with pytest.raises(InputError, match="input_mask must have shape"):
        load_network(_write_npz(tmp_path / "t.npz", **arrays))


def test_half_a_linear_term(tmp_path, net):
    arrays = net.to_arrays()
    arrays["linear_weight"] = np.zeros((2, 4))
    with pytest.raises(InputError, match="missing key linear_bias"):
        load_network(_write_npz(tmp_path / "t.npz", **arrays))


# ------------------------------------------------------------------------------------------------
# query files
# ------------------------------------------------------------------------------------------------


def test_queries_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((10, 3)), rng.standard_normal((10, 2))
    x2, y2 = load_queries(save_queries(tmp_path / "q.npz", x, y))
    np.testing.assert_array_equal(x, x2)
    np.testing.assert_array_equal(y, y2)
    assert x2.dtype == y2.dtype == np.float64


def test_queries_1d_y_and_float32(tmp_path):
    x = np.ones((4, 2), dtype=np.float32)
    path = _write_npz(tmp_path / "q.npz", X=x, Y=np.arange(4, dtype=np.float32))
    x2, y2 = load_queries(path)
    assert y2.shape == (4, 1) and x2.dtype == np.float64


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"X": np.ones((3, 2))}, "missing key.*Y"),
        ({"Y": np.ones((3, 1))}, "missing key.*X"),
        ({"X": np.ones(3), "Y": np.ones(3)}, "X must be 2-D"),
        ({"X": np.ones((3, 2)), "Y": np.ones((3, 1, 1))}, "Y must be 2-D"),
        ({"X": np.ones((3, 2)), "Y": np.ones((4, 1))}, "X has 3 rows but Y has 4"),
        ({"X": np.ones((1, 2)), "Y": np.ones((1, 1))}, "1 queries; at least 2"),
        ({"X": np.array([["a", "b"], ["c", "d"]]), "Y": np.ones(2)}, "X has non-numeric"),
    ],
)
def test_query_errors(tmp_path, arrays, message):
    with pytest.raises(InputError, match=message):
        load_queries(_write_npz(tmp_path / "q.npz", **arrays))


def test_query_non_finite_rows_counted(tmp_path):
    x = np.ones((5, 2))
    x[1, 0] = x[1, 1] = np.nan
    x[3, 1] = np.inf
    with pytest.raises(InputError, match="X has NaN or Inf values in 2 of 5 rows"):
        load_queries(_write_npz(tmp_path / "q.npz", X=x, Y=np.ones((5, 1))))
    y = np.ones(5)
    y[0] = np.nan
    with pytest.raises(InputError, match="Y has NaN or Inf values in 1 of 5 rows"):
        load_queries(_write_npz(tmp_path / "q.npz", X=np.ones((5, 2)), Y=y))


def test_query_file_missing_or_bad(tmp_path):
    with pytest.raises(InputError, match="q.npz: no such file"):
        load_queries(tmp_path / "q.npz")
    (tmp_path / "q.npz").write_bytes(b"\x00" * 10)
    with pytest.raises(InputError, match="q.npz: not a readable .npz"):
        load_queries(tmp_path / "q.npz")


# ------------------------------------------------------------------------------------------------
# probing and augmentation
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("distribution", ["gaussian", "uniform"])
def test_probe_shapes_determinism_and_variance(net, distribution):
    x, y = probe(net, 50, distribution, seed=3)
    assert x.shape == (50, 4) and y.shape == (50, 2) and x.dtype == y.dtype == np.float64
    np.testing.assert_array_equal(y, net.forward(x))
    x2, _ = probe(net, 50, distribution, seed=3)
    np.testing.assert_array_equal(x, x2)
    assert not np.array_equal(x, probe(net, 50, distribution, seed=4)[0])
    big, _ = probe(net, 100_000, distribution, seed=0)
    np.testing.assert_allclose(big.mean(axis=0), 0.0, atol=0.02)
    np.testing.assert_allclose(big.var(axis=0), 1.0, atol=0.03)
    if distribution == "uniform":
        assert np.abs(big).max() <= np.sqrt(3.0)


def test_probe_given_inputs_and_errors(net):
    inputs = np.arange(12.0).reshape(3, 4)
    x, y = probe(net, 0, inputs=inputs)
    np.testing.assert_array_equal(x, inputs)
    assert y.shape == (3, 2)
    with pytest.raises(InputError, match=r"inputs: expected shape \[P, 4\]"):
        probe(net, 0, inputs=np.ones((3, 5)))
    with pytest.raises(InputError, match="unknown 'cauchy'"):
        probe(net, 10, "cauchy")
    with pytest.raises(InputError, match="number of queries"):
        probe(net, 0)


def test_load_probe_inputs(tmp_path):
    np.save(tmp_path / "x.npy", np.ones((5, 4), dtype=np.float32))
    x = load_probe_inputs(tmp_path / "x.npy", d_in=4)
    assert x.shape == (5, 4) and x.dtype == np.float64
    with pytest.raises(InputError, match="dimension 4, the teacher expects 3"):
        load_probe_inputs(tmp_path / "x.npy", d_in=3)
    bad = np.ones((5, 4))
    bad[2, 2] = np.nan
    np.save(tmp_path / "n.npy", bad)
    with pytest.raises(InputError, match="NaN or Inf values in 1 of 5 rows"):
        load_probe_inputs(tmp_path / "n.npy")
    np.save(tmp_path / "c.npy", np.ones((2, 2, 2)))
    with pytest.raises(InputError, match=r"expected inputs \[P, d_in\]"):
        load_probe_inputs(tmp_path / "c.npy")
    (tmp_path / "t.npy").write_text("text")
    with pytest.raises(InputError, match="not a readable .npy"):
        load_probe_inputs(tmp_path / "t.npy")


def test_biased_noise_augmentation():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((100, 3))
    aug = biased_noise_augmentation(x, np.random.default_rng(1), scale=0.5)
    assert aug.shape == (300, 3)
    np.testing.assert_array_equal(aug[:100], x)
    up, down = aug[100:200] - x, aug[200:] - x
    assert up.min() >= 0.0 and up.max() <= 0.5 and up.mean() == pytest.approx(0.25, abs=0.03)
    assert down.max() <= 0.0 and down.min() >= -0.5
    assert down.mean() == pytest.approx(-0.25, abs=0.03)
    again = biased_noise_augmentation(x, np.random.default_rng(1), scale=0.5)
    np.testing.assert_array_equal(aug, again)


# ------------------------------------------------------------------------------------------------
# demo and test teachers
# ------------------------------------------------------------------------------------------------


def _min_angle_degrees(v: np.ndarray, sign_symmetric: bool) -> float:
    u = v / np.linalg.norm(v, axis=1, keepdims=True)
    cos = u @ u.T
    cos = np.abs(cos) if sign_symmetric else cos
    np.fill_diagonal(cos, -1.0)
    return float(np.degrees(np.arccos(np.clip(cos.max(), -1.0, 1.0))))


def test_planted_teacher_is_deterministic():
    a = planted_teacher(6, [8, 5], 2, "sigmoid", seed=7, min_angle_degrees=20)
    b = planted_teacher(6, [8, 5], 2, "sigmoid", seed=7, min_angle_degrees=20)
    c = planted_teacher(6, [8, 5], 2, "sigmoid", seed=8, min_angle_degrees=20)
    assert _arrays_equal(a, b) and not _arrays_equal(a, c)
    assert a.hidden_sizes == [8, 5] and (a.d_in, a.d_out) == (6, 2)


@pytest.mark.parametrize(("activation", "angle"), [("tanh", 45.0), ("g", 60.0)])
def test_planted_teacher_angles_and_output_weights(activation, angle):
    net = planted_teacher(3, [12, 6], 3, activation, seed=0, min_angle_degrees=angle)
    sign_symmetric = activation != "g"
    for layer in range(2):
        assert _min_angle_degrees(net.incoming(layer), sign_symmetric) >= angle
    assert np.abs(net.weights[-1]).min() >= 0.3 / np.sqrt(6)


def test_planted_teacher_impossible_angle():
    with pytest.raises(InputError, match="cannot place 10 neurons"):
        planted_teacher(1, [10], 1, "tanh", seed=0, min_angle_degrees=80)
    with pytest.raises(InputError, match="min_angle_degrees"):
        planted_teacher(1, [10], 1, "tanh", seed=0, min_angle_degrees=95)


def test_train_digits_teacher():
    net, x, info = train_digits_teacher(width=10, seed=0, epochs=40)
    assert net.hidden_sizes == [10] and (net.d_in, net.d_out) == (64, 10)
    assert net.activation == "tanh" and all(w.dtype == np.float64 for w in net.weights)
    assert x.shape == (1797, 64) and x.min() >= 0.0 and x.max() <= 1.0
    assert info["test_accuracy"] > 0.8 and info["n_test"] + info["n_train"] == 1797
    again, _, info2 = train_digits_teacher(width=10, seed=0, epochs=40)
    assert _arrays_equal(net, again) and info == info2
