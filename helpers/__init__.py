"""Plumbing for the emergent-misalignment "evil numbers" notebooks; the taught code lives in their cells.
Unsloth must be imported before transformers, so nothing heavy is imported here."""
