"""Batch stages of slimray (prepare, finetune, evaluate, predict) and what every later stage loads:
the task registry, the model/tokenizer loader and the artifact helpers.

May import from `cluster/` only.
"""
