"""The version of mmret, here so that modules inside the package never import the package face
(`mmret/__init__.py` names the Python API, which stands above them)."""

__version__ = "0.1.0"
