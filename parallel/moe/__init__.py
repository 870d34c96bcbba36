"""The Mixture-of-Experts layer: router, experts, dispatch."""
