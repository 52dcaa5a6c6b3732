"""The pictures `mmret eval` draws for people to look at: `draw` (matplotlib's file backend: a
confusion matrix, a 2-D map, a gallery of failed queries), `maps` (a run's item and caption
embeddings projected to 2-D) and `failures` (the text queries a run gets most wrong).
This face holds only the projections `--map-method` accepts, so checking the option stays cheap."""

MAP_METHODS = ("umap", "tsne")
