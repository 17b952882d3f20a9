"""Commands: click commands of each product area, registered by ``gateway.cli``."""
