"""Scheduling: the dependency DAG, the eager executor and hedged requests."""
