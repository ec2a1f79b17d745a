"""Bad input gets one clear paragraph, a non-zero exit and no traceback."""

import pytest

from conftest import TINY

pytestmark = pytest.mark.slow

CASES = [
    (["backbone.name=resnet5O"], ["Unknown backbone 'resnet5O'", "Did you mean", "resnet50"]),
    (["head.nesting=[8,4,16]"], ["strictly increasing"]),
    (["head.nesting=[8,1024]"], ["goes up to 1024", "backbone.embed_dim"]),
    (["data.data_dir=/nonexistent/fmnist"], ["Fashion-MNIST not found", "data.download=true"]),
    (["head=transformer"], ["head", "Available options", "mrl_e"]),
    (["head.weights=[1,2]", "head.nesting=[4,8,16]"], ["one relative importance weight per size"]),
]


@pytest.mark.parametrize(("overrides", "expected"), CASES, ids=[c[0][-1].split("=")[0] for c in CASES])
def test_bad_input_is_explained(run_cli, overrides, expected):
    data = ["data=fashion_mnist"] if overrides[0].startswith("data.") else TINY
    result = run_cli("mrl-train", *data, "logger=none", *overrides)
    assert result.returncode != 0
    assert "Traceback" not in result.output
    for text in expected:
        assert text in result.output, result.output
    assert not list((result.log_dir / "train" / "runs").glob("*/results.json"))
