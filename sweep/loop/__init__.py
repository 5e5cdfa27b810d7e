"""The study loop: the budget, reconciliation, creating or resuming a study, one trial, the
seats of a pack, where a pack's time went, the worker loop, the confirmation plan. Talks to
MLflow only through ``sweep.record``; imports nothing eagerly (callers that must stay free of
torch import the modules they need)."""
