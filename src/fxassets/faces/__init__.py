"""Faces: detection (MediaPipe BlazeFace, detect.py), alignment to the canonical crop (align.py) and compositing back
(composite.py). Serves face_pairs, the occluder template of student_checkpoint, and the runtime."""
