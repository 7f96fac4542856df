"""Shared test helpers: the tiny-model factory (:mod:`.models`), the multi-process harness
(:mod:`.harness`) and the per-rank worker functions it runs (:mod:`.workers`).

Test modules import from here, never from one another.
"""
