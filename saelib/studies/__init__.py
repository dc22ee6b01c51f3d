"""Analyses that combine SAEs with their subject models.

``splice`` (an SAE spliced into the model: CE-loss increase, downstream errors), ``matching``
(which feature of one SAE is which of another), ``scaling`` (studies against training length and
dictionary size) and ``patch_analysis`` (PatchSAE statistics of chapter 5).
"""
