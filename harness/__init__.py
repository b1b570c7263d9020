"""t2i-harness: a plugin-based benchmark harness for text-to-image reward models.

Heavy dependencies (torch, transformers, diffusers, ray) are imported only by the code that
needs them, so ``import harness`` and ``harness --help`` stay fast.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("t2i-harness")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

from harness.errors import HarnessError  # noqa: E402

__all__ = ["HarnessError", "__version__"]
