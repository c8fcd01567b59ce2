"""`classes=` and `k=` forms, read in one place (fastattr.targets)."""

import pytest
import torch

import fastattr
from fastattr.targets import resolve

CPU = torch.device("cpu")


def test_no_classes_and_no_k_means_top1_of_each_image():
    t = resolve(None, None, n=3, num_classes=10, device=CPU)
    assert t.classes is None and t.k == 1


def test_k_alone_means_top_k_of_each_image():
    t = resolve(None, 4, n=3, num_classes=10, device=CPU)
    assert t.classes is None and t.k == 4


def test_an_int_is_one_class_for_every_image():
    assert resolve(7, None, n=3, num_classes=10, device=CPU).classes.tolist() == [[7], [7], [7]]


def test_a_list_is_shared_by_the_batch():
    assert resolve([2, 9], None, n=2, num_classes=10, device=CPU).classes.tolist() == [[2, 9], [2, 9]]


def test_a_1d_tensor_gives_one_class_per_image():
    assert resolve(torch.tensor([4, 5, 6]), None, n=3, num_classes=10, device=CPU).classes.tolist() == [[4], [5], [6]]


def test_a_2d_tensor_gives_k_classes_per_image():
    t = resolve(torch.tensor([[1, 2], [3, 4]]), None, n=2, num_classes=10, device=CPU)
    assert t.classes.tolist() == [[1, 2], [3, 4]] and t.k == 2 and t.classes.dtype == torch.long


def test_a_0d_tensor_is_like_an_int():
    assert resolve(torch.tensor(3), None, n=2, num_classes=10, device=CPU).classes.tolist() == [[3], [3]]


@pytest.mark.parametrize("classes,k,message", [
    (10, None, r"classes: index 10 out of range for a model with 10 outputs \(valid 0..9\)"),
    (-1, None, r"index -1 out of range"),
    ([1, 12], None, r"index 12 out of range"),
    (torch.tensor([[1, 2], [3, 40], [5, 6]]), None, r"index 40 out of range"),
    (None, 11, r"k: must be an int in 1..10 \(the model has 10 outputs\), got 11"),
    (None, 0, r"k: must be an int in 1..10"),
    (torch.tensor([1, 2]), None, r"needs 3 entries for 3 images, got 2"),
    (torch.tensor([[1], [2]]), None, r"must be \[N=3, K>=1\], got \[2, 1\]"),
    (torch.tensor([1.0, 2.0, 3.0]), None, r"must be an integer tensor, got dtype torch.float32"),
    (torch.zeros(3, 1, 1, dtype=torch.long), None, r"expected a tensor \[N\] or \[N, K\]"),
    ([], None, r"a list must hold at least one int"),
    ("cat", None, r"expected None, an int, a list of ints or an integer tensor, got str"),
    ([1], 2, r"got both"),
])
def test_bad_targets_raise_a_clear_error(classes, k, message):
    with pytest.raises(fastattr.TargetError, match=message):
        resolve(classes, k, n=3, num_classes=10, device=CPU)
