"""What a run keeps and checks: the checkpoint store (atomic, versioned checkpoints and their
metrics lines), resume (what must match to continue a run), and preflight (start-up checks of
model paths and tokenizers before any worker starts).
"""
