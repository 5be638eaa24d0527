"""vggdist-preprocess: ImageNet → WebDataset shards + exact mean-RGB / RGB-covariance stats."""
