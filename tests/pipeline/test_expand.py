"""The expansion search: it qualifies the smallest width whose quick students fit, and when
none does it takes the best width it saw, never the cap."""

import numpy as np
import torch

from expand_and_cluster.config import ExpansionSearchConfig, TrainConfig
from expand_and_cluster.pipeline.expand import _late_gain, expansion_search
from expand_and_cluster.teachers import planted_teacher, probe

TRAIN = TrainConfig(batch_size=128, progress=False, handover_window=None)


def _queries(activation="tanh", width=3, seed=3):
    t = planted_teacher(3, [width], 1, activation, seed=seed, min_angle_degrees=30)
    x, y = probe(t, 600, "gaussian", seed=seed)
    return torch.as_tensor(x), torch.as_tensor(y)


def test_search_qualifies_a_small_width_near_the_teacher():
    x, y = _queries()
    search = ExpansionSearchConfig(
        start_width=2, n_students=4, epochs=150, polish_iterations=300, target_relative_mse=1e-6
    )
    width, record = expansion_search(x, y, "tanh", 1, search, TRAIN)
    assert record["reason"] == "qualified"
    assert 3 <= record["found_width"] <= 5  # the teacher has 3 neurons
    assert width == record["student_width"] == 2 * record["found_width"]
    last = record["tried"][-1]
    assert last["width"] == record["found_width"] and last["fraction_reached"] >= 0.5
    assert last["decision"].startswith("qualifies")
    # Every width below it failed the target with most of its quick students.
    assert all(t["fraction_reached"] < 0.5 for t in record["tried"][:-1])


def test_search_without_a_qualifying_width_takes_the_best_one_not_the_cap():
    x, y = _queries()
    # An unreachable target: no width qualifies.
    search = ExpansionSearchConfig(
        start_width=1, growth=2.0, max_width=64, n_students=2, epochs=40, polish_iterations=30,
        target_relative_mse=1e-300, extensions=0,
    )  # fmt: skip
    width, record = expansion_search(x, y, "tanh", 1, search, TRAIN)
    tried = record["tried"]
    scores = np.log10([t["median_relative_mse"] for t in tried])
    near = [t["width"] for t, s in zip(tried, scores) if s <= scores.min() + 0.1]
    assert record["found_width"] == min(near) and width == 2 * min(near)
    assert "within 0.1 decades of the best" in record["reason"]
    assert all(t["fraction_reached"] == 0.0 for t in tried)
    # It stopped when wider students stopped helping (or at the cap): never past the cap.
    assert max(t["width"] for t in tried) <= search.max_width


def test_late_gain_reads_the_last_third_of_the_history():
    history = {
        "epoch": [1, 30, 60, 90],
        "relative_mse": [[1.0, 1.0], [1e-1, 1e-1], [1e-2, 1e-2], [1e-4, 1e-4]],
    }
    # The last third starts at epoch 60: 1e-2 -> 1e-4 is 2 decades.
    assert _late_gain(history) == 2.0
    assert _late_gain({"epoch": [1], "relative_mse": [[1.0]]}) == 0.0
