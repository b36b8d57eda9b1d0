"""Files in and out, shared by every layer: strict image / disparity readers and writers (``images``),
atomic writes and output-folder checks (``atomic``), torch-free streaming safetensors (``safetensors_io``).
Imports nothing of the package but ``errors``."""
