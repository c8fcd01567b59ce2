import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
# benchmarks/load_test.py starts and stops a KServe server process the way tests/test_kserve.py needs one too.
sys.path.insert(1, str(Path(__file__).parents[1] / "benchmarks"))


@pytest.fixture(scope="session")
def weights(tmp_path_factory) -> str:
    """A state-dict file of torchvision's resnet18 with random weights (seed 0): what the front ends load by name
    and file, as a user's own weights would be."""
    import torch
    import torchvision

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pt"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return str(path)
