"""The serving load test in small, so that it cannot rot: every answer must come back and be right.
(No figure from it is worth reading; the real run is `benchmarks/load_test.py`, see its docstring.)"""

import pytest

# Each of these starts Ray on this machine: one such module at a time, in one worker.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("ray")]

pytest.importorskip("ray.serve")


def test_the_load_test_gets_every_answer_right_on_a_small_model(tmp_path):
    import json

    import load_test

    out = tmp_path / "serving.json"
    assert load_test.main(["--model", "resnet18", "--input-size", "32", "--clients", "4", "--requests", "8",
                           "--max-batch-size", "4", "--time-limit", "120", "-o", str(out)]) == 0
    run = json.loads(out.read_text())["runs"][0]
    assert run["requests"] == 8 and run["errors"] == 0 and run["wrong"] == 0


@pytest.mark.xdist_group("kserve")  # no Ray: a KServe server process of its own
def test_the_load_test_gets_every_answer_right_from_the_kserve_server(tmp_path):
    import json

    import importlib.util

    if importlib.util.find_spec("kserve") is None:  # the server runs in its own process
        pytest.skip("kserve is not installed (the kserve extra)")
    import load_test

    out = tmp_path / "serving.json"
    assert load_test.main(["--server", "kserve", "--model", "resnet18", "--input-size", "32", "--clients", "4",
                           "--requests", "8", "--max-batch-size", "4", "--time-limit", "120", "-o", str(out)]) == 0
    run = json.loads(out.read_text())["runs"][0]
    assert run["server"] == "kserve" and run["requests"] == 8 and run["errors"] == 0 and run["wrong"] == 0
