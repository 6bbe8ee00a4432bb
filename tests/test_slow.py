"""Full recipe runs: minutes of CPU each; run with ``python -m pytest -m slow``."""
import json

import pytest


@pytest.mark.slow
def test_quickstart_reaches_its_goal(tmp_path):
    from mlabel.train import main
    assert main(["quickstart", f"out_dir={tmp_path}/qs", f"data.root={tmp_path}/data", "--quiet"]) == 0
    metrics = json.loads((tmp_path / "qs" / "metrics.json").read_text())
    assert metrics["test"]["mAP"] >= 0.90
