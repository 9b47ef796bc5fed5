"""The Gradio studio (``python -m jointdit.ui``): app.py (Blocks), backend.py (the sampler adapter),
catalog.py (model picker), uploads.py (upload checks). Needs the ``[ui]`` extra (gradio)."""
