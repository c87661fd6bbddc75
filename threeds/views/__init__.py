"""What the app and exports show: token heatmaps, the embedding map, export formats."""
