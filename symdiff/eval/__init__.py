"""Evaluation of generated molecules: EDM metrics, the revised GEOM-Drugs protocol, reports."""
