"""Tests of the clustering step (Martinelli et al. 2024, Sec. 3, step "Cluster").

Students are built from a planted teacher layer: each student holds every teacher neuron (with a
random sign flip for sign-symmetric classes and a random positive scale for relu), one teacher
neuron split into two copies whose outgoing weights sum to the teacher's, and junk neurons (random
directions, small outgoing weights). Student n's incoming vectors carry Gaussian noise of scale
sigma_n = 1e-6 * 10^U(-1, 1), and its loss is sigma_n: as with trained students, some are closer to
the teacher than others. (With the same noise scale in every student, gamma = 0.5 is fragile: a
cluster of ~N members can split into two halves of >= N/2 members at the noise scale, which the
"maximum number of big clusters" rule then counts as two; see
test_iid_noise_needs_gamma_above_half.)
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from scipy.spatial.distance import pdist, squareform

from expand_and_cluster.activations import SymmetryClass, get_activation
from expand_and_cluster.config import ClusterConfig
from expand_and_cluster.errors import InputError, NoClusterError
from expand_and_cluster.pipeline.cluster import cluster_layer, min_cluster_size
from expand_and_cluster.pipeline.cut import cut_tree
from expand_and_cluster.pipeline.stages import input_mask_from_queries

ALL_ACTIVATIONS = [
    "g",
    "identity",
    "tanh",
    "sigmoid",
    "softplus",
    "gelu",
    "silu",
    "relu",
    "leaky_relu",
]


# ----------------------------------------------------------------------------------------------
# planted students


class Planted:
    """A planted teacher layer and N students that contain it (see the module docstring)."""

    def __init__(
        self,
        activation: str,
        k: int = 4,
        fan_in: int = 10,
        d_next: int = 3,
        n_students: int = 10,
        n_junk: int = 1,
        noise: float = 1e-6,
        noise_decades: float = 1.0,
        seed: int = 0,
    ):
        rng = np.random.default_rng(seed)
        sym = get_activation(activation).symmetry
        dim = fan_in + 1
        # Orthogonal teacher rows: any two teacher neurons are at 1 - |cos| = 1.
        q = np.linalg.qr(rng.standard_normal((dim, k)))[0].T
        self.teacher = q * rng.uniform(0.5, 2.0, size=(k, 1))  # [k, dim]
        self.teacher_out = rng.standard_normal((d_next, k))  # [d_next, k]
        self.k, self.fan_in, self.d_next, self.n_students = k, fan_in, d_next, n_students
        self.width = k + 1 + n_junk
        self.incoming = np.empty((n_students, self.width, dim))
        self.outgoing = np.empty((n_students, d_next, self.width))
        self.is_junk = np.zeros((n_students, self.width), dtype=bool)
        self.student_noise = noise * 10.0 ** rng.uniform(-noise_decades, noise_decades, n_students)
        for n in range(n_students):
            split = rng.integers(k)
            neurons = []  # (teacher index or -1, fraction of the outgoing weight)
            for j in range(k):
                if j == split:
                    f = rng.uniform(0.2, 0.8)
                    neurons += [(j, f), (j, 1.0 - f)]
                else:
                    neurons.append((j, 1.0))
            neurons += [(-1, 0.0)] * n_junk
            for i in rng.permutation(self.width):
                j, frac = neurons.pop()
                if j < 0:  # junk
                    self.is_junk[n, i] = True
                    self.incoming[n, i] = rng.standard_normal(dim)
                    self.outgoing[n, :, i] = 0.01 * rng.standard_normal(d_next)
                    continue
                sign = rng.choice([-1.0, 1.0]) if sym.sign_symmetric else 1.0
                scale = rng.uniform(0.3, 3.0) if sym.scale_symmetric else 1.0
                self.incoming[n, i] = sign * scale * self.teacher[j]
                self.incoming[n, i] += self.student_noise[n] * rng.standard_normal(dim)
                a = frac * self.teacher_out[:, j] / scale
                if sym in (SymmetryClass.ODD, SymmetryClass.ODD_CONSTANT):
                    a = sign * a  # the student computes the teacher's output (up to a constant)
                self.outgoing[n, :, i] = a
        self.losses = self.student_noise.copy()

    def expected(self, activation: str):
        """Canonical teacher incoming vectors [k, dim] and their outgoing weights [k, d_next]."""
        sym = get_activation(activation).symmetry
        t = self.teacher.copy()
        out = self.teacher_out.T.copy()
        if sym.scale_symmetric:
            norms = np.linalg.norm(t, axis=1, keepdims=True)
            t /= norms
            out *= norms
        if sym.sign_symmetric:
            sign = np.sign(t[np.arange(self.k), np.argmax(np.abs(t), axis=1)])[:, None]
            t *= sign
            if sym in (SymmetryClass.ODD, SymmetryClass.ODD_CONSTANT):
                out *= sign
        return t, out


def _match(recovered: np.ndarray, teacher: np.ndarray, absolute: bool) -> np.ndarray:
    """For each recovered row, the index of the closest teacher row (cosine)."""
    r = recovered / np.linalg.norm(recovered, axis=1, keepdims=True)
    t = teacher / np.linalg.norm(teacher, axis=1, keepdims=True)
    cos = r @ t.T
    return np.argmax(np.abs(cos) if absolute else cos, axis=1)


def _layer_output(incoming, outgoing, act, x):
    """sum_i a_i s(v_i . [x; 1]): incoming [k, dim], outgoing [d_next, k], x [B, fan_in]."""
    x1 = np.hstack([x, np.ones((x.shape[0], 1))])
    h = act.fn(torch.from_numpy(x1 @ incoming.T)).numpy()
    return h @ outgoing.T


# ----------------------------------------------------------------------------------------------
# recovery per symmetry class


@pytest.mark.parametrize("name", ALL_ACTIVATIONS)
def test_recovers_planted_layer(name):
    p = Planted(name)
    res = cluster_layer(p.incoming, p.outgoing, p.losses, name)
    sym = get_activation(name).symmetry
    assert res.k_hat == p.k
    teacher, teacher_out = p.expected(name)
    idx = _match(res.incoming, teacher, sym.sign_symmetric)
    assert sorted(idx) == list(range(p.k))
    # Directions: the best student's noise (< 1e-5) gives 1 - |cos| < 1e-9.
    r = res.incoming / np.linalg.norm(res.incoming, axis=1, keepdims=True)
    t = teacher[idx] / np.linalg.norm(teacher[idx], axis=1, keepdims=True)
    assert np.all(1.0 - np.abs(np.sum(r * t, axis=1)) < 1e-8)
    # Canonical form, sign included (and unit norm for relu): equal up to the noise.
    np.testing.assert_allclose(res.incoming, teacher[idx], atol=1e-5)
    # Summed outgoing weights of duplicates equal the teacher's, after the sign/scale convention.
    np.testing.assert_allclose(res.outgoing, teacher_out[idx], atol=1e-5)
    # Every student holds every teacher neuron: the best student is the lowest-loss one.
    assert np.all(res.best_student == np.argmin(p.losses))
    # Each cluster: one member per student plus the split duplicate in some students.
    assert res.sizes.sum() == p.n_students * (p.k + 1)
    assert np.all(np.diff(res.sizes) <= 0)
    assert np.all(res.median_angle_degrees < 1e-3)
    # Junk neurons are not absorbed.
    assert np.all(res.labels.reshape(p.n_students, p.width)[p.is_junk] == -1)
    accounted = res.sizes.sum() + sum(d.size for d in res.dropped) + res.n_dropped_singletons
    assert accounted == p.n_students * p.width


@pytest.mark.parametrize("name", ALL_ACTIVATIONS)
def test_collapse_preserves_each_students_function(name):
    """Each student's contribution of its clustered neurons is unchanged when its neurons are
    replaced by the collapsed ones, with its summed outgoing weights, bias shift and linear term.
    """
    p = Planted(name, seed=1)
    act = get_activation(name)
    res = cluster_layer(p.incoming, p.outgoing, p.losses, name)
    x = np.random.default_rng(2).standard_normal((50, p.fan_in))
    sym = act.symmetry
    if sym is SymmetryClass.ODD_CONSTANT:
        assert np.abs(res.next_bias_shift).max() > 0.1  # flips happened and were recorded
    else:
        assert np.all(res.next_bias_shift == 0)
    if sym.has_linear_term:
        assert np.abs(res.linear_terms).max() > 0.1
    else:
        assert np.all(res.linear_terms == 0)
    x1 = np.hstack([x, np.ones((x.shape[0], 1))])
    for n in range(p.n_students):
        kept = res.labels[n * p.width : (n + 1) * p.width] >= 0
        before = _layer_output(p.incoming[n][kept], p.outgoing[n][:, kept], act, x)
        after = _layer_output(res.incoming, res.student_outgoing[n].T, act, x)
        after += res.next_bias_shift[n] + x1 @ res.linear_terms[n].T
        # Tolerance: student n's members differ from the collapsed vectors by its noise sigma_n
        # times ~sqrt(dim), times |a| (<~3, a few neurons) and |[x; 1]| (<~6): 1e3 sigma_n bounds
        # it (<= 1e-2 for the noisiest student); a wrong flip or scale gives O(1) errors.
        np.testing.assert_allclose(after, before, atol=1e3 * p.student_noise[n])
    # The best student's outgoing weights are the reported ones.
    np.testing.assert_array_equal(
        res.outgoing, res.student_outgoing[res.best_student, np.arange(res.k_hat)]
    )


@pytest.mark.parametrize("name", ["tanh", "relu", "g"])
def test_l2_metric_recovers_planted_layer(name):
    p = Planted(name, seed=3)
    res = cluster_layer(p.incoming, p.outgoing, p.losses, name, ClusterConfig(metric="l2"))
    teacher, teacher_out = p.expected(name)
    assert res.k_hat == p.k
    idx = _match(res.incoming, teacher, get_activation(name).symmetry.sign_symmetric)
    np.testing.assert_allclose(res.incoming, teacher[idx], atol=1e-5)
    np.testing.assert_allclose(res.outgoing, teacher_out[idx], atol=1e-5)


def test_iid_noise_needs_gamma_above_half_with_the_max_count_rule():
    """Seed 6 with identical noise in every student: with the paper's max-count cut at gamma = 0.5
    a cluster splits into two halves of >= 5 members (k_hat = 5), at gamma = 0.75 two halves
    cannot both reach 8. The longest-plateau cut (default) is right at gamma = 0.5 too."""
    p = Planted("tanh", seed=6, noise_decades=0.0)
    paper = ClusterConfig(cut_rule="max_count")
    assert cluster_layer(p.incoming, p.outgoing, p.losses, "tanh", paper).k_hat == p.k + 1
    res = cluster_layer(
        p.incoming, p.outgoing, p.losses, "tanh", ClusterConfig(gamma=0.75, cut_rule="max_count")
    )
    assert res.k_hat == p.k
    assert cluster_layer(p.incoming, p.outgoing, p.losses, "tanh").k_hat == p.k


def test_longest_plateau_cut_ignores_junk_clumps():
    """Many spare (junk) neurons per student clump into extra clusters of >= gamma N members just
    below the root: the paper's max-count cut keeps them, the longest-plateau cut does not."""
    p = Planted("tanh", seed=3, k=5, n_junk=15)
    res = cluster_layer(p.incoming, p.outgoing, p.losses, "tanh", ClusterConfig(beta_degrees=90))
    assert res.k_hat == p.k
    z = res.linkage
    longest = cut_tree(z, res.min_size)
    assert longest.plateau_count == p.k
    a, b = longest.plateau
    assert np.log(b / max(a, 1e-15)) > 5  # the true partition persists over many decades


