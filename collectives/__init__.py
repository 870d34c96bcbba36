"""Transports and the sparse collectives: how bytes move. Knows nothing about experts."""
