"""MIMIC-CXR-JPG + MIMIC-IV-ED -> the prepared-dataset format (`python -m mdfnet_hydra.prepare`)."""
