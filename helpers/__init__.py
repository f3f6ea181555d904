"""Helpers for the emergent-misalignment "evil numbers" notebook series.

Modules follow the pipeline, lower floors never importing upper ones:
ground  config, download, store, metrics, text
middle  data, questions, model, plots, widgets, run
top     training, generation, judging
Unsloth must be imported before transformers, so nothing heavy is imported here.
"""
