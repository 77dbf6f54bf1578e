"""Interventions: change a model by editing a few heads, through the probe's edits.

``act``: ACT attention calibration (Yu et al. 2024).
``var``: VAR attention redistribution towards a named token group (Kang et al. 2025).
"""
