"""The embedded default job (`mrl-train`, no arguments) meets its accuracy bar and shows the curve."""

import pytest

from support import read_results

pytestmark = pytest.mark.slow


def test_default_job_reaches_91_percent_and_shows_where_accuracy_falls(run_cli):
    result = run_cli("mrl-train", timeout=900)
    assert result.returncode == 0, result.output[-3000:]
    (job,) = result.run_dirs()
    results = read_results(job)
    sizes = sorted(int(k.split("@")[1]) for k in results if k.startswith("test/acc@"))
    assert sizes[0] == 1 and sizes[-1] == 256
    assert results["test/acc@256"] >= 0.91
    # The nesting goes low enough to see accuracy fall off.
    assert results["test/acc@1"] < results["test/acc@256"] - 0.2
    assert (job / "acc_vs_size.png").is_file()
