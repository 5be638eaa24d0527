"""vggdist: the VGG study (Simonyan & Zisserman, 2015) on Ray Train + MLflow."""

__version__ = "0.1.0"
