"""``python -m reckoning_ray.tune report``: pictures of a finished sweep from its files alone.
(The report every real sweep writes at its end is checked in tests/test_tune.py; one in an object
store in tests/test_storage.py.)"""

import base64
import re

from PIL import Image
from sweep_files import TRIALS, write_sweep

from reckoning_ray.on_ray.report import PICTURES, rungs, sweep_data
from reckoning_ray.tune import main as tune_main


def test_report_draws_the_curves_the_keys_and_the_test_accuracy(tmp_path, capsys):
    root = write_sweep(tmp_path / "sweep")
    assert tune_main(["report", str(root)]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith(f"report: {root / 'report' / 'report.html'}") and all(p in last for p in PICTURES)
    for name in PICTURES:
        with Image.open(root / "report" / name) as image:
            assert image.format == "PNG" and image.size[0] >= 500
    page = (root / "report" / "report.html").read_text()
    # self-contained: every picture inlined, the same bytes as the files, nothing fetched
    inlined = re.findall(r"src='data:image/png;base64,([^']+)'", page)
    assert [base64.b64decode(i) for i in inlined] == [(root / "report" / n).read_bytes() for n in PICTURES]
    assert "src='http" not in page and "<script" not in page and "<link" not in page
    assert "t2" in page and "val/answer_loss" in page


def test_what_the_pictures_show_comes_from_the_sweeps_files(tmp_path):
    root = write_sweep(tmp_path / "sweep")
    data = sweep_data(root)
    assert data["rungs"] == [1, 2, 4] and data["metric"] == "val/answer_loss" and data["mode"] == "min"
    assert data["keys"] == ["inner.steps", "inner.lr_init"]
    # the rounds Tune judged: a stopped trial's one more validation in its workers is left out
    assert {t: [v for _, v in c] for t, c in data["curves"].items()} == {t[0]: t[5] for t in TRIALS}
    # without asha_state.json: the milestones ASHA's settings give
    other = write_sweep(tmp_path / "other", asha_rungs=False)
    assert rungs(other, sweep_data(other)["tune"]) == [1, 2, 4]
    assert rungs(other, {"scheduler": "asha", "grace_period": 2, "reduction_factor": 3, "max_rounds": 12}) == [2, 6]
    assert rungs(other, {"scheduler": "curve"}) == []


def test_a_directory_that_is_not_a_finished_sweep_is_one_line(tmp_path, capsys):
    assert tune_main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "sweep_summary.json" in err and len(err.strip().splitlines()) == 1
