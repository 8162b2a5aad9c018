"""The capture side's machinery, shared by every quantity: the ``Quantity`` protocol and its state
declarations, the one reducer, the flush clock, DDP handling, run.json, and argument checks. It imports
torch; it never imports the reading side's file reader (``gatewatch.run_reader``), the CLI, the dashboard or
the figures."""