def test_accepts_torch_tensors_and_is_deterministic():
    p = Planted("tanh", seed=4)
    a = cluster_layer(p.incoming, p.outgoing, p.losses, "tanh")
    b = cluster_layer(
        torch.from_numpy(p.incoming),
        torch.from_numpy(p.outgoing),
        torch.from_numpy(p.losses),
        get_activation("tanh"),
    )
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.incoming, b.incoming)
    np.testing.assert_array_equal(a.outgoing, b.outgoing)


# ----------------------------------------------------------------------------------------------
# tree cut


def _brute_force_cut(Z: np.ndarray, min_size: int):
    """Reference-code style: fcluster at every distinct merge height. Returns the count at each
    distinct height, the maximum, the first height reaching it and the next height that drops."""
    heights = np.unique(Z[:, 2])
    counts = np.array(
        [np.sum(np.bincount(fcluster(Z, h, criterion="distance")) >= min_size) for h in heights]
    )
    first = int(np.argmax(counts == counts.max()))
    drops = np.flatnonzero(counts[first:] < counts.max())
    h_b = heights[first + drops[0]] if drops.size else heights[-1]
    return dict(zip(heights.tolist(), counts.tolist())), int(counts.max()), heights[first], h_b


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@functools.cache
def _cut_cases():
    rng = np.random.default_rng(5)
    cases = []
    for m, min_size in [(40, 2), (60, 3), (120, 5), (200, 4)]:
        x = rng.standard_normal((m, 3))
        cases.append((linkage(pdist(x), "average"), min_size))
    # Tied heights: points on an integer grid, L1 distances (many exactly equal merge heights).
    grid = rng.integers(0, 4, size=(80, 2)).astype(float)
    cases.append((linkage(pdist(grid, "cityblock"), "average"), 3))
    # Planted students (their real linkage).
    for name in ("tanh", "relu"):
        p = Planted(name, seed=6, n_junk=3)
        res = cluster_layer(p.incoming, p.outgoing, p.losses, name, ClusterConfig(beta_degrees=90))
        cases.append((res.linkage, res.min_size))
    return cases


