"""vggdist-preprocess: ImageNet → WebDataset shards + exact mean-RGB / RGB-covariance stats (DESIGN.md §3–§4)."""
