"""Profilers the agent can run, behind one small interface (see base.Profiler)."""
