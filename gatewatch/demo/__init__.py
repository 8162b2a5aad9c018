"""The demo: ``gatewatch demo`` trains models live while the dashboard shows them. It sits above both the
training loop and the dashboard, and only the command line imports it."""
