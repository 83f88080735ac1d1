"""A run's event payloads stay strict JSON (a NaN loss's alert must not stop the session log)."""

import json
import math

from training.run_files import finite


def test_non_finite_numbers_become_null():
    doc = {"value": math.nan, "threshold": math.inf, "ok": 1.5, "nested": [{"x": -math.inf}, 2, "nan"]}
    out = finite(doc)
    assert out == {"value": None, "threshold": None, "ok": 1.5, "nested": [{"x": None}, 2, "nan"]}
    json.dumps(out, allow_nan=False)  # strict JSON now
