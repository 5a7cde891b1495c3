"""Network files, query files and query inputs (expand_and_cluster.io.files)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from expand_and_cluster.errors import InputError
from expand_and_cluster.io.files import (
    atomic_write,
    load_network,
    load_probe_inputs,
    load_queries,
    save_network,
    save_queries,
    write_json_atomic,
)
from expand_and_cluster.network import Network
from expand_and_cluster.teachers import planted_teacher
from tests.testing import networks_equal


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
    assert loaded.activation == "tanh" and networks_equal(net, loaded)


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
    assert networks_equal(net, loaded)
    assert loaded.input_mask.dtype == bool
    x = rng.standard_normal((7, 3))
    np.testing.assert_array_equal(net.forward(x), loaded.forward(x))


def test_save_network_is_atomic_and_overwrites(tmp_path, net):
    path = tmp_path / "t.npz"
    save_network(planted_teacher(2, [2], 1, "relu", seed=0), path)
    save_network(net, path)
    assert networks_equal(load_network(path), net)
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


def _only_file(tmp_path, name: str) -> bool:
    return [p.name for p in tmp_path.iterdir()] == [name]


def test_write_json_converts_numpy_and_non_finite(tmp_path):
    obj = {
        "a": np.float32(1.5),
        "b": np.int64(3),
        "c": np.array([[1.0, np.nan], [np.inf, -2.0]]),
        "d": (np.bool_(True), None, "s"),
        "e": float("nan"),
        3: [np.float64(-np.inf)],
    }
    path = write_json_atomic(tmp_path / "report.json", obj)
    text = path.read_text()
    assert text.endswith("\n") and "NaN" not in text and "Infinity" not in text
    assert json.loads(text) == {
        "a": 1.5,
        "b": 3,
        "c": [[1.0, None], [None, -2.0]],
        "d": [True, None, "s"],
        "e": None,
        "3": [None],
    }
    assert _only_file(tmp_path, "report.json")


def test_write_json_rejects_unknown_objects_and_keeps_old_file(tmp_path):
    path = write_json_atomic(tmp_path / "r.json", {"ok": 1})
    with pytest.raises(TypeError, match="object"):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text()) == {"ok": 1}
    assert _only_file(tmp_path, "r.json")


def test_atomic_write_failure_leaves_nothing(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(path) as f:
        f.write(b"new, partial")
        raise RuntimeError("interrupted")
    assert path.read_bytes() == b"old" and _only_file(tmp_path, "f.bin")