@pytest.mark.parametrize("case", range(7))
def test_one_pass_cut_matches_brute_force(case):
    Z, min_size = _cut_cases()[case]
    cut = cut_tree(Z, min_size, rule="max_count")
    count_at, max_count, h_a, h_b = _brute_force_cut(Z, min_size)
    assert cut.max_count == max_count
    assert cut.plateau == (h_a, h_b)
    assert h_a <= cut.cut_height and (cut.cut_height < h_b or cut.cut_height == h_a)
    # counts[i] after the last merge at each height is fcluster's count at that height.
    last_of_height = np.append(Z[1:, 2] != Z[:-1, 2], True)
    for i in np.flatnonzero(last_of_height):
        assert cut.counts[i] == count_at[Z[i, 2]]
    # The labels are fcluster's partition at the cut height, with max_count big clusters.
    ref = fcluster(Z, cut.cut_height, criterion="distance")
    assert _same_partition(cut.labels, ref)
    assert int(np.sum(np.bincount(cut.labels) >= min_size)) == max_count
    assert cut.n_merges_below == int(np.sum(Z[:, 2] <= cut.cut_height))


@pytest.mark.parametrize("seed", range(3))
def test_tight_cluster_count_matches_brute_force(seed):
    """cut_tree(..., max_mean_distance): a cluster counts only if its mean pairwise distance,
    computed here from the distance matrix itself, is within the bound."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((6, 4))
    x = np.vstack(
        [
            centers[rng.integers(6, size=60)] + 0.3 * rng.standard_normal((60, 4)),
            2.0 * rng.standard_normal((40, 4)),
        ]
    )
    dist = squareform(pdist(x))
    Z = linkage(pdist(x), "average")
    min_size, bound = 4, 0.5
    cut = cut_tree(Z, min_size, max_mean_distance=bound, rule="max_count")
    assert cut.max_count < cut_tree(Z, min_size, rule="max_count").max_count  # the bound matters

    def count(labels):
        n = 0
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            if idx.size >= min_size:
                n += dist[np.ix_(idx, idx)].sum() / (idx.size * (idx.size - 1)) <= bound
        return n

    heights = np.unique(Z[:, 2])
    counts = np.array([count(fcluster(Z, h, criterion="distance")) for h in heights])
    assert cut.max_count == counts.max()
    assert cut.plateau[0] == heights[np.argmax(counts == counts.max())]
    assert count(cut.labels) == cut.max_count


def test_cut_uses_beta_ignores_junk_clumps():
    """Random-direction junk that outnumbers the teacher neurons (30 junk, 10 teacher neurons per
    student) forms more clusters of >= gamma * N members than the teacher has neurons: the
    paper's count puts the cut among the junk; counting only clusters within beta does not, nor
    does the default longest-plateau cut."""
    p = Planted("tanh", k=10, fan_in=40, n_junk=30, seed=1)
    paper = cluster_layer(
        p.incoming, p.outgoing, p.losses, "tanh", ClusterConfig(cut_rule="max_count")
    )
    assert paper.k_hat != p.k and paper.plateau[0] > 0.1
    assert cluster_layer(p.incoming, p.outgoing, p.losses, "tanh").k_hat == p.k
    res = cluster_layer(
        p.incoming,
        p.outgoing,
        p.losses,
        "tanh",
        ClusterConfig(cut_uses_beta=True, cut_rule="max_count"),
    )
    assert res.k_hat == p.k
    teacher, teacher_out = p.expected("tanh")
    idx = _match(res.incoming, teacher, absolute=True)
    np.testing.assert_allclose(res.incoming, teacher[idx], atol=1e-5)
    np.testing.assert_allclose(res.outgoing, teacher_out[idx], atol=1e-5)
    assert np.all(res.labels.reshape(p.n_students, p.width)[p.is_junk] == -1)


def test_cut_is_geometric_midpoint_of_first_plateau():
    p = Planted("tanh", seed=7)
    res = cluster_layer(p.incoming, p.outgoing, p.losses, "tanh")
    h_a, h_b = res.plateau
    assert h_a < 1e-9 < 0.1 < h_b  # tight clusters, then a gap to the next drop
    np.testing.assert_allclose(res.cut_height, np.sqrt(max(h_a, 1e-15) * h_b), rtol=1e-12)


def test_cut_tree_rejects_bad_linkage():
    Z = linkage(pdist(np.random.default_rng(0).standard_normal((5, 2))), "average")
    with pytest.raises(ValueError, match="non-decreasing"):
        cut_tree(Z[::-1].copy(), 2)
    with pytest.raises(ValueError, match="linkage"):
        cut_tree(Z[:, :3], 2)


@pytest.mark.parametrize("name", ["g", "sigmoid", "relu"])
def test_native_and_scipy_backends_agree(name):
    p = Planted(name, seed=8, n_junk=3)
    cfg = ClusterConfig(beta_degrees=90)
    native = cluster_layer(p.incoming, p.outgoing, p.losses, name, cfg)
    scipy_ = cluster_layer(
        p.incoming,
        p.outgoing,
        p.losses,
        name,
        ClusterConfig(beta_degrees=90, linkage_backend="reference"),
    )
    np.testing.assert_array_equal(native.labels, scipy_.labels)
    np.testing.assert_allclose(native.incoming, scipy_.incoming, rtol=0, atol=1e-12)
    np.testing.assert_allclose(native.linkage[:, 2], scipy_.linkage[:, 2], rtol=1e-9, atol=1e-14)


# ----------------------------------------------------------------------------------------------
# filters and errors


def test_gamma_times_n_below_two_raises():
    p = Planted("tanh", n_students=3)
    with pytest.raises(ValueError, match=r"gamma \* N = 0.5 \* 3 = 1.5 < 2.*students"):
        cluster_layer(p.incoming, p.outgoing, p.losses, "tanh", ClusterConfig(gamma=0.5))
    assert min_cluster_size(0.5, 4) == 2
    assert min_cluster_size(0.7, 10) == 7  # 0.7 * 10 = 7.000000000000001


def test_small_clusters_dropped_and_reported():
    p = Planted("tanh", seed=9)
    # Teacher neuron 0 is kept by students 0-2 only; the others hold a duplicate of their own
    # copy of teacher neuron 1 instead. gamma = 0.75: the cluster of teacher neuron 0 (3 or 4
    # members) is below ceil(0.75 * 10) = 8.
    unit = p.incoming / np.linalg.norm(p.incoming, axis=2, keepdims=True)
    for n in range(3, p.n_students):
        of_t1 = np.argmax(np.abs(unit[n] @ p.teacher[1]))
        for i in np.flatnonzero(
            np.abs(unit[n] @ p.teacher[0]) > 0.999 * np.linalg.norm(p.teacher[0])
        ):
            p.incoming[n, i] = p.incoming[n, of_t1]
    res = cluster_layer(p.incoming, p.outgoing, p.losses, "tanh", ClusterConfig(gamma=0.75))
    assert res.k_hat == p.k - 1
    small = [d for d in res.dropped if d.reason == "size < gamma*N"]
    assert len(small) == 1
    assert small[0].size in (3, 4) and small[0].students.tolist() == [0, 1, 2]
    assert small[0].median_angle_degrees < 1e-3
    assert res.n_dropped_singletons == p.n_students  # the junk neurons


def test_no_cluster_raises_no_cluster_error():
    p = Planted("tanh", noise=1e-2)
    with pytest.raises(NoClusterError, match="median angle above beta") as info:
        cluster_layer(p.incoming, p.outgoing, p.losses, "tanh", ClusterConfig(beta_degrees=1e-3))
    assert "4 cluster(s) had a median angle" in str(info.value)
    assert "more students" in str(info.value)
    # Pure junk, gamma = 1: nothing is found in every student at a small angle.
    rng = np.random.default_rng(1)
    with pytest.raises(NoClusterError, match="gamma"):
        cluster_layer(
            rng.standard_normal((4, 5, 30)),
            rng.standard_normal((4, 2, 5)),
            np.ones(4),
            "tanh",
            ClusterConfig(gamma=1.0, beta_degrees=30),
        )


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"gamma": 0.0}, "gamma"),
        ({"gamma": 1.5}, "gamma"),
        ({"gamma": float("nan")}, "gamma"),
        ({"gamma": True}, "gamma"),
        ({"beta_degrees": 0.0}, "beta_degrees"),
        ({"beta_degrees": 200.0}, "beta_degrees"),
        ({"beta_degrees": "60"}, "beta_degrees"),
        ({"metric": "euclid"}, "metric"),
        ({"mask_tolerance": -1.0}, "mask_tolerance"),
        ({"mask_tolerance": 1.0}, "mask_tolerance"),
        ({"linkage_backend": "fast"}, "linkage_backend"),
        ({"cut_uses_beta": 1}, "cut_uses_beta"),
        ({"cut_uses_beta": True, "metric": "l2"}, "cut_uses_beta"),
    ],
)
def test_bad_config_raises(kwargs, field):
    with pytest.raises(ValueError, match=field):
        ClusterConfig(**kwargs)
    with pytest.raises(InputError):
        ClusterConfig(**kwargs)


def test_bad_arguments_raise():
    p = Planted("tanh")
    with pytest.raises(ValueError, match="outgoing"):
        cluster_layer(p.incoming, p.outgoing[:, :, :-1], p.losses, "tanh")
    with pytest.raises(ValueError, match="student_losses"):
        cluster_layer(p.incoming, p.outgoing, p.losses[:-1], "tanh")
    bad = p.incoming.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="incoming"):
        cluster_layer(bad, p.outgoing, p.losses, "tanh")
    with pytest.raises(ValueError, match="input_mask"):
        cluster_layer(p.incoming, p.outgoing, p.losses, "tanh", input_mask=np.ones(p.fan_in))
    with pytest.raises(ValueError, match="input_mask"):
        cluster_layer(p.incoming, p.outgoing, p.losses, "tanh", input_mask=np.ones(3, bool))
    with pytest.raises(ValueError, match="activation"):
        cluster_layer(p.incoming, p.outgoing, p.losses, "swish")


# ----------------------------------------------------------------------------------------------
# input mask


@pytest.mark.parametrize("name", ["tanh", "relu", "g"])
def test_masked_garbage_column_does_not_change_clustering(name):
    p = Planted(name, seed=10)
    col = 3
    mask = np.ones(p.fan_in, dtype=bool)
    mask[col] = False
    garbage = p.incoming.copy()
    garbage[:, :, col] = 10.0 * np.random.default_rng(11).standard_normal(garbage.shape[:2])
    clean = cluster_layer(p.incoming, p.outgoing, p.losses, name, input_mask=mask)
    dirty = cluster_layer(garbage, p.outgoing, p.losses, name, input_mask=mask)
    assert dirty.k_hat == p.k
    np.testing.assert_array_equal(dirty.labels, clean.labels)
    keep = np.append(mask, True)
    np.testing.assert_allclose(dirty.incoming[:, keep], clean.incoming[:, keep], atol=1e-12)
    np.testing.assert_allclose(dirty.outgoing, clean.outgoing, atol=1e-12)
    np.testing.assert_array_equal(dirty.input_mask, mask)
    # The masked coordinate is carried along (the best student's value, scaled and flipped).
    assert np.all(np.abs(dirty.incoming[:, col]) > 0)
    # Without the mask the garbage dominates the distances.
    try:
        unmasked = cluster_layer(garbage, p.outgoing, p.losses, name)
    except NoClusterError:
        return
    assert not np.array_equal(unmasked.labels, clean.labels)


def test_input_mask_from_queries():
    rng = np.random.default_rng(12)
    X = rng.standard_normal((200, 6))
    X[:, 2] = 3.0  # constant
    X[:, 4] = 1.0 + 1e-9 * rng.standard_normal(200)  # variance 1e-18 of a max ~1: masked
    mask = input_mask_from_queries(X, tolerance=ClusterConfig().mask_tolerance)
    assert mask.dtype == np.bool_
    np.testing.assert_array_equal(mask, [True, True, False, True, False, True])
    np.testing.assert_array_equal(
        input_mask_from_queries(torch.from_numpy(X), 0.0),
        mask | [False, False, False, False, True, False],
    )
    with pytest.raises(InputError, match="no input varies"):
        input_mask_from_queries(np.ones((10, 3)))
    with pytest.raises(ValueError, match="X"):
        input_mask_from_queries(np.ones(10))


def test_larger_layer():
    """2,000 vectors, half of them junk (50 students of width 40 for a teacher of width 20)."""
    p = Planted("tanh", k=20, fan_in=30, n_students=50, n_junk=19, seed=13)
    res = cluster_layer(p.incoming, p.outgoing, p.losses, "tanh")
    assert res.k_hat == 20
    assert np.all(res.labels.reshape(p.n_students, p.width)[p.is_junk] == -1)


def _tree_with_tight_and_loose_clusters(n_tight: int, n_loose: int, size: int) -> np.ndarray:
    """A UPGMA tree of points on a line: ``n_tight`` groups of ``size`` points spread 1e-11, then
    ``n_loose`` groups spread 1e-3, groups 10 apart."""
    rng = np.random.default_rng(0)
    pts = []
    for g in range(n_tight + n_loose):
        spread = 1e-11 if g < n_tight else 1e-3
        pts.append(10.0 * g + spread * rng.random(size))
    x = np.concatenate(pts)[:, None]
    return linkage(x, method="average")


def test_persistent_max_cut_prefers_the_complete_partition():
    # 4 tight clusters persist from ~1e-11 to ~1e-3 (8 decades), the 10 complete ones from ~1e-3
    # to 10 (4 decades, at least half as long): longest_plateau stops at 4, persistent_max
    # takes 10.
    Z = _tree_with_tight_and_loose_clusters(4, 6, 12)
    assert cut_tree(Z, 10, rule="longest_plateau").plateau_count == 4
    cut = cut_tree(Z, 10, rule="persistent_max")
    assert cut.plateau_count == 10
    assert int(np.sum(np.bincount(cut.labels) >= 10)) == 10
    # a plateau much shorter than the longest never wins, however many clusters it has
    junk = _tree_with_tight_and_loose_clusters(0, 3, 12)
    assert cut_tree(junk, 10, rule="persistent_max").plateau_count == 3


def test_persistent_max_cut_ignores_junk_clumps():
    p = Planted("tanh", seed=3, k=5, n_junk=15)
    cfg = ClusterConfig(beta_degrees=90, cut_rule="persistent_max")
    assert cluster_layer(p.incoming, p.outgoing, p.losses, "tanh", cfg).k_hat == p.k
