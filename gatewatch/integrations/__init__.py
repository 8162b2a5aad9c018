"""Training-loop integrations: PyTorch Lightning (:mod:`.lightning`) and the Hugging Face Trainer
(:mod:`.huggingface`). Each module imports its framework only when it is itself imported, so
``gatewatch`` works without either installed.

Both follow one convention for per-task losses (see :mod:`._common`): the training step (Lightning)
or the model's ``forward`` (Hugging Face) returns a dict with ``"loss"`` (what the framework
backpropagates) and ``"task_losses"`` (``{task: scalar tensor}``), or sets ``self.task_losses``.
"""
