"""Numbers about predictions: classification metrics with intervals, calibration, operating points, paired
comparison, drift tests. NumPy and SciPy only, no model.
"""
