"""SmooSeg: smoothness prior for unsupervised semantic segmentation."""

__version__ = "0.1.0"
