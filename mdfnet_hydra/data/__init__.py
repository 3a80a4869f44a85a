"""Prepared-dataset format, the synthetic generator, preprocessing and the torch Dataset."""
