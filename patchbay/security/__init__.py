"""Security: verifying inbound webhook requests and keeping credentials encrypted at rest."""
