"""AI-specific monitors on the request path: detectors, their calibration, and the guard stages."""
