"""python -m mrl.data.generate: its --help says what it makes and what each option means."""

from __future__ import annotations

import pytest

from mrl.data.generate import main


def test_help_is_whole_and_explains_every_option(capsys):
    """The description was the docstring's first line, cut off mid-sentence ("... workflow on a")."""
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps to the terminal's width
    assert "trying the shard workflow on a machine without the real data" in text, text
    for option in (
        "--classes",
        "--train",
        "--val",
        "--width",
        "--height",
        "--quality",
        "--workers",
        "--seed",
    ):
        assert option in text, (option, text)
    assert "number of classes" in text and "images are written" in text, text
