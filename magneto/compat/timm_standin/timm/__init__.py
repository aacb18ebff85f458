"""STAND-IN for timm: provides only ``timm.models.layers.drop_path`` (see ../README.md)."""

STANDIN = True
