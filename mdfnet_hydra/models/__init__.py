"""Encoders (vision, text, clinical), fusion, head and the assembled MDF-Net."""
