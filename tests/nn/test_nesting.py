import pytest

from mrl import MRLError, default_nesting, validate_nesting


def test_default_nesting():
    assert default_nesting(2048) == [8, 16, 32, 64, 128, 256, 512, 1024, 2048]
    assert default_nesting(96, min_size=1) == [1, 2, 4, 8, 16, 32, 64, 96]
    assert default_nesting(4, min_size=8) == [4]


@pytest.mark.parametrize(
    ("nesting", "match"),
    [
        ([4, 2, 8], "strictly increasing"),
        ([2, 2], "strictly increasing"),
        ([0, 4], "below 1"),
        ([], "non-empty"),
        ([1.5, 4], "positive integers"),
        (["a"], "positive integers"),
        ([8, 64], "only 32 features"),
    ],
)
def test_invalid_nesting_is_explained(nesting, match):
    with pytest.raises(MRLError, match=match):
        validate_nesting(nesting, 32)


def test_valid_nesting():
    assert validate_nesting([1, 3, 32], 32) == [1, 3, 32]
