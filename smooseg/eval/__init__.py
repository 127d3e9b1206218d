"""Evaluation: metrics, the evaluation loop and its reports, segmentation, and the torch dense CRF."""
