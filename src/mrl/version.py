"""The package version, in one place (mrl.__version__ and the model exports read it)."""

__version__ = "0.1.0"
