"""Exit statuses of every ``gatewatch`` subcommand (no imports: the command modules share them without
importing :mod:`gatewatch.cli`)."""

EXIT_OK = 0  # done; for ``report``: no error-level finding
EXIT_FINDINGS = 1  # ``report``: an error-level finding; ``ablate``: the job was stopped
EXIT_BAD_INPUT = 2  # unreadable run, bad option values, or input the command cannot use

__all__ = ["EXIT_BAD_INPUT", "EXIT_FINDINGS", "EXIT_OK"]
