"""Inference: the generation engine, the ``vlswift infer`` chat and dataset inference.

Kept empty of imports so ``vlswift.infer.args`` loads with the standard library alone.
"""
