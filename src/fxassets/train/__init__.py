"""The student_checkpoint stage: the student model (student.py), the training loop (loop.py), its losses, the
augmentation (augment.py, occluders.py) and the resumable training state (state.py)."""
