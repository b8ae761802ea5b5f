"""Shared by every stage: the params.yaml schema (config), where each stage writes (paths), atomic writes, image I/O,
file hashing, the face_pairs manifest reader and the image metrics. Imports nothing else from fxassets."""
