"""The CNI side of flock: the plugin a container runtime executes, and its installer.

This package must stay import-light: `plugin.py` is run as a plain script on
every pod start (with `python -I -S`, outside this package), so nothing here
may import pyroute2, pydantic or the rest of flock.
"""
