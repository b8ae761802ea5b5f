"""The face_pairs stage (stage.py): aligned source/target crops, the quality measures per pair (quality.py, with the
skin-tone groups) and the great-expectations gate over the set (gate.py)."""
