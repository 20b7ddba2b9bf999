"""Agents: the request/response types, the simulated agent and the HTTP LLM agents."""
