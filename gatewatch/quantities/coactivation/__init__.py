"""Co-activation of the experts of each sparse router: how often two experts are chosen by the same token."""
