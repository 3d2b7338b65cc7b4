"""The hub's HTTP side: webhook endpoints, health, metrics, the demo inbox (and later the API/console)."""
