"""STAND-IN for timm.models (see ../../README.md)."""
