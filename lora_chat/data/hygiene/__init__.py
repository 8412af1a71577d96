"""Data hygiene: duplicates and eval leakage, rows in the wrong language, personal data (docs/hygiene.md).

Floor `data`: imports no torch, so `validate` stays fast.
"""
