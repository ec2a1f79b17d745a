"""W&B dashboards as code (``wandb-workspaces``, the ``dashboards`` extra).

- :mod:`.workspace`: the project's saved view (``mrl-dashboard --project <p>``);
- :mod:`.report` and :mod:`.sweep`: a sweep's report (``mrl-report <sweep dir> --wandb-report``);
- :mod:`.keys`: the keys the runs really logged, read from the runs (panels name nothing else);
- :mod:`.curves`: the size-curve runs the report's accuracy-vs-size charts aggregate;
- :mod:`.spec`: save online, or write the spec file offline (and read it back).

``wandb_workspaces`` is imported by those modules only, so the rest of mrl works without it.
"""

from __future__ import annotations

from mrl.errors import MRLError


def require_workspaces() -> None:
    """Fail with the install command when ``wandb-workspaces`` is missing."""
    try:
        import wandb_workspaces  # noqa: F401
    except ImportError:
        raise MRLError(
            "W&B dashboards need the `wandb-workspaces` package: pip install 'mrl[dashboards]' "
            "(or pip install wandb-workspaces)."
        ) from None
