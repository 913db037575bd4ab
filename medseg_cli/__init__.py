"""medseg: segment medical scans with attention and multi-scale networks.

The command line (``medseg``) is a thin shell over this library; everything it does can be
called from Python too, e.g. ``from medseg_cli.imaging import read_image``.
"""

__version__ = "0.1.0"
