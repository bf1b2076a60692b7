"""The data layer: Kermany layouts, label sets, the Parquet manifest, image decoding, Ray Data loaders."""
