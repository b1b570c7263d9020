"""Built-in plugins of t2i-harness, installed as the ``harness_plugins`` package.

Each module is an ordinary plugin (it implements hooks from :mod:`harness.hookspecs`) and is
listed in :data:`harness.plugins.BUILTIN_PLUGINS`.
"""
