"""metrics/predictions.csv: written and read back with pandas, probabilities bit for bit."""
import numpy as np
import pandas as pd
from hypothesis import given, settings
from hypothesis import strategies as st

from pneumonia import evaluate

# Values whose shortest decimal form is long, or which sit at the edges of float64.
SPECIAL = [0.1, 1 / 3, 2 / 3, 1e-300, 5e-324, 0.9999999999999999, 0.0, 1.0, 0.5, np.nextafter(0.5, 0), np.nextafter(0.5, 1)]


def _round_trip(path, val, test):
    labels = {"val": np.arange(len(val)) % 2, "test": np.arange(len(test)) % 2}
    raw = {"val": val[::-1].copy(), "test": test[::-1].copy()}
    evaluate.write_predictions(path, labels, raw, {"val": val, "test": test})
    for split, calibrated in (("val", val), ("test", test)):
        y, p = evaluate.read_predictions(path, split)
        assert y.tolist() == labels[split].tolist()
        assert p.dtype == np.float64 and p.tolist() == calibrated.tolist()  # exact, not approximately
    written = pd.read_csv(path, float_precision="round_trip")
    assert written["probability"].tolist() == [*raw["val"], *raw["test"]]


def test_predictions_csv_keeps_columns_and_probabilities_exactly(tmp_path):
    rng = np.random.default_rng(0)
    val = np.concatenate([SPECIAL, rng.random(500)])
    test = np.concatenate([rng.random(1000) ** 20, SPECIAL])  # many small values too
    path = tmp_path / "predictions.csv"
    _round_trip(path, val, test)
    lines = path.read_text().splitlines()
    assert lines[0] == "split,index,label,probability,calibrated_probability" and len(lines) == 1 + len(val) + len(test)
    # Python's shortest exact form, as the file had before pandas wrote it.
    assert lines[1] == f"val,0,0,{float(val[-1])!r},0.1"
    assert lines[1 + len(val)] == f"test,0,0,0.5000000000000001,{float(test[0])!r}"


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(0, 1), min_size=1, max_size=50), st.lists(st.floats(0, 1), min_size=1, max_size=50))
def test_any_probabilities_survive_the_round_trip(tmp_path_factory, val, test):
    _round_trip(tmp_path_factory.mktemp("p") / "predictions.csv", np.array(val), np.array(test))


def test_a_broken_predictions_csv_is_one_clear_error(tmp_path):
    import pytest

    from pneumonia.errors import PipelineError

    path = tmp_path / "predictions.csv"
    for text in ("", "split,index\nval,0\n", "split,index,label,probability,calibrated_probability\ntest,0,1,0.5,oops\n",
                 "split,index,label,probability,calibrated_probability\ntest,0,7,0.5,0.5\n", '"unclosed\n'):
        path.write_text(text)
        with pytest.raises(PipelineError, match="rerun dvc repro evaluate"):
            evaluate.read_predictions(path, "test")
    with pytest.raises(PipelineError, match="cannot read"):
        evaluate.read_predictions(tmp_path / "missing.csv", "test")
